"""What the runtime's consume loop costs per message, with fake Kafka clients (no broker, no I/O).

Run::

    PYTHONPATH=. python -m tests.bench.bench_runtime [--batches 200] [--batch 500]

``StreamApp._process`` on batches of ``confluent_kafka.Message`` objects (300-byte values, three
partitions) with a handler that returns one output per input, through the at-least-once path
(produce with a delivery callback, flush, commit) and the exactly-once path (one transaction per
batch), against a baseline measured in the same run: the minimal hand-written loop over the same
fake clients (produce each value, flush, commit). The difference is the runtime's bookkeeping per
message: offsets, DLQ routing, metrics, delivery accounting. For scale, the same run measures one
River predict + learn step of the phishing model, and prints the overhead as a share of it.
"""

from __future__ import annotations

import argparse
import time

from confluent_kafka import Message

from services.runtime.app import StreamApp
from services.runtime.messages import Outgoing
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings


class Passthrough:
    name = "bench"

    def subscriptions(self):
        return {"t.in": lambda raw: raw}

    def handle(self, batch):
        return [Outgoing("t.out", m.raw, m.key) for m in batch]


class FakeProducer:
    """Acknowledges everything at flush / commit, calling the delivery callbacks as librdkafka does."""

    def __init__(self):
        self.pending: list = []

    def produce(self, topic, value, key=None, headers=None, on_delivery=None):
        self.pending.append(on_delivery)

    def flush(self, timeout=None):
        for callback in self.pending:
            if callback is not None:
                callback(None, None)
        self.pending = []
        return 0

    def poll(self, timeout=0):
        return 0

    def begin_transaction(self):
        pass

    def send_offsets_to_transaction(self, positions, metadata, timeout=None):
        pass

    def commit_transaction(self, timeout=None):
        self.flush()


class FakeConsumer:
    def commit(self, offsets=None, asynchronous=True):
        pass

    def store_offsets(self, offsets=None):
        pass

    def consumer_group_metadata(self):
        return None


def messages(n: int) -> list[Message]:
    return [Message(topic="t.in", partition=i % 3, offset=i, key=b"user-%d" % (i % 1000), value=b"x" * 300,
                    timestamp=(1, 1)) for i in range(n)]


def baseline(batch: list[Message], producer: FakeProducer, consumer: FakeConsumer) -> None:
    for msg in batch:
        producer.produce("t.out", msg.value(), msg.key())
    producer.flush()
    consumer.commit(asynchronous=False)


def per_message_us(fn, batch: list[Message], batches: int) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(batches):
            fn(batch)
        best = min(best, (time.process_time() - started) / (batches * len(batch)) * 1e6)
    return best


def river_step_us(n: int = 1250) -> float:
    from river import datasets

    from services.runtime.river_models import build_pipeline
    from services.runtime.spec import load_spec

    model = build_pipeline(load_spec("phishing").model.pipeline)
    data = list(datasets.Phishing())[:n]
    started = time.process_time()
    for x, y in data:
        model.predict_one(x)
        model.learn_one(x, y)
    return (time.process_time() - started) / len(data) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args(argv)
    batch = messages(args.batch)
    producer, consumer = FakeProducer(), FakeConsumer()
    base = per_message_us(lambda b: baseline(b, producer, consumer), batch, args.batches)
    step = river_step_us()
    print(f"River predict_one + learn_one (phishing model):  {step:6.2f} us/example")
    print(f"hand-written loop (produce, flush, commit):      {base:6.2f} us/message")
    for transactional in (False, True):
        app = StreamApp(Settings(), Passthrough(), RuntimeMetrics("bench"))
        app.producer, app.consumer, app.transactional = FakeProducer(), FakeConsumer(), transactional
        app._assigned = {("t.in", p) for p in range(3)}
        us = per_message_us(app._process, batch, args.batches)
        mode = "exactly-once (transaction)" if transactional else "at-least-once (flush, commit)"
        print(f"StreamApp._process, {mode:30s} {us:6.2f} us/message: +{us - base:.2f} us over the "
              f"hand-written loop, {(us - base) / step:.0%} of a River step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
