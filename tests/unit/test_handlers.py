"""Handlers fed in memory: each processor gets :class:`Incoming` messages decoded by its own
decoders, exactly as the runtime would, and returns :class:`Outgoing` / :class:`Rejected`.
No broker, no Redis server: the online store and the model registry are in-memory fakes."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import tracemalloc
from collections.abc import Iterable
from typing import Any

import pytest
import redis
from river import datasets, drift
from river import metrics as river_metrics

from schemas import DriftEvent, Features, ModelAnnouncement, Prediction, QualityEvent, Stage
from services.ingestion.app import IngestionProcessor
from services.learner.app import LearnerProcessor
from services.learner.core import LearnerState
from services.monitor.app import MonitorProcessor
from services.runtime.app import StreamApp
from services.runtime.messages import Incoming, Outgoing, Reject, Rejected, Transient
from services.runtime.metrics import RuntimeMetrics
from services.runtime.river_models import build_pipeline
from services.runtime.settings import Settings
from services.runtime.spec import PipelineSpec, load_spec, parse_spec, resolve_spec_path
from services.scorer.app import ScorerProcessor
from services.scorer.models import Served

ENV = {"STREAMLEARN_MODEL_SIGNING_KEY": "k" * 32, "STREAMLEARN_TOPIC_PREFIX": "t."}
PHISHING_YAML = resolve_spec_path("phishing").read_text()
ROWS: list[tuple[dict[str, Any], bool]] = list(itertools.islice(datasets.Phishing(), 60))


@pytest.fixture
def settings() -> Settings:
    return Settings(ENV)


@pytest.fixture
def spec() -> PipelineSpec:
    return load_spec("phishing")


def spec_with(*replacements: tuple[str, str]) -> PipelineSpec:
    text = PHISHING_YAML
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return parse_spec(text)


_offsets = itertools.count()


def incoming(processor, topic: str, raw: bytes, key: bytes | None = None, partition: int = 0,
             offset: int | None = None) -> Incoming:
    """What the runtime hands a handler: raw bytes decoded by the processor's own decoder."""
    decoder = processor.subscriptions()[topic]
    return Incoming(topic, partition, next(_offsets) if offset is None else offset, key, raw, value=decoder(raw))


def event_bytes(i: int, entity: str = "u1", ts: float | None = None, **changes: Any) -> bytes:
    x, _ = ROWS[i]
    doc = {"event_id": f"e{i}", "entity_id": entity, "ts": float(1000 + i if ts is None else ts),
           "type": "page_visit", "data": dict(x)}
    for name, value in changes.items():
        doc[name] = value
    return json.dumps(doc).encode()


def label_bytes(event_id: str, label: Any, ts: float = 2000.0, entity: str = "u1") -> bytes:
    return json.dumps({"event_id": event_id, "entity_id": entity, "ts": ts, "label": label}).encode()


def features_bytes(i: int, entity: str = "u1", ts: float | None = None) -> bytes:
    x, _ = ROWS[i]
    return Features(event_id=f"e{i}", entity_id=entity, ts=float(1000 + i if ts is None else ts),
                    feature_set="phishing", feature_set_version=1, features=dict(x),
                    ingested_at=0.0).model_dump_json().encode()


def outgoing(results: Iterable[Outgoing | Rejected]) -> list[Outgoing]:
    results = list(results)
    assert all(isinstance(r, Outgoing) for r in results), results
    return results  # type: ignore[return-value]


# ==== ingestion ===================================================================================

class FakeStore:
    """The :class:`OnlineStore` interface in memory."""

    def __init__(self, fail: Exception | None = None):
        self.rows: dict[str, tuple[float, dict[str, Any]]] = {}
        self.batches: list[dict[str, tuple[float, dict[str, Any]]]] = []
        self.fail = fail
        self.closed = False

    def write_batch(self, rows):
        if self.fail is not None:
            raise self.fail
        self.batches.append(dict(rows))
        self.rows.update(rows)

    def read(self, entity_id, max_age_s=None):
        return self.rows.get(entity_id)

    def close(self):
        self.closed = True


def make_ingestion(spec: PipelineSpec, settings: Settings, store: FakeStore | None = None):
    store = FakeStore() if store is None else store
    return IngestionProcessor(spec, settings, RuntimeMetrics("ingestion"), store=store), store


def test_ingestion_subscribes_to_the_prefixed_events_topic(spec, settings):
    proc, _ = make_ingestion(spec, settings)
    assert list(proc.subscriptions()) == ["t.events"]


def test_valid_event_becomes_one_features_message_keyed_by_entity(spec, settings):
    proc, store = make_ingestion(spec, settings)
    out = outgoing(proc.handle([incoming(proc, "t.events", event_bytes(0, entity="u7"), key=b"u7")]))
    assert len(out) == 1
    msg = out[0]
    assert msg.topic == "t.features"
    assert msg.key == "u7"
    f = msg.value
    assert isinstance(f, Features)
    assert (f.event_id, f.entity_id, f.ts) == ("e0", "u7", 1000.0)
    assert (f.feature_set, f.feature_set_version) == ("phishing", 1)
    assert f.features == ROWS[0][0]
    assert len(f.features) == 9
    assert list(f.features) == list(spec.event.fields)
    assert store.rows == {"u7": (1000.0, ROWS[0][0])}
    # the bytes on the wire are a valid Features message
    _, value = msg.encoded()
    assert Features.model_validate_json(value) == f


