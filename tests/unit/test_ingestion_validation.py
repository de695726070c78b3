"""The event decoder of ingestion: one case per reject reason (on the clickstream spec, which has
every field type), accepted event times, and hypothesis fuzzing: whatever the bytes, the decoder
returns a valid event or raises a :class:`Reject` with a reason from ``REASONS``, and a valid event
always gets its feature vector or a ``Rejected``."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.ingestion.app import IngestionProcessor
from services.ingestion.validation import MAX_TS, REASONS, EventValidator, encoding_problem, parse_ts
from services.runtime.messages import Incoming, Outgoing, Reject, Rejected
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings
from services.runtime.spec import load_spec, parse_spec

SPEC = load_spec("clickstream")
VALIDATE = EventValidator(SPEC)
GOOD: dict[str, Any] = {"schema_version": 1, "event_id": "e1", "entity_id": "u1", "ts": 1_700_000_000.5,
                        "type": "page_view", "data": {"page": "product", "item": "item-1", "price": 9.5,
                                                      "dwell_s": 12.0}}


def doc(**changes: Any) -> bytes:
    """GOOD with top-level (``ts=...``) or data (``data__price=...``) changes; ``...`` deletes."""
    event = json.loads(json.dumps(GOOD))
    for name, value in changes.items():
        target, key = (event["data"], name[6:]) if name.startswith("data__") else (event, name)
        if value is ...:
            del target[key]
        else:
            target[key] = value
    return json.dumps(event).encode()


# (case, raw bytes, reason, field): at least one per reason the issue lists
REJECTS = [
    ("oversized", doc(data__item="x" * 5000), "oversized", None),
    ("malformed-bytes", b"\x00\x9f\x92\x96garbage", "encoding", None),
    ("latin-1-text", doc().replace(b"item-1", "caf\u00e9".encode("latin-1")), "encoding", None),
    ("utf-16", doc().decode().encode("utf-16-le"), "encoding", None),
    ("utf-16-bom", doc().decode().encode("utf-16"), "encoding", None),
    ("utf-8-bom", b"\xef\xbb\xbf" + doc(), "encoding", None),
    ("invalid-json", doc()[:-5], "invalid_json", None),
    ("empty", b"", "invalid_json", None),
    ("json-array", b"[1, 2]", "not_an_object", None),
    ("json-string", b'"event"', "not_an_object", None),
    ("data-not-object", doc(data=[1, 2]), "not_an_object", "data"),
    ("schema-version", doc(schema_version=2), "schema_version", "schema_version"),
    ("missing-event-id", doc(event_id=...), "missing_field", "event_id"),
    ("missing-entity-id", doc(entity_id=...), "missing_field", "entity_id"),
    ("missing-data-field", doc(data__dwell_s=...), "missing_field", "data.dwell_s"),
    ("missing-timestamp", doc(ts=...), "missing_field", "ts"),
    ("unknown-data-field", doc(data__colour="red"), "unknown_field", "data.colour"),
    ("unknown-envelope-field", doc(source="web"), "unknown_field", "source"),
    ("wrong-type-str-for-float", doc(data__price="9.5"), "wrong_type", "data.price"),
    ("wrong-type-bool-for-float", doc(data__dwell_s=True), "wrong_type", "data.dwell_s"),
    ("wrong-type-number-for-str", doc(data__item=7), "wrong_type", "data.item"),
    ("wrong-type-entity-id", doc(entity_id=42), "wrong_type", "entity_id"),
    ("out-of-bounds-low", doc(data__price=-1.0), "out_of_bounds", "data.price"),
    ("out-of-bounds-high", doc(data__dwell_s=86401.0), "out_of_bounds", "data.dwell_s"),
    ("string-too-long", doc(data__item="x" * 65), "out_of_bounds", "data.item"),
    ("nan", doc().replace(b'"price": 9.5', b'"price": NaN'), "not_finite", "data.price"),
    ("infinity", doc().replace(b'"price": 9.5', b'"price": -Infinity'), "not_finite", "data.price"),
    ("overflow-to-inf", doc().replace(b'"price": 9.5', b'"price": 1e999'), "not_finite", "data.price"),
    ("unknown-event-type", doc(type="page_click"), "unknown_type", "type"),
    ("value-not-allowed", doc(data__page="admin"), "invalid_value", "data.page"),
    ("empty-event-id", doc(event_id=""), "invalid_value", "event_id"),
    ("unparseable-timestamp", doc(ts="yesterday"), "invalid_timestamp", "ts"),
    ("invalid-iso-date", doc(ts="2024-13-45T00:00:00Z"), "invalid_timestamp", "ts"),
    ("timestamp-in-milliseconds", doc(ts=1_700_000_000_000), "invalid_timestamp", "ts"),
    ("negative-timestamp", doc(ts=-5), "invalid_timestamp", "ts"),
    ("nan-timestamp", doc().replace(b'"ts": 1700000000.5', b'"ts": NaN'), "invalid_timestamp", "ts"),
    ("boolean-timestamp", doc(ts=True), "invalid_timestamp", "ts"),
    ("null-timestamp", doc(ts=None), "invalid_timestamp", "ts"),
]


def test_the_table_covers_every_decoder_reason():
    assert {reason for _, _, reason, _ in REJECTS} == set(REASONS) - {"derived_error"}


@pytest.mark.parametrize(("raw", "reason", "field"), [c[1:] for c in REJECTS], ids=[c[0] for c in REJECTS])
def test_reject_reason_and_field(raw, reason, field):
    with pytest.raises(Reject) as info:
        VALIDATE(raw)
    assert (info.value.reason, info.value.field) == (reason, field), info.value.error
    assert info.value.schema_version == 1
    assert info.value.error


@pytest.mark.parametrize(("ts", "expected"), [
    (1_700_000_000, 1_700_000_000.0),
    (1_700_000_000.25, 1_700_000_000.25),
    ("1700000000.25", 1_700_000_000.25),
    ("2023-11-14T22:13:20Z", 1_700_000_000.0),
    ("2023-11-14T22:13:20.5+00:00", 1_700_000_000.5),
    ("2023-11-15T00:13:20+02:00", 1_700_000_000.0),
    ("2023-11-14 22:13:20", 1_700_000_000.0),  # no offset: UTC
    (0, 0.0),
    (MAX_TS, MAX_TS),
])
def test_event_time_as_epoch_seconds_or_iso_8601(ts, expected):
    assert VALIDATE(doc(ts=ts)).ts == expected


def test_a_valid_event_keeps_its_values():
    event = VALIDATE(doc())
    assert (event.event_id, event.entity_id, event.type) == ("e1", "u1", "page_view")
    assert event.data.__dict__ == GOOD["data"]
    assert VALIDATE(doc(data__item=...)).data.item is None  # optional field


def test_int_fields_without_bounds_still_fit_in_64_bits():
    validate = EventValidator(parse_spec("""
