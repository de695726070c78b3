"""Each task type end to end on Apache Kafka: multiclass (River's ImageSegments), regression
(TrumpApproval) with the lockstep replay matching River's progressive validation, and unsupervised
anomaly detection (a synthetic sensor stream, no labels learned) with every event scored."""

from __future__ import annotations

import uuid

import pytest
from river import metrics

from services.cli.datasets import Sensors, examples, river_reference
from services.cli.replay import Replayer
from services.cli.stack import Stack
from services.runtime.spec import load_spec
from tests.conftest import wait_until
from tests.kafka_helpers import read_topic, values

pytestmark = pytest.mark.kafka

EVENTS, DELAY = 400, 30


def _stack(spec: str, kafka_broker, redis_server, prefix, tmp_path) -> Stack:
    return Stack(tmp_path / "state", spec=spec, broker=kafka_broker.bootstrap, redis=redis_server.url,
                 topic_prefix=prefix, extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip(".")})


@pytest.mark.parametrize("spec_name", ["image_segments", "trump_approval"])
def test_supervised_task_matches_river(spec_name, kafka_broker, redis_server, prefix, tmp_path):
    spec = load_spec(spec_name)
    data = list(examples(spec_name, EVENTS, run_id=uuid.uuid4().hex[:6]))
    with _stack(spec_name, kafka_broker, redis_server, prefix, tmp_path) as stack:
        replayer = Replayer(stack.kafka_settings(), stack.topics.all(), spec.model.name)
        result = replayer.run(data, DELAY, "lockstep")
        replayer.close()
        predictions = values(read_topic(stack.bootstrap, stack.topics.name("predictions")))
    assert sorted(p["event_id"] for p in predictions) == sorted(e.event["event_id"] for e in data)
    assert result.examples_seen == EVENTS
    labels = {e.label["event_id"]: e.label["label"] for e in data}
    reference = river_reference(spec, EVENTS, DELAY)
    if spec.model.task == "regression":
        mae = sum(abs(p["prediction"] - labels[p["event_id"]]) for p in predictions) / len(predictions)
        print(f"\n{spec_name}: pipeline MAE {mae:.4f}, River {reference:.4f}")
        assert mae == pytest.approx(reference, rel=0.01)
    else:
        # like River's progressive validation, count only the predictions a model could make (an
        # untrained multiclass model predicts nothing: prediction None, proba {})
        made = [p for p in predictions if p["prediction"] is not None]
        accuracy = sum(p["prediction"] == labels[p["event_id"]] for p in made) / len(made)
        print(f"\n{spec_name}: pipeline accuracy {accuracy:.4f}, River {reference:.4f}")
        assert abs(accuracy - reference) <= 0.01
        assert {type(p["prediction"]) for p in made} == {str}
        assert len(made) >= EVENTS - DELAY - 1


def test_anomaly_detection_scores_every_event(kafka_broker, redis_server, prefix, tmp_path):
    spec = load_spec("sensors")
    data = list(examples("sensors", run_id=uuid.uuid4().hex[:6]))
    truth = {e.event["event_id"]: e.label["label"] for e in data}
    with _stack("sensors", kafka_broker, redis_server, prefix, tmp_path) as stack:
        replayer = Replayer(stack.kafka_settings(), stack.topics.all(), spec.model.name)
        # unsupervised: no labels are produced (delay larger than the stream); paced so that the
        # scorer sees models that learned the stream so far
        result = replayer.run(data, delay=len(data), mode=400, final_timeout=120, labels=False)
        replayer.close()
        wait_until(lambda: max((a["examples_seen"] for a in values(
            read_topic(stack.bootstrap, stack.topics.name("models")))), default=0) >= len(data), 60,
            "the learner to learn every reading")
        predictions = values(read_topic(stack.bootstrap, stack.topics.name("predictions")))
    assert len(result.predictions) == len(data) == len(predictions)
    assert all(0.0 <= p["score"] <= 1.0 and isinstance(p["prediction"], bool) for p in predictions)
    auc = metrics.ROCAUC()
    for p in predictions:
        auc.update(truth[p["event_id"]], p["score"])
    print(f"\nsensors: ROC AUC of live scores {auc.get():.3f} ({sum(truth.values())} anomalies)")
    assert auc.get() > 0.75
    assert Sensors().n == len(data)
