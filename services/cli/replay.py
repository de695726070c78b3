"""Replay a dataset into a running stack: events, then each label ``delay`` events later.

Modes:
- ``lockstep`` (default for the demo and the end-to-end tests): before event *i* is sent, the label
  of event *i - delay* is sent and the learner's announced model must reflect every label sent so
  far; event *i* is then scored before the next step. This reproduces River's progressive
  validation with the same delay exactly, so the pipeline's accuracy can be compared with
  ``river.evaluate.progressive_val_score``.
- a rate (events/s, 0 = as fast as possible): free-running, the way a live system runs.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
from confluent_kafka import OFFSET_END, Consumer, KafkaError, Producer, TopicPartition

from services.cli.datasets import Example
from services.runtime.kafka import PARTITIONER, consumer_config
from services.runtime.settings import KafkaSettings


@dataclass
class ReplayResult:
    events: int = 0
    labels: int = 0
    predictions: dict[str, dict] = field(default_factory=dict)  # event_id -> first prediction
    prediction_counts: Counter = field(default_factory=Counter)
    examples_seen: int = 0
    last_version: int = 0
    seconds: float = 0.0

    @property
    def duplicates(self) -> int:
        return sum(c - 1 for c in self.prediction_counts.values() if c > 1)

    def accuracy(self, labels: dict[str, object]) -> float:
        hits = sum(1 for eid, p in self.predictions.items() if eid in labels and p["prediction"] == labels[eid])
        return hits / max(1, len(self.predictions))


class Replayer:
    def __init__(self, kafka: KafkaSettings, topics: dict[str, str], model_name: str):
        self.topics = topics
        self.model_name = model_name
        self.producer = Producer(kafka.client_config() | PARTITIONER | {"linger.ms": 2, "enable.idempotence": True})
        self.consumer = Consumer(consumer_config(kafka, f"streamlearn-replay-{uuid.uuid4().hex[:8]}"))
        self._watch()
        self.result = ReplayResult()

    def _watch(self) -> None:
        """Read predictions from their current end and the models topic from the beginning."""
        parts = []
        md = self.consumer.list_topics(timeout=30).topics
        for role, start in (("predictions", OFFSET_END), ("models", None)):
            name = self.topics[role]
            for p in md[name].partitions:
                if start is None:
                    low, _ = self.consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                    parts.append(TopicPartition(name, p, low))
                else:
                    _, high = self.consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                    parts.append(TopicPartition(name, p, high))
        self.consumer.assign(parts)

    def _drain(self, timeout: float) -> None:
        for msg in self.consumer.consume(1000, timeout):
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"replay consumer: {msg.error()}")
                continue
            value = orjson.loads(msg.value())
            if msg.topic() == self.topics["predictions"]:
                if value.get("shadow"):
                    continue
                eid = value["event_id"]
                self.result.prediction_counts[eid] += 1
                self.result.predictions.setdefault(eid, value)
            elif value.get("model") == self.model_name and value.get("stage") == "champion":
                self.result.examples_seen = max(self.result.examples_seen, value["examples_seen"])
                self.result.last_version = max(self.result.last_version, value["version"])

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"replay: timed out after {timeout:.0f}s waiting for {what}")
            self._drain(0.005)

    def _send(self, role: str, record: dict) -> None:
        self.producer.produce(self.topics[role], orjson.dumps(record), record["entity_id"].encode())

    def run(self, examples: Sequence[Example], delay: int, mode: str | float = "lockstep",
            progress: Callable[[ReplayResult], None] | None = None, step_timeout: float = 60.0,
            final_timeout: float = 120.0, labels: bool = True) -> ReplayResult:
        """Replay ``examples``; ``labels=False`` sends events only (unsupervised tasks)."""
        started = time.monotonic()
        lockstep = mode == "lockstep"
        rate = 0.0 if lockstep else float(mode)
        res = self.result
        next_progress = 0.0
        for i, example in enumerate(examples):
            if labels and i >= delay:
                self._send("labels", examples[i - delay].label)
                res.labels += 1
            if lockstep:
                self.producer.flush()
                labels_sent = res.labels
                self._wait(lambda n=labels_sent: res.examples_seen >= n, step_timeout,
                           f"a model that learned {labels_sent} labels")
            self._send("events", example.event)
            res.events += 1
            if lockstep:
                self.producer.flush()
                eid = example.event["event_id"]
                self._wait(lambda eid=eid: eid in res.predictions, step_timeout, f"the prediction of {eid}")
            else:
                self.producer.poll(0)
                self._drain(0)
                if rate > 0:
                    ahead = res.events / rate - (time.monotonic() - started)
                    if ahead > 0:
                        self._drain(ahead)
            if progress and time.monotonic() >= next_progress:
                progress(res)
                next_progress = time.monotonic() + 0.25
        for example in examples[max(0, len(examples) - delay):] if labels else []:
            self._send("labels", example.label)
            res.labels += 1
        self.producer.flush()
        ids = [e.event["event_id"] for e in examples]
        self._wait(lambda: all(eid in res.predictions for eid in ids), final_timeout, "every prediction")
        if labels:
            self._wait(lambda: res.examples_seen >= res.labels, final_timeout, "the learner to learn every label")
        res.seconds = time.monotonic() - started
        if progress:
            progress(res)
        return res

    def close(self) -> None:
        self.producer.flush()
        self.consumer.close()
        del self.producer  # release the client now, before the broker goes away