def test_store_gets_the_latest_vector_per_entity_in_one_write(spec, settings):
    proc, store = make_ingestion(spec, settings)
    batch = [incoming(proc, "t.events", event_bytes(i, entity=e, ts=ts))
             for i, (e, ts) in enumerate([("u1", 10.0), ("u1", 30.0), ("u2", 5.0), ("u1", 20.0)])]
    out = outgoing(proc.handle(batch))
    assert [o.value.event_id for o in out] == ["e0", "e1", "e2", "e3"]
    assert len(store.batches) == 1
    assert store.rows == {"u1": (30.0, ROWS[1][0]), "u2": (5.0, ROWS[2][0])}


def test_ingestion_close_closes_the_store(spec, settings):
    proc, store = make_ingestion(spec, settings)
    proc.close()
    assert store.closed


def _valid_doc() -> dict[str, Any]:
    return json.loads(event_bytes(0))


def _doc(**top: Any) -> bytes:
    doc = _valid_doc()
    for k, v in top.items():
        if v is ...:
            del doc[k]
        else:
            doc[k] = v
    return json.dumps(doc).encode()


def _data(**fields: Any) -> bytes:
    doc = _valid_doc()
    for k, v in fields.items():
        if v is ...:
            del doc["data"][k]
        else:
            doc["data"][k] = v
    return json.dumps(doc).encode()


INVALID_EVENTS = [
    ("oversized", b'{"pad": "' + b"x" * 9000 + b'"}', "oversized", None),
    ("encoding", b"\xff\xfe", "encoding", None),
    ("invalid-json", b'{"event_id": "e1",', "invalid_json", None),
    ("not-json-at-all", b"hello", "invalid_json", None),
    ("array", b"[1, 2, 3]", "not_an_object", None),
    ("number", b"42", "not_an_object", None),
    ("schema-version", _doc(schema_version=2), "schema_version", "schema_version"),
    ("missing-data-field", _data(https=...), "missing_field", "data.https"),
    ("missing-event-id", _doc(event_id=...), "missing_field", "event_id"),
    ("unknown-data-field", _data(surprise=1.0), "unknown_field", "data.surprise"),
    ("unknown-envelope-field", _doc(surprise=1), "unknown_field", "surprise"),
    ("wrong-type-str", _data(https="high"), "wrong_type", "data.https"),
    ("wrong-type-bool-for-float", _data(https=True), "wrong_type", "data.https"),
    ("wrong-type-float-for-int", _data(age_of_domain=0.5), "wrong_type", "data.age_of_domain"),
    ("out-of-bounds-high", _data(https=1.5), "out_of_bounds", "data.https"),
    ("out-of-bounds-low", _data(ip_in_url=-1), "out_of_bounds", "data.ip_in_url"),
    ("nan", _data(https=0.0).replace(b'"https": 0.0', b'"https": NaN'), "not_finite", "data.https"),
    ("unknown-type", _doc(type="page_click"), "unknown_type", "type"),
    ("invalid-timestamp", _doc(ts="yesterday"), "invalid_timestamp", "ts"),
    ("missing-timestamp", _doc(ts=...), "missing_field", "ts"),
    ("empty-event-id", _doc(event_id=""), "invalid_value", "event_id"),
]


@pytest.mark.parametrize(("raw", "reason", "field"), [c[1:] for c in INVALID_EVENTS],
                         ids=[c[0] for c in INVALID_EVENTS])
def test_invalid_event_is_rejected_by_the_decoder_with_reason_and_field(spec, settings, raw, reason, field):
    proc, _ = make_ingestion(spec, settings)
    decode = proc.subscriptions()["t.events"]
    with pytest.raises(Reject) as info:
        decode(raw)
    assert (info.value.reason, info.value.field) == (reason, field), info.value.error
    assert info.value.schema_version == 1
    assert info.value.error


def test_the_decoder_accepts_the_whole_phishing_dataset_sample(spec, settings):
    proc, _ = make_ingestion(spec, settings)
    decode = proc.subscriptions()["t.events"]
    for i in range(len(ROWS)):
        assert decode(event_bytes(i)).data.__dict__ == ROWS[i][0]


def test_data_that_is_not_an_object_names_the_data_field(spec, settings):
    proc, _ = make_ingestion(spec, settings)
    with pytest.raises(Reject) as info:
        proc.subscriptions()["t.events"](_doc(data=[1]))
    assert info.value.field == "data"


DERIVED = ("passthrough: all", "passthrough: all\n  derived:\n"
                               "    - {name: ratio, expr: 'https / popup_window'}\n"
                               "    - {name: twice, expr: 'ratio * 2'}")


