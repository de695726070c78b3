"""Settings: one environment mapping in, a frozen settings object or a ConfigError naming the variable."""

from __future__ import annotations

import pydantic
import pytest

from services.runtime.settings import ConfigError, KafkaSettings, Settings, env_var_names, load

KEY = "k" * 32
BASE = {"STREAMLEARN_MODEL_SIGNING_KEY": KEY}

SASL_PASSWORD = "sasl-pw-Zq8Xv1"
SSL_KEY_PASSWORD = "ssl-key-pw-Mm41"
REDIS_PASSWORD = "redis-pw-Tt77Qe"
SIGNING_KEY = "signing-key-Ye93Lp0000000000"
SECRET_ENV = {
    "STREAMLEARN_MODEL_SIGNING_KEY": SIGNING_KEY,
    "STREAMLEARN_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "STREAMLEARN_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "STREAMLEARN_KAFKA_SASL_USERNAME": "alice",
    "STREAMLEARN_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
    "STREAMLEARN_KAFKA_SSL_CA_LOCATION": "/etc/streamlearn/ca.pem",
    "STREAMLEARN_KAFKA_SSL_CERTIFICATE_LOCATION": "/etc/streamlearn/client.pem",
    "STREAMLEARN_KAFKA_SSL_KEY_LOCATION": "/etc/streamlearn/client.key",
    "STREAMLEARN_KAFKA_SSL_KEY_PASSWORD": SSL_KEY_PASSWORD,
    "STREAMLEARN_REDIS_URL": f"rediss://:{REDIS_PASSWORD}@redis.internal:6380/2",
}
SECRETS = (SASL_PASSWORD, SSL_KEY_PASSWORD, REDIS_PASSWORD, SIGNING_KEY)


def _error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load(env)
    return str(info.value)


def test_defaults_load_from_an_almost_empty_environment():
    settings = load(BASE)
    assert settings.service.spec == "phishing"
    assert settings.service.batch_size == 500
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.service.signing_key() == KEY.encode()
    assert settings.topics.name("features") == "features"


