"""Monitor: quality per model version and drift, from the live streams.

Consumes: ``predictions`` and ``labels`` (joined by ``event_id``), and ``features`` when a spec
drift detector watches a feature.
Produces: ``quality`` (:class:`schemas.QualityEvent`, every ``monitor.quality_interval_s``) and
``drift`` (:class:`schemas.DriftEvent`, one per detection, with a cooldown against alert storms).
State: in memory (join buffer, metrics, detectors); after a restart quality restarts from the
monitor's committed offsets.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from schemas import DriftEvent, Features, Label, Prediction, QualityEvent, Severity
from services.monitor.drift import Detector
from services.monitor.quality import VersionQuality
from services.runtime.join import LabelJoin
from services.runtime.messages import Decoder, Incoming, Outgoing, Rejected, schema_decoder
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings
from services.runtime.spec import PipelineSpec, load_spec

KEEP_VERSIONS = 3


class MonitorProcessor:
    name = "monitor"

    def __init__(self, spec: PipelineSpec, settings: Settings, metrics: RuntimeMetrics):
        self.spec = spec
        self.task = spec.model.task
        self.topics = settings.topics
        self.join = LabelJoin(spec.monitor.join_ttl_s, spec.label.max_pending)
        self.quality: dict[tuple[str, int, bool], VersionQuality] = {}
        self.detectors = [Detector(d) for d in spec.monitor.drift]
        self.feature_detectors = [d for d in self.detectors if d.kind == "data"]
        self._last_emit = time.monotonic()
        self._latest_version: dict[str, int] = {}
        self._retired: dict[str, tuple[int, float]] = {}  # model -> (labelled, accuracy * labelled)
        lbl = ["service", "model", "model_version", "metric", "window"]
        self.m_quality = metrics.gauge("streamlearn_model_quality", "Quality of a model version", lbl)
        self.m_quality_labelled = metrics.gauge(
            "streamlearn_model_quality_labelled", "Labelled predictions behind the model_version='all' figure",
            ["service", "model"])
        self.m_labelled = metrics.counter("streamlearn_monitor_labelled_total",
                                          "Predictions joined with their label", ["service", "model"])
        self.m_drift = metrics.counter("streamlearn_drift_detections_total", "Drift detections",
                                       ["service", "model", "detector", "kind", "target"])
        self.m_pending = metrics.gauge("streamlearn_monitor_join_pending", "Predictions and labels waiting",
                                       ["service"])

    def subscriptions(self) -> dict[str, Decoder]:
        subs = {self.topics.name("predictions"): schema_decoder(Prediction),
                self.topics.name("labels"): schema_decoder(Label)}
        if self.feature_detectors:
            subs[self.topics.name("features")] = schema_decoder(Features)
        return subs

    def handle(self, batch: list[Incoming]) -> Iterable[Outgoing | Rejected]:
        outputs: list[Outgoing | Rejected] = []
        labels_topic, predictions_topic = self.topics.name("labels"), self.topics.name("predictions")
        for msg in batch:
            value = msg.value
            if msg.topic == labels_topic:
                matched = self.join.add_label(value.event_id, value.ts, value.label)
            elif msg.topic == predictions_topic:
                if value.shadow:
                    continue  # shadow quality: see the scorer issue
                self._latest_version[value.model] = max(value.model_version,
                                                        self._latest_version.get(value.model, 0))
                matched = self.join.add_item(value.event_id, value.ts, value)
                outputs.extend(self._observe("prediction", _as_number(value.prediction), value))
            else:
                for name, x in value.features.items():
                    outputs.extend(self._observe(name, _as_number(x), None))
                continue
            if matched is not None:
                prediction, label, _delay = matched
                outputs.extend(self._labelled(prediction, label))
        self.m_pending.labels(self.name).set(len(self.join))
        return outputs

    def _labelled(self, p: Prediction, label: Any) -> list[Outgoing]:
        y = _normalise(label, p.prediction)
        key = (p.model, p.model_version, p.shadow)
        quality = self.quality.get(key)
        if quality is None:
            quality = self.quality[key] = VersionQuality(self.task, self.spec.monitor.quality_window)
        quality.update(y, p.prediction)
        self.m_labelled.labels(self.name, p.model).inc()
        if self.task == "regression":
            error = abs(float(y) - float(p.prediction or 0.0))
        else:
            error = 0.0 if y == p.prediction else 1.0
        return self._observe("error", error, p)

    def _observe(self, target: str, value: float | None, p: Prediction | None) -> list[Outgoing]:
        if value is None:
            return []
        out = []
        for d in self.detectors:
            if d.spec.target != target or not d.update(value):
                continue
            model = p.model if p else self.spec.model.name
            version = p.model_version if p else self._latest_version.get(model)
            self.m_drift.labels(self.name, model, d.spec.detector, d.kind, target).inc()
            out.append(Outgoing(self.topics.name("drift"), DriftEvent(
                model=model, model_version=version, detector=d.spec.detector, kind=d.kind, target=target,
                statistic=d.statistic, threshold=d.threshold, window=d.seen,
                severity=Severity.warning, detected_at=time.time()), model))
        return out

    def tick(self, now: float) -> list[Outgoing]:
        if time.monotonic() - self._last_emit < self.spec.monitor.quality_interval_s:
            return []
        self._last_emit = time.monotonic()
        self._prune()
        out = []
        for (model, version, shadow), q in self.quality.items():
            rolling, cumulative = q.rolling.get(), q.cumulative.get()
            self.m_quality.labels(self.name, model, str(version), q.metric_name, "rolling").set(rolling)
            self.m_quality.labels(self.name, model, str(version), q.metric_name, "cumulative").set(cumulative)
            out.append(Outgoing(self.topics.name("quality"), QualityEvent(
                model=model, model_version=version, shadow=shadow, metric=q.metric_name, value=rolling,
                window=q.in_window, cumulative=cumulative, labelled=q.labelled, emitted_at=now), model))
        self._export_overall()
        return out

    def _prune(self) -> None:
        """Keep the newest ``KEEP_VERSIONS`` versions per model (a learning model publishes often:
        older versions' gauges are removed so that label cardinality stays bounded). Their labelled
        counts stay in the per-model 'all' figure."""
        for model in {m for m, _, _ in self.quality}:
            keys = sorted((k for k in self.quality if k[0] == model), key=lambda k: k[1])
            for key in keys[:-KEEP_VERSIONS]:
                q = self.quality.pop(key)
                self._retired[model] = self._retired.get(model, (0, 0.0))
                n, total = self._retired[model]
                self._retired[model] = (n + q.labelled, total + q.cumulative.get() * q.labelled)
                for window in ("rolling", "cumulative"):
                    try:
                        self.m_quality.remove(self.name, model, str(key[1]), q.metric_name, window)
                    except KeyError:
                        pass

    def _export_overall(self) -> None:
        """All versions of a model together: what an operator reads as 'the model's accuracy'."""
        for model in {m for m, _, _ in self.quality} | set(self._retired):
            total, weighted = self._retired.get(model, (0, 0.0))
            for (m, _, shadow), q in self.quality.items():
                if m == model and not shadow:
                    total += q.labelled
                    weighted += q.cumulative.get() * q.labelled
            if total:
                self.m_quality.labels(self.name, model, "all", self._metric_name(), "cumulative").set(
                    weighted / total)
                self.m_quality_labelled.labels(self.name, model).set(total)

    def _metric_name(self) -> str:
        return "mae" if self.task == "regression" else "accuracy"


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool | int | float):
        return float(value)
    return None


def _normalise(label: Any, prediction: Any) -> Any:
    """Make a label comparable with a prediction (0/1 labels against bool predictions)."""
    if isinstance(prediction, bool) and isinstance(label, int) and not isinstance(label, bool):
        return bool(label)
    return label


def build(settings: Settings, metrics: RuntimeMetrics) -> MonitorProcessor:
    return MonitorProcessor(load_spec(settings.service.spec), settings, metrics)