def test_derived_features_are_computed(settings):
    proc, store = make_ingestion(spec_with(DERIVED), settings)
    raw = event_bytes(0, entity="u1")
    doc = json.loads(raw)
    doc["data"].update(https=1.0, popup_window=0.5)
    out = outgoing(proc.handle([incoming(proc, "t.events", json.dumps(doc).encode())]))
    features = out[0].value.features
    assert list(features)[-2:] == ["ratio", "twice"]
    assert features["ratio"] == 2.0
    assert features["twice"] == 4.0
    assert store.rows["u1"][1]["twice"] == 4.0


def test_derived_division_by_zero_is_rejected_and_the_rest_of_the_batch_goes_on(settings):
    proc, store = make_ingestion(spec_with(DERIVED), settings)
    good = json.loads(event_bytes(1, entity="ok"))
    good["data"].update(https=1.0, popup_window=0.5)
    bad = json.loads(event_bytes(2, entity="bad"))
    bad["data"].update(https=1.0, popup_window=0.0)
    batch = [incoming(proc, "t.events", json.dumps(d).encode()) for d in (good, bad)]
    results = list(proc.handle(batch))
    assert isinstance(results[0], Outgoing)
    rejected = results[1]
    assert isinstance(rejected, Rejected)
    assert rejected.message is batch[1]
    assert rejected.reject.reason == "derived_error"
    assert rejected.reject.field == "features.ratio"
    assert "https / popup_window" in rejected.reject.error
    assert set(store.rows) == {"ok"}


def test_store_connection_error_is_transient(spec, settings):
    proc, _ = make_ingestion(spec, settings, FakeStore(fail=redis.ConnectionError("connection refused")))
    with pytest.raises(Transient, match="online store"):
        proc.handle([incoming(proc, "t.events", event_bytes(0))])


def test_store_timeout_is_transient_too(spec, settings):
    proc, _ = make_ingestion(spec, settings, FakeStore(fail=redis.TimeoutError("timed out")))
    with pytest.raises(Transient):
        proc.handle([incoming(proc, "t.events", event_bytes(0))])


# ==== scorer ======================================================================================

def make_scorer(spec: PipelineSpec, settings: Settings) -> ScorerProcessor:
    return ScorerProcessor(spec, settings, RuntimeMetrics("scorer"), follower=None)


def test_untrained_scorer_predicts_with_version_zero(spec, settings):
    proc = make_scorer(spec, settings)
    assert list(proc.subscriptions()) == ["t.features"]
    assert proc.ready()
    batch = [incoming(proc, "t.features", features_bytes(i, entity=f"u{i}")) for i in range(5)]
    out = outgoing(proc.handle(batch))
    assert len(out) == len(batch)
    for msg, i in zip(out, range(5), strict=True):
        assert msg.topic == "t.predictions"
        assert msg.key == f"u{i}"
        p = msg.value
        assert isinstance(p, Prediction)
        assert (p.event_id, p.entity_id, p.ts) == (f"e{i}", f"u{i}", 1000.0 + i)
        assert (p.model, p.model_version, p.shadow) == ("phishing-logreg", 0, False)
        assert set(p.proba) == {"False", "True"}
        assert math.isclose(sum(p.proba.values()), 1.0)
        assert p.prediction in (True, False)
        assert p.proba[str(p.prediction)] == max(p.proba.values())
        assert p.latency_ms >= 0
        Prediction.model_validate_json(msg.encoded()[1])


def test_features_from_ingestion_flow_into_the_scorer(spec, settings):
    ingestion, _ = make_ingestion(spec, settings)
    scorer = make_scorer(spec, settings)
    features = outgoing(ingestion.handle([incoming(ingestion, "t.events", event_bytes(i)) for i in range(3)]))
    batch = [incoming(scorer, o.topic, o.encoded()[1], key=o.encoded()[0]) for o in features]
    predictions = outgoing(scorer.handle(batch))
    assert [p.value.event_id for p in predictions] == ["e0", "e1", "e2"]


def _scored(out: list[Outgoing]) -> list[tuple[Any, dict[str, float] | None]]:
    return [(o.value.prediction, o.value.proba) for o in out]


def test_scoring_the_same_batch_twice_gives_identical_outputs(spec, settings):
    proc = make_scorer(spec, settings)
    batch = [incoming(proc, "t.features", features_bytes(i)) for i in range(10)]
    first = _scored(outgoing(proc.handle(batch)))
    second = _scored(outgoing(proc.handle(batch)))
    assert first == second


def test_scoring_does_not_learn_from_the_untrained_model(spec, settings):
    proc = make_scorer(spec, settings)
    model = proc.initial.model
    scaler = model.steps["StandardScaler"]
    batch = [incoming(proc, "t.features", features_bytes(i)) for i in range(10)]
    proc.handle(batch)
    # River's StandardScaler reads its defaultdicts while transforming, which inserts zeros for unseen
    # features; nothing is learned: no counts, no means, no weights
    assert not any(scaler.counts.values())
    assert not any(scaler.means.values())
    assert not any(scaler.vars.values())
    assert len(model.steps["LogisticRegression"]._weights) == 0


