"""Back-pressure and overload on Apache Kafka (product issue "Reliability", item 4).

* Producers outrun the pipeline: a burst of 150,000 events, produced as fast as one client can, into
  a running ingestion + scorer. The backlog stays in Kafka as consumer lag; each service's resident
  memory stays under what its bounded prefetch queue allows (derived below from consumer_config);
  in the end every event has exactly one committed feature vector and one prediction.
* A downstream topic becomes unwritable (its ``max.message.bytes`` below any batch: every produce
  fails with MSG_SIZE_TOO_LARGE, a real broker-side rejection) for longer than the liveness window,
  then is restored. On both delivery paths (at-least-once, and Kafka transactions) the service
  retries with capped exponential back-off, counts and logs it, stays alive and healthy, does not
  spin (retries and CPU over the outage are bounded), and loses nothing once the topic is back.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import orjson
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, IsolationLevel, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    OffsetSpec,
    ResourceType,
)

from services.cli.datasets import examples
from services.cli.stack import Stack, tail
from services.runtime.app import BACKOFF_CAP_S, BACKOFF_FIRST_S
from services.runtime.kafka import consumer_config
from services.runtime.settings import load as load_settings
from tests.conftest import SIGNING_KEY, wait_until
from tests.kafka_helpers import read_topic, scrape, values

pytestmark = pytest.mark.kafka

BURST = 150_000
OUTAGE_S = 35.0  # longer than the 30 s /healthz window, so a blocked loop would be seen as dead
# librdkafka bookkeeping per queued message besides its payload (measured: a consumer's RSS grows by
# ~0.7 KB per prefetched 310-byte event) and how far lz4 shrinks these JSON events (~4x)
PER_MESSAGE_OVERHEAD = 400
LZ4_RATIO = 4
# beyond the queue: a batch in hand (500 events decoded, their outputs, the producer's buffers) and the
# memory the allocator keeps for librdkafka's threads (measured: 10-15 MiB at the plateau)
WORKING_SET = 24 * 2**20


# ---- helpers ---------------------------------------------------------------------------------------

def rss(pid: int) -> int:
    """Resident memory of a process, bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(stack: Stack, alias: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples on one service's /metrics (0 when it has none)."""
    return sum(scrape(stack.services[alias].metrics_url, name, **labels))


def group_lag(admin: AdminClient, group: str, topic: str) -> int:
    """The group's lag on ``topic`` as the broker sees it: last stable offsets minus committed
    offsets (what ``kafka-consumer-groups --describe`` and the KEDA scaler read)."""
    parts = admin.list_topics(topic, timeout=10).topics[topic].partitions
    tps = [TopicPartition(topic, p) for p in parts]
    ends = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps},
                              isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=10)
    end = {tp.partition: f.result().offset for tp, f in ends.items()}
    committed = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)])[group].result()
    done = {tp.partition: max(tp.offset, 0) for tp in committed.topic_partitions}
    return sum(end[p] - done.get(p, 0) for p in end)


def burst(n: int) -> list[tuple[bytes, bytes]]:
    """``n`` phishing events (key, value), serialized up front so that producing is only producing."""
    base = list(examples("phishing", run_id=uuid.uuid4().hex[:6]))
    records = []
    for i in range(n):
        event = dict(base[i % len(base)].event, event_id=f"ev-{i:07d}", entity_id=f"entity-{i % 997}")
        records.append((event["entity_id"].encode(), orjson.dumps(event)))
    return records


def produce_fast(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 50,
                         "batch.num.messages": 10000, "compression.type": "lz4",
                         "queue.buffering.max.messages": len(records) + 1000})
    errors: list = []
    for key, value in records:
        producer.produce(topic, value, key, on_delivery=lambda err, _m: err and errors.append(err))
    assert producer.flush(120) == 0 and not errors, errors[:3]


def event_ids(bootstrap: str, topic: str) -> Counter:
    return Counter(v["event_id"] for v in values(read_topic(bootstrap, topic, timeout=60)))


