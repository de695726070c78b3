"""``streamlearn up``: a broker, Redis and the four services as separate processes on one machine.

The stack is described in ``<state-dir>/stack.json`` (bootstrap address, Redis URL without its
password, topic names, each service's metrics URL and pid). The signing key lives in
``<state-dir>/signing.key`` (mode 0600) and never in stack.json.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from services.cli import localstack
from services.runtime.kafka import ensure_topics
from services.runtime.settings import PREFIX, KafkaSettings, TopicSettings
from services.runtime.settings import load as load_settings

SERVICES = ("ingestion", "learner", "scorer", "monitor")


def topic_layout(topics: TopicSettings, partitions: int) -> dict[str, tuple[int, dict[str, str]]]:
    """Partitions and configs per topic: data topics keyed by entity share ``partitions``; the
    models topic is compacted (latest announcement per model)."""
    layout = {}
    for role, name in topics.all().items():
        if role == "models":
            layout[name] = (1, {"cleanup.policy": "compact"})
        elif role in ("drift", "quality", "dlq"):
            layout[name] = (1, {})
        else:
            layout[name] = (partitions, {})
    layout[topics.shadow_predictions()] = (partitions, {})
    return layout


def redact_url(url: str) -> str:
    """Hide the password of a Redis URL.

    >>> redact_url("redis://:s3cret@127.0.0.1:6379/0")
    'redis://:***@127.0.0.1:6379/0'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    metrics_url: str
    log_path: Path

    def ready(self) -> bool:
        return self._probe("/readyz")

    def alive(self) -> bool:
        return self._probe("/healthz")

    def _probe(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.metrics_url.replace("/metrics", path), timeout=1) as r:
                return r.status == 200
        except OSError:
            return False


@dataclass
class Stack:
    state_dir: Path
    spec: str = "phishing"
    broker: str = "embedded"
    redis: str = "embedded"
    partitions: int = 3
    topic_prefix: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    servers: list = field(default_factory=list)
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    bootstrap: str = ""
    redis_url: str = ""

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.topics = TopicSettings(prefix=self.topic_prefix)

    # ---- servers -------------------------------------------------------------------------------

    def start_servers(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.broker == "embedded":
            server = localstack.TansuBroker(self.state_dir / "tansu").start()
            self.servers.append(server)
            self.bootstrap = server.bootstrap
        elif self.broker == "kafka":
            server = localstack.KafkaBroker(self.state_dir / "kafka").start()
            self.servers.append(server)
            self.bootstrap = server.bootstrap
        else:
            self.bootstrap = self.broker
        if self.redis == "embedded":
            server = localstack.RedisServer(self.state_dir / "redis").start()
            self.servers.append(server)
            self.redis_url = server.url
        else:
            self.redis_url = self.redis
        ensure_topics(self.kafka_settings(), topic_layout(self.topics, self.partitions))

    def kafka_settings(self) -> KafkaSettings:
        """The Kafka settings the services get (security settings from ``extra_env`` included)."""
        return load_settings(self.service_env("cli", 0)).kafka

    def _broker_profile(self) -> dict[str, object]:
        # Tansu answers a fetch only when fetch.wait.max.ms has passed, even with data waiting, and
        # lets read_committed consumers see aborted transactions: exactly-once is not real there
        return {"fetch_wait_max_ms": 10, "transactions": "off"} if self.broker == "embedded" else {}

    def signing_key(self) -> str:
        path = self.state_dir / "signing.key"
        if not path.exists():
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip()

    # ---- services ------------------------------------------------------------------------------

    def service_env(self, name: str, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
        env.update({
            PREFIX + "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            PREFIX + "REDIS_URL": self.redis_url,
            PREFIX + "SPEC": self.spec,
            PREFIX + "METRICS_PORT": str(port),
            PREFIX + "MODEL_SIGNING_KEY": self.signing_key(),
            PREFIX + "TOPIC_PREFIX": self.topic_prefix,
            **{PREFIX + "KAFKA_" + k.upper(): str(v) for k, v in self._broker_profile().items()},
            PREFIX + "GROUP_PREFIX": f"streamlearn{'-' + self.topic_prefix.strip('-.') if self.topic_prefix else ''}",
        })
        env.update(self.extra_env)
        return env

    def start_service(self, name: str, alias: str | None = None) -> ServiceProcess:
        """Start ``services.<name>`` as a process; ``alias`` names a second replica."""
        port = localstack.free_port()
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        alias = alias or name
        log_path = logs / f"{alias}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen([sys.executable, "-m", f"services.{name}"],
                                       env=self.service_env(name, port), stdout=log_file,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        svc = ServiceProcess(alias, process, f"http://127.0.0.1:{port}/metrics", log_path)
        self.services[alias] = svc
        return svc

    def start(self, timeout: float = 90.0) -> Stack:
        self.start_servers()
        for name in SERVICES:
            self.start_service(name)
        self.wait_ready(timeout)
        self.write_state()
        return self

    def wait_ready(self, timeout: float = 90.0, names: tuple[str, ...] = SERVICES) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            for name in list(pending):
                svc = self.services[name]
                if svc.process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {svc.process.returncode}:\n{tail(svc.log_path)}")
                if svc.ready():
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"services not ready after {timeout:.0f}s: {sorted(pending)}")
            if pending:
                time.sleep(0.1)  # polling interval of a deadline-bounded readiness probe

    def kill_service(self, name: str) -> None:
        """SIGKILL one service (reliability tests)."""
        svc = self.services[name]
        svc.process.kill()
        svc.process.wait(10)

    def stop_service(self, name: str, timeout: float = 30) -> int:
        svc = self.services[name]
        if svc.process.poll() is None:
            svc.process.send_signal(signal.SIGTERM)
            try:
                svc.process.wait(timeout)
            except subprocess.TimeoutExpired:
                svc.process.kill()
                svc.process.wait(10)
        return svc.process.returncode

    def stop(self) -> None:
        for name in reversed(list(self.services)):
            self.stop_service(name)
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "broker": {"kind": self.broker if self.broker in ("embedded", "kafka") else "external",
                       "bootstrap": self.bootstrap,
                       "pid": next((s.pid for s in self.servers if not isinstance(s, localstack.RedisServer)), None)},
            "redis": {"url": redact_url(self.redis_url),
                      "pid": next((s.pid for s in self.servers if isinstance(s, localstack.RedisServer)), None)},
            "topics": self.topics.all(),
            "services": {n: {"pid": s.process.pid, "metrics_url": s.metrics_url, "log": str(s.log_path)}
                         for n, s in self.services.items()},
        }

    def write_state(self) -> Path:
        path = self.state_dir / "stack.json"
        path.write_text(json.dumps(self.describe(), indent=2) + "\n")
        return path

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def load_state(state_dir: Path) -> dict:
    path = Path(state_dir) / "stack.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is a stack running? (streamlearn up)")
    return json.loads(path.read_text())
