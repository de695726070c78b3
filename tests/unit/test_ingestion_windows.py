"""Windowed per-entity aggregates in memory: the ingestion handler against a pandas computation of
the same definitions (late events inside and outside the grace periods), exactly-once application
under re-delivery, conflicting writers and state round trips. The Redis backend of the same
contract is tested in tests/integration/test_ingestion_state.py."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
import redis

from services.ingestion.app import IngestionProcessor
from services.ingestion.state import MemoryStateBackend
from services.ingestion.synthetic import clickstream
from services.ingestion.windows import WindowEngine
from services.runtime.messages import Incoming, Outgoing, Rejected, Transient
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings
from services.runtime.spec import PipelineSpec, SpecError, load_spec, parse_spec, resolve_spec_path
from tests.ingestion_reference import mismatches, reference, tumbling_counts

SETTINGS = Settings({"STREAMLEARN_TOPIC_PREFIX": "t."})
CLICKSTREAM = load_spec("clickstream")
CLICKSTREAM_YAML = resolve_spec_path("clickstream").read_text()
# the same spec without defaults: missing aggregates are None
RAW = parse_spec(CLICKSTREAM_YAML.replace(", default: 0}", "}").replace(", default: -1}", "}"))


def processor(spec: PipelineSpec = CLICKSTREAM, backend: MemoryStateBackend | None = None, **kwargs: Any):
    metrics = RuntimeMetrics("ingestion")
    if backend is None:
        backend = MemoryStateBackend(WindowEngine(spec).state_fields, **kwargs)
    return IngestionProcessor(spec, SETTINGS, metrics, store=None, state=backend), metrics, backend


def messages(proc, events: list[dict], partition_of=lambda e: 0, start: int = 0) -> list[Incoming]:
    """Incoming messages as the runtime hands them over: decoded, with per-partition offsets."""
    decode = proc.subscriptions()["t.events"]
    offsets: dict[int, itertools.count] = {}
    out = []
    for event in events:
        p = partition_of(event)
        raw = orjson.dumps(event)
        offset = next(offsets.setdefault(p, itertools.count(start)))
        out.append(Incoming("t.events", p, offset, event["entity_id"].encode(), raw, value=decode(raw)))
    return out


def run(proc, msgs: list[Incoming], batch: int = 250) -> list[Outgoing]:
    out = []
    for i in range(0, len(msgs), batch):
        results = list(proc.handle(msgs[i:i + batch]))
        assert all(isinstance(r, Outgoing) for r in results), results
        out.extend(results)
    return out


def features(outputs: list[Outgoing]) -> dict[str, dict[str, Any]]:
    return {f["event_id"]: f["features"] for f in (orjson.loads(o.encoded()[1]) for o in outputs)}


def late_counter(metrics: RuntimeMetrics, window: str) -> float:
    labels = {"service": "ingestion", "feature_set": "clickstream", "window": window}
    return metrics.registry.get_sample_value("streamlearn_ingestion_late_events_total", labels) or 0


@pytest.mark.parametrize("spec", [CLICKSTREAM, RAW], ids=["with-defaults", "without-defaults"])
def test_aggregates_equal_a_pandas_computation_over_the_same_events(spec):
    events = clickstream(3000, users=30, seed=11)
    proc, metrics, _ = processor(spec)
    got = features(run(proc, messages(proc, events, partition_of=lambda e: hash(e["entity_id"]) % 3)))
    expected, late = reference(events, spec)
    assert len(got) == len(events)
    assert mismatches(expected, got) == []
    # late events inside and outside the grace periods were really there, and were counted
    assert all(n > 10 for n in late.values()), late
    for window, n in late.items():
        assert late_counter(metrics, window) == n
    # within grace: out of order but counted
    ts = {e["event_id"]: e["ts"] for e in events}
    running: dict[str, float] = {}
    within = 0
    for e in events:
        wm = running.get(e["entity_id"], e["ts"])
        if wm - 10 <= e["ts"] < wm:
            within += 1
        running[e["entity_id"]] = max(wm, e["ts"])
    assert within > 10
    assert len(ts) == len(events)


def test_tumbling_counts_match_a_vectorised_groupby_too():
    events = clickstream(2000, users=20, seed=3)
    proc, _, _ = processor()
    got = features(run(proc, messages(proc, events)))
    counts = tumbling_counts(events, CLICKSTREAM, "t1m")
    for event_id, count in counts.items():
        assert got[event_id]["events_1m"] == (None if count != count else count)


def test_a_too_late_event_still_gets_its_vector_with_what_it_can_have():
    proc, metrics, _ = processor(RAW)
    base = {"schema_version": 1, "entity_id": "u", "type": "page_view",
            "data": {"page": "product", "item": "a", "price": 10.0, "dwell_s": 1.0}}
    events = [dict(base, event_id="e1", ts=1000.0), dict(base, event_id="e2", ts=2000.0),
              dict(base, event_id="late", ts=1001.0)]
    got = features(run(proc, messages(proc, events)))
    late = got["late"]
    assert late["events_1m"] is None and late["dwell_sum_1m"] is None  # tumbling closed (grace 10 s)
    assert late["dwell_mean_5m"] is None  # every hopping window containing it closed
    assert late["items_10m"] is None  # sliding: 999 s behind, grace 60 s
    assert late["since_last_s"] == -999.0
    assert (late["price"], late["dwell_s"], late["long_dwell"]) == (10.0, 1.0, False)
    assert got["e2"]["since_last_s"] == 1000.0
    assert got["e1"]["since_last_s"] is None
    assert {w: late_counter(metrics, w) for w in ("t1m", "h5m", "s10m")} == {"t1m": 1, "h5m": 1, "s10m": 1}


def test_hopping_windows_give_the_oldest_open_window():
    spec = parse_spec("""