def committed(bootstrap: str, topic: str, at_least: int) -> Callable[[], Counter | None]:
    """A wait condition: the event ids of ``topic`` (committed messages, counted) once ``at_least``
    distinct ones are there; a read that times out on a loaded machine counts as "not yet"."""
    def condition() -> Counter | None:
        try:
            ids = event_ids(bootstrap, topic)
        except (TimeoutError, RuntimeError) as exc:
            print(f"(polling {topic}: {exc})")
            return None
        return ids if len(ids) >= at_least else None
    return condition


def make_stack(tmp_path, kafka_broker, redis_server, prefix: str, **env: str) -> Stack:
    return Stack(tmp_path / "state", broker=kafka_broker.bootstrap, redis=redis_server.url, partitions=3,
                 topic_prefix=prefix, extra_env={"STREAMLEARN_MODEL_SIGNING_KEY": SIGNING_KEY, **env})


def group_of(stack: Stack, service: str) -> str:
    return f"{stack.service_env(service, 0)['STREAMLEARN_GROUP_PREFIX']}-{service}"


# ---- 1. producers outrun the pipeline ----------------------------------------------------------------

def prefetch_bound(avg_payload: float) -> tuple[int, int]:
    """What one consumer may hold while its input is far behind, from the services' consumer_config:
    librdkafka stops fetching once its queue holds ``queued.max.messages.kbytes`` of payload, a check
    made before each fetch, so one fetch response (at most ``fetch.max.bytes`` compressed) can
    overshoot it. Returns (payload bytes, resident bytes with librdkafka's per-message bookkeeping)."""
    conf = consumer_config(load_settings({}).kafka, "bound")
    payload = conf["queued.max.messages.kbytes"] * 1024 + LZ4_RATIO * conf["fetch.max.bytes"]
    return payload, int(payload * (avg_payload + PER_MESSAGE_OVERHEAD) / avg_payload)


def test_a_burst_becomes_lag_not_memory_and_nothing_is_dropped(kafka_broker, redis_server, prefix, tmp_path):
    stack = make_stack(tmp_path, kafka_broker, redis_server, prefix)
    names = ("ingestion", "scorer")
    inputs = {"ingestion": "events", "scorer": "features"}
    records = burst(BURST)
    avg = sum(len(v) for _, v in records) / len(records)
    payload_bound, resident_bound = prefetch_bound(avg)
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    peak_rss = dict.fromkeys(names, 0)
    peak_lag = dict.fromkeys(names, 0)
    peak_metric_lag = dict.fromkeys(names, 0.0)
    sampling = threading.Event()
    errors: list[BaseException] = []

    def sample() -> None:
        last_lag = 0.0
        while not sampling.wait(0.1):
            try:
                for name in names:
                    peak_rss[name] = max(peak_rss[name], rss(stack.services[name].process.pid))
            except (OSError, AssertionError) as exc:  # a service died: the test thread reports it
                errors.append(exc)
                return
            if time.monotonic() - last_lag < 0.5:
                continue
            last_lag = time.monotonic()
            for name in names:
                try:
                    lag = group_lag(admin, group_of(stack, name), stack.topics.name(inputs[name]))
                    shown = metric(stack, name, "streamlearn_consumer_lag_messages", service=name)
                except (KafkaException, OSError) as exc:  # a slow answer on a loaded machine: next sample
                    print(f"(sampling {name}: {exc})")
                    continue
                peak_lag[name] = max(peak_lag[name], lag)
                peak_metric_lag[name] = max(peak_metric_lag[name], shown)

    try:
        stack.start_servers()
        for name in names:
            stack.start_service(name)
        stack.wait_ready(120, names=names)
        baseline = {name: rss(stack.services[name].process.pid) for name in names}
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        produce_fast(stack.bootstrap, stack.topics.name("events"), records)
        produced = time.monotonic() - started
        predictions = stack.topics.name("predictions")
        wait_until(lambda: errors or metric(stack, "scorer", "streamlearn_messages_out_total",
                                            topic=predictions) >= BURST, 240, "the scorer to catch up")
        drained = time.monotonic() - started
        sampling.set()
        sampler.join(10)
        assert not errors, errors
        for name in names:
            assert stack.services[name].process.poll() is None, f"{name} died:\n{tail(stack.services[name].log_path)}"
        features = wait_until(committed(stack.bootstrap, stack.topics.name("features"), BURST), 60,
                              "every feature vector committed")
        scored = wait_until(committed(stack.bootstrap, predictions, BURST), 60, "every prediction committed")
    finally:
        sampling.set()
        stack.stop()
    growth = {name: peak_rss[name] - baseline[name] for name in names}
    print(f"\nburst of {BURST} events ({avg:.0f} B each) produced in {produced:.1f}s, drained (all scored) in "
          f"{drained:.1f}s; peak group lag {peak_lag}; peak streamlearn_consumer_lag_messages {peak_metric_lag}; "
          f"RSS baseline {_mib(baseline)} peak {_mib(peak_rss)} growth {_mib(growth)}; bound on growth "
          f"{resident_bound / 2**20 + WORKING_SET / 2**20:.0f} MiB (prefetch {payload_bound / 2**20:.0f} MiB payload)")
    # the pipeline really was behind: a backlog more than twice what a consumer may hold in memory
    assert peak_lag["ingestion"] > 2 * payload_bound / avg, peak_lag
    # and the services said so: the lag metric (what the lag alert reads) saw the backlog too
    assert peak_metric_lag["ingestion"] > payload_bound / avg, peak_metric_lag
    for name in names:
        assert growth[name] < resident_bound + WORKING_SET, f"{name}: RSS grew by {_mib(growth)[name]}"
    expected = {v["event_id"] for v in (orjson.loads(value) for _, value in records)}
    assert set(features) == expected and set(features.values()) == {1}, "exactly one feature vector per event"
    assert set(scored) == expected and set(scored.values()) == {1}, "exactly one prediction per event"


