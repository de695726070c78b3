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
import os
import platform
import time
from collections.abc import Iterable

import redis
import river

from schemas import DriftEvent, Features, Label, Stage
from services.learner.core import LearnerState, apply, new_state
from services.runtime.app import VERSION
from services.runtime.lease import Lease, LeaseLost
from services.runtime.messages import Decoder, Incoming, Outgoing, Reject, Rejected, schema_decoder
from services.runtime.metrics import RuntimeMetrics
from services.runtime.redis_client import make_redis
from services.runtime.registry import ModelRegistry, Signer
from services.runtime.settings import Settings
from services.runtime.spec import PipelineSpec, load_spec

log = logging.getLogger(__name__)

class LearnerProcessor:
    name = "learner"

    def __init__(self, spec: PipelineSpec, settings: Settings, metrics: RuntimeMetrics,
                 registry: ModelRegistry, lease: Lease | None = None):
        self.spec = spec
        self.model_name = spec.model.name
        self.features_topic = settings.topics.name("features")
        self.labels_topic = settings.topics.name("labels")
        self.models_topic = settings.topics.name("models")
        self.drift_topic = settings.topics.name("drift")
        self._metric_name = "mae" if spec.model.task == "regression" else "accuracy"
        self._spec_hash = spec.spec_hash()  # dumps and hashes the whole spec: once, not per version
        self.roles = {self.features_topic: "features", self.labels_topic: "labels", self.drift_topic: "drift"}
        self.registry = registry
        self.lease = lease
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
        self.m_metric = m.gauge("streamlearn_learner_progressive_metric",
                                "Prequential (predict-then-learn) metric per model", labels + ["metric", "window"])
        self.m_published = m.gauge("streamlearn_learner_published_version", "Last published model version",
                                   labels)
        self.m_lifecycle = m.counter("streamlearn_learner_lifecycle_events_total",
                                     "Champion promotions, resets and drift challengers", labels + ["event"])
        self.m_publish_errors = m.counter("streamlearn_learner_publish_errors_total", "Failed publications",
                                          labels)
        for event in ("promotion", "reset", "drift_challenger"):  # series exist at 0 from the start
            self.m_lifecycle.labels(self.name, self.model_name, event)
        self.m_publish_errors.labels(self.name, self.model_name)
        self.m_checkpoint = m.histogram("streamlearn_checkpoint_seconds", "Time to write a checkpoint", labels)
        self.m_checkpoint_bytes = m.gauge("streamlearn_checkpoint_bytes", "Size of the last checkpoint", labels)
        self.m_checkpoint_ts = m.gauge("streamlearn_checkpoint_timestamp_seconds",
                                       "When the last checkpoint was written", labels)
        self._export()

    # ---- state -----------------------------------------------------------------------------------

    def _fresh(self) -> LearnerState:
        return new_state(self.spec)

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
        subs = {self.features_topic: schema_decoder(Features)}
        if self.spec.model.task != "anomaly":
            subs[self.labels_topic] = schema_decoder(Label)
        if self.spec.learner.on_drift != "ignore":
            subs[self.drift_topic] = schema_decoder(DriftEvent)
        return subs

    def handle(self, batch: list[Incoming]) -> Iterable[Outgoing | Rejected]:
        outputs: list[Outgoing | Rejected] = []
        for msg in batch:
            role = self.roles[msg.topic]
            try:
                delay = apply(self.state, self.spec, role, msg.topic, msg.partition, msg.offset, msg.value)
            except Reject as reject:
                outputs.append(Rejected(msg, reject))
                continue
            if delay is not None:
                self._since_publish += 1
                self._since_checkpoint += 1
                self.m_delay.labels(self.name, self.model_name).observe(max(0.0, delay))
        self._batch_open = True  # learned past the recorded offsets until committable() runs
        return outputs

    def _publish_due(self) -> bool:
        ls = self.spec.learner
        if self.state.events:
            return True  # a promotion or a reset is announced at once
        if self._since_publish == 0:
            return False
        return (self._since_publish >= ls.publish_every
                or time.monotonic() - self._last_publish >= ls.publish_interval_s)

    def _publish(self) -> list[Outgoing]:
        """A new version of the champion and of every challenger (shadow-scored by the scorer)."""
        state = self.state
        events, state.events = state.events, []
        candidates = [(self.model_name, state.model, Stage.champion, state.metric.get(), events)]
        candidates += [(f"{self.model_name}.{ch.name}", ch.model, Stage.challenger, ch.window.get(), [])
                       for ch in state.challengers.values()]
        outputs = []
        lineage = state.lineage.blob()
        for name, model, stage, metric, model_events in candidates:
            try:
                ann = self.registry.publish(
                    name, model, stage=stage, examples_seen=state.examples_seen, spec_hash=self._spec_hash,
                    metrics={self._metric_name: metric}, extra=self._provenance() | {"events": model_events},
                    keep=self.spec.learner.keep_versions,
                    lineage=lineage)
            except redis.RedisError as exc:
                # publishing is retried at the next tick; learning is never redone because of it
                self.m_publish_errors.labels(self.name, name).inc()
                log.warning("publishing %s failed (%s); will retry", name, exc)
                state.events = events + state.events
                return outputs
            outputs.append(Outgoing(self.models_topic, ann, name))
            self.m_published.labels(self.name, name).set(ann.version)
            if stage is Stage.champion:
                state.last_version = ann.version
        for event in events:
            log.info("%s: %s", self.model_name, event)
            self.m_lifecycle.labels(self.name, self.model_name, event["event"]).inc()
        self._since_publish = 0
        self._last_publish = time.monotonic()
        return outputs

    def _provenance(self) -> dict[str, object]:
        """Code, library and data versions of a model version (Kafka offsets are the data version)."""
        return {"code_version": VERSION, "river_version": river.__version__,
                "python": platform.python_version(), "spec": self.spec.name,
                "offset_ranges": self.state.lineage.ranges(),
                "reproducible": not self.state.lineage.truncated}

    def tick(self, now: float) -> list[Outgoing]:
        """Called by the runtime after each batch: publish a version when due."""
        return self._publish() if self._publish_due() else []

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
            size = self.registry.save_checkpoint(self.checkpoint_name, self.state,
                                                 self.lease.fenced_set if self.lease else None)
        except LeaseLost:
            log.error("checkpoint refused: this learner no longer holds the lease")
            _lost()
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
        self.m_metric.labels(*labels, self._metric_name, "cumulative").set(s.metric.get())
        self.m_metric.labels(*labels, self._metric_name, "rolling").set(s.window.get())
        for ch in s.challengers.values():
            self.m_metric.labels(self.name, f"{self.model_name}.{ch.name}", self._metric_name, "rolling").set(
                ch.window.get())

    def close(self) -> None:
        if not self._batch_open:  # never checkpoint learning whose offsets were not recorded
            self.checkpoint()
        if self.lease:
            self.lease.release()  # a standby takes over at once


def build(settings: Settings, metrics: RuntimeMetrics) -> LearnerProcessor:
    """One writer per model: block as a standby until this process holds the model's lease, then
    restore the checkpoint (whatever the previous holder last wrote) and start."""
    spec = load_spec(settings.service.spec)
    client = make_redis(settings.redis)
    registry = ModelRegistry(client, Signer(settings.service.signing_key()), settings.redis.namespace)
    lease = Lease(client, f"{settings.redis.namespace}:lease:learner:{spec.name}:{spec.model.name}",
                  settings.service.lease_ttl_s, on_lost=_lost)
    lease.acquire()
    return LearnerProcessor(spec, settings, metrics, registry, lease)


def _lost() -> None:
    # another learner holds the lease now: stop writing at once (checkpoints are fenced anyway)
    os._exit(3)