def test_scoring_does_not_change_a_trained_model(spec, settings):
    proc = make_scorer(spec, settings)
    model = proc.initial.model
    for x, y in ROWS[:30]:
        model.learn_one(x, y)
    before = pickle.dumps(model)
    batch = [incoming(proc, "t.features", features_bytes(i)) for i in range(30, 60)]
    first = _scored(outgoing(proc.handle(batch)))
    assert pickle.dumps(model) == before
    assert _scored(outgoing(proc.handle(batch))) == first
    assert pickle.dumps(model) == before
    # and the trained model is really being used
    assert any(p != {"False": 0.5, "True": 0.5} for _, p in first)


def test_scorer_serves_the_followed_version(spec, settings):
    proc = make_scorer(spec, settings)
    trained = proc.initial.model.clone()
    for x, y in ROWS[:30]:
        trained.learn_one(x, y)

    class Follower:  # the part of ModelFollower the processor reads
        current = Served("phishing-logreg", 7, trained)
        challengers: dict = {}

    proc.follower = Follower()  # type: ignore[assignment]
    out = outgoing(proc.handle([incoming(proc, "t.features", features_bytes(40))]))
    assert out[0].value.model_version == 7
    assert out[0].value.proba == {str(k): v for k, v in trained.predict_proba_one(ROWS[40][0]).items()}


# ==== learner =====================================================================================

class FakeRegistry:
    """The registry interface the learner uses, in memory (state pickled as the real one does)."""

    def __init__(self):
        self.checkpoints: dict[str, bytes] = {}
        self.saves = 0
        self.published: list[tuple[ModelAnnouncement, bytes]] = []
        self.fail_publish: Exception | None = None

    def load_checkpoint(self, name):
        blob = self.checkpoints.get(name)
        return None if blob is None else pickle.loads(blob)

    def save_checkpoint(self, name, state, write=None):
        blob = pickle.dumps(state)
        self.checkpoints[name] = blob
        self.saves += 1
        return len(blob)

    def publish(self, model, obj, *, stage, examples_seen, spec_hash, metrics, keep, extra=None, lineage=None):
        if self.fail_publish is not None:
            raise self.fail_publish
        data = pickle.dumps(obj)
        version = len(self.published) + 1
        ann = ModelAnnouncement(model=model, version=version, stage=stage, artifact_key=f"m:{model}:v:{version}",
                                signature="0" * 64, sha256="1" * 64, examples_seen=examples_seen,
                                metrics=metrics, spec_hash=spec_hash, created_at=0.0)
        self.published.append((ann, data))
        return ann


def make_learner(spec: PipelineSpec, settings: Settings, registry: FakeRegistry | None = None):
    registry = FakeRegistry() if registry is None else registry
    return LearnerProcessor(spec, settings, RuntimeMetrics("learner"), registry=registry), registry


def feat(proc, i: int, offset: int | None = None) -> Incoming:
    return incoming(proc, "t.features", features_bytes(i), offset=offset)


def lab(proc, i: int, label: Any = None, offset: int | None = None) -> Incoming:
    return incoming(proc, "t.labels", label_bytes(f"e{i}", ROWS[i][1] if label is None else label), offset=offset)


def test_learner_subscribes_to_features_and_labels(spec, settings):
    proc, _ = make_learner(spec, settings)
    assert set(proc.subscriptions()) == {"t.features", "t.labels"}


def test_features_then_label_learns_one_example_and_tick_announces_it(spec, settings):
    proc, registry = make_learner(spec, settings)
    assert list(proc.handle([feat(proc, 0)])) == []
    assert proc.state.examples_seen == 0
    assert proc.tick(0.0) == []  # nothing learned: nothing to publish
    assert list(proc.handle([lab(proc, 0)])) == []
    assert proc.state.examples_seen == 1
    out = proc.tick(0.0)
    assert len(out) == 1
    msg = out[0]
    assert (msg.topic, msg.key) == ("t.models", "phishing-logreg")
    ann = msg.value
    assert isinstance(ann, ModelAnnouncement)
    assert (ann.model, ann.version, ann.stage, ann.examples_seen) == ("phishing-logreg", 1, Stage.champion, 1)
    assert ann.spec_hash == spec.spec_hash()
    assert "accuracy" in ann.metrics
    assert proc.state.last_version == 1
    assert proc.tick(0.0) == []  # published already
    # the published object is the learned model
    published = pickle.loads(registry.published[0][1])
    assert published.predict_proba_one(ROWS[1][0]) == proc.state.model.predict_proba_one(ROWS[1][0])


def test_learning_matches_river_progressive_validation(spec, settings):
    proc, _ = make_learner(spec, settings)
    for i in range(20):
        proc.handle([feat(proc, i), lab(proc, i)])
    model, metric = build_pipeline(spec.model.pipeline), river_metrics.Accuracy()
    for x, y in ROWS[:20]:
        metric.update(y, model.predict_one(x))
        model.learn_one(x, y)
    assert proc.state.examples_seen == 20
    assert proc.state.metric.get() == metric.get()
    assert proc.state.model.predict_proba_one(ROWS[30][0]) == model.predict_proba_one(ROWS[30][0])


