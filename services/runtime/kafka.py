"""confluent-kafka client construction from settings (security settings passed through)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from services.runtime.settings import KafkaSettings

log = logging.getLogger(__name__)

# Every producer of keyed streamlearn topics (events, labels, features, predictions) must place a key on
# the partition the Java client would: murmur2 of the key. librdkafka's default (CRC32) places the
# same entity elsewhere, and keyed joins (the monitor's predictions with labels, on several replicas)
# then never meet. Users' own librdkafka-based producers set this too (README, "Producing").
PARTITIONER = {"partitioner": "murmur2_random"}


def producer_config(kafka: KafkaSettings, **overrides: object) -> dict[str, object]:
    conf = kafka.client_config() | {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": kafka.linger_ms,
        "compression.type": kafka.compression_type,
        "batch.num.messages": 10000,
        **PARTITIONER,
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
        # Back-pressure: when producers outrun a service, the backlog must stay in Kafka (as lag),
        # not in the service's memory. librdkafka prefetches until its queue holds 100,000 messages
        # or 64 MiB by default: a burst of 100,000 events of 310 bytes sat in ingestion's memory
        # (RSS +70 MB). 8 MiB is still about a second of work at the fastest measured rate (25,000
        # events/s): RSS +35 MB for that burst (tests/reliability/test_overload.py).
        # The bound is checked before each fetch, so one fetch response overshoots it: fetch.max.bytes
        # (compressed, per broker; librdkafka's minimum is message.max.bytes, 1,000,000) makes that
        # one 1 MiB response instead of 1 MiB per partition.
        "queued.max.messages.kbytes": kafka.consumer_queue_kbytes,
        "fetch.max.bytes": 1_048_576,
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


def read_ranges(consumer: Consumer, ranges: dict[tuple[str, int], tuple[int, int]],
                timeout: float = 60.0) -> list[Message]:
    """The messages of each ``(topic, partition)`` with ``start <= offset < end``, in partition order.

    ``consumer`` must have ``enable.partition.eof`` set. A partition is done at its end offset or at
    the end of the partition as the consumer sees it: for a ``read_committed`` consumer that is the
    last stable offset, so an open transaction is not waited for (its messages are not read). Errors
    the client recovers from by itself (a broker restarting) are ridden out; others raise. Raises
    ``TimeoutError`` naming how far it got when ``timeout`` passes first."""
    ranges = {tp: (start, end) for tp, (start, end) in ranges.items() if end > start}
    if not ranges:
        return []
    consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in ranges.items()])
    out: list[Message] = []
    done: set[tuple[str, int]] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(done) < len(ranges):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {sorted(set(t for t, _ in ranges))}: {len(out)} messages, "
                                   f"{len(ranges) - len(done)} of {len(ranges)} partitions not at their end "
                                   f"after {timeout:.0f}s")
            for msg in consumer.consume(1000, 0.2):
                tp = (msg.topic(), msg.partition())
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        done.add(tp)
                    elif err.fatal() or not (err.retriable() or err.code() in _TRANSIENT):
                        raise RuntimeError(f"reading {msg.topic()}[{msg.partition()}]: {err}")
                    continue
                if tp in done or msg.offset() >= ranges[tp][1]:
                    done.add(tp)
                    continue
                out.append(msg)
                if msg.offset() + 1 >= ranges[tp][1]:
                    done.add(tp)
    finally:
        consumer.unassign()
    return out


def read_topic(consumer: Consumer, topic: str, last: int | None = None, timeout: float = 60.0) -> list[Message]:
    """Every message of ``topic`` up to its current end (the ``last`` N of each partition if given);
    [] when the topic does not exist. See :func:`read_ranges`."""
    meta = consumer.list_topics(topic, timeout=15).topics.get(topic)
    if meta is None or meta.error is not None:
        return []
    ranges = {}
    for p in meta.partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
        ranges[(topic, p)] = (low if last is None else max(low, high - last), high)
    return read_ranges(consumer, ranges, timeout)


# client-side errors librdkafka reports to the consumer and recovers from without help
_TRANSIENT = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE, KafkaError._TIMED_OUT}
