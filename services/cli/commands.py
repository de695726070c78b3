"""Implementations of the CLI sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from schemas import DlqRecord, export
from services.cli.stack import Stack, load_state, redact_url
from services.runtime.kafka import PARTITIONER, read_topic
from services.runtime.settings import ConfigError, KafkaSettings, Settings, TopicSettings, load


class CliError(RuntimeError):
    pass


def dispatch(args: argparse.Namespace) -> int:
    handler = {
        "up": cmd_up, "demo": cmd_demo, "produce": cmd_produce, "tail": cmd_tail, "topics": cmd_topics,
        "status": cmd_status,
        "schemas": cmd_schemas, "models": cmd_models,
    }[args.command]
    return handler(args)


# ---- connection context: env settings, overridden by a running stack's stack.json -------------

def _settings() -> Settings:
    try:
        return load()
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _kafka(args: argparse.Namespace) -> tuple[KafkaSettings, TopicSettings]:
    settings = _settings()
    kafka, topics = settings.kafka, settings.topics
    bootstrap = getattr(args, "bootstrap", None)
    state_file = Path(args.state_dir) / "stack.json"
    if bootstrap:
        kafka = kafka.model_copy(update={"bootstrap_servers": bootstrap})
    elif state_file.exists():
        state = load_state(args.state_dir)
        kafka = kafka.model_copy(update={"bootstrap_servers": state["broker"]["bootstrap"]})
        prefix = state["topics"]["events"].removesuffix("events")
        topics = topics.model_copy(update={"prefix": prefix})
    return kafka, topics


def _topic(name: str, topics: TopicSettings) -> str:
    return topics.name(name) if name in topics.all() else name


# ---- up / demo ----------------------------------------------------------------------------------

def _stack(args: argparse.Namespace) -> Stack:
    return Stack(state_dir=args.state_dir, spec=args.spec, broker=args.broker, redis=args.redis,
                 partitions=args.partitions)


def _print_stack(stack: Stack) -> None:
    d = stack.describe()
    print(f"broker    {d['broker']['kind']:9} {d['broker']['bootstrap']}")
    print(f"redis     {'':9} {d['redis']['url']}")
    for name, svc in d["services"].items():
        print(f"{name:9} pid {svc['pid']:<6} {svc['metrics_url']}")
    print(f"topics    {', '.join(d['topics'].values())}")
    print(f"state     {stack.state_dir / 'stack.json'}")


def cmd_up(args: argparse.Namespace) -> int:
    from services.cli.main import wait_for_signal

    stack = _stack(args)
    try:
        stack.start()
        _print_stack(stack)
        print("streamlearn is up; Ctrl-C stops it.", flush=True)
        wait_for_signal()
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.cli.datasets import examples, river_reference
    from services.cli.replay import Replayer
    from services.runtime.spec import load_spec

    spec = load_spec(args.spec)
    data = list(examples(spec.name, args.events, run_id=uuid.uuid4().hex[:8]))
    stack = _stack(args)
    try:
        stack.start()
        _print_stack(stack)
        mode = args.rate if args.rate == "lockstep" else float(args.rate)
        print(f"replaying {len(data)} {spec.name} events, labels {args.label_delay} events later "
              f"({'lockstep' if mode == 'lockstep' else f'{mode:g} events/s'}) ...", flush=True)
        labels = {e.label["event_id"]: e.label["label"] for e in data}
        replayer = Replayer(stack.kafka_settings(), stack.topics.all(), spec.model.name)

        def progress(res) -> None:
            acc = res.accuracy(labels)
            sys.stdout.write(f"\r  events sent {res.events:6d}  predictions {len(res.predictions):6d}  "
                             f"model v{res.last_version:<5d} learned {res.examples_seen:6d}  "
                             f"accuracy {acc:6.2%}")
            sys.stdout.flush()

        result = replayer.run(data, args.label_delay, mode, progress)
        replayer.close()
        print()
        reference = river_reference(spec, len(data), args.label_delay)
        accuracy = result.accuracy(labels)
        print(f"done in {result.seconds:.1f}s: {result.events} events, {len(result.predictions)} predicted "
              f"({result.duplicates} duplicates), {result.examples_seen} examples learned, "
              f"model v{result.last_version}")
        print(f"pipeline accuracy {accuracy:.2%}; River progressive_val_score (same model, delay "
              f"{args.label_delay}): {reference:.2%}")
        print(f"metrics: {', '.join(s['metrics_url'] for s in stack.describe()['services'].values())}")
        missing = len(data) - len(result.predictions)
        return 0 if missing == 0 else 1
    finally:
        stack.stop()


# ---- produce / tail / topics ----------------------------------------------------------------------

Record = tuple[bytes | None, bytes, float | None]  # key, value, event time (epoch s) when known


def event_time(value: object) -> float | None:
    """Epoch seconds from a number, a numeric or ISO-8601 string (UTC when it has no offset), a
    ``datetime`` or a pandas ``Timestamp``; ``None`` when missing or unparseable.

    >>> event_time("2024-01-01T00:00:00Z"), event_time(1704067200), event_time("soon")
    (1704067200.0, 1704067200.0, None)
    """
    import math
    import numbers
    from datetime import UTC, datetime

    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            try:
                value = datetime.fromisoformat(value.strip())
            except ValueError:
                return None
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "to_pydatetime"):  # a pandas Timestamp (naive means UTC) or NaT
        return None if value != value else float(value.timestamp())
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return None


def _records(path: Path, args: argparse.Namespace, role: str) -> list[Record]:
    """(key, value, event time) per record. JSON lines are sent as they are (bad lines too:
    ingestion's DLQ judges them); CSV / Parquet rows are mapped to the event or label envelope, with
    the event time taken from ``--ts-col`` (epoch seconds, ISO-8601 strings or timestamps; a row
    whose time is missing or unparseable keeps its raw value, for ingestion to reject). Without that
    column every row gets the current time."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        out: list[Record] = []
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
                key = str(doc.get("entity_id", "")).encode() or None
                ts = event_time(doc.get("ts"))
            except (orjson.JSONDecodeError, AttributeError):
                key, ts = None, None
            out.append((key, line, ts))
        return out
    import pandas as pd

    if suffix == ".csv":
        frame = pd.read_csv(path)
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        raise CliError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .csv or .parquet)")
    has_ts = args.ts_col in frame.columns
    now = time.time()
    out = []
    for row in frame.to_dict(orient="records"):
        row = {k: (None if v is None or (isinstance(v, float) and v != v) or v is pd.NaT else v)
               for k, v in row.items()}
        entity = str(row.pop(args.entity_col, "") or "")
        event_id = str(row.pop(args.event_id_col, None) or uuid.uuid4().hex)
        raw_ts = row.pop(args.ts_col, None) if has_ts else now
        ts = event_time(raw_ts)
        wire_ts = ts if ts is not None else (None if raw_ts is None else str(raw_ts))
        if role == "labels":
            record = {"schema_version": 1, "event_id": event_id, "entity_id": entity, "ts": wire_ts,
                      "label": row.get("label")}
        else:
            record = {"schema_version": 1, "event_id": event_id, "entity_id": entity, "ts": wire_ts,
                      "type": args.event_type or row.pop("type", "event"), "data": row}
        if wire_ts is None:
            del record["ts"]
        out.append((entity.encode() or None, orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY), ts))
    return out


