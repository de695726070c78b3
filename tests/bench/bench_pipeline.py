"""End-to-end benchmark of streamlearn on Apache Kafka, against the compute bound and a naive loop.

Run (not collected by pytest; ``make bench``)::

    PYTHONPATH=. python -m tests.bench.bench_pipeline [--events N] [--quick] [--profile] [--soak S]
        [--settle-s S] [--env STREAMLEARN_BATCH_SIZE=2000 ...] [--skip bound,alone,e2e,naive]

One run starts an Apache Kafka broker (KRaft, single node) and a Redis server from
:mod:`services.cli.localstack` in a temporary directory, warms the broker's JVM up (produce, fetch
and transactions: a fresh broker spends much of its first minute compiling), then measures, each
phase on its own topics (its own topic prefix, consumer groups and Redis namespace):

1. **compute bound** — the pipeline's stages for the phishing spec in one process, no Kafka:
   decode + validate (``EventValidator``), features (``FeatureComputer``), predict
   (``predict_batch``), learn (``learner.core.apply``: the label join, predict-then-learn), monitor
   update (``MonitorProcessor.handle``), encode (the ``Prediction`` to JSON). CPU seconds per event
   (``time.process_time``), with the garbage collector tuned as the services run it; the bound is
   ``os.cpu_count()`` divided by that. River's own in-process rates for the same model are measured
   beside it.
2. **per service**, each alone with its input pre-produced: ingestion (events -> features), the
   scorer (features -> predictions, one replica, Kafka transactions, a trained model announced),
   the learner (features + labels -> examples learned; its checkpoint cost from its ``/metrics``).
   Rates come from the outputs' own timestamps (producer CreateTime of features and predictions,
   ``created_at`` / ``examples_seen`` of the learner's announcements), CPU from ``/proc``.
3. **streamlearn end to end** — ingestion, scorer, learner and monitor as separate processes.
   Sustained throughput: ``--events`` events produced as fast as possible, each label produced when
   the event's prediction is read (labels flow the way they do in production: after the
   prediction); time until every prediction is read by a ``read_committed`` consumer, and until
   the learner learned every label. Before both, the pipeline runs at the latency rate until the
   broker's JIT compiler is quiet (``--settle-s``, at most 240 s): a fresh JVM compiles for minutes
   under this load, and a production broker is past that; the compiler's CPU during each measured
   run is reported (``kafka_jit_cpu_s``). Consumer lag of every service's group sampled every
   second through the admin API. Latency: 1,000 events/s for ``--latency-s`` seconds, each event's
   ``ts`` set when it is produced; latency = the time a ``read_committed`` consumer receives the
   prediction minus the produce time, with a breakdown by hop from ``ingested_at`` and
   ``scored_at``; repeated on a stack with ``STREAMLEARN_KAFKA_TRANSACTIONS=off`` (at-least-once,
   not in ``--quick``) to show what exactly-once costs. CPU seconds and peak RSS (``VmHWM``) per
   process from ``/proc``, the broker, Redis and the benchmark's own process (the users) included.
4. **naive baseline** — the tutorial loop in one process: ``poll(1.0)`` one message, stdlib
   ``json``, the same validation, predict with the same River model, ``produce`` + ``flush()`` per
   prediction, a synchronous commit per message, learning each label when it arrives.

Prints a table with the ratios (streamlearn / bound, streamlearn / naive) and writes
``bench-results/pipeline.json``. ``--profile`` samples every service with py-spy (``pip install
py-spy``) during the end-to-end throughput and latency runs (``bench-results/profile-<service>-
<run>.txt``, collapsed stacks) and prints the top frames; profiling costs CPU, so a profiled run's
figures are not the reference ones. ``--soak S`` adds a run at 50% of the measured throughput for S
seconds, sampling every 10 s each service's RSS and CPU share and the learner's checkpoint size
(issue 7: no service's RSS grows).

Numbers are noisy on a small shared machine: compare ratios within one run, not runs with each
other.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import confluent_kafka
import orjson
import river
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families
from river import datasets

from schemas import Label, Prediction, Stage
from services.cli.localstack import KafkaBroker, RedisServer
from services.cli.stack import SERVICES, Stack
from services.ingestion.features import FeatureComputer
from services.ingestion.validation import EventValidator
from services.learner.core import apply, new_state
from services.monitor.app import MonitorProcessor
from services.runtime.app import tune_gc
from services.runtime.kafka import ensure_topics
from services.runtime.messages import Incoming, schema_decoder
from services.runtime.metrics import RuntimeMetrics
from services.runtime.registry import ModelRegistry, Signer
from services.runtime.river_models import build_pipeline
from services.runtime.settings import KafkaSettings, Settings
from services.runtime.spec import load_spec
from services.scorer.app import predict_batch

SPEC = "phishing"
SIGNING_KEY = "bench-signing-key-0123456789abcdef"
RESULTS_DIR = Path("bench-results")
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROWS = list(datasets.Phishing())
ENTITIES = 97
LABEL_DELAY = 50  # learner alone: the label of event i follows event i + LABEL_DELAY


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- /proc -----------------------------------------------------------------------------------------

def _stat_cpu_s(stat: Path) -> float:
    """User + system CPU seconds from a /proc ``stat`` file (a process's or one thread's)."""
    data = stat.read_text()
    fields = data[data.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def jit_cpu_s(pid: int) -> float:
    """CPU seconds spent by a JVM's JIT compiler threads ("C1/C2 CompilerThread")."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if "CompilerThre" in (task / "comm").read_text():
                total += _stat_cpu_s(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
    return total


def memory_mb(pid: int) -> dict[str, float]:
    """Resident set size now and its peak (VmHWM), in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = round(int(value.split()[0]) / 1024, 1)
    return out


def machine() -> dict[str, Any]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
            "load_avg_at_start": os.getloadavg(), "python": platform.python_version(),
            "river": river.__version__, "confluent_kafka": confluent_kafka.version()[0],
            "librdkafka": confluent_kafka.libversion()[0], "kafka": "Apache Kafka 4.1.1 (KRaft, 1 node)"}


# ---- data ------------------------------------------------------------------------------------------

def event_record(run: str, i: int, ts: float) -> dict[str, Any]:
    x, _ = ROWS[i % len(ROWS)]
    return {"schema_version": 1, "event_id": f"{run}-{i:07d}", "entity_id": f"entity-{i % ENTITIES}",
            "ts": ts, "type": "page_visit", "data": x}


def label_record(run: str, i: int, ts: float) -> dict[str, Any]:
    return {"schema_version": 1, "event_id": f"{run}-{i:07d}", "entity_id": f"entity-{i % ENTITIES}",
            "ts": ts, "label": ROWS[i % len(ROWS)][1]}


def features_record(run: str, i: int, ts: float, spec) -> dict[str, Any]:
    x, _ = ROWS[i % len(ROWS)]
    return {"schema_version": 1, "event_id": f"{run}-{i:07d}", "entity_id": f"entity-{i % ENTITIES}",
            "ts": ts, "feature_set": spec.features.name, "feature_set_version": spec.features.version,
            "features": x, "ingested_at": ts}


def index_of(event_id: str) -> int:
    return int(event_id[-7:])


def encoded(record: dict[str, Any]) -> tuple[bytes, bytes]:
    return record["entity_id"].encode(), orjson.dumps(record)


# ---- Kafka helpers ---------------------------------------------------------------------------------

def bench_producer(bootstrap: str, **overrides: object) -> Producer:
    """The users' producer: batched, lz4, idempotent (what a load generator would use)."""
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "compression.type": "lz4",
                     "enable.idempotence": True, "acks": "all", "batch.num.messages": 10000,
                     "queue.buffering.max.messages": 2_000_000, "queue.buffering.max.kbytes": 2_000_000,
                     "log.connection.close": False, "partitioner": "murmur2_random", "client.id": "bench-producer",
                     **overrides})


