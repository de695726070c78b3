"""Monitor: quality per model version and drift, from the live streams.

Consumes: ``predictions`` and ``labels`` (joined by ``event_id``), ``<predictions>-shadow`` when the
scorer writes challengers' predictions there, and ``features`` when a drift detector watches a feature.
Produces: ``quality`` (:class:`schemas.QualityEvent`, per model version and metric, every
``monitor.quality_interval_s`` for the versions that got labels since the last one) and ``drift``
(:class:`schemas.DriftEvent`, one per detection, with a cooldown against alert storms).
State: in memory (join buffer, metrics, detectors); after a restart quality restarts from the
monitor's committed offsets.

Quality (:mod:`services.monitor.quality`) is kept per (model, version) — challengers' shadow
predictions under their own model name — and per model over all its versions (``model_version="all"``),
rolling over the last ``monitor.quality_window`` labelled predictions and cumulatively. The champion's
figures cover the predictions it served: its shadow predictions (made for canary entities, whose
served prediction came from a challenger) are not counted. Drift detectors on ``prediction`` and
``error`` watch the same stream: the champion's served predictions.

Metrics (besides the runtime's):

- ``streamlearn_model_quality{service,model,model_version,metric,window}``: rolling / cumulative
  figures of the newest 3 versions of each model and of ``model_version="all"``;
  ``streamlearn_model_quality_labelled{service,model}``: the labelled predictions behind "all";
- ``streamlearn_monitor_label_coverage{service,model,model_version}``: labelled / predicted;
  ``streamlearn_monitor_label_delay_seconds{service,model}``: label event time - prediction event time;
- ``streamlearn_monitor_quality_terms_total{service,model,model_version,term}``: the additive terms of
  the cumulative figures (:meth:`VersionQuality.sums`), for several replicas (below);
- ``streamlearn_drift_detections_total{service,model,detector,kind,target}``;
- ``streamlearn_model_quality_threshold{service,model,metric,bound}`` and
  ``streamlearn_monitor_label_coverage_min{service,model}``: the spec's alert bounds
  (``monitor.thresholds``, ``monitor.min_label_coverage``), which the alert rules compare with.

Several replicas: each consumes some partitions of predictions and labels and knows only its share
of each model version, so its ``streamlearn_model_quality`` is a per-replica figure. The combined
figure of a version comes from the additive terms, summed over replicas (and over restarts with
``increase``), e.g. accuracy and RMSE over the last hour::

    sum by (model, model_version) (increase(streamlearn_monitor_quality_terms_total{term="correct"}[1h]))
      / sum by (model, model_version) (increase(streamlearn_monitor_quality_terms_total{term="labelled"}[1h]))
    sqrt(sum by (model, model_version) (increase(streamlearn_monitor_quality_terms_total{term="squared_error"}[1h]))
      / sum by (model, model_version) (increase(streamlearn_monitor_quality_terms_total{term="labelled"}[1h])))

Precision, recall, F1, log loss, MAE and R2 combine the same way; rolling windows, ROC AUC and the
macro-averaged metrics are not additive and stay per replica. The join needs a prediction and its
label in the same replica: both topics are keyed by entity with the same partitioner (murmur2, the
Java client's; the scorer uses it, label producers must too) and have the same partition count, and
the monitor consumes with the range assignor, which gives one replica the same partition numbers of
both (tests/integration/test_monitor.py: two replicas, one combined figure equal to River's).
Drift detectors also run per replica on its share of the stream: a shift seen by every replica
fires once per replica.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from prometheus_client.core import CounterMetricFamily

from schemas import DriftEvent, Features, Label, Prediction, QualityEvent, Severity
from services.monitor.drift import BINARY_INPUT, Detector
from services.monitor.quality import TASK_METRICS, VersionQuality, as_positive, positive_proba
from services.runtime.join import LabelJoin
from services.runtime.messages import Decoder, Incoming, Outgoing, Rejected, schema_decoder
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings
from services.runtime.spec import PipelineSpec, SpecError, load_spec

KEEP_VERSIONS = 3
MAX_UNLABELLED_VERSIONS = 100  # versions per model whose predictions are counted before their first label
ALL = "all"
DELAY_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400)


class Waiting(NamedTuple):
    """What a prediction keeps while it waits in the join buffer for its label. The buffer holds
    about rate x label delay of them, up to ``label.max_pending`` (100,000 by default): keeping the
    decoded :class:`Prediction` cost 1,817 bytes per waiting prediction, this 589 (tracemalloc, the
    buffer's own structures included; tests/unit/test_handlers.py)."""

    model: str
    model_version: int
    prediction: Any
    proba: dict[str, float] | None
    score: float | None


class MonitorProcessor:
    name = "monitor"
    copartitioned = True  # a prediction and its label (both keyed by entity) meet on one replica

    def __init__(self, spec: PipelineSpec, settings: Settings, metrics: RuntimeMetrics):
        self.spec = spec
        self.task = spec.model.task
        self.champion = spec.model.name
        self.topics = settings.topics
        self.window = spec.monitor.quality_window
        self.metric_names = tuple(spec.monitor.metrics or TASK_METRICS[self.task])
        unfit = [m for m in self.metric_names if m not in TASK_METRICS[self.task]]
        if unfit:
            raise SpecError(f"monitor.metrics: {unfit} do not fit a {self.task} model "
                            f"(it has {list(TASK_METRICS[self.task])})")
        untracked = [m for m in spec.monitor.thresholds if m not in self.metric_names]
        if untracked:
            raise SpecError(f"monitor.thresholds: {untracked} are not reported for this model "
                            f"(monitor.metrics: {list(self.metric_names)})")
        self.join = LabelJoin(spec.monitor.join_ttl_s, spec.label.max_pending)
        self.quality: dict[tuple[str, int], VersionQuality] = {}  # (model, version)
        self.overall: dict[str, VersionQuality] = {}  # model -> all its versions
        self._floor: dict[str, int] = {}  # model -> newest version pruned (not tracked again)
        # predictions of versions with no label yet: model -> version -> count (newest versions only)
        self._unlabelled: dict[str, dict[int, int]] = {}
        self._dirty: set[tuple[str, int]] = set()  # versions with labels since the last quality events
        self.detectors = [self._detector(i, d) for i, d in enumerate(spec.monitor.drift)]
        self._by_target: dict[str, list[Detector]] = {}
        for d in self.detectors:
            self._by_target.setdefault(d.spec.target, []).append(d)
        self._feature_detectors = [(t, ds) for t, ds in self._by_target.items() if t not in ("error", "prediction")]
        self._last_emit = time.monotonic()
        self._latest_version: dict[str, int] = {}
        self.predictions_topics = {self.topics.name("predictions")}
        scorer = getattr(spec, "scorer", None)
        if scorer is not None and scorer.shadow == "separate":
            self.predictions_topics.add(self.topics.shadow_predictions())
        lbl = ["service", "model", "model_version", "metric", "window"]
        self.m_quality = metrics.gauge("streamlearn_model_quality", "Quality of a model version", lbl)
        self.m_quality_labelled = metrics.gauge(
            "streamlearn_model_quality_labelled", "Labelled predictions behind the model_version='all' figure",
            ["service", "model"])
        self.m_coverage = metrics.gauge("streamlearn_monitor_label_coverage",
                                        "Labelled predictions / predictions of a model version",
                                        ["service", "model", "model_version"])
        self.m_labelled = metrics.counter("streamlearn_monitor_labelled_total",
                                          "Predictions joined with their label", ["service", "model"])
        self.m_delay = metrics.histogram("streamlearn_monitor_label_delay_seconds",
                                         "Label event time minus prediction event time", ["service", "model"],
                                         buckets=DELAY_BUCKETS)
        self.m_drift = metrics.counter("streamlearn_drift_detections_total", "Drift detections",
                                       ["service", "model", "detector", "kind", "target"])
        for d in self.detectors:  # every configured detector's series exists from the start, at 0
            self.m_drift.labels(self.name, spec.model.name, d.name, d.kind, d.spec.target)
        self.m_pending = metrics.gauge("streamlearn_monitor_join_pending", "Predictions and labels waiting",
                                       ["service"])
        self.m_errors = metrics.errors
        # the spec's alert bounds, as series the alert rules compare with (on model, metric)
        threshold = metrics.gauge("streamlearn_model_quality_threshold",
                                  "Alert bound of a quality metric from the pipeline spec",
                                  ["service", "model", "metric", "bound"])
        for metric, bounds in spec.monitor.thresholds.items():
            for bound in ("min", "max"):
                if getattr(bounds, bound) is not None:
                    threshold.labels(self.name, self.champion, metric, bound).set(getattr(bounds, bound))
        if spec.monitor.min_label_coverage is not None:
            metrics.gauge("streamlearn_monitor_label_coverage_min",
                          "Alert bound of the label coverage from the pipeline spec", ["service", "model"]
                          ).labels(self.name, self.champion).set(spec.monitor.min_label_coverage)
        metrics.registry.register(_QualityTerms(self))
        self._labelled_child: dict[str, Any] = {}
        self._delay_child: dict[str, Any] = {}

    def _detector(self, i: int, d: Any) -> Detector:
        try:
            detector = Detector(d, categorical=self._categorical(d.target))
        except ValueError as exc:
            raise SpecError(f"monitor.drift.{i}: {exc}") from None
        if detector.name in BINARY_INPUT and (d.target != "error" or self.task == "regression"):
            raise SpecError(f"monitor.drift.{i}.detector: {detector.name} reads a 0/1 stream: the error of a "
                            "classifier (use ADWIN, PageHinkley or a windowed test here)")
        return detector

    def _categorical(self, target: str) -> bool:
        if target == "prediction":
            return self.task == "multiclass"
        if target == "error":
            return False
        field = self.spec.event.fields.get(target)
        return field is not None and field.type == "str"

    def subscriptions(self) -> dict[str, Decoder]:
        subs = {topic: schema_decoder(Prediction) for topic in self.predictions_topics}
        subs[self.topics.name("labels")] = schema_decoder(Label)
        if self._feature_detectors:
            subs[self.topics.name("features")] = schema_decoder(Features)
        return subs

    # ---- handling --------------------------------------------------------------------------------

    def handle(self, batch: list[Incoming]) -> Iterable[Outgoing | Rejected]:
        outputs: list[Outgoing | Rejected] = []
        labels_topic = self.topics.name("labels")
        for msg in batch:
            value = msg.value
            if msg.topic == labels_topic:
                matched = self.join.add_label(value.event_id, value.ts, value.label)
            elif msg.topic in self.predictions_topics:
                if value.shadow and value.model == self.champion:
                    continue  # the champion's prediction for a canary entity: a challenger's was served
                matched = self._predicted(value, outputs)
            else:
                outputs.extend(self._features(value))
                continue
            if matched is not None:
                predictions, label, delay = matched
                for p in predictions:
                    outputs.extend(self._labelled(p, label, delay))
        self.m_pending.labels(self.name).set(len(self.join))
        return outputs

    def _predicted(self, p: Prediction, outputs: list[Outgoing | Rejected]) -> tuple | None:
        """Count the prediction, feed prediction drift, and join it (several models predict each event)."""
        model, version = p.model, p.model_version
        q = self.quality.get((model, version))
        if q is not None:
            q.predicted += 1
        elif version > self._floor.get(model, -1):
            counts = self._unlabelled.setdefault(model, {})
            counts[version] = counts.get(version, 0) + 1
            if len(counts) > MAX_UNLABELLED_VERSIONS:  # e.g. an anomaly detector that never gets labels
                del counts[min(counts)]
        self._overall(model).predicted += 1
        if model == self.champion:
            if version > self._latest_version.get(model, -1):
                self._latest_version[model] = version
            detectors = self._by_target.get("prediction")
            if detectors:
                outputs.extend(self._observe(detectors, self._prediction_value(p), p))
        kept = Waiting(model, version, p.prediction, p.proba, p.score)
        waiting = self.join.features.get(p.event_id)
        if waiting is None:
            return self.join.add_item(p.event_id, p.ts, [kept])
        others = waiting[1]
        if any(o.model == model and o.model_version == version for o in others):
            self.join.duplicates += 1
        else:
            others.append(kept)
        return None

    def _labelled(self, p: Waiting, label: Any, delay: float) -> list[Outgoing]:
        if p.prediction is None:
            return []  # nothing was predicted (an untrained classifier): nothing to judge
        model, version = p.model, p.model_version
        proba = p.proba
        if self.task == "anomaly" and p.score is not None:
            proba = {"True": p.score}  # the score is the anomaly detector's P(anomaly)
        try:
            self._overall(model).update(label, p.prediction, proba)
        except (TypeError, ValueError):  # e.g. a text label for a regression: the learner DLQs it
            self.m_errors.labels(self.name, "label_type").inc()
            return []
        q = self._version(model, version)
        if q is not None:
            q.update(label, p.prediction, proba)
            self._dirty.add((model, version))
        labelled = self._labelled_child.get(model)
        if labelled is None:
            labelled = self._labelled_child[model] = self.m_labelled.labels(self.name, model)
            self._delay_child[model] = self.m_delay.labels(self.name, model)
        labelled.inc()
        self._delay_child[model].observe(max(delay, 0.0))
        detectors = self._by_target.get("error")
        if not detectors or model != self.champion:
            return []
        if self.task == "regression":
            error = abs(float(label) - float(p.prediction))
        elif self.task != "multiclass":
            error = float(as_positive(label) != as_positive(p.prediction))
        else:
            error = float(str(label) != str(p.prediction))
        return self._observe(detectors, error, p)

    def _features(self, f: Features) -> list[Outgoing]:
        out: list[Outgoing] = []
        values = f.features
        for target, detectors in self._feature_detectors:
            x = values.get(target)
            if x is None:
                continue
            if detectors[0].categorical:
                out.extend(self._observe(detectors, str(x), None))
            elif isinstance(x, int | float) and math.isfinite(x):
                out.extend(self._observe(detectors, float(x), None))
        return out

    def _prediction_value(self, p: Prediction) -> Any:
        """What prediction drift watches: P(positive) (binary), the score (anomaly), the value
        (regression) or the class (multiclass)."""
        if p.prediction is None:
            return None
        if self.task == "multiclass":
            return str(p.prediction)
        if self.task == "regression":
            return float(p.prediction) if isinstance(p.prediction, int | float) else None
        if self.task == "anomaly" and p.score is not None:
            return p.score
        proba = positive_proba(p.proba) if p.proba else None
        return proba if proba is not None else float(as_positive(p.prediction))

    def _observe(self, detectors: list[Detector], value: Any, p: Prediction | Waiting | None) -> list[Outgoing]:
        if value is None:
            return []
        out = []
        for d in detectors:
            if not d.update(value):
                continue
            model = p.model if p else self.champion
            version = p.model_version if p else self._latest_version.get(model)
            self.m_drift.labels(self.name, model, d.name, d.kind, d.spec.target).inc()
            out.append(Outgoing(self.topics.name("drift"), DriftEvent(
                model=model, model_version=version, detector=d.name, kind=d.kind, target=d.spec.target,
                statistic=d.statistic, threshold=d.threshold, window=d.seen,
                severity=Severity(d.spec.severity), detected_at=time.time()), model))
        return out

    # ---- quality state ---------------------------------------------------------------------------

    def _version(self, model: str, version: int) -> VersionQuality | None:
        q = self.quality.get((model, version))
        if q is None:
            if version <= self._floor.get(model, -1):
                return None  # an old version, pruned: it counts in the model's "all" figure only
            q = self.quality[(model, version)] = VersionQuality(self.task, self.window, self.metric_names)
            q.predicted = self._unlabelled.get(model, {}).pop(version, 0)
        return q

    def _overall(self, model: str) -> VersionQuality:
        q = self.overall.get(model)
        if q is None:
            q = self.overall[model] = VersionQuality(self.task, self.window, self.metric_names)
        return q

    # ---- periodic output -------------------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        if time.monotonic() - self._last_emit < self.spec.monitor.quality_interval_s:
            return []
        self._last_emit = time.monotonic()
        self._prune()
        out = []
        for (model, version), q in self.quality.items():
            figures = self._export(model, str(version), q)
            if (model, version) not in self._dirty:
                continue
            for metric, (rolling, cumulative) in figures.items():
                out.append(Outgoing(self.topics.name("quality"), QualityEvent(
                    model=model, model_version=version, shadow=model != self.champion, metric=metric,
                    value=rolling, window=q.in_window, cumulative=cumulative, labelled=q.labelled,
                    emitted_at=now), model))
        self._dirty.clear()
        for model, q in self.overall.items():
            self._export(model, ALL, q)
            if q.labelled:
                self.m_quality_labelled.labels(self.name, model).set(q.labelled)
        return out

    def _export(self, model: str, version: str, q: VersionQuality) -> dict[str, tuple[float, float]]:
        figures = q.figures() if q.labelled else {}
        for metric, (rolling, cumulative) in figures.items():
            self.m_quality.labels(self.name, model, version, metric, "rolling").set(rolling)
            self.m_quality.labels(self.name, model, version, metric, "cumulative").set(cumulative)
        if q.predicted:
            self.m_coverage.labels(self.name, model, version).set(q.labelled / q.predicted)
        return figures

    def _prune(self) -> None:
        """Keep the newest ``KEEP_VERSIONS`` versions per model (a learning model publishes often:
        older versions' series are removed so that label cardinality stays bounded). Their labelled
        predictions stay in the per-model 'all' figure."""
        by_model: dict[str, list[int]] = {}
        for model, version in self.quality:
            by_model.setdefault(model, []).append(version)
        for model, versions in by_model.items():
            for version in sorted(versions)[:-KEEP_VERSIONS]:
                self.quality.pop((model, version))
                self._dirty.discard((model, version))
                self._floor[model] = max(version, self._floor.get(model, -1))
                waiting = self._unlabelled.get(model, {})
                for old in [v for v in waiting if v <= version]:
                    del waiting[old]
                for metric in self.metric_names:
                    for window in ("rolling", "cumulative"):
                        _remove(self.m_quality, self.name, model, str(version), metric, window)
                _remove(self.m_coverage, self.name, model, str(version))


class _QualityTerms:
    """Custom collector: the additive terms of each tracked version's cumulative figures, read at
    scrape time (nothing to update per message, and pruned versions simply disappear)."""

    def __init__(self, processor: MonitorProcessor):
        self.processor = processor

    def collect(self) -> Iterator[CounterMetricFamily]:
        proc = self.processor
        family = CounterMetricFamily(
            "streamlearn_monitor_quality_terms_total",
            "Additive terms of the cumulative quality figures (sum over replicas, then divide)",
            labels=["service", "model", "model_version", "term"])
        entries = [(m, str(v), q) for (m, v), q in list(proc.quality.items())]
        entries += [(m, ALL, q) for m, q in list(proc.overall.items())]
        for model, version, q in entries:
            for term, value in q.sums().items():
                family.add_metric([proc.name, model, version, term], value)
        yield family
        expired = CounterMetricFamily("streamlearn_monitor_join_expired_total",
                                      "Predictions and labels that left the join buffer unmatched (TTL or bound)",
                                      labels=["service", "side"])
        expired.add_metric([proc.name, "prediction"], proc.join.expired_features)
        expired.add_metric([proc.name, "label"], proc.join.expired_labels)
        yield expired


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def build(settings: Settings, metrics: RuntimeMetrics) -> MonitorProcessor:
    return MonitorProcessor(load_spec(settings.service.spec), settings, metrics)