name: ints
event: {fields: {n: {type: int}}}
label: {type: bool}
model: {name: m, task: binary, pipeline: [{linear_model.LogisticRegression: {}}]}
"""))

    def event(n: int) -> bytes:
        return b'{"event_id":"e","entity_id":"u","ts":1,"type":"event","data":{"n":%d}}' % n

    assert validate(event(2**63 - 1)).data.n == 2**63 - 1
    assert validate(event(-(2**63))).data.n == -(2**63)
    for n in (2**63, -(2**63) - 1, 10**30):
        with pytest.raises(Reject) as info:
            validate(event(n))
        assert (info.value.reason, info.value.field) == ("out_of_bounds", "data.n")


def test_encoding_problem_only_names_real_encoding_problems():
    assert encoding_problem(doc()) is None
    assert "BOM" in encoding_problem(b"\xef\xbb\xbf{}") or "byte order" in encoding_problem(b"\xef\xbb\xbf{}")
    assert "UTF-16" in encoding_problem("{}".encode("utf-16-le"))
    assert "not UTF-8" in encoding_problem(b"{\xff}")


def test_parse_ts_leaves_non_strings_to_the_float_validator():
    assert parse_ts(5) == 5
    assert parse_ts(None) is None
    with pytest.raises(ValueError):
        parse_ts(False)
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_ts("tomorrow")


# ---- fuzzing -------------------------------------------------------------------------------------

PROCESSOR = IngestionProcessor(SPEC, Settings({"STREAMLEARN_TOPIC_PREFIX": "t."}), RuntimeMetrics("ingestion"),
                               store=None)
SEEN = {"bytes": 0, "json": 0, "near": 0}
OUTCOMES: Counter = Counter()


def check(raw: bytes, kind: str) -> None:
    """The property: a Reject with a known reason, or an event that yields features or a Rejected."""
    SEEN[kind] += 1
    try:
        event = VALIDATE(raw)
    except Reject as reject:
        assert reject.reason in REASONS, reject.reason
        assert isinstance(reject.error, str) and reject.error
        assert reject.field is None or isinstance(reject.field, str)
        OUTCOMES[reject.reason] += 1
        return
    assert math.isfinite(event.ts) and 0 <= event.ts <= MAX_TS
    msg = Incoming("t.events", 0, SEEN[kind] + 10_000_000 * list(SEEN).index(kind), None, raw, value=event)
    results = list(PROCESSOR.handle([msg]))
    assert len(results) == 1
    result = results[0]
    if isinstance(result, Rejected):
        assert result.reject.reason in REASONS
        OUTCOMES[result.reject.reason] += 1
        return
    OUTCOMES["features"] += 1
    assert isinstance(result, Outgoing)
    features = orjson.loads(result.encoded()[1])
    assert features["event_id"] == event.event_id
    assert set(features["features"]) == set(SPEC.feature_names()) | set(SPEC.features.aggregate_names())


FUZZ = settings(max_examples=2000, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(raw):
    check(raw, "bytes")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


@FUZZ
@given(json_values)
def test_fuzz_random_json(value):
    check(json.dumps(value).encode(), "json")


ENVELOPE = ["schema_version", "event_id", "entity_id", "ts", "type", "data"]
DATA = list(GOOD["data"])
odd_values = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
              | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=80)
              | st.sampled_from(["2024-02-30T00:00:00Z", "2024-01-01T00:00:00+25:00", "1e10", " 12 ", "",
                                 "home", "checkout", "\ud7ff", "2023-11-14T22:13:20Z", "NaN"])
              | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@st.composite
def near_valid(draw) -> bytes:
    """A valid event with a few things changed: values replaced, keys dropped or added, the bytes
    cut, spliced or re-encoded."""
    event = json.loads(json.dumps(GOOD))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        where = draw(st.sampled_from(["top", "data"]))
        target = event if where == "top" or not isinstance(event.get("data"), dict) else event["data"]
        keys = ENVELOPE if target is event else DATA
        action = draw(st.sampled_from(["set", "drop", "add"]))
        key = draw(st.sampled_from(keys))
        if action == "set":
            target[key] = draw(odd_values)
        elif action == "drop":
            target.pop(key, None)
        else:
            target[draw(st.text(min_size=1, max_size=8))] = draw(odd_values)
    raw = json.dumps(event, allow_nan=True).encode()
    mangle = draw(st.sampled_from(["none", "none", "none", "cut", "splice", "utf16", "bom", "pad"]))
    if mangle == "cut":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif mangle == "splice":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    elif mangle == "utf16":
        raw = raw.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    elif mangle == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif mangle == "pad":
        raw = raw[:-1] + b" " * draw(st.integers(0, 5000)) + raw[-1:]
    return raw


@FUZZ
@given(near_valid())
def test_fuzz_near_valid_events(raw):
    check(raw, "near")


def test_fuzzing_volume():
    """Hypothesis really generated thousands of inputs (runs the fuzzers not run yet, e.g. with -k)."""
    for kind, fuzz in (("bytes", test_fuzz_random_bytes), ("json", test_fuzz_random_json),
                       ("near", test_fuzz_near_valid_events)):
        if SEEN[kind] == 0:
            fuzz()
    print(f"\nfuzzed {sum(SEEN.values())} inputs: {SEEN}; outcomes {dict(OUTCOMES.most_common())}")
    assert sum(SEEN.values()) >= 6000, SEEN
    assert OUTCOMES["features"] >= 100, "near-valid events reach the feature computation"
    assert len(set(OUTCOMES) - {"features"}) >= 10, "and most reject reasons"