def produce(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:
            producer.poll(0.05)


def produce_all(producer: Producer, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    for key, value in records:
        produce(producer, topic, key, value)
    producer.poll(0)


class Collector:
    """A ``read_committed`` consumer of some topics, from their current end (or beginning)."""

    def __init__(self, bootstrap: str, topics: list[str], from_beginning: bool = False):
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False, "isolation.level": "read_committed",
                                  "fetch.wait.max.ms": 100, "log.connection.close": False,
                                  "client.id": "bench-collector"})
        md = self.consumer.list_topics(timeout=30).topics
        parts = []
        for topic in topics:
            for p in md[topic].partitions:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                parts.append(TopicPartition(topic, p, low if from_beginning else high))
        self.consumer.assign(parts)

    def poll(self, timeout: float, max_messages: int = 2000) -> tuple[float, list]:
        msgs = self.consumer.consume(max_messages, timeout)
        now = time.time()
        out = []
        for m in msgs:
            if m.error():
                if m.error().code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"bench consumer: {m.error()}")
                continue
            out.append(m)
        return now, out

    def close(self) -> None:
        self.consumer.close()


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric(url: str, name: str, **labels: str) -> float:
    return sum(v for n, lbl, v in scrape(url) if n == name and all(lbl.get(k) == x for k, x in labels.items()))


def wait_for(cond: Callable[[], object], timeout: float, what: str, step: Callable[[], None] | None = None,
             interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: timed out after {timeout:.0f}s waiting for {what}")
        if step:
            step()
        else:
            time.sleep(interval)


class LagSampler(threading.Thread):
    """Consumer lag (high watermark - committed offset, summed over partitions) of each service's
    group, every ``interval`` seconds, through the admin API. The learner commits only what its
    checkpoint covers, so its lag includes up to one checkpoint interval of messages."""

    def __init__(self, bootstrap: str, groups: dict[str, tuple[str, list[str]]], interval: float = 1.0):
        super().__init__(daemon=True, name="lag-sampler")
        self.groups, self.interval = groups, interval
        self.admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-lag-{uuid.uuid4().hex[:6]}",
                                  "log.connection.close": False})
        md = self.consumer.list_topics(timeout=30).topics
        topics = {t for _, ts in groups.values() for t in ts}
        self.partitions = {t: sorted(md[t].partitions) for t in topics}
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict[str, int]:
        high = {}
        for topic, parts in self.partitions.items():
            for p in parts:
                high[(topic, p)] = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5,
                                                                       cached=False)[1]
        lags = {}
        for service, (group, topics) in self.groups.items():
            fut = self.admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group]
            committed = {(tp.topic, tp.partition): tp.offset for tp in fut.result(timeout=5).topic_partitions}
            lags[service] = sum(max(0, high[(t, p)] - max(0, committed.get((t, p), 0)))
                                for t in topics for p in self.partitions[t])
        return lags

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                self.samples.append({"t": round(started - self.t0, 2), **self.sample()})
            except Exception as exc:  # noqa: BLE001 - a missed sample is not worth failing the run
                log(f"lag sample failed: {exc}")
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> list[dict[str, Any]]:
        self._halt.set()
        self.join(10)
        self.consumer.close()
        return self.samples


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]

    return {"p50": round(q(0.50), 2), "p95": round(q(0.95), 2), "p99": round(q(0.99), 2),
            "max": round(s[-1], 2), "n": len(s)}


def rate_from_timestamps(ts_ms: list[int], trim: float = 0.0) -> float:
    """Messages per second between the first and last timestamp (optionally trimming a fraction
    at each end: the ramp-up and the tail)."""
    s = sorted(ts_ms)
    if trim:
        k = int(len(s) * trim)
        s = s[k:len(s) - k]
    if len(s) < 2 or s[-1] == s[0]:
        return float("nan")
    return (len(s) - 1) / ((s[-1] - s[0]) / 1000)


# ---- the run's environment -------------------------------------------------------------------------

class Bench:
    def __init__(self, tmp: Path, partitions: int, env: dict[str, str] | None = None):
        self.tmp = tmp
        self.partitions = partitions
        self.env = dict(env or {})  # extra STREAMLEARN_* settings for every service
        self.spec = load_spec(SPEC)
        log("starting Apache Kafka and Redis")
        self.kafka = KafkaBroker(tmp / "kafka").start()
        self.redis = RedisServer(tmp / "redis").start()
        self.bootstrap = self.kafka.bootstrap

    def warm_up(self, messages: int = 100_000, transactions: int = 300) -> None:
        """Exercise the broker's produce, fetch and transaction paths before measuring: a fresh JVM
        spends a large share of its CPU compiling them during its first minute of load."""
        topic = f"bwarm{uuid.uuid4().hex[:6]}"
        ensure_topics(KafkaSettings(bootstrap_servers=self.bootstrap), {topic: (self.partitions, {})})
        producer = bench_producer(self.bootstrap)
        value = orjson.dumps(event_record("warm", 0, time.time()))
        for i in range(messages):
            produce(producer, topic, str(i % ENTITIES).encode(), value)
        assert producer.flush(60) == 0
        txn = bench_producer(self.bootstrap, **{"transactional.id": f"bench-warm-{uuid.uuid4().hex[:6]}"})
        txn.init_transactions(30)
        for i in range(transactions):
            txn.begin_transaction()
            produce(txn, topic, str(i % ENTITIES).encode(), value)
            txn.commit_transaction(30)
        reader = Collector(self.bootstrap, [topic], from_beginning=True)
        seen = 0
        deadline = time.monotonic() + 120
        while seen < messages + transactions and time.monotonic() < deadline:
            seen += len(reader.poll(0.2, 10_000)[1])
        reader.close()

    def stack(self, tag: str, env: dict[str, str] | None = None) -> Stack:
        prefix = f"b{tag}{uuid.uuid4().hex[:6]}."
        ns = prefix.rstrip(".")
        stack = Stack(self.tmp / f"stack-{ns}", spec=SPEC, broker=self.bootstrap, redis=self.redis.url,
                      partitions=self.partitions, topic_prefix=prefix,
                      extra_env={"STREAMLEARN_REDIS_NAMESPACE": ns, "STREAMLEARN_GROUP_PREFIX": ns,
                                 "STREAMLEARN_MODEL_SIGNING_KEY": SIGNING_KEY, **self.env, **(env or {})})
        stack.start_servers()  # external broker and Redis: creates the topics only
        stack.group_prefix = ns  # type: ignore[attr-defined]
        return stack

    def servers_cpu(self) -> dict[str, float]:
        return {"kafka": cpu_seconds(self.kafka.pid), "redis": cpu_seconds(self.redis.pid),
                "bench": cpu_seconds(os.getpid())}

    def close(self) -> None:
        self.redis.stop()
        self.kafka.stop()