def pace(records: list[Record], rate: float | None = None, speedup: float | None = None,
         sort: bool = False) -> tuple[list[Record], list[float] | None]:
    """Order the records and say when each is due, in seconds after the start (``None``: as fast as
    possible). ``rate``: N records per second, in file order. ``speedup``: in event-time order, the
    gaps between event times divided by ``speedup``. ``sort``: event-time order, no pacing. Records
    without an event time take the one of the record before them in the file.

    >>> recs = [(None, b"", 30.0), (None, b"", 10.0), (None, b"", None), (None, b"", 20.0)]
    >>> ordered, due = pace(recs, speedup=10)
    >>> [r[2] for r in ordered], due
    ([10.0, None, 20.0, 30.0], [0.0, 0.0, 1.0, 2.0])
    >>> pace(recs, rate=4)[1]
    [0.0, 0.25, 0.5, 0.75]
    """
    if rate is not None:
        return records, [i / rate for i in range(len(records))]
    if speedup is None and not sort:
        return records, None
    times, last = [], None
    for record in records:
        last = record[2] if record[2] is not None else last
        times.append(last)
    first = next((t for t in times if t is not None), 0.0)
    times = [first if t is None else t for t in times]
    order = sorted(range(len(records)), key=times.__getitem__)
    ordered = [records[i] for i in order]
    if speedup is None:
        return ordered, None
    start = times[order[0]] if order else 0.0
    return ordered, [(times[i] - start) / speedup for i in order]


