"""The local servers of services.cli.localstack are real and behave: Kafka, Tansu and Redis.

Every wait is a condition with a deadline; nothing is skipped.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.cli.localstack import KafkaBroker, RedisServer, TansuBroker, create_topics, free_port

# Group settings that also make Tansu's group joins quick (it waits half the session timeout).
GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "auto.offset.reset": "earliest"}


def produce(config: dict, topic: str, key: bytes, value: bytes) -> None:
    errors: list = []
    producer = Producer({**config, "acks": "all", "enable.idempotence": True})
    producer.produce(topic, value, key, on_delivery=lambda err, _msg: errors.append(err))
    assert producer.flush(30) == 0, "message not delivered within 30 s"
    assert errors == [None]


def consume(config: dict, topic: str, count: int, timeout: float = 60) -> list[tuple[bytes, bytes]]:
    """Read ``count`` messages from the start of ``topic`` with a fresh consumer group."""
    consumer = Consumer({**config, **GROUP, "group.id": f"test-{uuid.uuid4().hex[:8]}"})
    consumer.subscribe([topic])
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            got.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    assert len(got) == count, f"got {len(got)} of {count} messages within {timeout} s"
    return got


def assert_reaped(pid: int) -> None:
    # A reaped child is gone; an unreaped (zombie) one would still accept signal 0.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.kafka
def test_kafka_roundtrip_topics_and_logs(tmp_path):
    with KafkaBroker(tmp_path / "kafka") as broker:
        pid = broker.pid
        topics = {"events": {"partitions": 3}, "state": {"config": {"cleanup.policy": "compact"}}}
        create_topics(broker.bootstrap, topics)
        create_topics(broker.bootstrap, topics)  # idempotent
        metadata = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10)
        assert len(metadata.topics["events"].partitions) == 3
        assert len(metadata.topics["state"].partitions) == 1

        config = {"bootstrap.servers": broker.bootstrap}
        produce(config, "events", b"k", b"hello kafka")
        assert consume(config, "events", 1) == [(b"k", b"hello kafka")]
    assert broker.pid is None
    assert_reaped(pid)
    assert "Kafka Server started" in (tmp_path / "kafka" / "server.log").read_text()


@pytest.mark.kafka
def test_kafka_restart_keeps_data(tmp_path):
    # A shorter broker session makes the start after kill() quick (see the module docstring).
    fast = {"broker.session.timeout.ms": "4000", "broker.heartbeat.interval.ms": "1000"}
    broker = KafkaBroker(tmp_path / "kafka", extra_props=fast).start()
    try:
        config = {"bootstrap.servers": broker.bootstrap}
        create_topics(broker.bootstrap, {"durable": {"partitions": 1}})
        produce(config, "durable", b"a", b"before clean restart")

        broker.restart()
        assert consume(config, "durable", 1) == [(b"a", b"before clean restart")]

        produce(config, "durable", b"b", b"before crash")
        pid = broker.pid
        broker.kill()
        assert_reaped(pid)
        broker.start()
        assert consume(config, "durable", 2) == [(b"a", b"before clean restart"), (b"b", b"before crash")]
    finally:
        broker.stop()


@pytest.mark.kafka
def test_kafka_sasl_plain_and_scram(tmp_path):
    users = {"alice": 'al"ice\\secret', "bob": "bob-secret"}
    with KafkaBroker(tmp_path / "kafka", sasl_users=users) as broker:
        create_topics(broker.bootstrap, {"secured": {"partitions": 1}})
        for mechanism in ("PLAIN", "SCRAM-SHA-256"):
            for user, password in users.items():
                config = broker.sasl_config(user, password, mechanism)
                assert "secured" in AdminClient(config).list_topics(timeout=10).topics
            produce(broker.sasl_config("bob", "bob-secret", mechanism), "secured", b"m", mechanism.encode())

            errors: list[KafkaError] = []
            bad = {**broker.sasl_config("bob", "wrong", mechanism), "error_cb": errors.append}
            admin = AdminClient(bad)
            with pytest.raises(KafkaException):
                admin.list_topics(timeout=3)
            deadline = time.monotonic() + 15
            while not any(e.code() == KafkaError._AUTHENTICATION for e in errors):
                assert time.monotonic() < deadline, f"no authentication error reported: {errors}"
                admin.poll(0.2)
            del admin
        plain = {"bootstrap.servers": broker.bootstrap}
        assert [v for _, v in consume(plain, "secured", 2)] == [b"PLAIN", b"SCRAM-SHA-256"]


@pytest.mark.tansu
def test_tansu_roundtrip(tmp_path):
    with TansuBroker(tmp_path / "tansu") as broker:
        pid = broker.pid
        create_topics(broker.bootstrap, {"events": {"partitions": 2}})
        create_topics(broker.bootstrap, {"events": {"partitions": 2}})  # idempotent
        config = {"bootstrap.servers": broker.bootstrap}
        produce(config, "events", b"k", b"hello tansu")
        assert consume(config, "events", 1) == [(b"k", b"hello tansu")]
    assert_reaped(pid)
    assert (tmp_path / "tansu" / "tansu.log").read_text().strip()


def test_redis_restart_keeps_data_and_password(tmp_path):
    server = RedisServer(tmp_path / "redis", password="s3cret/:@")
    with server:
        client = redis.Redis.from_url(server.url)
        client.set("model:version", "42")
        client.xadd("events", {"x": "1"})
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0)).get("model:version")
        old_pid = server.pid
        server.restart()
        assert_reaped(old_pid)
        client = redis.Redis.from_url(server.url)
        assert client.get("model:version") == b"42"
        assert client.xlen("events") == 1
    assert server.pid is None
    assert (tmp_path / "redis" / "appendonly.aof").exists()


def test_start_failure_reports_log_tail(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(tmp_path / "redis", port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="(?s)failed to start.*Address already in use"):
            server.start()
    assert server.pid is None


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
