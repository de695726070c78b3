"""Security: Kafka SASL settings reach every client (a real Apache Kafka with a SASL listener; wrong
credentials are refused), Redis AUTH is honoured, and secrets stay out of logs, metrics and
stack.json."""

from __future__ import annotations

import json
import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from services.cli.datasets import examples
from services.cli.localstack import KafkaBroker, RedisServer
from services.cli.replay import Replayer
from services.cli.stack import Stack
from services.runtime.spec import load_spec
from tests.conftest import wait_until

pytestmark = pytest.mark.kafka

USER, PASSWORD = "streamlearn", "sasl-secret-4f9a1c"
REDIS_PASSWORD = "redis-secret-77b2e0"
SIGNING = "signing-secret-0a1b2c3d4e5f"


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory):
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka-sasl"), sasl_users={USER: PASSWORD}).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def redis_with_auth(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=REDIS_PASSWORD).start()
    yield server
    server.stop()


def test_wrong_kafka_credentials_are_refused(sasl_kafka):
    errors = []
    admin = AdminClient(sasl_kafka.sasl_config(USER, "wrong-password")
                        | {"error_cb": lambda err: errors.append(err)})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=8)
    # the authentication failure itself reaches error_cb, which poll() serves
    wait_until(lambda: any(e.code() == KafkaError._AUTHENTICATION for e in errors), 30,
               "an authentication error", step=lambda: admin.poll(0.2))


def test_whole_pipeline_over_sasl_with_redis_auth(sasl_kafka, redis_with_auth, tmp_path):
    """Every service, the topic setup and the replay connect with SASL/PLAIN; Redis needs its
    password; the secrets appear in no log, no /metrics and not in stack.json."""
    spec = load_spec("phishing")
    stack = Stack(tmp_path / "state", broker=sasl_kafka.sasl_bootstrap, redis=redis_with_auth.url,
                  extra_env={"STREAMLEARN_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                             "STREAMLEARN_KAFKA_SASL_MECHANISM": "PLAIN",
                             "STREAMLEARN_KAFKA_SASL_USERNAME": USER,
                             "STREAMLEARN_KAFKA_SASL_PASSWORD": PASSWORD,
                             "STREAMLEARN_MODEL_SIGNING_KEY": SIGNING,
                             "STREAMLEARN_LOG_LEVEL": "DEBUG"})
    data = list(examples("phishing", 200, run_id=uuid.uuid4().hex[:6]))
    with stack:
        replayer = Replayer(stack.kafka_settings(), stack.topics.all(), spec.model.name)
        result = replayer.run(data, delay=20, mode=0)
        replayer.close()
        exposition = "".join(_get(s.metrics_url) for s in stack.services.values())
        state = (stack.state_dir / "stack.json").read_text()
    assert len(result.predictions) == 200 and result.examples_seen == 200
    logs = "".join(s.log_path.read_text() for s in stack.services.values())
    for secret in (PASSWORD, REDIS_PASSWORD, SIGNING):
        assert secret not in logs and secret not in exposition and secret not in state
    assert json.loads(state)["redis"]["url"].startswith("redis://:***@")


def test_redis_without_the_password_is_refused(redis_with_auth, tmp_path):
    from services.runtime.settings import load

    url = redis_with_auth.url.replace(f":{REDIS_PASSWORD}@", "")  # the URL without its password
    settings = load({"STREAMLEARN_REDIS_URL": url, "STREAMLEARN_MODEL_SIGNING_KEY": SIGNING})
    from redis.exceptions import AuthenticationError, ResponseError

    from services.runtime.redis_client import make_redis
    with pytest.raises((AuthenticationError, ResponseError)):
        make_redis(settings.redis).set("x", "1")
    ok = load({"STREAMLEARN_REDIS_URL": url, "STREAMLEARN_REDIS_PASSWORD": REDIS_PASSWORD,
               "STREAMLEARN_MODEL_SIGNING_KEY": SIGNING})
    assert make_redis(ok.redis).set("x", "1")


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()
