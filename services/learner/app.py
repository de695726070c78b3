"""Learner: joins features with their (later) labels and learns River models incrementally.

Consumes: ``features`` (:class:`schemas.Features`) and ``labels`` (:class:`schemas.Label`).
Produces: ``models`` (:class:`schemas.ModelAnnouncement`, compacted, keyed by model name); the
signed artifact goes to the Redis registry first.
State: the model, the label-join buffer and the consumer offsets they reflect, checkpointed together
in one signed Redis value. On start the learner restores the checkpoint and seeks to its offsets, so
each labelled example is learned exactly once across crashes (Kafka offsets are committed only up
to the checkpoint, for lag monitoring).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from river import metrics as river_metrics

from schemas import Features, Label, Stage
from services.runtime.join import LabelJoin
from services.runtime.messages import Decoder, Incoming, Outgoing, Reject, Rejected, schema_decoder
from services.runtime.metrics import RuntimeMetrics
from services.runtime.redis_client import make_redis
from services.runtime.registry import ModelRegistry, Signer
from services.runtime.river_models import build_pipeline, check_task
from services.runtime.settings import Settings
from services.runtime.spec import PipelineSpec, load_spec

log = logging.getLogger(__name__)

_LABEL_TYPES = {"bool": (bool,), "int": (int,), "float": (float, int), "str": (str,)}


def coerce_label(value: Any, kind: str) -> Any:
    """Check a label against the spec's label type (0/1 accepted for bool).

    >>> coerce_label(1, "bool"), coerce_label(2, "float")
    (True, 2.0)
    """
    if kind == "bool" and isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if kind in ("int", "float") and isinstance(value, bool):
        raise Reject("wrong_type", f"label {value!r} is not a {kind}", "label")
    if not isinstance(value, _LABEL_TYPES[kind]):
        raise Reject("wrong_type", f"label {value!r} is not a {kind}", "label")
    return float(value) if kind == "float" else value


def _metric_for(task: str):
    return river_metrics.MAE() if task == "regression" else river_metrics.Accuracy()


@dataclass
class LearnerState:
    """Everything a checkpoint holds; restored as one piece."""

    model: Any
    join: LabelJoin
    metric: Any
    examples_seen: int = 0
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    last_version: int = 0


class LearnerProcessor:
    name = "learner"

    def __init__(self, spec: PipelineSpec, settings: Settings, metrics: RuntimeMetrics,
                 registry: ModelRegistry):
        self.spec = spec
        self.model_name = spec.model.name
        self.features_topic = settings.topics.name("features")
        self.labels_topic = settings.topics.name("labels")
        self.models_topic = settings.topics.name("models")
        self.registry = registry
        self.checkpoint_name = f"learner:{spec.name}:{self.model_name}"
        self.state = self._restore() or self._fresh()
        self._since_publish = 0
        self._since_checkpoint = 0
        self._batch_open = False
        self._last_publish = self._last_checkpoint = time.monotonic()
        m, labels = metrics, ["service", "model"]
        self.m_examples = m.gauge("streamlearn_learner_examples_learned", "Examples learned", labels)
        self.m_pending = m.gauge("streamlearn_learner_join_pending",
                                 "Features and labels waiting in the join buffer", labels)
        self.m_expired = m.gauge("streamlearn_learner_join_expired", "Join entries expired unmatched",
                                 labels + ["kind"])
        self.m_delay = m.histogram("streamlearn_label_delay_seconds",
                                   "Event time of label minus event time of features", labels,
                                   buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 86400))
        self.m_metric = m.gauge("streamlearn_learner_progressive_metric", "Prequential metric of the learner",
                                labels + ["metric"])
        self.m_published = m.gauge("streamlearn_learner_published_version", "Last published model version",
                                   labels)
        self.m_publish_errors = m.counter("streamlearn_learner_publish_errors_total", "Failed publications",
                                          labels)
        self.m_checkpoint = m.histogram("streamlearn_checkpoint_seconds", "Time to write a checkpoint", labels)
        self.m_checkpoint_bytes = m.gauge("streamlearn_checkpoint_bytes", "Size of the last checkpoint", labels)
        self.m_checkpoint_ts = m.gauge("streamlearn_checkpoint_timestamp_seconds",
                                       "When the last checkpoint was written", labels)
        self._export()

    # ---- state -----------------------------------------------------------------------------------

    def _fresh(self) -> LearnerState:
        model = build_pipeline(self.spec.model.pipeline)
        check_task(model, self.spec.model.task)
        return LearnerState(model=model, metric=_metric_for(self.spec.model.task),
                            join=LabelJoin(self.spec.label.join_ttl_s, self.spec.label.max_pending))

    def _restore(self) -> LearnerState | None:
        state = self.registry.load_checkpoint(self.checkpoint_name)
        if state is not None:
            log.info("restored checkpoint: %d examples, offsets %s", state.examples_seen, state.offsets)
        return state

    def assigned(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Seek to the offsets the checkpoint reflects."""
        return {tp: self.state.offsets[tp] for tp in partitions if tp in self.state.offsets}

    # ---- handling --------------------------------------------------------------------------------

    def subscriptions(self) -> dict[str, Decoder]:
        return {self.features_topic: schema_decoder(Features), self.labels_topic: schema_decoder(Label)}

    def handle(self, batch: list[Incoming]) -> Iterable[Outgoing | Rejected]:
        outputs: list[Outgoing | Rejected] = []
        join = self.state.join
        for msg in batch:
            value = msg.value
            if msg.topic == self.labels_topic:
                try:
                    y = coerce_label(value.label, self.spec.label.type)
                except Reject as reject:
                    outputs.append(Rejected(msg, reject))
                    continue
                matched = join.add_label(value.event_id, value.ts, y)
            else:
                matched = join.add_item(value.event_id, value.ts, value.features)
            if matched is not None:
                self._learn(*matched)
        self._batch_open = True  # learned past the recorded offsets until committable() runs
        return outputs

    def _learn(self, x: dict, y: Any, delay: float) -> None:
        state = self.state
        state.metric.update(y, state.model.predict_one(x))
        state.model.learn_one(x, y)
        state.examples_seen += 1
        self._since_publish += 1
        self._since_checkpoint += 1
        self.m_delay.labels(self.name, self.model_name).observe(max(0.0, delay))

    def _publish_due(self) -> bool:
        ls = self.spec.learner
        if self._since_publish == 0:
            return False
        return (self._since_publish >= ls.publish_every
                or time.monotonic() - self._last_publish >= ls.publish_interval_s)

    def _publish(self) -> Outgoing | None:
        state = self.state
        try:
            ann = self.registry.publish(
                self.model_name, state.model, stage=Stage.champion, examples_seen=state.examples_seen,
                spec_hash=self.spec.spec_hash(), metrics={state.metric.__class__.__name__.lower(): state.metric.get()},
                keep=self.spec.learner.keep_versions)
        except redis.RedisError as exc:
            # publishing is retried at the next tick; learning is never redone because of it
            self.m_publish_errors.labels(self.name, self.model_name).inc()
            log.warning("publishing %s failed (%s); will retry", self.model_name, exc)
            return None
        state.last_version = ann.version
        self._since_publish = 0
        self._last_publish = time.monotonic()
        self.m_published.labels(self.name, self.model_name).set(ann.version)
        return Outgoing(self.models_topic, ann, self.model_name)

    def tick(self, now: float) -> list[Outgoing]:
        """Called by the runtime after each batch: publish a version when due."""
        if not self._publish_due():
            return []
        announcement = self._publish()
        return [announcement] if announcement else []

    # ---- checkpoints -----------------------------------------------------------------------------

    def committable(self, offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], int] | None:
        """Record the offsets this batch advanced to; checkpoint when due and allow committing the
        offsets the checkpoint covers (never more)."""
        self.state.offsets.update(offsets)
        self._batch_open = False
        self._export()
        ls = self.spec.learner
        due = (self._since_checkpoint >= ls.checkpoint_every
               or (offsets and time.monotonic() - self._last_checkpoint >= ls.checkpoint_interval_s))
        if not due or not self.checkpoint():
            return None
        return dict(self.state.offsets)

    def checkpoint(self) -> bool:
        """Write model + join buffer + offsets as one signed value; False when Redis refused."""
        started = time.perf_counter()
        try:
            size = self.registry.save_checkpoint(self.checkpoint_name, self.state)
        except redis.RedisError as exc:
            log.warning("checkpoint failed (%s); will retry", exc)
            return False
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        labels = (self.name, self.model_name)
        self.m_checkpoint.labels(*labels).observe(time.perf_counter() - started)
        self.m_checkpoint_bytes.labels(*labels).set(size)
        self.m_checkpoint_ts.labels(*labels).set(time.time())
        self._export()
        return True

    def _export(self) -> None:
        labels = (self.name, self.model_name)
        s = self.state
        self.m_examples.labels(*labels).set(s.examples_seen)
        self.m_pending.labels(*labels).set(len(s.join))
        self.m_expired.labels(*labels, "features").set(s.join.expired_features)
        self.m_expired.labels(*labels, "labels").set(s.join.expired_labels)
        self.m_metric.labels(*labels, s.metric.__class__.__name__.lower()).set(s.metric.get())

    def close(self) -> None:
        if not self._batch_open:  # never checkpoint learning whose offsets were not recorded
            self.checkpoint()


def build(settings: Settings, metrics: RuntimeMetrics) -> LearnerProcessor:
    spec = load_spec(settings.service.spec)
    registry = ModelRegistry(make_redis(settings.redis), Signer(settings.service.signing_key()),
                             settings.redis.namespace)
    return LearnerProcessor(spec, settings, metrics, registry)
