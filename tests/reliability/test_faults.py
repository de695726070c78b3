"""Fault injection on Apache Kafka with a persistent log dir: a stream of events with delayed labels
flows while every service is SIGKILLed (and restarted) at random moments, the broker and Redis are
restarted mid-stream, and two replicas of ingestion and scorer run and one is killed. Then, from the
topics themselves: no event is missing from features or predictions, each event has exactly one
committed prediction (Kafka transactions), and every label was learned exactly once.

`make test` runs a bounded form (STREAMLEARN_FAULT_EVENTS, default 12,000 events); the soak form is
`make soak` (60,000 events, the fault schedule three times: 36 faults).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import orjson
import pytest
from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from services.cli.datasets import examples
from services.cli.localstack import KafkaBroker, RedisServer
from services.cli.stack import Stack
from services.runtime.kafka import PARTITIONER
from tests.conftest import SIGNING_KEY, wait_until
from tests.kafka_helpers import read_topic, values

EVENTS = int(os.environ.get("STREAMLEARN_FAULT_EVENTS", "12000"))
RATE = int(os.environ.get("STREAMLEARN_FAULT_RATE", "600"))
ROUNDS = int(os.environ.get("STREAMLEARN_FAULT_ROUNDS", "1"))  # the fault schedule, repeated over the stream
DELAY = 100

pytestmark = pytest.mark.kafka


class Supervisor:
    """Restarts any service process that exits (as Kubernetes would); counts crashes apart from
    the kills the test injects."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.crashes: Counter = Counter()
        self.kills: Counter = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kill(self, alias: str) -> None:
        with self._lock:
            self.stack.kill_service(alias)
            self.kills[alias] += 1
            self._restart(alias)

    def _restart(self, alias: str) -> None:
        name = alias.split("-")[0]
        self.stack.start_service(name, alias=alias)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                for alias, svc in list(self.stack.services.items()):
                    if svc.process.poll() is not None:
                        self.crashes[alias] += 1
                        self._restart(alias)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _produce(stack: Stack, data: list, done: threading.Event, sent: list) -> None:
    from confluent_kafka import Producer

    producer = Producer(stack.kafka_settings().client_config() | PARTITIONER
                        | {"enable.idempotence": True, "linger.ms": 5})
    started = time.monotonic()
    for i, e in enumerate(data):
        producer.produce(stack.topics.name("events"), orjson.dumps(e.event), e.event["entity_id"].encode())
        if i >= DELAY:
            label = data[i - DELAY].label
            producer.produce(stack.topics.name("labels"), orjson.dumps(label), label["entity_id"].encode())
        sent[0] = i + 1
        ahead = (i + 1) / RATE - (time.monotonic() - started)
        producer.poll(max(0.0, ahead))
    for e in data[-DELAY:]:
        producer.produce(stack.topics.name("labels"), orjson.dumps(e.label), e.label["entity_id"].encode())
    while producer.flush(10):  # the broker may be restarting: librdkafka retries until delivered
        pass
    done.set()


def _unique(bootstrap: str, topic: str) -> set[str]:
    return {orjson.loads(m.value())["event_id"] for m in read_topic(bootstrap, topic, timeout=60)}


def _while_polling(read: Callable[[], int]) -> Callable[[], int]:
    """A read of whole topics as a wait condition: a read that fails or times out on a loaded
    machine counts as "not yet" (the next check reads again); the final checks read strictly."""
    def condition() -> int:
        try:
            return read()
        except (TimeoutError, RuntimeError, KafkaException) as exc:
            print(f"(polling: {exc})")
            return 0
    return condition