def test_label_before_features_also_joins(spec, settings):
    proc, _ = make_learner(spec, settings)
    proc.handle([lab(proc, 3)])
    assert proc.state.examples_seen == 0
    assert len(proc.state.join) == 1
    proc.handle([feat(proc, 3)])
    assert proc.state.examples_seen == 1
    assert len(proc.state.join) == 0


def test_duplicate_label_is_not_learned_twice(spec, settings):
    proc, _ = make_learner(spec, settings)
    proc.handle([feat(proc, 0), lab(proc, 0)])
    proc.handle([lab(proc, 0)])
    assert proc.state.examples_seen == 1
    # label first, duplicated before the features arrive
    proc.handle([lab(proc, 1), lab(proc, 1)])
    proc.handle([feat(proc, 1)])
    assert proc.state.examples_seen == 2
    assert proc.state.join.duplicates == 1


def test_zero_one_label_is_accepted_for_a_bool_task(spec, settings):
    proc, _ = make_learner(spec, settings)
    assert list(proc.handle([feat(proc, 0), lab(proc, 0, label=1)])) == []
    assert proc.state.examples_seen == 1


@pytest.mark.parametrize("bad", ["yes", 1.0, 2])
def test_label_of_the_wrong_type_is_rejected(spec, settings, bad):
    proc, _ = make_learner(spec, settings)
    proc.handle([feat(proc, 0)])
    msg = lab(proc, 0, label=bad)
    results = list(proc.handle([msg]))
    assert len(results) == 1
    rejected = results[0]
    assert isinstance(rejected, Rejected)
    assert rejected.message is msg
    assert (rejected.reject.reason, rejected.reject.field) == ("wrong_type", "label")
    assert proc.state.examples_seen == 0


def test_publish_failure_is_retried_at_the_next_tick(spec, settings):
    proc, registry = make_learner(spec, settings)
    proc.handle([feat(proc, 0), lab(proc, 0)])
    registry.fail_publish = redis.ConnectionError("down")
    assert proc.tick(0.0) == []
    registry.fail_publish = None
    out = proc.tick(0.0)
    assert [o.value.examples_seen for o in out] == [1]


CHECKPOINT_EVERY_ONE = ("checkpoint_every: 50000", "checkpoint_every: 1")


def test_committable_checkpoints_when_due_and_returns_the_offsets(settings):
    proc, registry = make_learner(spec_with(CHECKPOINT_EVERY_ONE), settings)
    proc.handle([feat(proc, 0, offset=10), lab(proc, 0, offset=4)])
    offsets = {("t.features", 0): 11, ("t.labels", 0): 5}
    assert proc.committable(offsets) == offsets
    assert registry.saves == 1
    saved = registry.load_checkpoint(proc.checkpoint_name)
    assert isinstance(saved, LearnerState)
    assert saved.offsets == offsets
    assert saved.examples_seen == 1


def test_failed_checkpoint_commits_nothing(settings):
    proc, registry = make_learner(spec_with(CHECKPOINT_EVERY_ONE), settings)

    def down(name, state, write=None):
        raise redis.ConnectionError("down")

    registry.save_checkpoint = down  # type: ignore[method-assign]
    proc.handle([feat(proc, 0, offset=10), lab(proc, 0, offset=4)])
    assert proc.committable({("t.features", 0): 11, ("t.labels", 0): 5}) is None


def test_committable_commits_nothing_before_a_checkpoint_is_due(spec, settings):
    proc, registry = make_learner(spec, settings)  # checkpoint_every 200, interval 5 s
    proc.handle([feat(proc, 0, offset=10)])
    assert proc.committable({("t.features", 0): 11}) is None
    assert registry.saves == 0
    assert proc.state.offsets == {("t.features", 0): 11}  # recorded for the next checkpoint


def test_committable_returns_every_recorded_offset_at_the_checkpoint(settings):
    proc, _ = make_learner(spec_with(CHECKPOINT_EVERY_ONE), settings)
    proc.handle([feat(proc, 0, offset=10)])
    assert proc.committable({("t.features", 0): 11}) is None  # nothing learned, not yet due
    proc.handle([lab(proc, 0, offset=3)])
    assert proc.committable({("t.labels", 0): 4}) == {("t.features", 0): 11, ("t.labels", 0): 4}


def test_restore_from_checkpoint_seeks_to_its_offsets_and_keeps_the_join_buffer(settings):
    spec = spec_with(CHECKPOINT_EVERY_ONE)
    first, registry = make_learner(spec, settings)
    first.handle([feat(first, 0, offset=0), lab(first, 0, offset=0), feat(first, 1, offset=1)])
    offsets = {("t.features", 0): 2, ("t.labels", 0): 1}
    assert first.committable(offsets) == offsets

    second, _ = make_learner(spec, settings, registry)  # a restart
    assert second.state.examples_seen == 1
    assert second.assigned([("t.features", 0), ("t.labels", 0), ("t.features", 1)]) == offsets
    assert second.assigned([("t.labels", 3)]) == {}
    # the features of e1 waited in the checkpointed join buffer: its label still joins
    second.handle([lab(second, 1, offset=1)])
    assert second.state.examples_seen == 2
    assert second.state.model.predict_proba_one(ROWS[5][0]) != first.state.model.predict_proba_one(ROWS[5][0])


