"""The learner on Apache Kafka: each labelled example is learned exactly once across kill -9s."""

from __future__ import annotations

import random
import uuid

import orjson
import pytest
import redis

from services.cli.datasets import examples
from services.cli.reproduce import reproduce
from services.cli.stack import Stack
from services.runtime.registry import ModelRegistry, Signer
from services.runtime.river_models import build_pipeline
from services.runtime.spec import load_spec, resolve_spec_path
from tests.conftest import SIGNING_KEY, wait_until
from tests.kafka_helpers import produce_all, read_topic, scrape, values

pytestmark = pytest.mark.kafka


def _examples_seen(stack: Stack) -> int:
    announcements = values(read_topic(stack.bootstrap, stack.topics.name("models")))
    return announcements[-1]["examples_seen"] if announcements else 0


def test_kill_9_during_learning_learns_each_label_exactly_once(kafka_broker, redis_server, prefix, tmp_path):
    # checkpoints every 50 examples: each kill falls after one, which holds the full join buffer, so
    # the restarted learner learns in label order like the reference (a learner killed before its
    # first checkpoint starts over and may join features and labels in another order)
    spec_path = tmp_path / "phishing.yaml"
    text = resolve_spec_path("phishing").read_text()
    assert text.count("checkpoint_every: 50000") == 1
    spec_path.write_text(text.replace("checkpoint_every: 50000", "checkpoint_every: 50"))
    spec = load_spec(str(spec_path))
    namespace = prefix.rstrip(".")
    stack = Stack(tmp_path / "state", broker=kafka_broker.bootstrap, redis=redis_server.url, topic_prefix=prefix,
                  spec=str(spec_path), partitions=1, extra_env={"STREAMLEARN_REDIS_NAMESPACE": namespace,
                                           "STREAMLEARN_MODEL_SIGNING_KEY": SIGNING_KEY,
                                           "STREAMLEARN_BATCH_SIZE": "50", "STREAMLEARN_LEASE_TTL_S": "3"})
    data = list(examples("phishing", run_id=uuid.uuid4().hex[:6]))
    rng = random.Random(7)
    stack.start_servers()
    try:
        stack.start_service("ingestion")
        stack.start_service("learner")
        stack.wait_ready(90, names=("ingestion", "learner"))
        produce_all(stack.bootstrap, stack.topics.name("events"),
                    [(e.event["entity_id"].encode(), orjson.dumps(e.event)) for e in data])
        # every feature vector waits in the join buffer before any label arrives: the learning order
        # is then the label order, so an uninterrupted reference can be trained in-process
        wait_until(lambda: scrape(stack.services["learner"].metrics_url, "streamlearn_learner_join_pending")
                   == [1250.0], 90, "the learner to hold 1,250 feature vectors")
        labels = data[:]
        rng.shuffle(labels)
        produce_all(stack.bootstrap, stack.topics.name("labels"),
                    [(e.label["entity_id"].encode(), orjson.dumps(e.label)) for e in labels])
        kills = 0
        for target in sorted(rng.sample(range(100, 1100), 3)):
            wait_until(lambda t=target: _examples_seen(stack) >= t, 90, f"{target} examples learned")
            stack.kill_service("learner")
            kills += 1
            stack.start_service("learner")
        wait_until(lambda: _examples_seen(stack) >= 1250, 120, "all 1,250 examples learned")
        stack.wait_ready(60, names=("learner",))
        # the gauge moves at the checkpoint, which follows the announcement of the same batch
        learned = wait_until(lambda: scrape(stack.services["learner"].metrics_url,
                                            "streamlearn_learner_examples_learned") == [1250.0] and [1250.0],
                             30, "the learner's gauge to reach 1,250")
    finally:
        stack.stop()
    announcements = values(read_topic(stack.bootstrap, stack.topics.name("models")))
    final = announcements[-1]
    assert final["examples_seen"] == 1250 and learned == [1250.0]
    assert max(a["examples_seen"] for a in announcements) == 1250, "no label was learned twice"

    registry = ModelRegistry(redis.Redis.from_url(redis_server.url), Signer(SIGNING_KEY.encode()), namespace)
    served = registry.load(spec.model.name, final["version"])
    reference = build_pipeline(spec.model.pipeline)
    for e in labels:
        reference.learn_one(e.event["data"], e.label["label"])
    for e in data:
        x = e.event["data"]
        assert served.predict_proba_one(x)[True] == pytest.approx(reference.predict_proba_one(x)[True], abs=1e-12)
    print(f"\n1250 labels, {kills} learner kills: learned 1250, final model equals the uninterrupted one")

    # lineage: the version rebuilt from its recorded offsets predicts identically
    meta = registry.meta(spec.model.name, final["version"])
    assert meta["extra"]["river_version"] and meta["extra"]["reproducible"]
    assert {r["topic"] for r in meta["extra"]["offset_ranges"]} == {stack.topics.name("features"),
                                                                   stack.topics.name("labels")}
    result = reproduce(spec, registry, stack.kafka_settings(), spec.model.name, final["version"],
                       stack.topics.name("labels"))
    assert result.identical and result.examples == 1250 and result.sample == 200 and result.spec_matches