def cmd_produce(args: argparse.Namespace) -> int:
    kafka, topics = _kafka(args)
    topic = _topic(args.topic, topics)
    role = args.topic if args.topic in topics.all() else "events"
    records, due = pace(_records(args.file, args, role), args.rate, args.speedup, args.sort)
    errors: list[str] = []
    producer = Producer(kafka.client_config() | PARTITIONER | {"enable.idempotence": True, "linger.ms": 5})

    def delivered(err, _msg) -> None:
        if err:
            errors.append(str(err))

    started = time.monotonic()
    for i, (key, value, _) in enumerate(records):
        if due is not None:
            # a monotonic schedule: no drift, and waiting in poll() serves delivery reports
            while (wait := started + due[i] - time.monotonic()) > 0:
                producer.poll(min(wait, 0.1))
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(60) or errors:
        raise CliError(f"{len(errors)} messages not delivered: {errors[:3]}")
    seconds = time.monotonic() - started
    print(f"produced {len(records)} messages to {topic} in {seconds:.1f}s "
          f"({len(records) / max(seconds, 1e-9):,.0f}/s)")
    return 0


def _consumer(kafka: KafkaSettings) -> Consumer:
    return Consumer(kafka.client_config() | {"group.id": f"streamlearn-cli-{uuid.uuid4().hex[:8]}",
                                             "enable.auto.commit": False, "enable.partition.eof": True,
                                             "isolation.level": "read_committed",
                                             "fetch.wait.max.ms": kafka.fetch_wait_max_ms})


def _render(msg, as_json: bool, is_dlq: bool) -> str:
    value = msg.value() or b""
    key = msg.key().decode(errors="replace") if msg.key() else None
    if is_dlq:
        h = {k.removeprefix("streamlearn."): (v or b"").decode(errors="replace") for k, v in (msg.headers() or [])}
        record = DlqRecord(reason=h.get("reason", "?"), field=h.get("field") or None, error=h.get("error", ""),
                           service=h.get("service", "?"), source_topic=h.get("source.topic", "?"),
                           source_partition=int(h.get("source.partition") or -1),
                           source_offset=int(h.get("source.offset") or -1),
                           expected_schema_version=int(h["schema.version"]) if h.get("schema.version") else None,
                           key=key, value=value.decode(errors="replace"))
        return record.model_dump_json() if as_json else (
            f"[{record.source_topic}:{record.source_partition}@{record.source_offset}] {record.reason}"
            f"{' ' + record.field if record.field else ''}: {record.error} | {record.value[:120]}")
    if as_json:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            parsed = value.decode(errors="replace")
        return json.dumps({"partition": msg.partition(), "offset": msg.offset(), "key": key, "value": parsed})
    return f"{msg.partition()}:{msg.offset()} {key} {value.decode(errors='replace')}"


def cmd_tail(args: argparse.Namespace) -> int:
    kafka, topics = _kafka(args)
    topic = _topic(args.topic, topics)
    consumer = _consumer(kafka)
    is_dlq = topic == topics.name("dlq")
    try:
        meta = consumer.list_topics(topic, timeout=15).topics.get(topic)
        if meta is None or meta.error is not None:
            raise CliError(f"no such topic {topic!r}")
        messages = read_topic(consumer, topic, last=args.n)
        messages.sort(key=lambda m: m.timestamp()[1])
        for msg in messages[-args.n:]:
            print(_render(msg, args.json, is_dlq), flush=True)
        if args.follow:
            _follow(consumer, topic, messages, lambda msg: print(_render(msg, args.json, is_dlq), flush=True))
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def _follow(consumer: Consumer, topic: str, seen: list, emit) -> None:
    """Print what arrives after the messages already shown, until interrupted."""
    nxt: dict[int, int] = {}
    for msg in seen:
        nxt[msg.partition()] = max(nxt.get(msg.partition(), 0), msg.offset() + 1)
    partitions = consumer.list_topics(topic, timeout=15).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, nxt[p]) if p in nxt else
                     TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1])
                     for p in partitions])
    while True:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF or msg.error().retriable():
                continue
            raise CliError(str(msg.error()))
        emit(msg)