def test_fresh_learner_assigns_nothing(spec, settings):
    proc, _ = make_learner(spec, settings)
    assert proc.assigned([("t.features", 0), ("t.labels", 0)]) == {}


def test_close_checkpoints_only_when_offsets_were_recorded(spec, settings):
    proc, registry = make_learner(spec, settings)
    proc.handle([feat(proc, 0), lab(proc, 0)])
    proc.close()  # learned past recorded offsets: a checkpoint now would skip them after a restart
    assert registry.saves == 0
    assert proc.committable({("t.features", 0): 1, ("t.labels", 0): 1}) is None
    proc.close()
    assert registry.saves == 1


# ==== monitor =====================================================================================

def prediction_bytes(event_id: str, prediction: Any, version: int = 1, ts: float = 1000.0,
                     model: str = "phishing-logreg", shadow: bool = False) -> bytes:
    proba = None if prediction is None else {"False": 0.3, "True": 0.7}
    return Prediction(event_id=event_id, entity_id="u1", ts=ts, model=model, model_version=version,
                      prediction=prediction, proba=proba, scored_at=ts, latency_ms=0.0,
                      shadow=shadow).model_dump_json().encode()


def make_monitor(spec: PipelineSpec, settings: Settings) -> MonitorProcessor:
    return MonitorProcessor(spec, settings, RuntimeMetrics("monitor"))


def feed_pairs(proc: MonitorProcessor, pairs: list[tuple[Any, Any]], version: int = 1) -> list[Outgoing]:
    """One prediction then its label per pair (y_pred, y_true); returns everything handle emitted."""
    out: list[Outgoing] = []
    for n, (y_pred, y_true) in enumerate(pairs):
        eid = f"v{version}-e{n}"
        out += outgoing(proc.handle([incoming(proc, "t.predictions", prediction_bytes(eid, y_pred, version,
                                                                                       ts=1000.0 + n))]))
        out += outgoing(proc.handle([incoming(proc, "t.labels", label_bytes(eid, y_true, ts=1000.0 + n))]))
    return out


def elapse(proc: MonitorProcessor) -> None:
    proc._last_emit -= proc.spec.monitor.quality_interval_s + 1.0


def test_monitor_subscriptions(spec, settings):
    assert set(make_monitor(spec, settings).subscriptions()) == {"t.predictions", "t.labels"}
    with_feature_drift = spec_with(("target: error", "target: https"))
    assert set(make_monitor(with_feature_drift, settings).subscriptions()) == {
        "t.predictions", "t.labels", "t.features"}


def test_quality_is_not_emitted_before_the_interval(spec, settings):
    proc = make_monitor(spec, settings)
    feed_pairs(proc, [(True, True)])
    proc._last_emit = float("inf")
    assert proc.tick(0.0) == []


def test_quality_event_accuracy_equals_river_accuracy(spec, settings):
    proc = make_monitor(spec, settings)
    pairs = [(ROWS[i][1] if i % 3 else not ROWS[i][1], ROWS[i][1]) for i in range(50)]
    assert feed_pairs(proc, pairs) == []
    elapse(proc)
    out = proc.tick(123.0)
    assert len(out) == 1
    msg = out[0]
    assert (msg.topic, msg.key) == ("t.quality", "phishing-logreg")
    q = msg.value
    assert isinstance(q, QualityEvent)
    expected = river_metrics.Accuracy()
    for y_pred, y_true in pairs:
        expected.update(y_true, y_pred)
    assert (q.model, q.model_version, q.shadow, q.metric) == ("phishing-logreg", 1, False, "accuracy")
    assert q.cumulative == expected.get()
    assert q.value == expected.get()  # 50 pairs fit in the rolling window of 200
    assert (q.labelled, q.window, q.emitted_at) == (50, 50, 123.0)
    assert proc.tick(124.0) == []  # the interval starts again


def test_label_before_prediction_joins_in_the_monitor_and_zero_one_labels_compare_with_bools(spec, settings):
    proc = make_monitor(spec, settings)
    proc.handle([incoming(proc, "t.labels", label_bytes("a", 1)), incoming(proc, "t.labels", label_bytes("b", 0))])
    proc.handle([incoming(proc, "t.predictions", prediction_bytes("a", True)),
                 incoming(proc, "t.predictions", prediction_bytes("b", True))])
    elapse(proc)
    (msg,) = proc.tick(0.0)
    assert (msg.value.labelled, msg.value.cumulative) == (2, 0.5)


def test_quality_is_reported_per_model_version(spec, settings):
    proc = make_monitor(spec, settings)
    feed_pairs(proc, [(True, True)] * 4, version=1)
    feed_pairs(proc, [(True, False)] * 2, version=2)
    elapse(proc)
    by_version = {m.value.model_version: m.value for m in proc.tick(0.0)}
    assert set(by_version) == {1, 2}
    assert (by_version[1].cumulative, by_version[1].labelled) == (1.0, 4)
    assert (by_version[2].cumulative, by_version[2].labelled) == (0.0, 2)


def _drift_events(out: list[Outgoing]) -> list[DriftEvent]:
    assert all(o.topic == "t.drift" for o in out), out
    return [o.value for o in out]


