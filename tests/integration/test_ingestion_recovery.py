"""Ingestion's aggregates under failure, on Apache Kafka and Redis: ``kill -9`` of the ingestion
process during a paced replay, then a restart; and two replicas in one consumer group with a
rebalance in the middle. Both must end exactly where an uninterrupted single replica ends: the same
feature vector for every event (a re-emitted vector is byte for byte the first one), the same
per-entity aggregate state and the same online store."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import orjson
import pytest
import redis
from confluent_kafka import KafkaException

from services.cli.main import main as cli
from services.cli.stack import Stack
from services.ingestion.synthetic import clickstream
from services.ingestion.windows import EntityState, WindowEngine
from services.runtime.spec import load_spec
from tests.conftest import wait_until
from tests.integration.test_ingestion_pipeline import ingestion, settings_for
from tests.kafka_helpers import produce_all, read_topic

pytestmark = pytest.mark.kafka
SPEC = load_spec("clickstream")
ENGINE = WindowEngine(SPEC)


@dataclass
class Outcome:
    vectors: dict[str, set[bytes]]  # event_id -> the distinct payloads emitted for it
    features: dict[str, dict]
    states: dict[str, EntityState]
    store: dict[str, tuple[float, dict]]
    emitted: int


def _count(bootstrap: str, topic: str) -> int:
    """Committed messages in ``topic`` (read_committed: watermarks would also count the messages of
    aborted transactions, now that ingestion is transactional); retried while a freshly created
    topic elects its leaders."""
    from tests.kafka_helpers import read_topic

    def count(bootstrap: str, topic: str) -> int:
        return len(read_topic(bootstrap, topic))

    return wait_until(lambda: _try(count, bootstrap, topic), 30, f"the size of {topic}") - 1


def _try(count, bootstrap: str, topic: str) -> int | None:
    try:
        return count(bootstrap, topic) + 1
    except KafkaException:
        return None


def outcome(bootstrap: str, features_topic: str, redis_url: str, namespace: str) -> Outcome:
    vectors: dict[str, set[bytes]] = {}
    features: dict[str, dict] = {}
    messages = read_topic(bootstrap, features_topic)
    for msg in messages:
        value = orjson.loads(msg.value())
        vectors.setdefault(value["event_id"], set()).add(msg.value())
        features[value["event_id"]] = value["features"]
    client = redis.Redis.from_url(redis_url)
    try:
        states = {}
        prefix = f"{namespace}:agg:clickstream:v1:e:"
        for key in client.scan_iter(match=prefix + "*", count=1000):
            states[key.decode().removeprefix(prefix)] = ENGINE.decode(client.hmget(key, ENGINE.state_fields))
        store = {}
        prefix = f"{namespace}:fs:clickstream:v1:"
        for key in client.scan_iter(match=prefix + "*", count=1000):
            row = orjson.loads(client.hget(key, "row"))
            store[key.decode().removeprefix(prefix)] = (row["ts"], row["f"])
    finally:
        client.close()
    return Outcome(vectors, features, states, store, len(messages))


def uninterrupted(kafka_broker, redis_server, events: list[dict]) -> Outcome:
    """One replica, never interrupted, on its own topics and namespace."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    settings = settings_for(kafka_broker, redis_server, prefix)
    produce_all(kafka_broker.bootstrap, settings.topics.name("events"),
                [(e["entity_id"].encode(), orjson.dumps(e)) for e in events])
    features = settings.topics.name("features")
    with ingestion(settings):
        wait_until(lambda: _count(kafka_broker.bootstrap, features) >= len(events), 120, "the uninterrupted run")
    return outcome(kafka_broker.bootstrap, features, redis_server.url, settings.redis.namespace)


def assert_same(run: Outcome, reference: Outcome, events: list[dict]) -> None:
    assert set(run.vectors) == {e["event_id"] for e in events}, "every event has its vector"
    duplicated = {eid: v for eid, v in run.vectors.items() if len(v) > 1}
    assert not duplicated, f"re-emitted vectors differ from the first emission: {list(duplicated)[:3]}"
    different = [eid for eid in reference.features if run.features[eid] != reference.features[eid]]
    assert not different, f"{len(different)} vectors differ from the uninterrupted run, e.g. {different[:3]}"
    assert run.states == reference.states, "per-entity aggregate state"
    assert run.store == reference.store, "online store"


def paced_replay(tmp_path, bootstrap: str, topic: str, events: list[dict], rate: int) -> threading.Thread:
    """``streamlearn produce --rate`` of a JSON-lines file, in the background."""
    path = tmp_path / f"replay-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(cli(
        ["--state-dir", str(tmp_path / "none"), "produce", topic, str(path), "--bootstrap", bootstrap,
         "--rate", str(rate)])), daemon=True)
    thread.start()
    thread.result = result  # type: ignore[attr-defined]
    return thread