def cmd_topics(args: argparse.Namespace) -> int:
    kafka, topics = _kafka(args)
    consumer = _consumer(kafka)
    try:
        meta = consumer.list_topics(timeout=15)
        rows = []
        for name in sorted(meta.topics):
            if name.startswith("__"):
                continue
            parts = meta.topics[name].partitions
            messages = 0
            for p in parts:
                low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=15)
                messages += max(0, high - low)
            role = next((r for r, n in topics.all().items() if n == name), None)
            rows.append({"topic": name, "role": role, "partitions": len(parts), "messages": messages})
    finally:
        consumer.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['topic']:40} {r['role'] or '-':12} partitions {r['partitions']:<3} messages {r['messages']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from services.cli.status import as_json, latest_models, render, service_status

    state = load_state(args.state_dir)
    kafka, topics = _kafka(args)
    consumer = _consumer(kafka)
    try:
        announcements = [m.value() for m in read_topic(consumer, topics.name("models")) if m.value()]
        drift = [m.value() for m in read_topic(consumer, topics.name("drift"))][-5:]
    finally:
        consumer.close()
    statuses = service_status(state["services"])
    models = latest_models(announcements)
    print(as_json(statuses, models, drift) if args.json else render(statuses, models, drift))
    return 0 if all(s.up for s in statuses) else 1


def cmd_schemas(args: argparse.Namespace) -> int:
    for path in export(args.directory):
        print(path)
    return 0


# ---- models -----------------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    from services.runtime.redis_client import make_redis
    from services.runtime.registry import ModelRegistry

    settings = _settings()
    redis_settings = settings.redis
    state_file = Path(args.state_dir) / "stack.json"
    if state_file.exists():  # a running stack wins over the environment, as for Kafka
        redis_settings = redis_settings.model_copy(update={"url": _stack_redis_url(args.state_dir)})
    registry = ModelRegistry(make_redis(redis_settings), signer=None, namespace=redis_settings.namespace)
    if args.models_command == "reproduce":
        return _reproduce(args, settings, registry)
    if args.models_command == "list":
        if not registry.models():
            print("no model versions in the registry yet")
        for model in registry.models():
            champion = registry.champion(model)
            versions = registry.versions(model)
            print(f"{model}: champion v{champion}, versions {versions}")
        return 0
    if args.models_command == "show":
        print(json.dumps(registry.meta(args.model, args.version), indent=2))
        return 0
    ann = registry.promote(args.model, args.version) if args.models_command == "promote" \
        else registry.rollback(args.model)
    kafka, topics = _kafka(args)
    producer = Producer(kafka.client_config() | PARTITIONER)
    producer.produce(topics.name("models"), ann.model_dump_json().encode(), ann.model.encode())
    if producer.flush(30):
        raise CliError("announcement not delivered")
    print(f"{ann.model}: champion is now v{ann.version}")
    return 0


def _reproduce(args: argparse.Namespace, settings: Settings, registry) -> int:
    from services.cli.reproduce import reproduce
    from services.runtime.registry import Signer
    from services.runtime.spec import load_spec

    key_file = Path(args.state_dir) / "signing.key"
    if settings.service.model_signing_key is not None:
        key = settings.service.signing_key()
    elif key_file.exists():
        key = key_file.read_text().strip().encode()
    else:
        raise CliError("set STREAMLEARN_MODEL_SIGNING_KEY: the stored artifact is verified before loading")
    registry.signer = Signer(key)
    state_file = Path(args.state_dir) / "stack.json"
    spec_name = args.spec or (load_state(args.state_dir)["spec"] if state_file.exists() else settings.service.spec)
    kafka, topics = _kafka(args)
    result = reproduce(load_spec(spec_name), registry, kafka, args.model, args.version, topics.name("labels"),
                       args.sample)
    verdict = "identical" if result.identical else "DIFFERENT"
    print(f"{args.model} v{args.version}: rebuilt from {result.examples} examples; predictions on "
          f"{result.sample} inputs {verdict} (max difference {result.max_difference:.3g})"
          f"{'' if result.spec_matches else '; WARNING: spec hash differs from the version'}")
    return 0 if result.identical else 1


def _stack_redis_url(state_dir: Path):
    from pydantic import SecretStr

    state = load_state(state_dir)
    url = state["redis"]["url"]
    if "***" in url:
        raise CliError(f"the stack's Redis URL has a password; set STREAMLEARN_REDIS_URL ({redact_url(url)})")
    return SecretStr(url)