def start(stack: Stack, names: tuple[str, ...]) -> dict[str, int]:
    for name in names:
        stack.start_service(name)
    stack.wait_ready(180, names=names)
    return {name: stack.services[name].process.pid for name in names}


def groups_of(stack: Stack, names: tuple[str, ...]) -> dict[str, tuple[str, list[str]]]:
    t = stack.topics.name
    inputs = {"ingestion": ["events"], "scorer": ["features"], "learner": ["features", "labels"],
              "monitor": ["predictions", "labels"]}
    return {n: (f"{stack.group_prefix}-{n}", [t(r) for r in inputs[n]]) for n in names}


# ---- 1. compute bound ------------------------------------------------------------------------------

def compute_bound(n: int, batch: int = 500) -> dict[str, Any]:
    """The pipeline's stages in one process, without Kafka: CPU seconds per event."""
    spec = load_spec(SPEC)
    settings = Settings({})
    topics = settings.topics
    validate, compute = EventValidator(spec), FeatureComputer(spec)
    decode_label = schema_decoder(Label)
    state = new_state(spec)
    monitor = MonitorProcessor(spec, settings, RuntimeMetrics("monitor"))
    run, now = "bound", time.time()
    raw_events = [orjson.dumps(event_record(run, i, now + i * 1e-4)) for i in range(n)]
    raw_labels = [orjson.dumps(label_record(run, i, now + i * 1e-4 + 0.5)) for i in range(n)]
    ft, lt, pt = topics.name("features"), topics.name("labels"), topics.name("predictions")
    stages = dict.fromkeys(("decode_validate", "features", "predict", "encode", "learn", "monitor"), 0.0)
    clock = time.process_time
    started = clock()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        t = clock()
        events = [validate(raw) for raw in raw_events[lo:hi]]
        labels = [decode_label(raw) for raw in raw_labels[lo:hi]]
        t, stages["decode_validate"] = clock(), stages["decode_validate"] + clock() - t
        xs = [compute(e.data.__dict__) for e in events]
        t, stages["features"] = clock(), stages["features"] + clock() - t
        scored = predict_batch(state.model, spec.model.task, xs)
        t, stages["predict"] = clock(), stages["predict"] + clock() - t
        wall = time.time()
        preds = [Prediction(event_id=e.event_id, entity_id=e.entity_id, ts=e.ts, model=spec.model.name,
                            model_version=1, prediction=p, proba=proba, score=score, scored_at=wall,
                            latency_ms=max(0.0, wall - e.ts) * 1000)
                 for e, (p, proba, score) in zip(events, scored, strict=True)]
        payloads = [p.__pydantic_serializer__.to_json(p) for p in preds]
        assert len(payloads) == len(preds)
        t, stages["encode"] = clock(), stages["encode"] + clock() - t
        for i, (e, x) in enumerate(zip(events, xs, strict=True)):
            apply(state, spec, "features", ft, 0, lo + i, {"event_id": e.event_id, "ts": e.ts, "features": x})
        for i, label in enumerate(labels):
            apply(state, spec, "labels", lt, 0, lo + i, label)
        t, stages["learn"] = clock(), stages["learn"] + clock() - t
        monitor.handle([Incoming(pt, 0, lo + i, None, b"", p) for i, p in enumerate(preds)]
                       + [Incoming(lt, 0, lo + i, None, b"", label) for i, label in enumerate(labels)])
        stages["monitor"] += clock() - t
    cpu = clock() - started
    assert state.examples_seen == n, state.examples_seen
    per_event = cpu / n
    cores = os.cpu_count() or 1
    return {"events": n, "cpu_s": round(cpu, 3), "cpu_us_per_event": round(per_event * 1e6, 1),
            "stages_us_per_event": {k: round(v / n * 1e6, 1) for k, v in stages.items()},
            "cores": cores, "bound_events_per_s": round(cores / per_event),
            "one_core_events_per_s": round(1 / per_event)}


def river_rates(n: int) -> dict[str, float]:
    """River alone, the spec's model, one core: predict-then-learn (what the learner does per
    example), learn only, and predict_proba (what the scorer does)."""
    spec = load_spec(SPEC)
    xs = [ROWS[i % len(ROWS)] for i in range(n)]
    model = build_pipeline(spec.model.pipeline)
    t = time.process_time()
    for x, y in xs:
        model.predict_one(x)
        model.learn_one(x, y)
    prequential = n / (time.process_time() - t)
    model = build_pipeline(spec.model.pipeline)
    t = time.process_time()
    for x, y in xs:
        model.learn_one(x, y)
    learn = n / (time.process_time() - t)
    t = time.process_time()
    for x, _ in xs:
        model.predict_proba_one(x)
    proba = n / (time.process_time() - t)
    return {"predict_then_learn_per_s": round(prequential), "learn_one_per_s": round(learn),
            "predict_proba_one_per_s": round(proba)}


# ---- 2. one service alone --------------------------------------------------------------------------

def publish_trained_model(bench: Bench, stack: Stack) -> int:
    """A champion trained on the whole dataset, in the registry and announced (scorer alone)."""
    import redis

    spec = bench.spec
    model = build_pipeline(spec.model.pipeline)
    for x, y in ROWS:
        model.learn_one(x, y)
    registry = ModelRegistry(redis.Redis.from_url(bench.redis.url), Signer(SIGNING_KEY.encode()),
                             stack.group_prefix)
    ann = registry.publish(spec.model.name, model, stage=Stage.champion, examples_seen=len(ROWS),
                           spec_hash=spec.spec_hash())
    producer = bench_producer(bench.bootstrap)
    produce(producer, stack.topics.name("models"), ann.model.encode(), ann.model_dump_json().encode())
    assert producer.flush(30) == 0
    return ann.version


def ingestion_alone(bench: Bench, n: int) -> dict[str, Any]:
    stack = bench.stack("ing")
    try:
        pid = start(stack, ("ingestion",))["ingestion"]
        run, now = uuid.uuid4().hex[:6], time.time()
        events = [encoded(event_record(run, i, now + i * 1e-4)) for i in range(n)]
        collector = Collector(bench.bootstrap, [stack.topics.name("features")])
        producer = bench_producer(bench.bootstrap)
        cpu0, servers0 = cpu_seconds(pid), bench.servers_cpu()
        started = time.time()
        produce_all(producer, stack.topics.name("events"), events)
        stamps: list[int] = []

        def step() -> None:
            producer.poll(0)
            _, msgs = collector.poll(0.05)
            stamps.extend(m.timestamp()[1] for m in msgs)

        wait_for(lambda: len(stamps) >= n, 300, "ingestion to emit every feature vector", step)
        wall = time.time() - started
        cpu = cpu_seconds(pid) - cpu0
        servers = {k: round((v - servers0[k]) / n * 1e6, 1) for k, v in bench.servers_cpu().items()}
        collector.close()
        return {"events": n, "events_per_s": round(rate_from_timestamps(stamps)),
                "events_per_s_wall": round(n / wall), "cpu_s": round(cpu, 2),
                "cpu_us_per_event": round(cpu / n * 1e6, 1), "servers_cpu_us_per_event": servers, **memory_mb(pid)}
    finally:
        stack.stop()