def test_jump_from_all_correct_to_all_wrong_fires_one_drift_event(spec, settings):
    proc = make_monitor(spec, settings)
    pairs = [(True, True)] * 300 + [(True, False)] * 600
    events = _drift_events(feed_pairs(proc, pairs))
    assert len(events) == 1
    d = events[0]
    assert (d.model, d.model_version, d.detector, d.kind, d.target) == ("phishing-logreg", 1, "ADWIN", "concept",
                                                                        "error")
    assert 300 < d.window < 400
    assert d.threshold == 0.002


def test_cooldown_turns_a_flapping_error_stream_into_one_alert(spec, settings):
    errors = [0.0] * 300 + [1.0] * 100 + [0.0] * 100 + [1.0] * 100 + [0.0] * 100
    raw = drift.ADWIN(delta=0.002)
    raw_detections = 0
    for e in errors:
        raw.update(e)
        raw_detections += raw.drift_detected
    assert raw_detections > 1  # River alone would alert several times

    proc = make_monitor(spec, settings)
    events = _drift_events(feed_pairs(proc, [(True, e == 0.0) for e in errors]))
    assert len(events) == 1
    assert proc.spec.monitor.drift[0].cooldown == 500


def test_shadow_predictions_do_not_count(spec, settings):
    proc = make_monitor(spec, settings)
    proc.handle([incoming(proc, "t.predictions", prediction_bytes("s", True, shadow=True)),
                 incoming(proc, "t.labels", label_bytes("s", True))])
    elapse(proc)
    assert proc.tick(0.0) == []


# ==== runtime: poison-message isolation ===========================================================

class PoisonProcessor:
    """Upper-cases every message; raises on b"poison"; rejects b"reject"; transient failures on demand."""

    name = "stub"

    def __init__(self):
        self.calls: list[list[bytes]] = []
        self.transient_failures = 0

    def subscriptions(self):
        return {"t.in": lambda raw: raw.decode()}

    def handle(self, batch):
        self.calls.append([m.raw for m in batch])
        if self.transient_failures:
            self.transient_failures -= 1
            raise Transient("redis down")
        out = []
        for m in batch:
            if m.value == "poison":
                raise ValueError("boom")
            if m.value == "reject":
                out.append(Rejected(m, Reject("invalid_value", "no thanks", "value"), {"note": "x"}))
            else:
                out.append(Outgoing("t.out", m.value.upper().encode(), m.key))
        return out


def make_app(settings: Settings, processor=None) -> StreamApp:
    return StreamApp(settings, processor or PoisonProcessor(), RuntimeMetrics("x"))


def stub_batch(values: list[str]) -> list[Incoming]:
    return [Incoming("t.in", 2, 100 + n, f"k{n}".encode(), v.encode(), value=v) for n, v in enumerate(values)]


def headers(out: Outgoing) -> dict[str, str]:
    return {k: v.decode() for k, v in out.headers or []}


def test_poison_message_goes_alone_to_the_dlq(settings):
    app = make_app(settings)
    results = app._handle(stub_batch(["a", "b", "poison", "c"]))
    assert [r.topic for r in results] == ["t.out", "t.out", "t.dlq", "t.out"]
    assert [r.value for r in results] == [b"A", b"B", b"poison", b"C"]
    dlq = results[2]
    assert dlq.key == b"k2"
    h = headers(dlq)
    assert h["streamlearn.reason"] == "handler_error"
    assert h["streamlearn.source.offset"] == "102"
    assert h["streamlearn.source.partition"] == "2"
    assert h["streamlearn.source.topic"] == "t.in"
    assert h["streamlearn.service"] == "stub"
    registry = app.metrics.registry
    assert registry.get_sample_value("streamlearn_dlq_messages_total", {
        "service": "stub", "topic": "t.in", "reason": "handler_error", "field": ""}) == 1
    assert registry.get_sample_value("streamlearn_errors_total", {"service": "stub", "kind": "handler"}) == 1


def test_clean_batch_is_handled_once(settings):
    processor = PoisonProcessor()
    app = make_app(settings, processor)
    assert [r.value for r in app._handle(stub_batch(["a", "b"]))] == [b"A", b"B"]
    assert processor.calls == [[b"a", b"b"]]


def test_rejected_results_go_to_the_dlq_with_reason_field_and_extra_headers(settings):
    app = make_app(settings)
    results = app._handle(stub_batch(["a", "reject"]))
    assert [r.topic for r in results] == ["t.out", "t.dlq"]
    h = headers(results[1])
    assert (h["streamlearn.reason"], h["streamlearn.field"], h["streamlearn.error"]) == (
        "invalid_value", "value", "no thanks")
    assert h["streamlearn.note"] == "x"
    assert results[1].value == b"reject"


def test_transient_failure_retries_the_whole_batch(settings, monkeypatch):
    processor = PoisonProcessor()
    processor.transient_failures = 2
    app = make_app(settings, processor)
    waits: list[float] = []
    monkeypatch.setattr(app._stop, "wait", lambda timeout: waits.append(timeout) or False)
    results = app._handle(stub_batch(["a", "b"]))
    assert [r.value for r in results] == [b"A", b"B"]
    assert len(processor.calls) == 3
    assert waits == [0.1, 0.2]
    assert app.metrics.registry.get_sample_value("streamlearn_errors_total",
                                                 {"service": "stub", "kind": "transient"}) == 2


