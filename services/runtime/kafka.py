"""confluent-kafka client construction from settings (security settings passed through)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from services.runtime.settings import KafkaSettings

log = logging.getLogger(__name__)


def producer_config(kafka: KafkaSettings, **overrides: object) -> dict[str, object]:
    conf = kafka.client_config() | {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": kafka.linger_ms,
        "compression.type": kafka.compression_type,
        "batch.num.messages": 10000,
        # the Java client's default partitioner: a key lands on the same partition whichever client
        # produced it, which keyed joins (monitor, learner, ingestion state) rely on
        "partitioner": "murmur2_random",
    }
    return conf | overrides


def consumer_config(kafka: KafkaSettings, group_id: str, **overrides: object) -> dict[str, object]:
    conf = kafka.client_config() | {
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": kafka.session_timeout_ms,
        "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
        "isolation.level": "read_committed",
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.wait.max.ms": kafka.fetch_wait_max_ms,
    }
    return conf | overrides


def make_producer(kafka: KafkaSettings, stats_cb: Callable[[str], None] | None = None,
                  **overrides: object) -> Producer:
    conf = producer_config(kafka, **overrides)
    if stats_cb is not None:
        conf |= {"stats_cb": stats_cb, "statistics.interval.ms": 5000}
    return Producer(conf)


def make_consumer(kafka: KafkaSettings, group_id: str, stats_cb: Callable[[str], None] | None = None,
                  **overrides: object) -> Consumer:
    conf = consumer_config(kafka, group_id, **overrides)
    if stats_cb is not None:
        conf |= {"stats_cb": stats_cb, "statistics.interval.ms": 5000}
    return Consumer(conf)


def make_admin(kafka: KafkaSettings) -> AdminClient:
    return AdminClient(kafka.client_config())


def ensure_topics(kafka: KafkaSettings, topics: dict[str, tuple[int, dict[str, str]]],
                  timeout: float = 30.0) -> None:
    """Create the topics that do not exist (name -> (partitions, config)). Existing ones are kept."""
    admin = make_admin(kafka)
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [NewTopic(name, num_partitions=parts, replication_factor=1, config=config)
           for name, (parts, config) in topics.items() if name not in existing]
    if not new:
        return
    for name, future in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - racing creators are fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"cannot create topic {name!r}: {exc}") from exc
    log.info("created topics %s", [t.topic for t in new])
