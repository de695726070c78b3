"""The scorer on Apache Kafka: exactly one committed prediction per event across kill -9s, model
versions that only move forward while models are swapped rapidly, and tampered artifacts refused."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict

import orjson
import pytest
import redis

from schemas import Stage
from services.cli.datasets import examples
from services.cli.replay import Replayer
from services.cli.stack import Stack
from services.runtime.registry import ModelRegistry, Signer
from services.runtime.river_models import build_pipeline
from services.runtime.spec import load_spec
from tests.conftest import SIGNING_KEY, wait_until
from tests.kafka_helpers import produce_all, read_topic, scrape, values

pytestmark = pytest.mark.kafka


def _stack(kafka_broker, redis_server, prefix, tmp_path, **env) -> Stack:
    return Stack(tmp_path / "state", broker=kafka_broker.bootstrap, redis=redis_server.url, topic_prefix=prefix,
                 extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip("."),
                            "STREAMLEARN_MODEL_SIGNING_KEY": SIGNING_KEY, **env})


def _events(n: int) -> list[tuple[bytes, bytes]]:
    rows = list(examples("phishing", run_id=uuid.uuid4().hex[:6]))
    out = []
    for i in range(n):
        event = dict(rows[i % len(rows)].event, event_id=f"ev-{i:06d}")
        out.append((event["entity_id"].encode(), orjson.dumps(event)))
    return out


def _committed_count(bootstrap: str, topic: str) -> int:
    return len(read_topic(bootstrap, topic))


def test_exactly_one_committed_prediction_per_event_across_kills(kafka_broker, redis_server, prefix, tmp_path):
    stack = _stack(kafka_broker, redis_server, prefix, tmp_path, STREAMLEARN_BATCH_SIZE="300")
    stack.start_servers()
    events = _events(20_000)
    produce_all(stack.bootstrap, stack.topics.name("events"), events)
    predictions = stack.topics.name("predictions")
    try:
        stack.start_service("ingestion")
        kills = 0
        for _ in range(3):
            stack.start_service("scorer")
            before = _committed_count(stack.bootstrap, predictions)
            wait_until(lambda b=before: _committed_count(stack.bootstrap, predictions) > b + 1500, 120,
                       "the scorer to commit more predictions")
            stack.kill_service("scorer")
            kills += 1
        assert _committed_count(stack.bootstrap, predictions) < len(events), "killed before the end"
        stack.start_service("scorer")
        wait_until(lambda: _committed_count(stack.bootstrap, predictions) >= len(events), 180,
                   "every event to be scored")
        guarantee = _metric_line(stack, "scorer", "streamlearn_service_info")
    finally:
        stack.stop()
    counts = Counter(p["event_id"] for p in values(read_topic(stack.bootstrap, predictions)))
    assert set(counts) == {orjson.loads(v)["event_id"] for _, v in events}
    duplicates = sum(c - 1 for c in counts.values())
    print(f"\n{len(events)} events, {kills} scorer kills, read_committed duplicates {duplicates}")
    assert duplicates == 0
    assert 'guarantee="exactly_once"' in guarantee


def _metric_line(stack: Stack, service: str, name: str) -> str:
    import urllib.request

    with urllib.request.urlopen(stack.services[service].metrics_url, timeout=5) as r:
        return "\n".join(line for line in r.read().decode().splitlines() if line.startswith(name))


def test_rapid_model_swaps_never_go_backwards(kafka_broker, redis_server, prefix, tmp_path):
    """The learner publishes a version after every batch while 3,000 events and labels stream in
    as fast as they can: every prediction names a version that existed, and per partition the
    versions never decrease."""
    spec = load_spec("phishing")
    stack = _stack(kafka_broker, redis_server, prefix, tmp_path)
    data = list(examples("phishing", run_id=uuid.uuid4().hex[:6]))
    data = data + [type(e)(event=dict(e.event, event_id=e.event["event_id"] + "-b"),
                           label=dict(e.label, event_id=e.label["event_id"] + "-b")) for e in data]
    with stack:
        replayer = Replayer(stack.kafka_settings(), stack.topics.all(), spec.model.name)
        replayer.run(data, delay=20, mode=500, final_timeout=180)
        replayer.close()
        predictions = read_topic(stack.bootstrap, stack.topics.name("predictions"))
        announced = {v["version"] for v in values(read_topic(stack.bootstrap, stack.topics.name("models")))}
    assert len(announced) > 10, "models were swapped many times"
    by_partition = defaultdict(list)
    for msg in predictions:
        by_partition[msg.partition()].append((msg.offset(), orjson.loads(msg.value())["model_version"]))
    seen_versions = set()
    for partition, rows in by_partition.items():
        versions = [v for _, v in sorted(rows)]
        assert versions == sorted(versions), f"partition {partition}: a prediction used an older version"
        seen_versions |= set(versions)
    assert seen_versions <= announced | {0}
    assert len(seen_versions) > 3


def announce(stack: Stack, ann) -> None:
    produce_all(stack.bootstrap, stack.topics.name("models"), [(ann.model.encode(), ann.model_dump_json().encode())])


def test_tampered_artifact_is_refused_and_the_previous_version_kept(kafka_broker, redis_server, prefix, tmp_path):
    spec = load_spec("phishing")
    stack = _stack(kafka_broker, redis_server, prefix, tmp_path)
    namespace = prefix.rstrip(".")
    client = redis.Redis.from_url(redis_server.url)
    good = ModelRegistry(client, Signer(SIGNING_KEY.encode()), namespace)
    attacker = ModelRegistry(client, Signer(b"not-the-real-key-0123456789"), namespace)
    model = build_pipeline(spec.model.pipeline)
    for x, y in list(__import__("river").datasets.Phishing())[:200]:
        model.learn_one(x, y)
    stack.start_servers()
    try:
        v1 = good.publish(spec.model.name, model, stage=Stage.champion, examples_seen=200, spec_hash="x")
        announce(stack, v1)
        stack.start_service("ingestion")
        stack.start_service("scorer")
        stack.wait_ready(90, names=("ingestion", "scorer"))
        forged = attacker.publish(spec.model.name, {"evil": True}, stage=Stage.champion, examples_seen=1,
                                  spec_hash="x")
        announce(stack, forged)
        # and one whose bytes were swapped after signing with the real key
        v3 = good.publish(spec.model.name, model, stage=Stage.champion, examples_seen=200, spec_hash="x")
        client.hset(v3.artifact_key, "artifact", b"\x80\x04tampered")
        announce(stack, v3)
        wait_until(lambda: scrape(stack.services["scorer"].metrics_url, "streamlearn_model_loads_total",
                                  result="refused") == [2.0], 60, "both forged versions to be refused")
        produce_all(stack.bootstrap, stack.topics.name("events"), _events(50))
        wait_until(lambda: _committed_count(stack.bootstrap, stack.topics.name("predictions")) >= 50, 60,
                   "predictions")
        scorer_log = stack.services["scorer"].log_path.read_text()
    finally:
        stack.stop()
    versions = {p["model_version"] for p in values(read_topic(stack.bootstrap, stack.topics.name("predictions")))}
    assert versions == {v1.version}, "the scorer kept serving the verified version"
    assert "refused model" in scorer_log and SIGNING_KEY not in scorer_log