def scorer_alone(bench: Bench, n: int) -> dict[str, Any]:
    stack = bench.stack("sco")
    try:
        version = publish_trained_model(bench, stack)
        pid = start(stack, ("scorer",))["scorer"]
        run, now = uuid.uuid4().hex[:6], time.time()
        features = [encoded(features_record(run, i, now + i * 1e-4, bench.spec)) for i in range(n)]
        collector = Collector(bench.bootstrap, [stack.topics.name("predictions")])
        producer = bench_producer(bench.bootstrap)
        cpu0, servers0 = cpu_seconds(pid), bench.servers_cpu()
        started = time.time()
        produce_all(producer, stack.topics.name("features"), features)
        stamps: list[int] = []
        versions: set[int] = set()

        def step() -> None:
            producer.poll(0)
            _, msgs = collector.poll(0.05)
            for m in msgs:
                stamps.append(m.timestamp()[1])
                if len(versions) < 2:
                    versions.add(orjson.loads(m.value())["model_version"])

        wait_for(lambda: len(stamps) >= n, 300, "the scorer to commit every prediction", step)
        wall = time.time() - started
        cpu = cpu_seconds(pid) - cpu0
        servers = {k: round((v - servers0[k]) / n * 1e6, 1) for k, v in bench.servers_cpu().items()}
        collector.close()
        assert versions == {version}, versions
        url = stack.services["scorer"].metrics_url
        batches = metric(url, "streamlearn_batch_size_messages_count")
        return {"events": n, "events_per_s": round(rate_from_timestamps(stamps)),
                "events_per_s_wall": round(n / wall), "cpu_s": round(cpu, 2),
                "cpu_us_per_event": round(cpu / n * 1e6, 1), "batches": int(batches),
                "mean_batch": round(n / max(1, batches), 1), "servers_cpu_us_per_event": servers, **memory_mb(pid)}
    finally:
        stack.stop()


def announcements(msgs: list, model: str) -> list[tuple[float, int]]:
    """(created_at, examples_seen) of the champion's announcements."""
    out = []
    for m in msgs:
        ann = orjson.loads(m.value())
        if ann.get("model") == model and ann.get("stage") == "champion":
            out.append((ann["created_at"], ann["examples_seen"]))
    return out


def learner_rate(anns: list[tuple[float, int]], upto: int) -> float:
    """Examples per second between the first announcement and the one that reached ``upto``."""
    anns = sorted(anns)
    last = next(a for a in anns if a[1] >= upto)
    first = anns[0]
    return (last[1] - first[1]) / max(1e-9, last[0] - first[0])


def checkpoint_cost(url: str, model: str) -> dict[str, Any]:
    samples = scrape(url)

    def get(name: str) -> float:
        return sum(v for n, lbl, v in samples if n == name and lbl.get("model") == model)

    count = get("streamlearn_checkpoint_seconds_count")
    return {"checkpoints": int(count),
            "mean_ms": round(get("streamlearn_checkpoint_seconds_sum") / count * 1000, 2) if count else None,
            "bytes": int(get("streamlearn_checkpoint_bytes"))}


def learner_alone(bench: Bench, n: int) -> dict[str, Any]:
    stack = bench.stack("lrn")
    spec = bench.spec
    try:
        pid = start(stack, ("learner",))["learner"]
        run, now = uuid.uuid4().hex[:6], time.time()
        ft, lt = stack.topics.name("features"), stack.topics.name("labels")
        records = []
        for i in range(n + LABEL_DELAY):
            if i < n:
                records.append((ft, *encoded(features_record(run, i, now + i * 1e-4, spec))))
            if i >= LABEL_DELAY:
                j = i - LABEL_DELAY
                records.append((lt, *encoded(label_record(run, j, now + i * 1e-4))))
        models = Collector(bench.bootstrap, [stack.topics.name("models")], from_beginning=True)
        producer = bench_producer(bench.bootstrap)
        cpu0, servers0 = cpu_seconds(pid), bench.servers_cpu()
        started = time.time()
        for topic, key, value in records:
            produce(producer, topic, key, value)
        producer.poll(0)
        anns: list[tuple[float, int]] = []

        def step() -> None:
            producer.poll(0)
            _, msgs = models.poll(0.05)
            anns.extend(announcements(msgs, spec.model.name))

        wait_for(lambda: anns and max(a[1] for a in anns) >= n, 300, "the learner to learn every label", step)
        wall = time.time() - started
        cpu = cpu_seconds(pid) - cpu0
        servers = {k: round((v - servers0[k]) / n * 1e6, 1) for k, v in bench.servers_cpu().items()}
        models.close()
        url = stack.services["learner"].metrics_url
        return {"examples": n, "examples_per_s": round(learner_rate(anns, n)),
                "examples_per_s_wall": round(n / wall), "cpu_s": round(cpu, 2),
                "cpu_us_per_example": round(cpu / n * 1e6, 1), "servers_cpu_us_per_example": servers,
                "versions_published": len(anns),
                "checkpoint": checkpoint_cost(url, spec.model.name), **memory_mb(pid)}
    finally:
        stack.stop()


# ---- 3. end to end ---------------------------------------------------------------------------------

class Profiler:
    """py-spy on each service process (collapsed stacks), stopped with SIGINT."""

    def __init__(self, pids: dict[str, int], tag: str, rate: int = 100):
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        RESULTS_DIR.mkdir(exist_ok=True)
        self.files = {name: RESULTS_DIR / f"profile-{name}-{tag}.txt" for name in pids}
        self.procs = {name: subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                                              "--nonblocking", "--output", str(self.files[name])],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                      for name, pid in pids.items()}

    def stop(self) -> dict[str, Any]:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        return {name: top_frames(path) for name, path in self.files.items() if path.exists()}