def _mib(sizes: dict[str, int]) -> dict[str, str]:
    return {k: f"{v / 2**20:.0f} MiB" for k, v in sizes.items()}


# ---- 2. a downstream topic is unavailable -------------------------------------------------------------

def max_retries(seconds: float) -> int:
    """Most retries the runtime's back-off allows in ``seconds``: waits of BACKOFF_FIRST_S, doubling,
    capped at BACKOFF_CAP_S (0.1 s ... 5 s: 9 retries in 20 s, 12 in 35 s, then one per 5 s)."""
    count, waited, wait = 0, 0.0, BACKOFF_FIRST_S
    while waited <= seconds:
        count += 1
        waited += wait
        wait = min(wait * 2, BACKOFF_CAP_S)
    return count


def set_max_message_bytes(admin: AdminClient, topic: str, value: str | None) -> None:
    """``max.message.bytes`` of ``topic``; None restores the broker default. Returns once the broker
    reports the new value."""
    op = AlterConfigOpType.SET if value is not None else AlterConfigOpType.DELETE
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("max.message.bytes", value or "", incremental_operation=op)])
    for future in admin.incremental_alter_configs([resource]).values():
        assert future.exception(timeout=30) is None, future.exception()

    def current() -> bool:
        configs = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
        entry = next(iter(configs.values())).result(timeout=10)["max.message.bytes"]
        return entry.value == value if value is not None else entry.is_default
    wait_until(current, 30, f"max.message.bytes of {topic} to be {value or 'the default'}")