def test_only_the_mapping_passed_in_is_read(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_BATCH_SIZE", "abc")
    monkeypatch.setenv("STREAMLEARN_TOPIC_PREFIX", "from-os.")
    settings = load(BASE)
    assert settings.service.batch_size == 500
    assert settings.topics.name("events") == "events"


def test_process_environment_does_not_change_topic_names(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_TOPIC_PREFIX", "from-os.")
    assert load(BASE).topics.name("events") == "events"


def test_the_mapping_wins_over_the_process_environment(monkeypatch):
    monkeypatch.setenv("STREAMLEARN_BATCH_SIZE", "7")
    assert load({**BASE, "STREAMLEARN_BATCH_SIZE": "9"}).service.batch_size == 9


def test_values_are_parsed_and_prefixed_topic_names():
    settings = load({**BASE, "STREAMLEARN_BATCH_SIZE": "64", "STREAMLEARN_POLL_TIMEOUT_S": "0.05",
                     "STREAMLEARN_TOPIC_PREFIX": "t1.", "STREAMLEARN_TOPIC_DLQ": "dead",
                     "STREAMLEARN_KAFKA_BOOTSTRAP_SERVERS": "a:9092,b:9092"})
    assert settings.service.batch_size == 64
    assert settings.service.poll_timeout_s == 0.05
    assert settings.topics.name("features") == "t1.features"
    assert settings.topics.all()["dlq"] == "t1.dead"
    assert settings.kafka.client_config()["bootstrap.servers"] == "a:9092,b:9092"


def test_empty_values_mean_default():
    settings = load({**BASE, "STREAMLEARN_BATCH_SIZE": "", "STREAMLEARN_KAFKA_SASL_PASSWORD": ""})
    assert settings.service.batch_size == 500
    assert settings.kafka.sasl_password is None


def test_settings_are_frozen():
    settings = load(BASE)
    with pytest.raises(pydantic.ValidationError):
        settings.service.batch_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(("variable", "value", "fragment"), [
    ("STREAMLEARN_BATCH_SIZE", "abc", "valid integer"),
    ("STREAMLEARN_BATCH_SIZE", "0", "greater than or equal to 1"),
    ("STREAMLEARN_POLL_TIMEOUT_S", "-1", "greater than 0"),
    ("STREAMLEARN_METRICS_PORT", "70000", "less than or equal to 65535"),
    ("STREAMLEARN_LOG_LEVEL", "LOUD", "'DEBUG'"),
    ("STREAMLEARN_KAFKA_SECURITY_PROTOCOL", "FOO", "'PLAINTEXT'"),
    ("STREAMLEARN_KAFKA_SASL_MECHANISM", "GSSAPI", "'PLAIN'"),
    ("STREAMLEARN_KAFKA_SESSION_TIMEOUT_MS", "10", "greater than or equal to 1000"),
    ("STREAMLEARN_KAFKA_COMPRESSION_TYPE", "brotli", "'lz4'"),
    ("STREAMLEARN_KAFKA_CONSUMER_QUEUE_KBYTES", "100", "greater than or equal to 1024"),
    ("STREAMLEARN_REDIS_SOCKET_TIMEOUT_S", "0", "greater than 0"),
    ("STREAMLEARN_MODEL_SIGNING_KEY", "short", "at least 16 characters"),
])
def test_bad_value_names_the_variable(variable, value, fragment):
    message = _error({**BASE, variable: value})
    assert f"{variable}: " in message, message
    assert fragment in message, message


def test_a_shown_value_is_quoted_for_non_secrets():
    assert "(got 'abc')" in _error({**BASE, "STREAMLEARN_BATCH_SIZE": "abc"})


def test_several_errors_are_all_named_at_once():
    message = _error({
        "STREAMLEARN_MODEL_SIGNING_KEY": "short",
        "STREAMLEARN_BATCH_SIZE": "abc",
        "STREAMLEARN_KAFKA_SECURITY_PROTOCOL": "FOO",
        "STREAMLEARN_KAFKA_LINGER_MS": "-5",
        "STREAMLEARN_REDIS_SOCKET_TIMEOUT_S": "never",
    })
    for variable in ("STREAMLEARN_MODEL_SIGNING_KEY", "STREAMLEARN_BATCH_SIZE",
                     "STREAMLEARN_KAFKA_SECURITY_PROTOCOL", "STREAMLEARN_KAFKA_LINGER_MS",
                     "STREAMLEARN_REDIS_SOCKET_TIMEOUT_S"):
        assert variable in message, (variable, message)
    assert message.count("invalid settings") == 1


def test_secrets_never_appear_in_the_error_text():
    short_key = "short-secret-Kq"  # 15 characters: rejected
    env = {**SECRET_ENV, "STREAMLEARN_MODEL_SIGNING_KEY": short_key,
           "STREAMLEARN_KAFKA_SASL_MECHANISM": "NOPE", "STREAMLEARN_BATCH_SIZE": "abc"}
    message = _error(env)
    assert "STREAMLEARN_MODEL_SIGNING_KEY" in message and "STREAMLEARN_KAFKA_SASL_MECHANISM" in message
    for secret in (*SECRETS, short_key):
        assert secret not in message, secret
    assert "<hidden>" in message


def test_secrets_never_appear_in_repr_or_str_of_settings():
    settings = load(SECRET_ENV)
    shown = " ".join([repr(settings), str(settings), repr(settings.kafka), str(settings.kafka),
                      repr(settings.redis), str(settings.redis), repr(settings.service), str(settings.service)])
    for secret in SECRETS:
        assert secret not in shown, secret
    assert "**********" in repr(settings)


def test_sasl_and_tls_settings_are_passed_through_to_librdkafka():
    conf = load(SECRET_ENV).kafka.client_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "alice"
    assert conf["sasl.password"] == SASL_PASSWORD
    assert conf["ssl.ca.location"] == "/etc/streamlearn/ca.pem"
    assert conf["ssl.certificate.location"] == "/etc/streamlearn/client.pem"
    assert conf["ssl.key.location"] == "/etc/streamlearn/client.key"
    assert conf["ssl.key.password"] == SSL_KEY_PASSWORD


def test_consumer_prefetch_is_bounded_by_a_setting():
    """A backlog stays in Kafka: the consumers' prefetch queue is bounded (librdkafka's default is
    64 MiB or 100,000 messages) and one fetch response cannot overshoot it by much."""
    from services.runtime.kafka import consumer_config

    default = consumer_config(load(BASE).kafka, "g")
    assert default["queued.max.messages.kbytes"] == 8192
    assert default["fetch.max.bytes"] <= default["queued.max.messages.kbytes"] * 1024 // 4
    assert default["fetch.max.bytes"] >= 1_000_000, "librdkafka refuses less than message.max.bytes"
    chosen = load({**BASE, "STREAMLEARN_KAFKA_CONSUMER_QUEUE_KBYTES": "2048"}).kafka
    assert consumer_config(chosen, "g")["queued.max.messages.kbytes"] == 2048


def test_plaintext_config_has_no_security_keys():
    conf = KafkaSettings(bootstrap_servers="k:9092").client_config()
    assert conf["security.protocol"] == "PLAINTEXT"
    assert not any(key.startswith(("sasl.", "ssl.")) for key in conf)


def test_redis_url_and_password_are_kept_as_secrets():
    settings = load({**SECRET_ENV, "STREAMLEARN_REDIS_PASSWORD": REDIS_PASSWORD})
    assert settings.redis.url.get_secret_value() == SECRET_ENV["STREAMLEARN_REDIS_URL"]
    assert settings.redis.password.get_secret_value() == REDIS_PASSWORD


def test_missing_signing_key_fails_only_when_asked_for():
    settings = load({})
    with pytest.raises(ConfigError, match="STREAMLEARN_MODEL_SIGNING_KEY"):
        settings.service.signing_key()


def test_settings_constructor_is_load():
    assert isinstance(load(BASE), Settings)
    with pytest.raises(ConfigError, match="STREAMLEARN_BATCH_SIZE"):
        Settings({**BASE, "STREAMLEARN_BATCH_SIZE": "abc"})


def test_env_var_names_lists_every_variable():
    names = env_var_names()
    for name in ("STREAMLEARN_KAFKA_BOOTSTRAP_SERVERS", "STREAMLEARN_KAFKA_SASL_PASSWORD",
                 "STREAMLEARN_KAFKA_SECURITY_PROTOCOL", "STREAMLEARN_REDIS_URL", "STREAMLEARN_REDIS_NAMESPACE",
                 "STREAMLEARN_TOPIC_PREFIX", "STREAMLEARN_TOPIC_FEATURES", "STREAMLEARN_MODEL_SIGNING_KEY",
                 "STREAMLEARN_BATCH_SIZE", "STREAMLEARN_SPEC", "STREAMLEARN_GROUP_PREFIX"):
        assert name in names, name
    assert all(name.startswith("STREAMLEARN_") and name == name.upper() for name in names)


def test_every_listed_variable_is_actually_read():
    # a value that no field accepts would fail; a sentinel string for str fields must arrive
    str_vars = {"STREAMLEARN_SPEC": "s", "STREAMLEARN_GROUP_PREFIX": "g", "STREAMLEARN_METRICS_HOST": "h",
                "STREAMLEARN_KAFKA_BOOTSTRAP_SERVERS": "b:1", "STREAMLEARN_REDIS_NAMESPACE": "n",
                "STREAMLEARN_TOPIC_PREFIX": "p.", "STREAMLEARN_TOPIC_EVENTS": "ev"}
    settings = load({**BASE, **str_vars})
    assert (settings.service.spec, settings.service.group_prefix, settings.service.metrics_host) == ("s", "g", "h")
    assert settings.kafka.bootstrap_servers == "b:1"
    assert settings.redis.namespace == "n"
    assert settings.topics.name("events") == "p.ev"
    assert set(str_vars) <= env_var_names()