def test_two_learners_are_one_writer_and_a_hot_standby(kafka_broker, redis_server, prefix, tmp_path):
    """A second learner replica waits (alive, not ready) while the first holds the model's lease;
    when the first is killed it takes over from the last checkpoint, and every label is still
    learned exactly once."""
    namespace = prefix.rstrip(".")
    stack = Stack(tmp_path / "state", broker=kafka_broker.bootstrap, redis=redis_server.url, topic_prefix=prefix,
                  partitions=1, extra_env={"STREAMLEARN_REDIS_NAMESPACE": namespace,
                                           "STREAMLEARN_MODEL_SIGNING_KEY": SIGNING_KEY,
                                           "STREAMLEARN_LEASE_TTL_S": "3", "STREAMLEARN_BATCH_SIZE": "50"})
    data = list(examples("phishing", run_id=uuid.uuid4().hex[:6]))
    stack.start_servers()
    try:
        stack.start_service("ingestion")
        stack.start_service("learner")
        stack.wait_ready(90, names=("ingestion", "learner"))
        standby = stack.start_service("learner", alias="learner-standby")
        wait_until(standby.alive, 30, "the standby's health endpoint")
        assert not standby.ready()
        # which replica writes, as a metric (Kubernetes probes the learner on /healthz, not /readyz)
        assert scrape(standby.metrics_url, "streamlearn_ready") == [0.0]
        assert scrape(stack.services["learner"].metrics_url, "streamlearn_ready") == [1.0]
        produce_all(stack.bootstrap, stack.topics.name("events"),
                    [(e.event["entity_id"].encode(), orjson.dumps(e.event)) for e in data])
        produce_all(stack.bootstrap, stack.topics.name("labels"),
                    [(e.label["entity_id"].encode(), orjson.dumps(e.label)) for e in data])
        wait_until(lambda: _examples_seen(stack) >= 400, 90, "the active learner to learn")
        assert not standby.ready(), "the standby does not consume while the active learner lives"
        stack.kill_service("learner")
        stack.wait_ready(60, names=("learner-standby",))
        wait_until(lambda: _examples_seen(stack) >= 1250, 120, "the standby to learn the rest")
        learned = wait_until(lambda: scrape(standby.metrics_url, "streamlearn_learner_examples_learned") == [1250.0]
                             and [1250.0], 30, "the standby's gauge to reach 1,250")
        assert scrape(standby.metrics_url, "streamlearn_ready") == [1.0]
        log = standby.log_path.read_text()
    finally:
        stack.stop()
    announcements = values(read_topic(stack.bootstrap, stack.topics.name("models")))
    assert learned == [1250.0] and max(a["examples_seen"] for a in announcements) == 1250
    assert "standby: lease" in log and "acquired" in log