def top_frames(path: Path, k: int = 20) -> dict[str, Any]:
    """Inclusive and self shares of the sampled frames (py-spy's collapsed format)."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n

    def short(frame: str) -> str:
        name, _, where = frame.partition(" (")
        where = where.rstrip(")")
        if "site-packages/" in where:
            where = where.split("site-packages/", 1)[1]
        elif "/work/" in where:
            where = where.split("/", 3)[-1]
        return f"{name} ({where})"

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(short(f), round(100 * c / total, 1)) for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:k]]

    return {"samples": total, "self_pct": top(own), "inclusive_pct": top(inclusive)}


class Loop:
    """The users of a running stack: produce events, read predictions (``read_committed``) and
    features, and produce each event's label as soon as its prediction is read."""

    def __init__(self, bench: Bench, stack: Stack, run: str, features: bool = False):
        self.bench, self.stack, self.run = bench, stack, run
        t = stack.topics.name
        self.events_topic, self.labels_topic = t("events"), t("labels")
        # librdkafka's default linger (5 ms), as users' producers would have: 1 ms made the load
        # generator send ~2x the produce requests, and the broker's CPU is the scarce resource here
        self.producer = bench_producer(bench.bootstrap)
        watch = [t("predictions"), t("models")] + ([t("features")] if features else [])
        self.collector = Collector(bench.bootstrap, watch)
        self.predictions_topic, self.models_topic, self.features_topic = t("predictions"), t("models"), t("features")
        self.sent_at: dict[int, float] = {}
        self.received: dict[int, tuple[float, dict]] = {}  # index -> (receive time, prediction)
        self.ingested: dict[int, float] = {}
        self.pred_stamps: list[int] = []
        self.duplicates = 0
        self.anns: list[tuple[float, int]] = []
        self.labels_sent = 0
        self.model = bench.spec.model.name

    def send(self, i: int) -> None:
        now = time.time()
        self.sent_at[i] = now
        key, value = encoded(event_record(self.run, i, now))
        produce(self.producer, self.events_topic, key, value)

    def drain(self, timeout: float) -> None:
        self.producer.poll(0)
        now, msgs = self.collector.poll(timeout)
        for m in msgs:
            topic = m.topic()
            if topic == self.predictions_topic:
                p = orjson.loads(m.value())
                if p.get("shadow") or not p["event_id"].startswith(self.run):
                    continue
                i = index_of(p["event_id"])
                if i in self.received:
                    self.duplicates += 1
                    continue
                self.received[i] = (now, p)
                self.pred_stamps.append(m.timestamp()[1])
                key, value = encoded(label_record(self.run, i, time.time()))
                produce(self.producer, self.labels_topic, key, value)
                self.labels_sent += 1
            elif topic == self.models_topic:
                self.anns.extend(announcements([m], self.model))
            else:
                f = orjson.loads(m.value())
                if f["event_id"].startswith(self.run):
                    self.ingested[index_of(f["event_id"])] = f["ingested_at"]

    def examples_seen(self) -> int:
        return max((a[1] for a in self.anns), default=0)

    def close(self) -> None:
        self.producer.flush(30)
        self.collector.close()


def settle_broker(bench: Bench, stack: Stack, pids: dict[str, int], rate: float, max_s: float,
                  round_s: float = 10.0, quiet: float = 0.1) -> dict[str, Any]:
    """Run the pipeline at ``rate`` until the broker's JIT compiler has settled: a round of
    ``round_s`` in which the compiler threads used under ``quiet`` of a core, or ``max_s``.

    A fresh JVM goes on compiling the broker's produce, fetch and transaction paths for minutes
    (measured: 5-6 CPU-s of compilation in every 12 s at 1,000 events/s for the first ~70 s, half the
    broker's CPU), which a long-running broker has long done; the numbers measured during it are
    the JVM's warm-up, not the pipeline's."""
    started = time.monotonic()
    rounds: list[float] = []
    labels = 0
    while time.monotonic() - started < max_s:
        before = jit_cpu_s(bench.kafka.pid)
        labels += paced(bench, stack, pids, rate, round_s, warm_s=0.0)["labels"]
        rounds.append(round(jit_cpu_s(bench.kafka.pid) - before, 2))
        log(f"broker warm-up: the JIT compiler used {rounds[-1]} CPU-s in the last round")
        if rounds[-1] < quiet * round_s:
            break
    return {"rate": rate, "seconds": round(time.monotonic() - started, 1), "jit_cpu_s_per_round": rounds,
            "settled": bool(rounds) and rounds[-1] < quiet * round_s, "labels": labels}


def end_to_end(bench: Bench, n: int, warmup: int, latency_s: float, latency_rate: float, profile: bool,
               soak_s: float, settle_s: float = 0.0, at_least_once: bool = True) -> dict[str, Any]:
    stack = bench.stack("e2e")
    out: dict[str, Any] = {}
    try:
        pids = start(stack, SERVICES)
        labels = 0  # sent into this stack so far: the learner's examples_seen counts them all
        if settle_s > 0:
            out["broker_warmup"] = settle_broker(bench, stack, pids, latency_rate, settle_s)
            labels += out["broker_warmup"]["labels"]
        # warm up (imports, first model versions, caches); its events and labels are not measured
        run = uuid.uuid4().hex[:6]
        loop = Loop(bench, stack, run)
        for i in range(warmup):
            loop.send(i)
        labels += warmup
        wait_for(lambda: len(loop.received) >= warmup and loop.examples_seen() >= labels, 180, "the warm-up",
                 lambda: loop.drain(0.05))
        learned_before = loop.examples_seen()
        loop.close()

        # -- sustained throughput -------------------------------------------------------------------
        log(f"end to end: {n} events as fast as possible, labels as predictions come out")
        run = uuid.uuid4().hex[:6]
        loop = Loop(bench, stack, run)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()} | bench.servers_cpu()
        jit0 = jit_cpu_s(bench.kafka.pid)
        lag = LagSampler(bench.bootstrap, groups_of(stack, SERVICES))
        lag.start()
        profiler = Profiler(pids, "throughput") if profile else None
        started = time.time()
        for i in range(n):
            loop.send(i)
            if i % 5000 == 4999:
                loop.drain(0)
        produced_s = time.time() - started
        wait_for(lambda: len(loop.received) >= n, 600, "every prediction", lambda: loop.drain(0.05))
        predicted = time.time()
        wait_for(lambda: loop.examples_seen() >= learned_before + n, 600, "the learner to learn every label",
                 lambda: loop.drain(0.05))
        learned = time.time()
        groups = groups_of(stack, ("ingestion", "scorer", "monitor"))
        wait_for(lambda: all(v <= 3 * bench.partitions for k, v in lag.sample().items() if k in groups), 600,
                 "every service to catch up", lambda: loop.drain(0.2))
        drained = time.time()
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()} | bench.servers_cpu()
        profiles = profiler.stop() if profiler else None
        lag_samples = lag.stop()
        loop.drain(0.1)
        learned_anns = [a for a in loop.anns if a[1] > learned_before]
        throughput = n / (predicted - started)
        cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1}
        out["throughput"] = {
            "events": n, "labels": loop.labels_sent, "produce_s": round(produced_s, 2),
            "events_per_s": round(throughput),
            "events_per_s_steady": round(rate_from_timestamps(loop.pred_stamps, trim=0.1)),
            "seconds_to_last_prediction": round(predicted - started, 2),
            "learner_examples_per_s": round(n / (learned - started)),
            "learner_examples_per_s_steady": round(learner_rate(learned_anns, learned_before + n))
            if learned_anns else None,
            "seconds_to_last_example": round(learned - started, 2),
            "seconds_to_drain_all": round(drained - started, 2),
            "duplicates_read_committed": loop.duplicates,
            "cpu_s": cpu,
            "cpu_us_per_event": {k: round(v / n * 1e6, 1) for k, v in cpu.items()},
            "cpu_total_s": round(sum(cpu.values()), 2),
            "kafka_jit_cpu_s": round(jit_cpu_s(bench.kafka.pid) - jit0, 2),
            "cpu_utilisation_of_machine": round(sum(cpu.values()) / ((drained - started) * (os.cpu_count() or 1)), 2),
            "peak_lag": {k: max((s.get(k, 0) for s in lag_samples), default=0) for k in SERVICES},
            "lag_samples": lag_samples,
        }
        if profiles:
            out["profiles"] = {"throughput": profiles}
        loop.close()

        # -- latency at a fixed rate ----------------------------------------------------------------
        if latency_s > 0:
            out["latency"] = paced(bench, stack, pids, latency_rate, latency_s, warm_s=2.0, profile=profile)
            if "profiles" in out["latency"]:
                out.setdefault("profiles", {})["latency"] = out["latency"].pop("profiles")
        if latency_s > 0 and at_least_once:
            # what exactly-once costs (two transactional hops) against at-least-once, same broker
            out["latency_at_least_once"] = latency_on_own_stack(
                bench, "alo", {"STREAMLEARN_KAFKA_TRANSACTIONS": "off"}, latency_rate, latency_s)
        if soak_s:
            rate = max(100.0, round(throughput * 0.5, -2))
            out["soak"] = paced(bench, stack, pids, rate, soak_s, warm_s=5.0, rss_every=5.0)
        out["processes"] = {name: memory_mb(pid) for name, pid in pids.items()}
        out["processes"] |= {"kafka": memory_mb(bench.kafka.pid), "redis": memory_mb(bench.redis.pid)}
        out["checkpoint"] = checkpoint_cost(stack.services["learner"].metrics_url, bench.spec.model.name)
        return out
    finally:
        stack.stop()


