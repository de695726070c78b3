"""Ingestion through a real StreamApp on Apache Kafka and Redis: every reject reason ends in the DLQ
with its headers and counters while the good events around them get features; a replay with
``streamlearn produce`` (Parquet, event time from a timestamp column) gives the windowed features a
pandas computation expects, and the online store holds each entity's latest vector."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import pandas as pd
import pytest

from services.cli.main import main as cli
from services.cli.stack import topic_layout
from services.ingestion.app import build as build_ingestion
from services.ingestion.synthetic import clickstream
from services.runtime.app import StreamApp
from services.runtime.kafka import ensure_topics
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings
from services.runtime.spec import load_spec, resolve_spec_path
from tests.conftest import service_env, wait_until
from tests.ingestion_reference import mismatches, reference
from tests.integration.test_runtime import _count
from tests.kafka_helpers import produce_all, read_topic
from tests.unit.test_ingestion_validation import GOOD, REJECTS

pytestmark = pytest.mark.kafka
SPEC = load_spec("clickstream")


def settings_for(kafka_broker, redis_server, prefix: str, spec: str = "clickstream", partitions: int = 3) -> Settings:
    settings = Settings(service_env(kafka_broker.bootstrap, redis_server.url, prefix, STREAMLEARN_SPEC=spec,
                                    STREAMLEARN_BATCH_SIZE="200"))
    ensure_topics(settings.kafka, topic_layout(settings.topics, partitions))
    return settings


@contextmanager
def ingestion(settings: Settings, group_id: str | None = None) -> Iterator[tuple[StreamApp, RuntimeMetrics]]:
    metrics = RuntimeMetrics("ingestion")
    app = StreamApp(settings, build_ingestion(settings, metrics), metrics, group_id=group_id)
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        yield app, metrics
    finally:
        app.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_every_reject_reason_goes_to_the_dlq_and_the_events_around_them_get_features(
        kafka_broker, redis_server, prefix, tmp_path):
    # the bundled spec plus a derived feature that can fail (division by zero): the handler's reject
    spec_file = tmp_path / "clickstream-ratio.yaml"
    spec_file.write_text(resolve_spec_path("clickstream").read_text().replace(
        "    - {name: long_dwell, expr: 'dwell_s > 30'}",
        "    - {name: long_dwell, expr: 'dwell_s > 30'}\n    - {name: price_per_s, expr: 'price / dwell_s'}"))
    settings = settings_for(kafka_broker, redis_server, prefix, spec=str(spec_file))
    bad = [(case, raw, reason, field) for case, raw, reason, field in REJECTS]
    zero_dwell = orjson.loads(orjson.dumps(GOOD))
    zero_dwell["data"]["dwell_s"] = 0.0
    bad.append(("derived-error", orjson.dumps(zero_dwell | {"event_id": "zero"}), "derived_error",
                "features.price_per_s"))
    records, good_ids = [], []
    for i, (_, raw, _, _) in enumerate(bad):
        event = orjson.loads(orjson.dumps(GOOD))
        event["event_id"], event["ts"] = f"good-{i}", GOOD["ts"] + i
        if i % 3 == 0:
            event["ts"] = f"2023-11-14T22:{13 + i // 60:02d}:{20 + i % 40:02d}Z"  # ISO-8601 event time
        records.append((b"u1", orjson.dumps(event)))
        good_ids.append(event["event_id"])
        records.append((b"u1", raw))  # one key: one partition, offsets in this order
    records.append((b"u1", orjson.dumps(GOOD | {"event_id": "last"})))
    good_ids.append("last")
    produce_all(kafka_broker.bootstrap, settings.topics.name("events"), records)

    with ingestion(settings) as (_, metrics):
        wait_until(lambda: _count(kafka_broker.bootstrap, settings.topics.name("features")) >= len(good_ids)
                   and _count(kafka_broker.bootstrap, settings.topics.name("dlq")) >= len(bad), 60,
                   f"{len(good_ids)} feature vectors and {len(bad)} DLQ records")

    dlq = read_topic(kafka_broker.bootstrap, settings.topics.name("dlq"))
    assert len(dlq) == len(bad)
    produced = read_topic(kafka_broker.bootstrap, settings.topics.name("events"))
    assert len(produced) == len(records) and len({m.partition() for m in produced}) == 1
    partition = str(produced[0].partition())
    by_offset = {}
    for msg in dlq:
        headers = {k.removeprefix("streamlearn."): v.decode() for k, v in msg.headers()}
        by_offset[int(headers["source.offset"])] = (msg, headers)
    for i, (case, raw, reason, field) in enumerate(bad):
        msg, headers = by_offset[2 * i + 1]
        assert msg.value() == raw, f"{case}: the original bytes, untouched"
        assert msg.key() == b"u1"
        assert (headers["reason"], headers["field"]) == (reason, field or ""), case
        assert headers["error"], case
        assert headers["schema.version"] == "1"
        assert headers["service"] == "ingestion"
        assert headers["source.topic"] == settings.topics.name("events")
        assert headers["source.partition"] == partition
    expected = Counter((reason, field or "") for _, _, reason, field in bad)
    for (reason, field), n in expected.items():
        value = metrics.registry.get_sample_value("streamlearn_dlq_messages_total", {
            "service": "ingestion", "topic": settings.topics.name("events"), "reason": reason, "field": field})
        assert value == n, (reason, field)

    features = [orjson.loads(m.value()) for m in read_topic(kafka_broker.bootstrap, settings.topics.name("features"))]
    assert sorted(f["event_id"] for f in features) == sorted(good_ids), "every good event, once"
    counts = [f["features"]["events_1m"] for f in sorted(features, key=lambda f: f["ts"])]
    assert counts[-1] is not None and max(c for c in counts if c is not None) > 1, "the good events were aggregated"


def test_a_replay_with_streamlearn_produce_gives_the_features_pandas_expects(
        kafka_broker, redis_server, prefix, tmp_path, capsys):
    settings = settings_for(kafka_broker, redis_server, prefix)
    events = clickstream(2000, users=20, seed=31, run_id=prefix.rstrip("."))
    frame = pd.DataFrame([{"event_id": e["event_id"], "user": e["entity_id"],
                           "when": pd.Timestamp(e["ts"], unit="s", tz="UTC"), "type": e["type"], **e["data"]}
                          for e in events])
    path = tmp_path / "clicks.parquet"
    frame.to_parquet(path)
    topic = settings.topics.name("events")
    assert cli(["--state-dir", str(tmp_path / "none"), "produce", topic, str(path), "--bootstrap",
                kafka_broker.bootstrap, "--entity-col", "user", "--ts-col", "when"]) == 0
    assert f"produced {len(events)} messages to {topic}" in capsys.readouterr().out

    with ingestion(settings) as (_, metrics):
        wait_until(lambda: _count(kafka_broker.bootstrap, settings.topics.name("features")) >= len(events), 90,
                   "a feature vector per event")
    # the reference sees exactly what went over the wire, in each partition's order
    produced = sorted(read_topic(kafka_broker.bootstrap, topic), key=lambda m: (m.partition(), m.offset()))
    wire = [orjson.loads(m.value()) for m in produced]
    assert {e["event_id"] for e in wire} == {e["event_id"] for e in events}
    assert all(abs(w["ts"] - e["ts"]) < 1e-6 for w, e in zip(sorted(wire, key=lambda e: e["event_id"]), events,
                                                               strict=True)), "event time kept from the column"
    expected, late = reference(wire, SPEC)
    out = [orjson.loads(m.value()) for m in read_topic(kafka_broker.bootstrap, settings.topics.name("features"))]
    got = {f["event_id"]: f["features"] for f in out}
    assert len(out) == len(events) == len(got), "one vector per event (no duplicates without a crash)"
    assert mismatches(expected, got) == []
    assert all(n > 5 for n in late.values()), late
    for window, n in late.items():
        assert metrics.registry.get_sample_value("streamlearn_ingestion_late_events_total", {
            "service": "ingestion", "feature_set": "clickstream", "window": window}) == n

    # the online store holds each entity's latest vector (by event time; ties: the later one)
    from services.runtime.online_store import RedisOnlineStore
    from services.runtime.redis_client import make_redis

    store = RedisOnlineStore(make_redis(settings.redis), settings.redis.namespace, "clickstream:v1", ttl_s=60)
    latest: dict[str, tuple[float, str]] = {}
    for e in wire:
        if e["entity_id"] not in latest or latest[e["entity_id"]][0] <= e["ts"]:
            latest[e["entity_id"]] = (e["ts"], e["event_id"])
    for entity, (ts, event_id) in latest.items():
        row = store.read(entity)
        assert row is not None and row[0] == ts
        assert row[1] == got[event_id]
    store.close()
