"""Ingestion throughput, one replica on Apache Kafka, against a naive baseline measured in the same run.

Run: ``python -m tests.bench.bench_ingestion [--events N] [--baseline-events N]`` (not collected by
pytest). Starts a real Apache Kafka (KRaft) and a real Redis, pre-loads the events topic, then
measures, from the first output message to the last:

- ``streamlearn ingestion``: the real service (``python -m services.ingestion``, one process, batch
  500), on the ``phishing`` spec (validation + pass-through + online store) and on the
  ``clickstream`` spec (plus tumbling / hopping / sliding aggregates in Redis, exactly once);
- ``naive loop``: what a hand-written service does: per message ``poll`` -> stdlib ``json`` ->
  the same validation written in Python -> ``produce`` -> ``flush`` -> synchronous commit (no Redis);
- in-process decode rates (no broker): the compiled validator vs stdlib json + Python checks.

Prints a table and writes ``bench-results/ingestion.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from services.cli.datasets import examples
from services.cli.localstack import KafkaBroker, RedisServer
from services.cli.stack import Stack
from services.ingestion.synthetic import clickstream
from services.ingestion.validation import EventValidator
from services.runtime.messages import Reject
from services.runtime.spec import PipelineSpec, load_spec

RESULTS = Path("bench-results") / "ingestion.json"


def phishing_events(n: int, run_id: str) -> list[dict]:
    rows = list(examples("phishing", run_id=run_id, start_ts=1_700_000_000.0))
    out = []
    for i in range(n):
        event = dict(rows[i % len(rows)].event)
        event["event_id"] = f"{event['event_id']}-{i}"
        out.append(event)
    return out


def load(bootstrap: str, topic: str, events: list[dict]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True,
                         "compression.type": "lz4", "batch.num.messages": 10000})
    for event in events:
        while True:
            try:
                producer.produce(topic, orjson.dumps(event), event["entity_id"].encode())
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(120) == 0


def size(consumer: Consumer, topic: str) -> int:
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    return sum(max(0, hi - lo) for lo, hi in
               (consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts))


def measure(bootstrap: str, topic: str, n: int, timeout: float = 600.0) -> tuple[float, int]:
    """Seconds from the first message in ``topic`` until ``n``, and how many were counted in them."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}"})
    deadline = time.monotonic() + timeout
    try:
        while (first := size(probe, topic)) == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing in {topic}")
            time.sleep(0.02)  # polling interval of the benchmark's own clock, not of the system measured
        started = time.perf_counter()
        while size(probe, topic) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} did not reach {n}")
            time.sleep(0.02)
        return time.perf_counter() - started, n - first
    finally:
        probe.close()


def run_service(bootstrap: str, redis_url: str, spec: str, events: list[dict], state: Path) -> dict:
    prefix = f"b{uuid.uuid4().hex[:8]}."
    stack = Stack(state / prefix, spec=spec, broker=bootstrap, redis=redis_url, topic_prefix=prefix,
                  extra_env={"STREAMLEARN_REDIS_NAMESPACE": prefix.rstrip("."), "STREAMLEARN_LOG_LEVEL": "WARNING"})
    stack.start_servers()
    load(bootstrap, stack.topics.name("events"), events)
    try:
        stack.start_service("ingestion")
        seconds, counted = measure(bootstrap, stack.topics.name("features"), len(events))
    finally:
        stack.stop()
    return {"events": counted, "seconds": seconds, "events_per_s": counted / seconds}


# ---- the baseline: a naive hand-written loop with the same validation in plain Python ------------

def python_validator(spec: PipelineSpec):
    """The spec's checks written the obvious way with stdlib json (what the baseline runs)."""
    fields = spec.event.fields

    def validate(raw: bytes) -> dict:
        if len(raw) > spec.event.max_bytes:
            raise ValueError("oversized")
        event = json.loads(raw.decode("utf-8"))
        if not isinstance(event, dict):
            raise ValueError("not an object")
        for key in ("event_id", "entity_id"):
            if not isinstance(event.get(key), str) or not event[key]:
                raise ValueError(key)
        if event.get("schema_version", 1) != 1 or event.get("type") not in spec.event.types:
            raise ValueError("envelope")
        ts = event.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise ValueError("ts")
        data = event.get("data")
        if not isinstance(data, dict) or set(data) - set(fields):
            raise ValueError("data")
        for name, f in fields.items():
            value = data.get(name)
            if value is None:
                if f.required:
                    raise ValueError(f"missing {name}")
                continue
            if f.type == "float":
                ok = isinstance(value, int | float) and not isinstance(value, bool) and (
                    f.allow_nan or math.isfinite(value))
            elif f.type == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif f.type == "bool":
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, str) and (not f.values or value in f.values)
            if not ok or (f.min is not None and value < f.min) or (f.max is not None and value > f.max):
                raise ValueError(name)
        return event

    return validate


