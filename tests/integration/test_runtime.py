"""The shared runtime against a real Apache Kafka and a real Redis: DLQ routing with reasons, and
offsets committed only after outputs are delivered (a service killed mid-stream loses nothing)."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import orjson
import pytest

from services.cli.datasets import examples
from services.cli.stack import Stack, topic_layout
from services.ingestion.app import build as build_ingestion
from services.runtime.app import StreamApp
from services.runtime.kafka import ensure_topics
from services.runtime.metrics import RuntimeMetrics
from tests.conftest import wait_until
from tests.kafka_helpers import produce_all, read_topic

pytestmark = pytest.mark.kafka


def _events(n: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    rows = list(examples("phishing", run_id=uuid.uuid4().hex[:6]))
    out = []
    for i in range(start, start + n):
        event = dict(rows[i % len(rows)].event)
        event["event_id"] = f"{event['event_id']}-{i}"
        out.append((event["entity_id"].encode(), orjson.dumps(event)))
    return out


def _count(bootstrap: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "count"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(max(0, hi - lo) for lo, hi in
                   (c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts))
    finally:
        c.close()


def test_malformed_events_go_to_the_dlq_with_their_reason(kafka_settings, kafka_broker):
    settings = kafka_settings
    ensure_topics(settings.kafka, topic_layout(settings.topics, 2))
    good = _events(3)
    bad = [
        (b"k1", b'{"event_id": "x", not json'),
        (b"k2", orjson.dumps({"event_id": "e-big", "entity_id": "u", "ts": 1.0, "type": "page_visit",
                              "data": {"pad": "x" * 10_000}})),
        (b"k3", good[0][1].replace(b'"https":', b'"https_typo":')),
    ]
    records = [good[0], bad[0], good[1], bad[1], bad[2], good[2]]
    produce_all(kafka_broker.bootstrap, settings.topics.name("events"), records)

    metrics = RuntimeMetrics("ingestion")
    app = StreamApp(settings, build_ingestion(settings, metrics), metrics)
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: _count(kafka_broker.bootstrap, settings.topics.name("features")) >= 3
                   and _count(kafka_broker.bootstrap, settings.topics.name("dlq")) >= 3, 60,
                   "3 feature vectors and 3 DLQ records")
    finally:
        app.stop()
        thread.join(30)
    assert not thread.is_alive()

    dlq = read_topic(kafka_broker.bootstrap, settings.topics.name("dlq"))
    by_value = {m.value(): {k: v.decode() for k, v in m.headers()} for m in dlq}
    assert set(by_value) == {v for _, v in bad}, "the DLQ holds the original bytes, untouched"
    reasons = {by_value[v]["streamlearn.reason"]: by_value[v] for _, v in bad}
    assert set(reasons) == {"invalid_json", "oversized", "missing_field"}
    assert reasons["missing_field"]["streamlearn.field"] == "data.https"
    for headers in reasons.values():
        assert headers["streamlearn.source.topic"] == settings.topics.name("events")
        assert int(headers["streamlearn.source.offset"]) >= 0
        assert headers["streamlearn.service"] == "ingestion"
        assert headers["streamlearn.schema.version"] == "1"
    features = [orjson.loads(m.value()) for m in read_topic(kafka_broker.bootstrap, settings.topics.name("features"))]
    assert sorted(f["event_id"] for f in features) == sorted(orjson.loads(v)["event_id"] for _, v in good)
    exposition = metrics.exposition().decode()
    assert 'streamlearn_dlq_messages_total{field="data.https",reason="missing_field"' in exposition


def test_killed_mid_stream_loses_no_event(kafka_broker, redis_server, prefix, tmp_path):
    """SIGKILL ingestion while it works through 30,000 events, restart it: every event has its
    feature vector (duplicates are allowed in at-least-once mode, and counted)."""
    stack = Stack(tmp_path / "state", broker=kafka_broker.bootstrap, redis=redis_server.url,
                  topic_prefix=prefix, extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip("."),
                                                  "STREAMLEARN_BATCH_SIZE": "200"})
    stack.start_servers()
    events = _events(30_000)
    produce_all(stack.bootstrap, stack.topics.name("events"), events)
    features_topic = stack.topics.name("features")
    try:
        kills = 0
        for _ in range(2):
            stack.start_service("ingestion")
            already = _count(stack.bootstrap, features_topic)
            wait_until(lambda a=already: _count(stack.bootstrap, features_topic) > a + 1000, 90,
                       "ingestion to make progress")
            stack.kill_service("ingestion")
            kills += 1
        assert _count(stack.bootstrap, features_topic) < len(events), "killed before the end"
        stack.start_service("ingestion")
        wait_until(lambda: len({orjson.loads(m.value())["event_id"] for m in
                                read_topic(stack.bootstrap, features_topic)}) == len(events)
                   if _count(stack.bootstrap, features_topic) >= len(events) else False,
                   120, "every event to have its features")
    finally:
        stack.stop()
    ids = Counter(orjson.loads(m.value())["event_id"] for m in read_topic(stack.bootstrap, features_topic))
    assert set(ids) == {orjson.loads(v)["event_id"] for _, v in events}
    duplicates = sum(c - 1 for c in ids.values())
    print(f"\n{len(events)} events, {kills} kills, lost 0, duplicated {duplicates} (at-least-once)")
    assert duplicates <= kills * 200 * 2, "re-processing is bounded by the uncommitted batches"