def _offsets(bootstrap: str, topic: str) -> str:
    """Per partition: high watermark and last stable offset (an open transaction holds the latter)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    parts = admin.list_topics(topic, timeout=15).topics[topic].partitions
    ends = {}
    for level in (IsolationLevel.READ_UNCOMMITTED, IsolationLevel.READ_COMMITTED):
        futures = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for p in parts},
                                     isolation_level=level, request_timeout=15)
        ends[level] = {tp.partition: f.result().offset for tp, f in futures.items()}
    return ", ".join(f"[{p}] high {ends[IsolationLevel.READ_UNCOMMITTED][p]} stable "
                     f"{ends[IsolationLevel.READ_COMMITTED][p]}" for p in sorted(parts))


def _wait(condition: Callable[[], object], timeout: float, what: str, stack: Stack, topic: str) -> None:
    try:
        wait_until(condition, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {topic}: {_offsets(stack.bootstrap, stack.topics.name(topic))}") from None


def test_nothing_lost_nothing_duplicated_under_faults(tmp_path):
    rng = random.Random(20261126)
    broker = KafkaBroker(tmp_path / "kafka", extra_props={"broker.session.timeout.ms": "4000",
                                                          "broker.heartbeat.interval.ms": "1000"}).start()
    redis_server = RedisServer(tmp_path / "redis").start()
    stack = Stack(tmp_path / "state", broker=broker.bootstrap, redis=redis_server.url, partitions=4,
                  extra_env={"STREAMLEARN_MODEL_SIGNING_KEY": SIGNING_KEY, "STREAMLEARN_LEASE_TTL_S": "3",
                             "STREAMLEARN_BATCH_SIZE": "200"})
    base = list(examples("phishing", run_id=uuid.uuid4().hex[:6]))
    data = []
    for i in range(EVENTS):
        e = base[i % len(base)]
        eid = f"ev-{i:07d}"
        data.append(type(e)(event=dict(e.event, event_id=eid, entity_id=f"entity-{i % 501}"),
                            label=dict(e.label, event_id=eid, entity_id=f"entity-{i % 501}")))
    supervisor = Supervisor(stack)
    restarts = Counter()
    try:
        stack.start_servers()
        for alias in ("ingestion", "ingestion-2", "scorer", "scorer-2", "learner", "monitor"):
            stack.start_service(alias.split("-")[0], alias=alias)
        stack.wait_ready(120, names=("ingestion", "ingestion-2", "scorer", "scorer-2", "learner", "monitor"))
        supervisor.start()
        done, sent = threading.Event(), [0]
        producer = threading.Thread(target=_produce, args=(stack, data, done, sent), daemon=True)
        producer.start()

        def at(fraction: float) -> None:
            wait_until(lambda: sent[0] >= EVENTS * fraction, 600, f"{fraction:.0%} of the events sent")

        schedule = [("ingestion", 0.08), ("scorer", 0.14), ("learner", 0.2), ("monitor", 0.26),
                    ("broker", 0.34), ("ingestion-2", 0.42), ("scorer-2", 0.5), ("redis", 0.58),
                    ("learner", 0.66), ("scorer", 0.74), ("ingestion", 0.82), ("monitor", 0.9)]
        for target, fraction in [(t, (r + f) / ROUNDS) for r in range(ROUNDS) for t, f in schedule]:
            at(fraction + rng.uniform(-0.03, 0.03) / ROUNDS)
            if target == "broker":
                broker.stop()
                broker.start()
                restarts["broker"] += 1
            elif target == "redis":
                redis_server.stop()
                redis_server.start()
                restarts["redis"] += 1
            else:
                supervisor.kill(target)
        wait_until(done.is_set, 900, "every event and label to be produced")
        _wait(_while_polling(lambda: len(_unique(stack.bootstrap, stack.topics.name("predictions"))) >= EVENTS),
              600, "every event to have its prediction", stack, "predictions")
        _wait(_while_polling(lambda: max((a["examples_seen"] for a in values(read_topic(
            stack.bootstrap, stack.topics.name("models")))), default=0) >= EVENTS),
            600, "the learner to learn every label", stack, "models")
    finally:
        supervisor.stop()
        stack.stop()
    features = Counter(orjson.loads(m.value())["event_id"]
                       for m in read_topic(stack.bootstrap, stack.topics.name("features"), timeout=60))
    predictions = Counter(p["event_id"] for p in values(read_topic(stack.bootstrap, stack.topics.name("predictions"),
                                                                   timeout=60)) if not p["shadow"])
    models = values(read_topic(stack.bootstrap, stack.topics.name("models")))
    dlq = read_topic(stack.bootstrap, stack.topics.name("dlq"))
    broker.stop()
    redis_server.stop()
    expected = {e.event["event_id"] for e in data}
    lost_features = len(expected - set(features))
    lost_predictions = len(expected - set(predictions))
    duplicated = sum(c - 1 for c in predictions.values() if c > 1)
    learned = max(a["examples_seen"] for a in models)
    print(f"\nevents {EVENTS}, kills {dict(supervisor.kills)}, crashes+restarts {dict(supervisor.crashes)}, "
          f"server restarts {dict(restarts)}; lost features {lost_features}, lost predictions {lost_predictions}, "
          f"duplicate predictions {duplicated}, duplicate features {sum(c - 1 for c in features.values())} "
          f"(read_committed), learned {learned} of {EVENTS} labels, "
          f"DLQ {len(dlq)}")
    assert lost_features == 0 and lost_predictions == 0
    assert duplicated == 0 and sum(features.values()) == EVENTS
    assert learned == EVENTS, "every label learned exactly once"
    assert dlq == []