def run_loop(bootstrap: str, spec: PipelineSpec, events: list[dict], batched: bool) -> dict:
    """The hand-written loop: per message (``batched=False``: poll, produce, flush, commit each one)
    or per batch of 500 (consume, produce all, flush once, commit once: what the runtime does)."""
    from services.cli.stack import topic_layout
    from services.runtime.kafka import ensure_topics

    prefix = f"n{uuid.uuid4().hex[:8]}."
    stack = Stack(Path(tempfile.mkdtemp()), broker=bootstrap, redis="redis://unused", topic_prefix=prefix)
    stack.bootstrap = bootstrap
    ensure_topics(stack.kafka_settings(), topic_layout(stack.topics, 3))
    load(bootstrap, stack.topics.name("events"), events)
    validate = python_validator(spec)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}loop", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5 if batched else 0})
    consumer.subscribe([stack.topics.name("events")])
    features, dlq = stack.topics.name("features"), stack.topics.name("dlq")
    consumed, done, started = 0, 0, None
    while consumed < len(events):
        batch = consumer.consume(500 if batched else 1, 1.0)
        batch = [m for m in batch if not m.error()]
        if not batch:
            continue
        consumed += len(batch)
        if started is None:  # the clock starts once the first batch is in hand
            started = time.perf_counter()
        for msg in batch:
            try:
                event = validate(msg.value())
                topic = features
                value = json.dumps({"schema_version": 1, "event_id": event["event_id"],
                                    "entity_id": event["entity_id"], "ts": event["ts"],
                                    "feature_set": spec.features.name, "feature_set_version": spec.features.version,
                                    "features": event["data"], "ingested_at": time.time()}).encode()
            except (ValueError, UnicodeDecodeError):
                topic, value = dlq, msg.value()
            producer.produce(topic, value, msg.key())
        producer.flush()
        consumer.commit(asynchronous=False)
        done += len(batch)
    seconds = time.perf_counter() - started
    consumer.close()
    return {"events": done, "seconds": seconds, "events_per_s": done / seconds}


def decode_rates(events: list[dict], spec: PipelineSpec) -> dict[str, float]:
    raws = [orjson.dumps(e) for e in events]
    compiled, plain = EventValidator(spec), python_validator(spec)
    out = {}
    for name, fn in (("compiled validator (pydantic-core)", compiled), ("stdlib json + Python checks", plain)):
        started = time.perf_counter()
        for raw in raws:
            try:
                fn(raw)
            except (Reject, ValueError):
                pass
        out[name] = len(raws) / (time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--baseline-events", type=int, default=3_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ingestion-"))
    kafka = KafkaBroker(root / "kafka")
    kafka.start()
    redis_server = RedisServer(root / "redis").start()
    rows = []
    try:
        phishing = load_spec("phishing")
        for name, rate in decode_rates(phishing_events(20_000, "decode"), phishing).items():
            rows.append({"run": f"decode only, phishing: {name}", "events": 20_000, "seconds": 20_000 / rate,
                         "events_per_s": rate})
        rows.append({"run": "naive loop, per message (poll/json/produce/flush/commit), phishing",
                     **run_loop(kafka.bootstrap, phishing, phishing_events(args.baseline_events, "naive"), False)})
        rows.append({"run": "hand-written batched loop (500, json, one flush+commit), phishing",
                     **run_loop(kafka.bootstrap, phishing, phishing_events(args.events, "batched"), True)})
        rows.append({"run": "streamlearn ingestion, phishing (1 replica)",
                     **run_service(kafka.bootstrap, redis_server.url, "phishing",
                                   phishing_events(args.events, "svc"), root)})
        rows.append({"run": "streamlearn ingestion, clickstream windows (1 replica)",
                     **run_service(kafka.bootstrap, redis_server.url, "clickstream",
                                   clickstream(args.events, users=2000, run_id="svc"), root)})
    finally:
        redis_server.stop()
        kafka.stop()
    baseline = next(r for r in rows if r["run"].startswith("naive"))["events_per_s"]
    print(f"\n{'run':68} {'events':>8} {'seconds':>8} {'events/s':>10} {'vs naive':>9}")
    for r in rows:
        print(f"{r['run']:68} {r['events']:8d} {r['seconds']:8.2f} {r['events_per_s']:10,.0f} "
              f"{r['events_per_s'] / baseline:8.1f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "ingestion", "broker": "Apache Kafka 4.1.1 (KRaft, single node)", "redis": "redis-server 6.2",
        "cpus": os.cpu_count(), "python": platform.python_version(), "created_at": time.time(),
        "baseline_events_per_s": baseline, "runs": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
