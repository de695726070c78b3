"""The scorer's view of the models topic: a follower thread that loads and verifies each announced
version and swaps it in atomically. Scoring never waits for a load."""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition
from pydantic import ValidationError

from schemas import ModelAnnouncement, Stage
from services.runtime.kafka import make_consumer
from services.runtime.registry import ModelRegistry, SignatureError
from services.runtime.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Served:
    """One immutable (name, version, model) triple: a batch is scored with exactly one of these."""

    name: str
    version: int
    model: Any


class ModelFollower:
    """Reads the compacted models topic from the beginning (no consumer group: every replica sees
    every announcement) and keeps :attr:`current` pointing at the champion of the spec's model and
    :attr:`challengers` at its challengers (models named ``<champion>.<challenger>``)."""

    def __init__(self, kafka: KafkaSettings, topic: str, registry: ModelRegistry, initial: Served,
                 metrics, service: str = "scorer"):
        self.kafka = kafka
        self.topic = topic
        self.registry = registry
        self.current = initial
        self.challengers: dict[str, Served] = {}  # replaced whole on change, never mutated
        self._retry: bytes | None = None
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)
        self.loads = metrics.counter("streamlearn_model_loads_total", "Model versions loaded",
                                     ["service", "model", "result"])
        self.version_gauge = metrics.gauge("streamlearn_model_version", "Model version being served",
                                           ["service", "model", "stage"])
        self.service = service
        self.version_gauge.labels(service, initial.name, "champion").set(initial.version)

    def start(self) -> ModelFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        consumer = make_consumer(self.kafka, f"scorer-follower-{uuid.uuid4().hex[:8]}",
                                 **{"enable.partition.eof": True, "client.id": "streamlearn-scorer-models"})
        try:
            meta = consumer.list_topics(self.topic, timeout=30).topics[self.topic]
            partitions = [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in meta.partitions]
            consumer.assign(partitions)
            at_eof: set[int] = set()
            pending: dict[str, bytes] = {}  # while catching up, only the last announcement per model matters
            while not self._stop.is_set():
                msg = consumer.poll(0.1)
                if self._retry is not None and self.caught_up.is_set() and msg is None:
                    raw, self._retry = self._retry, None
                    self._stop.wait(0.5)  # back off while the registry is down
                    self._apply(raw)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("models follower: %s", msg.error())
                        continue
                    at_eof.add(msg.partition())
                    if not self.caught_up.is_set() and len(at_eof) == len(partitions):
                        for raw in pending.values():
                            self._apply(raw)
                        self.caught_up.set()
                    continue
                if self.caught_up.is_set():
                    if self._retry is not None and self._ours(self._retry) == self._ours(msg.value()):
                        self._retry = None  # a newer announcement of the same model supersedes it
                    self._apply(msg.value())
                else:
                    name = self._ours(msg.value())
                    if name is not None:
                        pending[name] = msg.value()
        except Exception:
            log.exception("models follower crashed")
            raise
        finally:
            consumer.close()

    def _ours(self, raw: bytes | None) -> str | None:
        """The model name of an announcement this scorer serves, else None."""
        try:
            ann = ModelAnnouncement.model_validate_json(raw or b"")
        except ValidationError:
            return None
        return ann.model if self._role(ann) else None

    def _role(self, ann: ModelAnnouncement) -> str | None:
        if ann.model == self.current.name and ann.stage is Stage.champion:
            return "champion"
        if ann.model.startswith(self.current.name + "."):
            return "challenger"
        return None

    def _apply(self, raw: bytes | None) -> None:
        if raw is None:  # tombstone
            return
        try:
            ann = ModelAnnouncement.model_validate_json(raw)
        except ValidationError as exc:
            self.loads.labels(self.service, "?", "invalid_announcement").inc()
            log.warning("ignoring invalid model announcement: %s", exc.errors()[0]["msg"])
            return
        role = self._role(ann)
        if role is None:
            return
        if role == "challenger" and ann.stage is not Stage.challenger:  # retired (or promoted away)
            if ann.model in self.challengers:
                self.challengers = {k: v for k, v in self.challengers.items() if k != ann.model}
                self.version_gauge.labels(self.service, ann.model, "challenger").set(0)
            return
        known = self.current if role == "champion" else self.challengers.get(ann.model)
        if known is not None and known.version == ann.version:
            return
        keeping = f"keeping v{known.version}" if known else "not serving it"
        try:
            model = self.registry.load(ann.model, ann.version, expected_signature=ann.signature)
        except SignatureError as exc:
            self.loads.labels(self.service, ann.model, "refused").inc()
            log.error("refused model %s v%d: %s; %s", ann.model, ann.version, exc, keeping)
            return
        except KeyError as exc:
            self.loads.labels(self.service, ann.model, "missing").inc()
            log.warning("%s; %s", exc, keeping)
            return
        except redis.RedisError as exc:
            # the registry is unreachable: keep serving, try this announcement again shortly
            self.loads.labels(self.service, ann.model, "registry_unavailable").inc()
            log.warning("cannot load %s v%d (%s); %s, retrying", ann.model, ann.version, exc, keeping)
            self._retry = raw
            return
        served = Served(ann.model, ann.version, model)
        if role == "champion":
            self.current = served  # atomic reference swap
        else:
            self.challengers = {**self.challengers, ann.model: served}
        self.loads.labels(self.service, ann.model, "ok").inc()
        self.version_gauge.labels(self.service, ann.model, role).set(ann.version)
        log.debug("now serving %s v%d", ann.model, ann.version)