def test_kill_9_during_a_replay_then_restart_equals_an_uninterrupted_run(kafka_broker, redis_server, prefix,
                                                                         tmp_path):
    events = clickstream(6000, users=60, seed=41, run_id=prefix.rstrip("."))
    stack = Stack(tmp_path / "state", spec="clickstream", broker=kafka_broker.bootstrap, redis=redis_server.url,
                  topic_prefix=prefix, extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip("."),
                                                  "STREAMLEARN_BATCH_SIZE": "100"})
    stack.start_servers()
    features = stack.topics.name("features")
    try:
        replay = paced_replay(tmp_path, stack.bootstrap, stack.topics.name("events"), events, rate=1500)
        at_kill = []
        for _ in range(2):
            stack.start_service("ingestion")
            already = _count(stack.bootstrap, features)
            wait_until(lambda a=already: _count(stack.bootstrap, features) > a + 800, 90,
                       "ingestion to make progress")
            stack.kill_service("ingestion")
            at_kill.append(_count(stack.bootstrap, features))
        assert at_kill[0] < len(events), "the first kill landed mid-replay"
        stack.start_service("ingestion")
        replay.join(60)
        assert replay.result == [0]
        wait_until(lambda: len({orjson.loads(m.value())["event_id"] for m in read_topic(stack.bootstrap, features)})
                   >= len(events) if _count(stack.bootstrap, features) >= len(events) else False,
                   120, "every event to have its features")
    finally:
        stack.stop()
    killed = outcome(stack.bootstrap, features, redis_server.url, prefix.rstrip("."))
    reference = uninterrupted(kafka_broker, redis_server, events)
    print(f"\n{len(events)} events, kills at {at_kill} vectors, {killed.emitted - len(events)} re-emitted "
          f"(identical), {len(killed.states)} entities")
    assert_same(killed, reference, events)


def test_two_replicas_and_a_rebalance_equal_one_replica(kafka_broker, redis_server, prefix, tmp_path):
    """Replica 1 alone on the first half; replica 2 joins (a rebalance) and the second half is
    replayed while both work; replica 1 leaves mid-replay (another rebalance); replica 2 finishes."""
    events = clickstream(5000, users=60, seed=43, run_id=prefix.rstrip("."))
    half = len(events) // 2
    settings = settings_for(kafka_broker, redis_server, prefix, partitions=4)
    features, topic = settings.topics.name("features"), settings.topics.name("events")
    group = f"{prefix}ingestion"
    produce_all(kafka_broker.bootstrap, topic, [(e["entity_id"].encode(), orjson.dumps(e)) for e in events[:half]])
    with ingestion(settings, group) as (first, first_metrics):
        wait_until(lambda: _count(kafka_broker.bootstrap, features) >= half, 60, "replica 1 to do the first half")
        with ingestion(settings, group) as (second, second_metrics):
            wait_until(lambda: second._assigned and len(first._assigned) < 4, 60,
                       "the rebalance to give replica 2 partitions")
            shared = (set(first._assigned), set(second._assigned))
            replay = paced_replay(tmp_path, kafka_broker.bootstrap, topic, events[half:], rate=1000)
            wait_until(lambda: _count(kafka_broker.bootstrap, features) > half + 600, 60,
                       "both replicas to work on the second half")
            first.stop()  # replica 1 leaves mid-replay: replica 2 takes every partition
            wait_until(lambda: len(second._assigned) == 4, 60, "replica 2 to own every partition")
            replay.join(60)
            wait_until(lambda: _count(kafka_broker.bootstrap, features) >= len(events), 120, "every event")
    assert replay.result == [0]
    assert shared[0] and shared[1] and not shared[0] & shared[1], shared

    def consumed(metrics) -> float:
        return metrics.registry.get_sample_value("streamlearn_messages_in_total", {
            "service": "ingestion", "topic": topic}) or 0

    assert consumed(first_metrics) > half and consumed(second_metrics) > 0
    replicas = outcome(kafka_broker.bootstrap, features, redis_server.url, settings.redis.namespace)
    reference = uninterrupted(kafka_broker, redis_server, events)
    print(f"\n{len(events)} events on 2 replicas: {consumed(first_metrics):.0f} + {consumed(second_metrics):.0f} "
          f"consumed, {replicas.emitted - len(events)} re-emitted (identical)")
    assert_same(replicas, reference, events)