name: hop
event: {fields: {x: {type: float}}}
label: {type: bool}
model: {name: m, task: binary, pipeline: [{linear_model.LogisticRegression: {}}]}
features:
  windows: [{name: h, type: hopping, size_s: 30, step_s: 10, grace_s: 5}]
  aggregates: [{name: n, fn: count, window: h}, {name: s, fn: sum, field: x, window: h}]
""")
    engine = WindowEngine(spec)
    state = engine.new_state()
    seen = [engine.update(state, ts, {"x": x}) for ts, x in [(1.0, 1.0), (12.0, 2.0), (25.0, 4.0), (34.0, 8.0)]]
    # windows [k*10, k*10+30): each event reads the oldest window containing it: [-20,10), [-10,20),
    # [0,30), [10,40)
    assert [f["n"] for f, _ in seen] == [1, 2, 3, 3]
    assert [f["s"] for f, _ in seen] == [1.0, 3.0, 7.0, 14.0]
    f, late = engine.update(state, 36.0, {"x": 16.0})  # [10,40) again; W=36 closes [0,30) (30 + 5 grace)
    assert (f["n"], f["s"], late) == (4, 30.0, [])
    f, late = engine.update(state, 5.0, {"x": 32.0})  # pane [0,10) belongs only to closed windows
    assert (f["n"], f["s"], late) == (None, None, ["h"])
    f, late = engine.update(state, 19.0, {"x": 64.0})  # [0,30) closed, [10,40) open: counted there
    assert (f["n"], f["s"], late) == (5, 94.0, [])


def test_state_survives_an_encode_decode_round_trip_mid_stream():
    events = clickstream(1500, users=10, seed=5)
    engine = WindowEngine(CLICKSTREAM)
    straight, restored = {}, {}
    states: dict[str, Any] = {}
    for e in events:
        state = states.setdefault(e["entity_id"], engine.new_state())
        straight[e["event_id"]] = engine.update(state, e["ts"], e["data"])
    states = {}
    for i, e in enumerate(events):
        state = states.setdefault(e["entity_id"], engine.new_state())
        restored[e["event_id"]] = engine.update(state, e["ts"], e["data"])
        if i % 97 == 0:  # persist and reload every entity now and then
            states = {k: engine.decode(engine.encode(s)) for k, s in states.items()}
    assert restored == straight


def test_redelivered_batches_get_the_first_vectors_byte_for_byte_and_count_once():
    events = clickstream(600, users=5, seed=9)
    proc, metrics, backend = processor()
    msgs = messages(proc, events)
    first = run(proc, msgs[:400])
    # a crash before the commit: a new process re-consumes from offset 100, in other batch sizes
    again, metrics2, _ = processor(backend=backend)
    second = run(again, msgs[100:], batch=170)
    assert [o.value for o in second[:300]] == [o.value for o in first[100:400]]
    reference_run, _, _ = processor()
    uninterrupted = run(reference_run, msgs)
    assert features(second[300:]) == features(uninterrupted[400:])
    assert backend.states == reference_run.aggregates.backend.states
    replayed = metrics2.registry.get_sample_value("streamlearn_ingestion_replayed_events_total",
                                                  {"service": "ingestion", "feature_set": "clickstream",
                                                   "result": "cached"})
    assert replayed == 300


def test_the_same_process_re_handling_a_batch_applies_nothing_twice():
    events = clickstream(50, users=3, seed=2)
    proc, _, backend = processor()
    batch = messages(proc, events)
    first = run(proc, batch, batch=50)
    commits = backend.commits
    second = run(proc, batch, batch=50)  # e.g. a transaction abort re-seeks and re-delivers it
    assert [o.value for o in second] == [o.value for o in first]
    assert backend.commits == commits


def test_a_zombie_writer_is_fenced_and_both_emit_the_same_vectors():
    """Two processes work on the same partition (a rebalance while the old owner finishes a batch):
    the compare-and-set on the applied offset makes the loser re-read, never double count."""
    events = clickstream(400, users=4, seed=4)
    backend = MemoryStateBackend(WindowEngine(CLICKSTREAM).state_fields)
    old, metrics_old, _ = processor(backend=backend)
    new, metrics_new, _ = processor(backend=backend)
    msgs = messages(old, events)
    run(old, msgs[:100])
    run(new, msgs[:100])  # the new owner starts from the committed offset: all replayed
    out_new = run(new, msgs[100:250])  # the new owner moves on
    out_old = run(old, msgs[100:200])  # the zombie still believes it is at 99: conflict, re-read, cached
    assert [o.value for o in out_old] == [o.value for o in out_new[:100]]
    single, _, single_backend = processor()
    expected = features(run(single, msgs[:250]))
    assert features(out_new) == {k: v for k, v in expected.items() if k in features(out_new)}
    assert backend.states == single_backend.states
    labels = {"service": "ingestion", "feature_set": "clickstream"}
    assert metrics_old.registry.get_sample_value("streamlearn_ingestion_state_conflicts_total", labels) == 1
    assert metrics_new.registry.get_sample_value("streamlearn_ingestion_state_conflicts_total", labels) is None


class FlakyBackend(MemoryStateBackend):
    """Fails the next ``fail`` reads or commits with a Redis error, like a Redis restart would."""

    def __init__(self, fields, fail_reads: int = 0, fail_commits: int = 0):
        super().__init__(fields)
        self.fail_reads, self.fail_commits = fail_reads, fail_commits

    def read(self, ranges, entities):
        if self.fail_reads:
            self.fail_reads -= 1
            raise redis.ConnectionError("connection refused")
        return super().read(ranges, entities)

    def commit(self, writes):
        if self.fail_commits:
            self.fail_commits -= 1
            raise redis.TimeoutError("timed out")
        return super().commit(writes)


def test_a_failing_state_store_is_transient_and_the_retry_counts_once():
    events = clickstream(300, users=5, seed=12)
    backend = FlakyBackend(WindowEngine(CLICKSTREAM).state_fields)
    proc, _, _ = processor(backend=backend)
    msgs = messages(proc, events)
    out = run(proc, msgs[:100])
    backend.fail_commits = 1
    with pytest.raises(Transient, match="aggregate state"):
        proc.handle(msgs[100:200])
    backend.fail_reads = 1
    with pytest.raises(Transient):
        proc.handle(msgs[100:200])  # the runtime retries the same batch ...
    out += run(proc, msgs[100:200], batch=100)  # ... until the store is back
    out += run(proc, msgs[200:])
    single, _, single_backend = processor()
    assert features(out) == features(run(single, msgs))
    assert backend.states == single_backend.states


def test_an_online_store_failure_after_the_state_commit_replays_the_same_vectors():
    class FailingOnce:
        def __init__(self):
            self.fail, self.rows = True, {}

        def write_batch(self, rows):
            if self.fail:
                self.fail = False
                raise redis.ConnectionError("down")
            self.rows.update(rows)

        def read(self, entity_id, max_age_s=None):
            return self.rows.get(entity_id)

        def close(self):
            pass

    events = clickstream(100, users=3, seed=13)
    store = FailingOnce()
    engine_fields = WindowEngine(CLICKSTREAM).state_fields
    proc = IngestionProcessor(CLICKSTREAM, SETTINGS, RuntimeMetrics("ingestion"), store=store,
                              state=MemoryStateBackend(engine_fields))
    msgs = messages(proc, events)
    with pytest.raises(Transient, match="online store"):
        proc.handle(msgs)
    out = run(proc, msgs, batch=100)  # the retry: everything was applied, so everything is replayed
    single, _, _ = processor()
    assert features(out) == features(run(single, msgs))
    assert set(store.rows) == {e["entity_id"] for e in events}


def test_revoked_partitions_are_re_read_from_the_backend():
    events = clickstream(300, users=6, seed=8)
    backend = MemoryStateBackend(WindowEngine(CLICKSTREAM).state_fields)
    a, _, _ = processor(backend=backend)
    b, _, _ = processor(backend=backend)
    msgs = messages(a, events, partition_of=lambda e: int(e["entity_id"].split("-")[1]) % 2)
    by_part = {p: [m for m in msgs if m.partition == p] for p in (0, 1)}
    out = run(a, by_part[0][:50] + by_part[1][:50])
    a.revoked([("t.events", 1)])  # partition 1 moves to b, which continues it
    out += run(b, by_part[1][50:])
    a.assigned([("t.events", 1)])  # ... and back to a
    b.revoked([("t.events", 1)])
    out += run(a, by_part[0][50:])
    single, _, _ = processor()
    expected = features(run(single, msgs))
    assert features(out) == expected


def test_rejected_events_do_not_touch_the_aggregates():
    spec = parse_spec(CLICKSTREAM_YAML.replace("expr: 'dwell_s > 30'", "expr: '1 / dwell_s'"))
    proc, _, _ = processor(spec)
    base = {"schema_version": 1, "entity_id": "u", "type": "page_view",
            "data": {"page": "home", "price": 0.0, "dwell_s": 2.0}}
    events = [dict(base, event_id="a", ts=10.0),
              dict(base, event_id="bad", ts=11.0, data={**base["data"], "dwell_s": 0.0}),
              dict(base, event_id="b", ts=12.0)]
    results = list(proc.handle(messages(proc, events)))
    assert isinstance(results[1], Rejected) and results[1].reject.reason == "derived_error"
    assert orjson.loads(results[2].value)["features"]["events_1m"] == 2


def test_the_online_store_gets_the_latest_vector_per_entity():
    class Store:
        def __init__(self):
            self.rows = {}

        def write_batch(self, rows):
            self.rows.update(rows)

        def read(self, entity_id, max_age_s=None):
            return self.rows.get(entity_id)

        def close(self):
            pass

    store = Store()
    metrics = RuntimeMetrics("ingestion")
    proc = IngestionProcessor(CLICKSTREAM, SETTINGS, metrics, store=store)
    base = {"schema_version": 1, "entity_id": "u", "type": "page_view",
            "data": {"page": "home", "price": 0.0, "dwell_s": 2.0}}
    events = [dict(base, event_id="a", ts=10.0), dict(base, event_id="b", ts=30.0), dict(base, event_id="c", ts=20.0)]
    out = features(run(proc, messages(proc, events)))
    assert store.rows["u"] == (30.0, out["b"])
    status, _, body = proc.routes()[("POST", "/features")](b'{"entity_ids": ["u", "nobody"]}')
    assert status == 200 and orjson.loads(body) == {"u": {"ts": 30.0, "features": out["b"]}, "nobody": None}
    assert proc.routes()[("POST", "/features")](b'{"entity": 1}')[0] == 400


@pytest.mark.parametrize(("change", "path", "message"), [
    ("type: hopping, size_s: 300, step_s: 60", "type: hopping, size_s: 300, step_s: 70", "multiple of step_s"),
    ("type: hopping, size_s: 300, step_s: 60", "type: hopping, size_s: 300", "needs step_s"),
    ("type: tumbling, size_s: 60", "type: tumbling, size_s: 60, step_s: 10", "only for hopping"),
    ("window: s10m, default: 0}", "window: s1h, default: 0}", "unknown window 's1h'"),
    ("fn: since_last,", "fn: since_last, window: t1m,", "no field and no window"),
    ("{name: events_1m, fn: count, window: t1m}", "{name: events_1m, fn: sum, window: t1m}", "needs a field"),
    ("state_ttl_s: 86400", "state_ttl_s: 100", "longer than state_ttl_s"),
])
def test_bad_window_specs_name_the_field_and_line(change, path, message):
    text = CLICKSTREAM_YAML.replace(change, path, 1)
    assert text != CLICKSTREAM_YAML
    with pytest.raises(SpecError, match=message) as info:
        parse_spec(text)
    assert "features" in str(info.value)
    assert "<spec>:" in str(info.value)


@pytest.mark.parametrize(("change", "message"), [
    ("field: dwell_s, window: t1m", "unknown event field"),
    ("field: price, window: h5m, default: 0}\n    - {name: price_max_5m", "needs an int or float field"),
    ("name: since_last_s", "already a feature"),
])
def test_aggregates_must_fit_the_event_fields(change, message):
    replacement = {"unknown event field": "field: dwel_s, window: t1m",
                   "needs an int or float field": "field: page, window: h5m, default: 0}\n    - {name: price_max_5m",
                   "already a feature": "name: price"}[message]
    spec = parse_spec(CLICKSTREAM_YAML.replace(change, replacement, 1))
    with pytest.raises(ValueError, match=message):
        spec.features.check_event_fields(spec.event)
