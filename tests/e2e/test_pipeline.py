"""The whole pipeline on real brokers: all of River's Phishing (1,250 events) replayed with labels
delayed by 50 events, through ingestion -> scorer -> predictions and labels -> learner -> models.

Checked from the topics themselves: exactly one prediction per event, 1,250 examples learned, no
DLQ record, and progressive accuracy within 1 point of River's own progressive_val_score with the
same model and the same delay.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from services.cli.datasets import examples, river_reference
from services.cli.replay import Replayer
from services.cli.stack import Stack
from services.runtime.spec import load_spec
from tests.conftest import wait_until
from tests.kafka_helpers import read_topic, scrape, values

DELAY = 50


def run_pipeline(stack: Stack) -> None:
    spec = load_spec("phishing")
    data = list(examples("phishing", run_id=uuid.uuid4().hex[:6]))
    assert len(data) == 1250
    with stack:
        replayer = Replayer(stack.kafka_settings(), stack.topics.all(), spec.model.name)
        result = replayer.run(data, DELAY, "lockstep", step_timeout=60)
        replayer.close()
        topics = stack.topics.all()
        predictions = values(read_topic(stack.bootstrap, topics["predictions"]))
        models = values(read_topic(stack.bootstrap, topics["models"]))
        dlq = read_topic(stack.bootstrap, topics["dlq"])
        labels = {e.label["event_id"]: e.label["label"] for e in data}
        monitor_url = stack.services["monitor"].metrics_url
        # the monitor joined every prediction with its label and reports the same accuracy
        wait_until(lambda: scrape(monitor_url, "streamlearn_model_quality_labelled") == [1250.0], 60,
                   "the monitor to report on 1,250 labelled predictions")
        overall = wait_until(lambda: scrape(monitor_url, "streamlearn_model_quality", metric="accuracy",
                                            model_version="all", window="cumulative"), 30,
                             "the monitor's overall accuracy gauge")
        quality = wait_until(lambda: values(read_topic(stack.bootstrap, topics["quality"])), 30,
                             "quality events")

    counts = Counter(p["event_id"] for p in predictions)
    expected = {e.event["event_id"] for e in data}
    assert set(counts) == expected, "every event has a prediction, and nothing else"
    assert max(counts.values()) == 1, f"duplicated predictions: {sum(c - 1 for c in counts.values())}"
    assert dlq == []

    learned = max(m["examples_seen"] for m in models)
    assert learned == 1250 == result.examples_seen
    versions = [p["model_version"] for p in predictions]
    assert min(versions) == 0 and max(versions) >= 1150, "later events were scored by a trained model"

    accuracy = sum(p["prediction"] == labels[p["event_id"]] for p in predictions) / len(predictions)
    reference = river_reference(spec, None, DELAY)
    print(f"\npipeline accuracy {accuracy:.4f}, River progressive_val_score {reference:.4f}")
    assert abs(accuracy - reference) <= 0.01

    # the monitor saw the same predictions and labels
    assert overall == [pytest.approx(accuracy, abs=1e-9)]
    assert "accuracy" in {q["metric"] for q in quality}
    assert all(0.0 <= q["value"] <= 1.0 and q["model"] == spec.model.name for q in quality)


@pytest.mark.kafka
def test_phishing_end_to_end_on_apache_kafka(kafka_broker, redis_server, prefix, tmp_path):
    stack = Stack(tmp_path / "state", broker=kafka_broker.bootstrap, redis=redis_server.url,
                  topic_prefix=prefix, extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip(".")})
    run_pipeline(stack)


@pytest.mark.tansu
def test_phishing_end_to_end_on_embedded_tansu(redis_server, prefix, tmp_path):
    """The path `make demo` takes: the embedded broker started by the stack itself."""
    stack = Stack(tmp_path / "state", broker="embedded", redis=redis_server.url,
                  extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip(".")})
    run_pipeline(stack)