@pytest.mark.parametrize(("transactions", "guarantee"), [("auto", "exactly_once"), ("off", "at_least_once")])
def test_an_unwritable_output_topic_is_retried_with_backoff_and_nothing_is_lost(
        kafka_broker, redis_server, prefix, tmp_path, transactions, guarantee):
    """Ingestion on each delivery path (``auto``: Kafka transactions; ``off``: produce, wait for the
    acknowledgements, commit). Its features topic refuses every batch for OUTAGE_S seconds."""
    stack = make_stack(tmp_path, kafka_broker, redis_server, prefix, STREAMLEARN_KAFKA_TRANSACTIONS=transactions)
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    records = burst(600)
    features = stack.topics.name("features")
    try:
        stack.start_servers()
        svc = stack.start_service("ingestion")
        stack.wait_ready(120, names=("ingestion",))
        assert metric(stack, "ingestion", "streamlearn_service_info", guarantee=guarantee) == 1
        produce_fast(stack.bootstrap, stack.topics.name("events"), records[:300])
        wait_until(lambda: metric(stack, "ingestion", "streamlearn_messages_out_total", topic=features) >= 300,
                   60, "the first 300 feature vectors")

        # a record batch has a 61-byte header: 128 bytes refuses every batch of feature vectors (~350 bytes
        # each) and still lets the broker write the ~80-byte transaction markers of an abort
        set_max_message_bytes(admin, features, "128")
        produce_fast(stack.bootstrap, stack.topics.name("events"), records[300:])
        retries = lambda: metric(stack, "ingestion", "streamlearn_produce_retries_total")  # noqa: E731
        wait_until(lambda: retries() >= 1 or svc.process.poll() is not None, 60, "the first failed attempt")
        first_failure, retries_at_first, cpu_at_first = time.monotonic(), retries(), cpu_seconds(svc.process.pid)
        unhealthy = 0
        tick = threading.Event()
        while time.monotonic() - first_failure < OUTAGE_S:  # the outage lasts OUTAGE_S; sample it
            assert svc.process.poll() is None, f"ingestion died during the outage:\n{tail(svc.log_path)}"
            unhealthy += not svc.alive()
            tick.wait(0.5)
        during = int(retries() - retries_at_first) + 1
        cpu = cpu_seconds(svc.process.pid) - cpu_at_first
        outage = time.monotonic() - first_failure
        set_max_message_bytes(admin, features, None)
        restored = time.monotonic()

        vectors = wait_until(committed(stack.bootstrap, features, len(records)), 90,
                             "every feature vector once the topic is writable")
        recovered = time.monotonic() - restored
        assert svc.process.poll() is None and svc.alive() and svc.ready()
        errors = {kind: metric(stack, "ingestion", "streamlearn_errors_total", kind=kind)
                  for kind in ("delivery", "transaction_abort")}
        log = svc.log_path.read_text(errors="replace")
    finally:
        stack.stop()
    waits = [float(w) for w in re.findall(r"retrying (?:the batch )?in ([0-9.]+)s", log)]
    print(f"\n{guarantee}: outage {outage:.0f}s, {during} retries (back-off allows at most {max_retries(outage)}), "
          f"back-offs logged {sorted(set(waits))}, CPU {cpu:.1f}s ({100 * cpu / outage:.0f}% of a core), "
          f"/healthz failures {unhealthy}, errors {errors}, recovered {recovered:.1f}s after the restore, "
          f"{sum(vectors.values())} feature vectors for {len(records)} events")
    assert 3 <= during <= max_retries(outage) + 1, "retried with capped exponential back-off, no spinning"
    assert max(waits) == BACKOFF_CAP_S and min(waits) == BACKOFF_FIRST_S, waits
    assert cpu < 0.25 * outage, "an idle wait, not a busy loop"
    assert unhealthy == 0, "alive (/healthz) throughout the outage: a liveness probe would not restart it"
    kind = "transaction_abort" if guarantee == "exactly_once" else "delivery"
    assert errors[kind] >= during - 1, errors
    assert "MSG_SIZE_TOO_LARGE" in log or "too large" in log.lower(), "the cause is in the log"
    expected = {v["event_id"] for v in (orjson.loads(value) for _, value in records)}
    assert set(vectors) == expected, f"lost {len(expected - set(vectors))} feature vectors"
    if guarantee == "exactly_once":
        assert set(vectors.values()) == {1}, "exactly one committed feature vector per event"