def latency_on_own_stack(bench: Bench, tag: str, env: dict[str, str], rate: float,
                         seconds: float) -> dict[str, Any]:
    """A latency run (:func:`paced`) on a fresh stack whose services get ``env`` on top of the run's."""
    stack = bench.stack(tag, env)
    try:
        pids = start(stack, SERVICES)
        paced(bench, stack, pids, rate, 5.0, warm_s=0.0)  # the new stack's first versions and caches
        return paced(bench, stack, pids, rate, seconds, warm_s=2.0)
    finally:
        stack.stop()


def paced(bench: Bench, stack: Stack, pids: dict[str, int], rate: float, seconds: float, warm_s: float,
          rss_every: float = 0.0, profile: bool = False) -> dict[str, Any]:
    """Events at ``rate`` for ``seconds`` (+ ``warm_s`` not measured); latency per event."""
    log(f"paced run: {rate:.0f} events/s for {seconds:.0f} s (+{warm_s:.0f} s warm-up)")
    run = uuid.uuid4().hex[:6]
    loop = Loop(bench, stack, run, features=True)
    total = int(rate * (seconds + warm_s))
    first_measured = int(rate * warm_s)
    rss: list[dict[str, Any]] = []
    next_rss = 0.0
    cpu0: dict[str, float] = {}
    t0 = measured_from = time.monotonic()
    i = 0
    while i < total:
        elapsed = time.monotonic() - t0
        if i >= first_measured and not cpu0:
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()} | bench.servers_cpu()
            jit0 = jit_cpu_s(bench.kafka.pid)
            measured_from = time.monotonic()
            profiler = Profiler(pids, "latency") if profile else None
        due = min(total, int(elapsed * rate) + 1)
        while i < due:
            loop.send(i)
            i += 1
        if rss_every and elapsed >= next_rss:
            rss.append(soak_sample(stack, pids, elapsed))
            next_rss = elapsed + rss_every
        # block in the consumer until the next event is due (at least 1 ms: no busy loop)
        loop.drain(min(0.005, max(0.001, i / rate - (time.monotonic() - t0))))
    wait_for(lambda: len(loop.received) >= total, 120, "every paced prediction", lambda: loop.drain(0.05))
    measured_s = time.monotonic() - measured_from
    cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()} | bench.servers_cpu()
    jit = jit_cpu_s(bench.kafka.pid) - jit0
    profiles = profiler.stop() if profile else None
    loop.close()
    e2e, to_ingest, to_score, to_read, scored = [], [], [], [], []
    for i, (recv, p) in loop.received.items():
        if i < first_measured:
            continue
        sent = loop.sent_at[i]
        e2e.append((recv - sent) * 1000)
        scored.append(p["latency_ms"])
        if i in loop.ingested:
            to_ingest.append((loop.ingested[i] - sent) * 1000)
            to_score.append((p["scored_at"] - loop.ingested[i]) * 1000)
        to_read.append((recv - p["scored_at"]) * 1000)
    measured = total - first_measured
    cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1}
    result = {"rate": rate, "seconds": seconds, "events": measured, "labels": loop.labels_sent,
              "end_to_end_ms": percentiles(e2e),
              "hops_ms": {"produce_to_ingested": percentiles(to_ingest),
                          "ingested_to_scored": percentiles(to_score),
                          "scored_to_read_committed": percentiles(to_read)},
              "prediction_latency_ms_field": percentiles(scored),
              "duplicates_read_committed": loop.duplicates,
              "cpu_s": cpu, "cpu_us_per_event": {k: round(v / measured * 1e6, 1) for k, v in cpu.items()},
              "kafka_jit_cpu_s": round(jit, 2),
              "cpu_utilisation_of_machine": round(sum(cpu.values()) / (measured_s * (os.cpu_count() or 1)), 2)}
    if profiles:
        result["profiles"] = profiles
    if rss:
        result["samples"] = rss
        first = rss[min(2, len(rss) - 1)]  # after the first 10 s: allocator and caches settled
        result["rss_growth_mb"] = {n: round(rss[-1]["rss_mb"][n] - first["rss_mb"][n], 1) for n in pids}
        # a plateau (e.g. a buffer's high-water mark) against a leak: what the second half added
        half = min(range(len(rss)), key=lambda k: abs(rss[k]["t"] - rss[-1]["t"] / 2))
        result["rss_growth_second_half_mb"] = {n: round(rss[-1]["rss_mb"][n] - rss[half]["rss_mb"][n], 1)
                                               for n in pids}
        result["checkpoint_bytes"] = {"first": first["checkpoint_bytes"], "last": rss[-1]["checkpoint_bytes"]}
        result["cpu_share"] = {"first": first["cpu_share"], "last": rss[-1]["cpu_share"]}
    return result


def soak_sample(stack: Stack, pids: dict[str, int], elapsed: float) -> dict[str, Any]:
    """RSS per service, the learner's checkpoint size, and each service's CPU share since the last
    sample (a cost that grows with uptime shows here before it shows in RSS)."""
    cpu = {n: cpu_seconds(p) for n, p in pids.items()}
    last = getattr(stack, "_soak_last", None)
    stack._soak_last = (elapsed, cpu)  # type: ignore[attr-defined]
    share = {n: round((cpu[n] - last[1][n]) / max(1e-9, elapsed - last[0]), 3) for n in pids} if last else {}
    try:
        ckpt = int(metric(stack.services["learner"].metrics_url, "streamlearn_checkpoint_bytes"))
    except OSError:
        ckpt = None
    return {"t": round(elapsed), "rss_mb": {n: memory_mb(p)["rss_mb"] for n, p in pids.items()},
            "cpu_share": share, "checkpoint_bytes": ckpt}


# ---- 4. naive baseline -----------------------------------------------------------------------------

