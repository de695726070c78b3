"""Session fixtures: a real Apache Kafka broker (KRaft, persistent log dir), a real embedded Tansu
broker and a real Redis server, started here. If one cannot start, the tests that need it fail
(they are never skipped)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.cli.localstack import KafkaBroker, RedisServer, TansuBroker
from services.runtime.settings import Settings

SIGNING_KEY = "test-signing-key-0123456789abcdef"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"),
                         extra_props={"broker.session.timeout.ms": "4000",
                                      "broker.heartbeat.interval.ms": "1000"})
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory) -> Iterator[TansuBroker]:
    broker = TansuBroker(tmp_path_factory.mktemp("tansu")).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A unique topic / group / Redis namespace prefix per test."""
    return f"t{uuid.uuid4().hex[:10]}."


def service_env(bootstrap: str, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {
        "STREAMLEARN_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "STREAMLEARN_REDIS_URL": redis_url,
        "STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip("."),
        "STREAMLEARN_TOPIC_PREFIX": prefix,
        "STREAMLEARN_GROUP_PREFIX": prefix.rstrip("."),
        "STREAMLEARN_MODEL_SIGNING_KEY": SIGNING_KEY,
        "STREAMLEARN_SPEC": "phishing",
    }
    env.update(extra)
    return env


@pytest.fixture
def kafka_settings(kafka_broker, redis_server, prefix) -> Settings:
    return Settings(service_env(kafka_broker.bootstrap, redis_server.url, prefix))


def wait_until(condition: Callable[[], object], timeout: float, what: str, step: Callable[[], None] | None = None):
    """Wait for ``condition()`` to be truthy within ``timeout`` seconds; ``step`` does the work
    between checks (e.g. polling a consumer). Returns the condition's value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if step:
            step()
        else:
            time.sleep(0.05)  # only between checks of a deadline-bounded condition


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
