"""Ingestion's Redis side against a real Redis: the aggregate state backend (compare-and-set on the
applied offset, replay cache, script reloading) and the online store (never backwards in event
time, TTL, freshness at read, feature-age histogram)."""

from __future__ import annotations

import time

import orjson
import pytest
import redis

from services.ingestion.app import IngestionProcessor
from services.ingestion.state import RedisStateBackend, Write
from services.ingestion.synthetic import clickstream
from services.ingestion.windows import WindowEngine
from services.runtime.metrics import RuntimeMetrics
from services.runtime.online_store import RedisOnlineStore
from services.runtime.settings import Settings
from services.runtime.spec import load_spec
from tests.conftest import wait_until
from tests.ingestion_reference import mismatches, reference
from tests.unit.test_ingestion_windows import features, messages, run

SPEC = load_spec("clickstream")
FIELDS = WindowEngine(SPEC).state_fields


@pytest.fixture
def client(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


def backend(client, prefix: str, **kwargs) -> RedisStateBackend:
    return RedisStateBackend(client, f"{prefix}agg:", FIELDS, state_ttl_s=3600, **kwargs)


def test_commit_is_a_compare_and_set_on_the_applied_offset(client, prefix):
    b = backend(client, prefix)
    tp = ("events", 3)
    state = [b"[1.0]", b"[]", b"[]", b"[]"]
    assert b.commit({tp: Write(-1, 9, {"u1": state}, [(8, b"v8"), (9, b"v9")])}) == {tp: True}
    assert b.commit({tp: Write(-1, 12, {"u1": state}, [(12, b"x")])}) == {tp: False}, "stale basis"
    snap = b.read({tp: (5, 20)}, ["u1", "nobody"])
    assert snap.applied == {tp: 9}
    assert snap.replayed == {tp: {8: b"v8", 9: b"v9"}}
    assert snap.states == {"u1": state, "nobody": [None] * 4}
    assert 0 < client.pttl(f"{prefix}agg:e:u1") <= 3_600_000
    assert client.hget(f"{prefix}agg:applied", "events:3") == b"9"


def test_the_replay_cache_keeps_the_last_offsets_only(client, prefix):
    b = backend(client, prefix, replay_keep=10)
    tp = ("events", 0)
    basis = -1
    for last in range(9, 100, 10):
        outputs = [(o, b"%d" % o) for o in range(last - 9, last + 1)]
        assert b.commit({tp: Write(basis, last, {}, outputs)}) == {tp: True}
        basis = last
    assert sorted(b.read({tp: (0, 200)}, []).replayed[tp]) == list(range(90, 100))
    assert client.pttl(f"{prefix}agg:replay:events:0") > 0


def test_a_redis_that_lost_its_scripts_gets_them_again(client, prefix):
    b = backend(client, prefix)
    tp = ("events", 1)
    assert b.commit({tp: Write(-1, 0, {}, [(0, b"a")])}) == {tp: True}
    client.script_flush()
    assert b.commit({tp: Write(0, 1, {}, [(1, b"b")])}) == {tp: True}


def test_aggregates_with_redis_equal_pandas_and_survive_a_new_process(redis_server, client, prefix):
    events = clickstream(1200, users=12, seed=21)
    settings = Settings({"STREAMLEARN_TOPIC_PREFIX": "t."})

    def process():
        return IngestionProcessor(SPEC, settings, RuntimeMetrics("ingestion"), store=None,
                                  state=backend(redis.Redis.from_url(redis_server.url), prefix))

    first = process()
    msgs = messages(first, events, partition_of=lambda e: int(e["entity_id"].split("-")[1]) % 2)
    out = run(first, msgs[:700])
    first.close()
    second = process()  # a restart: each partition is re-delivered from offset 300
    again = run(second, [m for m in msgs if m.offset >= 300], batch=333)
    got = features(out) | features(again)
    by_event = {orjson.loads(o.value)["event_id"]: o.value for o in out}
    for o in again:
        event_id = orjson.loads(o.value)["event_id"]
        if event_id in by_event:
            assert o.value == by_event[event_id], "a replayed vector is the first one, byte for byte"
    expected, _ = reference(events, SPEC)
    assert mismatches(expected, got) == []
    second.close()


# ---- online store -----------------------------------------------------------------------------------

def store(client, prefix: str, **kwargs) -> tuple[RedisOnlineStore, RuntimeMetrics]:
    metrics = RuntimeMetrics("ingestion")
    return RedisOnlineStore(client, prefix.rstrip("."), "clickstream:v1", metrics=metrics,
                            **{"ttl_s": 60, **kwargs}), metrics


def test_the_store_never_moves_an_entity_backwards_in_event_time(client, prefix):
    s, _ = store(client, prefix)
    now = time.time()
    s.write_batch({"u1": (now - 5, {"x": 1}), "u2": (now - 5, {"x": 1})})
    s.write_batch({"u1": (now - 10, {"x": 2}), "u2": (now - 1, {"x": 3})})
    assert s.read("u1") == (now - 5, {"x": 1})
    assert s.read("u2") == (now - 1, {"x": 3})
    s.write_batch({"u1": (now - 5, {"x": 4})})  # same event time: the later write wins
    assert s.read("u1") == (now - 5, {"x": 4})
    assert 0 < client.pttl(f"{prefix.rstrip('.')}:fs:clickstream:v1:u1") <= 60_000


def test_expired_and_stale_vectors_are_missing_not_served(client, prefix):
    s, metrics = store(client, prefix, ttl_s=0.3, max_age_s=30)
    now = time.time()
    s.write_batch({"fresh": (now, {"x": 1}), "old": (now - 3600, {"x": 2})})
    assert s.read("fresh") == (now, {"x": 1})
    assert s.read("old") is None, "older than max_age_s"
    assert s.read("old", max_age_s=7200) == (now - 3600, {"x": 2})
    wait_until(lambda: s.read("fresh") is None, 10, "the TTL to expire the row")
    reads = {r: metrics.registry.get_sample_value("streamlearn_feature_store_reads_total",
                                                  {"service": "ingestion", "feature_set": "clickstream:v1",
                                                   "result": r}) for r in ("hit", "stale", "missing")}
    assert reads["hit"] >= 2 and reads["stale"] == 1 and reads["missing"] >= 1
    labels = {"service": "ingestion", "feature_set": "clickstream:v1"}
    assert metrics.registry.get_sample_value("streamlearn_feature_age_seconds_count", labels) >= 3
    assert metrics.registry.get_sample_value("streamlearn_feature_age_seconds_bucket", {**labels, "le": "1.0"}) >= 1