def naive(bench: Bench, max_events: int, max_s: float) -> dict[str, Any]:
    """The tutorial loop: one message at a time, stdlib json, flush and commit per message."""
    stack = bench.stack("nai")
    spec = bench.spec
    run, now = uuid.uuid4().hex[:6], time.time()
    producer = bench_producer(bench.bootstrap)
    et, lt, pt = stack.topics.name("events"), stack.topics.name("labels"), stack.topics.name("predictions")
    for i in range(max_events):
        produce(producer, et, *encoded(event_record(run, i, now + i * 1e-4)))
        produce(producer, lt, *encoded(label_record(run, i, now + i * 1e-4 + 0.001)))
    assert producer.flush(60) == 0
    event_model = EventValidator(spec).model
    compute = FeatureComputer(spec)
    model = build_pipeline(spec.model.pipeline)
    consumer = Consumer({"bootstrap.servers": bench.bootstrap, "group.id": f"{stack.group_prefix}-naive",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([et, lt])
    out = Producer({"bootstrap.servers": bench.bootstrap})
    waiting_x: dict[str, dict] = {}
    waiting_y: dict[str, Any] = {}
    scored = learned = messages = 0
    started = idle_since = None
    cpu0 = cpu_seconds(os.getpid())
    while scored < max_events and (started is None or time.monotonic() - started < max_s):
        msg = consumer.poll(1.0)
        if msg is None:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 30:
                break
            continue
        idle_since = None
        if msg.error():
            continue
        if started is None:
            started = time.monotonic()
            cpu0 = cpu_seconds(os.getpid())
        messages += 1
        record = json.loads(msg.value())
        if msg.topic() == et:
            event = event_model.model_validate(record)
            x = compute(event.data.__dict__)
            proba = model.predict_proba_one(x)
            prediction = max(proba, key=proba.get) if proba else None
            scored_at = time.time()
            out.produce(pt, json.dumps({
                "schema_version": 1, "event_id": event.event_id, "entity_id": event.entity_id, "ts": event.ts,
                "model": spec.model.name, "model_version": 0, "prediction": prediction,
                "proba": {str(k): v for k, v in proba.items()}, "scored_at": scored_at,
                "latency_ms": (scored_at - event.ts) * 1000}).encode(), event.entity_id.encode())
            out.flush()
            scored += 1
            y = waiting_y.pop(event.event_id, None)
            if y is None:
                waiting_x[event.event_id] = x
            else:
                model.learn_one(x, y)
                learned += 1
        else:
            label = json.loads(msg.value())
            x = waiting_x.pop(label["event_id"], None)
            if x is None:
                waiting_y[label["event_id"]] = label["label"]
            else:
                model.learn_one(x, label["label"])
                learned += 1
        consumer.commit(message=msg, asynchronous=False)
    elapsed = time.monotonic() - (started or time.monotonic())
    cpu = cpu_seconds(os.getpid()) - cpu0
    consumer.close()
    return {"events": scored, "labels_learned": learned, "messages": messages, "seconds": round(elapsed, 2),
            "events_per_s": round(scored / elapsed, 1) if elapsed else None,
            "ms_per_message": round(elapsed / max(1, messages) * 1000, 2),
            "cpu_us_per_event": round(cpu / max(1, scored) * 1e6, 1)}


# ---- report ----------------------------------------------------------------------------------------

def table(results: dict[str, Any]) -> str:
    """The run's figures, one row each; phases skipped with ``--skip`` are left out."""
    b, r = results.get("compute_bound"), results.get("river")
    e = results.get("end_to_end")
    nv = results.get("naive")
    m = results["machine"]
    rows: list[tuple[str, str]] = []

    def row(label: str, value: object) -> None:
        rows.append((label, str(value)))

    def latency_rows(title: str, run: dict[str, Any]) -> None:
        p = run["end_to_end_ms"]
        row(title, f"p50 {p['p50']} ms, p95 {p['p95']} ms, p99 {p['p99']} ms, max {p['max']} ms")
        for hop, q in run["hops_ms"].items():
            row(f"  {hop}", f"p50 {q.get('p50')} ms, p99 {q.get('p99')} ms")

    row("machine", f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; load avg (1 min) at start "
                   f"{m['load_avg_at_start'][0]:.2f}, at end {results['load_avg_at_end'][0]:.2f} (shared machine)")
    row("stack", f"{m['kafka']}, Redis 6.2, {results['partitions']} partitions, one replica per service")
    row("model", f"{SPEC}: StandardScaler | LogisticRegression (River {m['river']})")
    if b and r:
        row("compute bound: CPU per event",
            f"{b['cpu_us_per_event']} us  (" + ", ".join(f"{k} {v}" for k, v in b["stages_us_per_event"].items()) + ")")
        row("compute bound (cores / CPU per event)", f"{b['bound_events_per_s']:,} events/s")
        row("River in process, one core", f"predict+learn {r['predict_then_learn_per_s']:,}/s, learn "
            f"{r['learn_one_per_s']:,}/s, predict_proba {r['predict_proba_one_per_s']:,}/s")
    if e:
        t, lat = e["throughput"], e.get("latency")
        if "broker_warmup" in e:
            w = e["broker_warmup"]
            row("broker warm-up before measuring", f"{w['seconds']} s at {w['rate']:.0f} events/s; JIT CPU-s per "
                f"10 s round {w['jit_cpu_s_per_round']} ({'settled' if w['settled'] else 'NOT settled'})")
        row(f"streamlearn end to end ({t['events']:,} events + labels)",
            f"{t['events_per_s']:,} events/s (steady {t['events_per_s_steady']:,}/s)")
        row("  learner in that run", f"{t['learner_examples_per_s']:,} examples/s "
                                     f"(steady {t['learner_examples_per_s_steady']:,}/s); all learned after "
                                     f"{t['seconds_to_last_example']} s")
        row("  CPU per event by process (us)", ", ".join(f"{k} {v}" for k, v in t["cpu_us_per_event"].items()))
        services_cpu = sum(t["cpu_us_per_event"][k] for k in SERVICES)
        row("  CPU per event: 4 services / all processes",
            f"{services_cpu:.0f} us / {sum(t['cpu_us_per_event'].values()):.0f} us"
            + (f" (compute bound: {b['cpu_us_per_event']} us)" if b else ""))
        row("  machine CPU used", f"{t['cpu_utilisation_of_machine']:.0%}; broker JIT compiler "
                                  f"{t.get('kafka_jit_cpu_s')} CPU-s")
        row("  peak consumer lag (messages)", ", ".join(f"{k} {v:,}" for k, v in t["peak_lag"].items()))
        ck = e["checkpoint"]
        row("  learner checkpoints", f"{ck['mean_ms']} ms mean, {ck['bytes']:,} bytes (last), "
                                     f"{ck['checkpoints']} written")
        if lat:
            latency_rows(f"latency at {lat['rate']:.0f} events/s ({lat['events']:,} events)", lat)
            row("  CPU per event by process (us)", ", ".join(f"{k} {v}" for k, v in lat["cpu_us_per_event"].items()))
            row("  machine CPU used", f"{lat['cpu_utilisation_of_machine']:.0%}; broker JIT compiler "
                                      f"{lat.get('kafka_jit_cpu_s')} CPU-s")
        alo = e.get("latency_at_least_once")
        if alo:
            latency_rows(f"latency at {alo['rate']:.0f} events/s, at-least-once (no transactions)", alo)
            row("  machine CPU used", f"{alo['cpu_utilisation_of_machine']:.0%}")
    if nv:
        row("naive loop (poll/produce/flush/commit per message)",
            f"{nv['events_per_s']} events/s ({nv['events']} events in {nv['seconds']} s, "
            f"{nv['ms_per_message']} ms/message)")
    if e and b:
        row("streamlearn / compute bound", f"{e['throughput']['events_per_s'] / b['bound_events_per_s']:.0%}")
    if e and nv:
        row("streamlearn / naive", f"{e['throughput']['events_per_s'] / nv['events_per_s']:.1f}x")
    if "ingestion_alone" in results:
        ing, sco, lrn = results["ingestion_alone"], results["scorer_alone"], results["learner_alone"]
        row("ingestion alone", f"{ing['events_per_s']:,} events/s, {ing['cpu_us_per_event']} us CPU/event, "
                               f"peak RSS {ing['peak_rss_mb']} MB")
        row("scorer alone (1 replica, transactions)", f"{sco['events_per_s']:,} events/s, {sco['cpu_us_per_event']} "
            f"us CPU/event, mean batch {sco['mean_batch']}, peak RSS {sco['peak_rss_mb']} MB")
        share = f" ({lrn['examples_per_s'] / r['predict_then_learn_per_s']:.0%} of River's predict+learn)" if r else ""
        row("learner alone", f"{lrn['examples_per_s']:,} examples/s{share}, {lrn['cpu_us_per_example']} us "
                             f"CPU/example")
        ck = lrn["checkpoint"]
        written = (f"{ck['mean_ms']} ms mean, {ck['bytes']:,} bytes, {ck['checkpoints']} checkpoints"
                   if ck["checkpoints"] else "none written in that run (checkpoints are by time)")
        row("  checkpoint", f"{written}; {lrn['versions_published']} versions published")
    if e:
        row("peak RSS (MB) end to end", ", ".join(f"{k} {v.get('peak_rss_mb')}" for k, v in e["processes"].items()))
    if e and "soak" in e:
        s = e["soak"]
        row(f"soak at {s['rate']:.0f}/s for {s['seconds']:.0f} s: RSS growth (MB)",
            ", ".join(f"{k} {v}" for k, v in s["rss_growth_mb"].items()))
        if "rss_growth_second_half_mb" in s:
            row("  RSS growth in the second half (MB)", ", ".join(f"{k} {v}" for k, v in
                                                                  s["rss_growth_second_half_mb"].items()))
        row("  latency, machine CPU used", f"p50 {s['end_to_end_ms']['p50']} ms, p99 {s['end_to_end_ms']['p99']} ms; "
                                          f"{s['cpu_utilisation_of_machine']:.0%}")
        row("  learner checkpoint bytes, first -> last", f"{s['checkpoint_bytes']['first']:,} -> "
            f"{s['checkpoint_bytes']['last']:,}")
        row("  CPU share first -> last", ", ".join(f"{k} {s['cpu_share']['first'].get(k)} -> {v}"
                                                   for k, v in s["cpu_share"]["last"].items()))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(width)}  {v}" for a, v in rows)


def print_profiles(phases: dict[str, Any]) -> None:
    for phase, profiles in phases.items():
        for name, prof in profiles.items():
            print_profile(f"{name}, {phase} run", prof)


def print_profile(title: str, prof: dict[str, Any]) -> None:
    print(f"\n== {title}: {prof['samples']} samples; self % (top) ==")
    for frame, pct in prof["self_pct"]:
        print(f"  {pct:5.1f}  {frame}")
    print("   -- inclusive % --")
    for frame, pct in prof["inclusive_pct"]:
        print(f"  {pct:5.1f}  {frame}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, help="events in the end-to-end throughput run (default 50000; quick 10000)")
    ap.add_argument("--quick", action="store_true", help="smaller runs (under ~3 minutes)")
    ap.add_argument("--latency-s", type=float, help="seconds of the fixed-rate latency run (default 20; quick 8)")
    ap.add_argument("--latency-rate", type=float, default=1000.0)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="py-spy every service during the throughput run")
    ap.add_argument("--settle-s", type=float, help="before measuring, run at the latency rate until the broker's JIT "
                    "compiler is quiet, for at most this long (default 240; quick 60; 0 = off)")
    ap.add_argument("--soak", type=float, default=0.0, help="seconds at 50%% of the throughput, sampling RSS")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: bound,alone,e2e,naive")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for every service, e.g. STREAMLEARN_BATCH_SIZE=2000 (repeatable)")
    ap.add_argument("--output", type=Path, default=RESULTS_DIR / "pipeline.json")
    args = ap.parse_args(argv)
    quick = args.quick
    n = args.events or (10_000 if quick else 50_000)
    per_service = max(5_000, n // 2) if quick else n
    latency_s = args.latency_s or (8.0 if quick else 20.0)
    settle_s = args.settle_s if args.settle_s is not None else (60.0 if quick else 240.0)
    naive_events, naive_s = (1_000, 20.0) if quick else (3_000, 60.0)
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {"machine": machine(), "spec": SPEC, "partitions": args.partitions, "quick": quick,
                               "profiled": args.profile, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    began = time.monotonic()
    if "bound" not in skip:
        log("compute bound (no Kafka)")
        # with the garbage collector tuned the way the services run it (services.runtime.app.tune_gc):
        # the default collector costs 5-30 us per message in a process of this size
        thresholds = gc.get_threshold()
        tune_gc()
        try:
            results["compute_bound"] = compute_bound(min(n, 20_000))
            results["river"] = river_rates(min(n, 20_000))
        finally:
            gc.unfreeze()
            gc.set_threshold(*thresholds)
    tmp = Path(tempfile.mkdtemp(prefix="streamlearn-bench-"))
    env = dict(item.split("=", 1) for item in args.env)
    results["env"] = env
    bench = Bench(tmp, args.partitions, env)
    try:
        log("warming the broker up")
        bench.warm_up(50_000 if quick else 100_000)
        if "alone" not in skip:
            log(f"ingestion alone: {per_service} events")
            results["ingestion_alone"] = ingestion_alone(bench, per_service)
            log(f"scorer alone: {per_service} feature vectors")
            results["scorer_alone"] = scorer_alone(bench, per_service)
            log(f"learner alone: {per_service} feature vectors + labels")
            results["learner_alone"] = learner_alone(bench, per_service)
        if "e2e" not in skip:
            results["end_to_end"] = end_to_end(bench, n, warmup=2000 if not quick else 1000, latency_s=latency_s,
                                               latency_rate=args.latency_rate, profile=args.profile,
                                               soak_s=args.soak, settle_s=settle_s, at_least_once=not quick)
        if "naive" not in skip:
            log(f"naive loop: up to {naive_events} events or {naive_s:.0f} s")
            results["naive"] = naive(bench, naive_events, naive_s)
    finally:
        bench.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - began, 1)
    results["load_avg_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    if results.get("end_to_end", {}).get("profiles"):
        print_profiles(results["end_to_end"]["profiles"])
    log(f"done in {results['seconds']} s; results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
