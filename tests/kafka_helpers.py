"""Reading whole topics back in tests (from the topics themselves, read_committed)."""

from __future__ import annotations

import uuid

import orjson
from confluent_kafka import Consumer, Producer

from services.runtime import kafka


def produce_all(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    errors: list = []
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                         **kafka.PARTITIONER})
    for key, value in records:
        producer.produce(topic, value, key, on_delivery=lambda err, _m: err and errors.append(err))
    assert producer.flush(60) == 0 and not errors, errors[:3]


def read_topic(bootstrap: str, topic: str, timeout: float = 30.0, **extra) -> list:
    """Every committed message currently in ``topic`` (all partitions), read_committed."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "enable.partition.eof": True, "fetch.wait.max.ms": 10, **extra})
    try:
        return kafka.read_topic(consumer, topic, timeout=timeout)
    finally:
        consumer.close()


def values(messages: list) -> list[dict]:
    return [orjson.loads(m.value()) for m in messages]


def scrape_samples(url: str, name: str) -> list:
    """The samples of metric ``name`` exposed at ``url``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def scrape(url: str, name: str, **labels: str) -> list[float]:
    """Values of the samples of metric ``name`` at ``url`` whose labels include ``labels``."""
    return [s.value for s in scrape_samples(url, name) if all(s.labels.get(k) == v for k, v in labels.items())]
