"""Reading whole topics back in tests (from the topics themselves, read_committed)."""

from __future__ import annotations

import time
import uuid

import orjson
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition


def produce_all(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    errors: list = []
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for key, value in records:
        producer.produce(topic, value, key, on_delivery=lambda err, _m: err and errors.append(err))
    assert producer.flush(60) == 0 and not errors, errors[:3]


def read_topic(bootstrap: str, topic: str, timeout: float = 30.0, **extra) -> list:
    """Every message currently in ``topic`` (all partitions, up to the high watermark)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "enable.partition.eof": True, "fetch.wait.max.ms": 10, **extra})
    try:
        meta = consumer.list_topics(topic, timeout=15).topics[topic]
        parts, ends = [], {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            if high > low:
                parts.append(TopicPartition(topic, p, low))
                ends[p] = high
        consumer.assign(parts)
        out, done = [], set()
        deadline = time.monotonic() + timeout
        while len(done) < len(parts):
            if time.monotonic() > deadline:
                raise AssertionError(f"reading {topic}: timed out with {len(out)} messages")
            for msg in consumer.consume(1000, 0.2):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        done.add(msg.partition())
                        continue
                    raise AssertionError(str(msg.error()))
                out.append(msg)
                if msg.offset() + 1 >= ends[msg.partition()]:
                    done.add(msg.partition())
        return out
    finally:
        consumer.close()


def values(messages: list) -> list[dict]:
    return [orjson.loads(m.value()) for m in messages]


def scrape(url: str, name: str, **labels: str) -> list[float]:
    """Values of the samples of metric ``name`` at ``url`` whose labels include ``labels``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return [s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
