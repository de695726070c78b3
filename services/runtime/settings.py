"""Settings: read from the environment here and nowhere else.

Every variable starts with ``STREAMLEARN_``. Shared groups have their own prefix
(``STREAMLEARN_KAFKA_``, ``STREAMLEARN_REDIS_``, ``STREAMLEARN_TOPIC_``); service settings compose
them. :func:`load` builds a frozen settings object once, at start, and turns a validation error
into a :class:`ConfigError` that names the offending variable.

>>> KafkaSettings(bootstrap_servers="k:9092").client_config()["bootstrap.servers"]
'k:9092'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

PREFIX = "STREAMLEARN_"


class ConfigError(ValueError):
    """Bad configuration, detected at start. The message names the environment variable."""


class _Group(BaseModel):
    """A settings group; ``env_prefix`` + the upper-cased field name is its variable."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    env_prefix: ClassVar[str] = PREFIX


class KafkaSettings(_Group):
    """Kafka client settings, passed through to every producer and consumer."""

    env_prefix: ClassVar[str] = PREFIX + "KAFKA_"

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None
    session_timeout_ms: int = Field(default=6000, ge=1000)
    heartbeat_interval_ms: int = Field(default=1000, ge=100)
    fetch_wait_max_ms: int = Field(default=100, ge=1, le=60000,
                                   description="broker long-poll bound; the embedded Tansu broker always "
                                               "waits this long, so its profile sets 10")
    consumer_queue_kbytes: int = Field(default=8192, ge=1024, le=2_097_151,
                                       description="prefetch bound per consumer (librdkafka "
                                                   "queued.max.messages.kbytes); see kafka.consumer_config")
    linger_ms: float = Field(default=5, ge=0)
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    transactions: Literal["auto", "on", "off"] = "auto"

    def client_config(self) -> dict[str, object]:
        """librdkafka settings common to producers, consumers and admin clients (secrets included:
        never log the result)."""
        conf: dict[str, object] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "log.connection.close": False,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        for key, value in (
            ("ssl.ca.location", self.ssl_ca_location),
            ("ssl.certificate.location", self.ssl_certificate_location),
            ("ssl.key.location", self.ssl_key_location),
        ):
            if value is not None:
                conf[key] = str(value)
        if self.ssl_key_password is not None:
            conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        return conf


class RedisSettings(_Group):
    """Redis online store / model registry. ``url`` may carry a password (``redis://:pw@host``) or
    use TLS (``rediss://``); it is a secret and never logged."""

    env_prefix: ClassVar[str] = PREFIX + "REDIS_"

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    password: SecretStr | None = None
    namespace: str = "streamlearn"
    socket_timeout_s: float = Field(default=5.0, gt=0)


class TopicSettings(_Group):
    """Topic names. ``prefix`` is prepended to every name (tests use a random one)."""

    env_prefix: ClassVar[str] = PREFIX + "TOPIC_"

    prefix: str = ""
    events: str = "events"
    labels: str = "labels"
    features: str = "features"
    predictions: str = "predictions"
    models: str = "models"
    drift: str = "drift"
    quality: str = "quality"
    dlq: str = "dlq"

    def name(self, role: str) -> str:
        return self.prefix + getattr(self, role)

    def shadow_predictions(self) -> str:
        """Where challengers' shadow predictions go when a spec says ``scorer.shadow: separate``."""
        return self.name("predictions") + "-shadow"

    def all(self) -> dict[str, str]:
        """Role -> full topic name."""
        roles = ("events", "labels", "features", "predictions", "models", "drift", "quality", "dlq")
        return {role: self.name(role) for role in roles}


class ServiceSettings(_Group):
    """What every service has: its spec, where it serves metrics, how it batches, its group."""

    env_prefix: ClassVar[str] = PREFIX

    spec: str = "phishing"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    batch_size: int = Field(default=500, ge=1, le=100_000)
    poll_timeout_s: float = Field(default=0.2, gt=0, le=10)
    batch_linger_ms: float = Field(default=0, ge=0, le=10_000,
                                   description="after a batch's first message, wait up to this long for more")
    group_prefix: str = "streamlearn"
    model_signing_key: SecretStr | None = None
    lease_ttl_s: float = Field(default=10.0, ge=1, le=300,
                               description="learner writer lease; a standby takes over this long after a crash")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("model_signing_key")
    @classmethod
    def _key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    def signing_key(self) -> bytes:
        if self.model_signing_key is None:
            raise ConfigError(f"{PREFIX}MODEL_SIGNING_KEY is required (at least 16 characters)")
        return self.model_signing_key.get_secret_value().encode()


S = TypeVar("S", bound=_Group)


def _build(cls: type[S], env: Mapping[str, str]) -> S:
    prefix = cls.env_prefix
    values = {
        name: env[prefix + name.upper()]
        for name in cls.model_fields
        if env.get(prefix + name.upper(), "") != ""
    }
    try:
        # the mapping passed in is the single source (tests pass their own)
        return cls.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{prefix}{field.upper()}: {err['msg']} (got {_shown(field, values)})")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


def _shown(field: str, values: Mapping[str, str]) -> str:
    if field not in values:
        return "nothing"
    secret = any(word in field for word in ("password", "key", "url", "secret"))
    return "<hidden>" if secret else repr(values[field])


class Settings:
    """All settings groups of one service, built once from one environment mapping."""

    service: ServiceSettings
    kafka: KafkaSettings
    redis: RedisSettings
    topics: TopicSettings

    def __init__(self, env: Mapping[str, str] | None = None):
        env = dict(os.environ if env is None else env)
        errors = []
        groups = {"service": ServiceSettings, "kafka": KafkaSettings, "redis": RedisSettings,
                  "topics": TopicSettings}
        for attr, cls in groups.items():
            try:
                setattr(self, attr, _build(cls, env))
            except ConfigError as exc:
                errors.append(str(exc).removeprefix("invalid settings: "))
        if errors:
            raise ConfigError("invalid settings: " + "; ".join(errors))

    def __repr__(self) -> str:  # secrets are SecretStr: their repr is masked
        return f"Settings(service={self.service!r}, kafka={self.kafka!r}, topics={self.topics!r})"


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Build and validate all settings (raises :class:`ConfigError` naming the variable)."""
    return Settings(env)


def env_var_names() -> set[str]:
    """Every environment variable the settings read (docker-compose and k8s manifests are checked
    against this)."""
    names = set()
    for cls in (ServiceSettings, KafkaSettings, RedisSettings, TopicSettings):
        prefix = cls.env_prefix
        names |= {prefix + name.upper() for name in cls.model_fields}
    return names
