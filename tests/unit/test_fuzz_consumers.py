"""Bad input at scale for every consumer but ingestion's events (fuzzed in the ingestion tests):
labels, features, predictions, drift events and model announcements. Random bytes and near-valid
JSON either decode or become a Reject with a reason (-> DLQ); what decodes never makes a handler
raise; a model follower survives any announcement."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.learner.app import LearnerProcessor
from services.runtime.messages import Incoming, Reject, Rejected
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings
from services.runtime.spec import load_spec
from services.scorer.app import ScorerProcessor

ENV = {"STREAMLEARN_MODEL_SIGNING_KEY": "k" * 32}
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                                       children, max_size=4),
                    max_leaves=12)


def near_valid(base: dict) -> st.SearchStrategy[bytes]:
    """``base`` with fields dropped, retyped or added."""
    keys = sorted(base)
    return st.builds(
        lambda drop, replace, extra: json.dumps({**{k: v for k, v in base.items() if k not in drop},
                                                 **replace, **extra}).encode(),
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.sampled_from(keys), JSON, max_size=2),
        st.dictionaries(st.text(max_size=8), JSON, max_size=1))


LABEL = {"schema_version": 1, "event_id": "e1", "entity_id": "u", "ts": 1.0, "label": True}
FEATURES = {"schema_version": 1, "event_id": "e1", "entity_id": "u", "ts": 1.0, "feature_set": "phishing",
            "feature_set_version": 1, "features": {"https": 1.0}, "ingested_at": 1.0}
DRIFT = {"schema_version": 1, "model": "phishing-logreg", "detector": "ADWIN", "kind": "concept", "target": "error",
         "window": 10, "severity": "warning", "detected_at": 1.0}
ANNOUNCEMENT = {"schema_version": 1, "model": "phishing-logreg", "version": 3, "stage": "champion",
                "artifact_key": "k", "signature": "s", "sha256": "x", "examples_seen": 1, "spec_hash": "h",
                "created_at": 1.0}


class NullRegistry:
    def load_checkpoint(self, name):
        return None

    def load(self, *a, **k):
        raise KeyError("nothing here")


@pytest.fixture(scope="module")
def learner():
    spec = load_spec("tests/specs/phishing_challengers.yaml")
    return LearnerProcessor(spec, Settings(ENV), RuntimeMetrics("learner"), NullRegistry())


@pytest.fixture(scope="module")
def scorer():
    return ScorerProcessor(load_spec("phishing"), Settings(ENV), RuntimeMetrics("scorer"), follower=None)


def _feed(processor, topic: str, raw: bytes) -> list:
    decode = processor.subscriptions()[topic]
    try:
        value = decode(raw)
    except Reject as reject:
        assert reject.reason and reject.error
        return ["rejected"]
    out = list(processor.handle([Incoming(topic, 0, 0, None, raw, value)]))
    for o in out:
        if isinstance(o, Rejected):
            assert o.reject.reason
    return out


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=200) | near_valid(LABEL) | near_valid(DRIFT) | near_valid(FEATURES))
def test_learner_never_raises(learner, raw):
    for topic in ("labels", "features", "drift"):
        _feed(learner, topic, raw)


@FUZZ
@given(st.binary(max_size=200) | near_valid(FEATURES))
def test_scorer_never_raises(scorer, raw):
    _feed(scorer, "features", raw)


@FUZZ
@given(st.binary(max_size=300) | near_valid(ANNOUNCEMENT))
def test_model_follower_survives_any_announcement(raw):
    from services.runtime.river_models import build_pipeline
    from services.scorer.models import ModelFollower, Served

    spec = load_spec("phishing")
    follower = ModelFollower.__new__(ModelFollower)  # no thread, no consumer: just the decision logic
    follower.current = Served(spec.model.name, 0, build_pipeline(spec.model.pipeline))
    follower.challengers, follower._retry, follower.service = {}, None, "scorer"
    follower.registry = NullRegistry()
    metrics = RuntimeMetrics("scorer")
    follower.loads = metrics.counter("streamlearn_model_loads_total", "x", ["service", "model", "result"])
    follower.version_gauge = metrics.gauge("streamlearn_model_version", "x", ["service", "model", "stage"])
    follower._apply(raw)
    assert follower.current.version == 0, "nothing unverified is ever served"