def test_transient_failure_while_stopping_sends_nothing_to_the_dlq(settings):
    processor = PoisonProcessor()
    processor.transient_failures = 1
    app = make_app(settings, processor)
    app.stop()
    with pytest.raises(SystemExit, match="offsets not committed"):
        app._handle(stub_batch(["a"]))


def test_stream_app_does_not_connect_at_construction(settings):
    app = make_app(settings)
    assert not hasattr(app, "producer") and not hasattr(app, "consumer")
    assert app.group_id == "streamlearn-stub"
    assert app.dlq_topic == "t.dlq"


# ---- one whole loop iteration with fake client objects -------------------------------------------

class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes):
        self._t, self._p, self._o, self._k, self._v = topic, partition, offset, key, value

    def error(self):
        return None

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def key(self):
        return self._k

    def value(self):
        return self._v

    def timestamp(self):
        return (1, 0)


class FakeProducer:
    def __init__(self):
        self.pending: list[tuple[str, bytes, bytes | None, list, Any]] = []
        self.acked: list[tuple[str, bytes, bytes | None, dict[str, bytes]]] = []

    def produce(self, topic, value, key, headers=None, on_delivery=None):
        self.pending.append((topic, value, key, headers, on_delivery))

    def flush(self, timeout=None):
        for topic, value, key, hdrs, callback in self.pending:
            self.acked.append((topic, value, key, dict(hdrs or [])))
            callback(None, None)
        self.pending = []
        return 0


class FakeConsumer:
    def __init__(self, producer: FakeProducer):
        self.producer = producer
        self.commits: list[tuple[list[tuple[str, int, int]], int]] = []

    def commit(self, offsets, asynchronous):
        assert asynchronous is False
        # at-least-once: every output was acknowledged before the commit
        assert not self.producer.pending
        self.commits.append(([(tp.topic, tp.partition, tp.offset) for tp in offsets], len(self.producer.acked)))


def test_one_loop_iteration_routes_decode_errors_to_the_dlq_then_commits(spec, settings):
    store = FakeStore()
    processor = IngestionProcessor(spec, settings, RuntimeMetrics("ingestion"), store=store)
    app = StreamApp(settings, processor, RuntimeMetrics("x"))
    app.producer = FakeProducer()
    app.consumer = FakeConsumer(app.producer)
    app._assigned = {("t.events", 0)}
    raws = [event_bytes(0), b"\xff\xfe", event_bytes(1, entity="u2"), _data(https=7.0)]
    app._process([FakeMessage("t.events", 0, 40 + n, b"u", raw) for n, raw in enumerate(raws)])

    acked = app.producer.acked
    assert sorted(topic for topic, *_ in acked) == ["t.dlq", "t.dlq", "t.features", "t.features"]
    dlq = {hdrs["streamlearn.source.offset"]: hdrs for topic, _, _, hdrs in acked if topic == "t.dlq"}
    assert dlq[b"41"]["streamlearn.reason"] == b"encoding"
    assert dlq[b"43"]["streamlearn.reason"] == b"out_of_bounds"
    assert dlq[b"43"]["streamlearn.field"] == b"data.https"
    assert dlq[b"43"]["streamlearn.schema.version"] == b"1"
    assert [value for topic, value, *_ in acked if topic == "t.dlq"] == [b"\xff\xfe", raws[3]]
    assert app.consumer.commits == [([("t.events", 0, 44)], 4)]
    assert set(store.rows) == {"u1", "u2"}


def test_predictions_waiting_for_labels_are_kept_compactly(spec, settings):
    """The monitor's join buffer holds about rate x label delay predictions (up to label.max_pending,
    100,000 by default): each keeps only what judging it needs, and still joins and counts the same.
    Keeping the decoded Prediction measured 1,817 bytes per waiting prediction."""
    proc = make_monitor(spec, settings)
    raw = [prediction_bytes(f"m{i}", i % 2 == 0, ts=1000.0 + i) for i in range(2000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        batch = [incoming(proc, "t.predictions", r) for r in raw]  # decoded, as the runtime hands them over
        proc.handle(batch)
        del batch  # what stays is what the join buffer keeps
        per_prediction = (tracemalloc.get_traced_memory()[0] - before) / len(raw)
    finally:
        tracemalloc.stop()
    assert len(proc.join) == 2000
    assert per_prediction < 700, f"{per_prediction:.0f} bytes per waiting prediction"
    proc.handle([incoming(proc, "t.labels", label_bytes(f"m{i}", True, ts=1000.0 + i)) for i in range(2000)])
    assert len(proc.join) == 0
    elapse(proc)
    quality = [o.value for o in proc.tick(5000.0) if isinstance(o.value, QualityEvent)]
    assert [(q.model_version, q.labelled, q.cumulative) for q in quality if not q.shadow] == [(1, 2000, 0.5)]
