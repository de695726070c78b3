"""The monitor's quality figures against River's metrics computed offline on the same predictions.

Predictions come from real River models learning River's datasets progressively (predict, then
learn); the monitor gets them as messages, joined with labels, and its quality events, gauges and
additive terms must equal what River's metrics give on the same (label, prediction) pairs."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from river import datasets, linear_model, metrics, preprocessing, utils

from schemas import Label, Prediction, QualityEvent
from services.monitor.app import MonitorProcessor
from services.monitor.quality import BinnedROCAUC, VersionQuality
from services.runtime.messages import Incoming, Outgoing
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings
from services.runtime.spec import PipelineSpec, SpecError, load_spec, parse_spec, resolve_spec_path

SETTINGS = Settings({"STREAMLEARN_MODEL_SIGNING_KEY": "k" * 32, "STREAMLEARN_TOPIC_PREFIX": "t."})
WINDOW = 50


def spec_of(name: str, *replacements: tuple[str, str]) -> PipelineSpec:
    text = resolve_spec_path(name).read_text()
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return parse_spec(text)


def all_metrics(name: str) -> PipelineSpec:
    """A bundled spec with every metric of its task and a rolling window of WINDOW."""
    window = {"phishing": "200", "image_segments": "200", "trump_approval": "100"}[name]
    replacements = [(f"quality_window: {window}", f"quality_window: {WINDOW}")]
    if name == "phishing":
        replacements.append(("  metrics: [accuracy]\n", ""))
    return spec_of(name, *replacements)


def progressive(dataset, model, n: int, proba: bool = True) -> list[tuple[Any, Any, dict[str, float] | None]]:
    """(label, prediction, proba) of ``model`` predicting then learning ``n`` examples."""
    out = []
    for x, y in itertools.islice(dataset, n):
        if proba:
            p = model.predict_proba_one(x)
            y_pred = max(p, key=p.get) if p else None
            out.append((y, y_pred, {str(k): v for k, v in p.items()} if p else None))
        else:
            out.append((y, model.predict_one(x), None))
        model.learn_one(x, y)
    return out


class Feed:
    """Predictions and their labels into a monitor, as decoded messages."""

    def __init__(self, proc: MonitorProcessor):
        self.proc = proc
        self.offset = itertools.count()
        self.out: list[Outgoing] = []

    def predict(self, event_id: str, y_pred: Any, proba: dict[str, float] | None = None, version: int = 1,
                model: str | None = None, shadow: bool = False, ts: float = 1000.0, score: float | None = None,
                entity: str = "u1") -> None:
        p = Prediction(event_id=event_id, entity_id=entity, ts=ts, model=model or self.proc.champion,
                       model_version=version, prediction=y_pred, proba=proba, score=score, scored_at=ts,
                       latency_ms=0.0, shadow=shadow)
        self._send("t.predictions", p)

    def label(self, event_id: str, y: Any, ts: float = 1000.0, entity: str = "u1") -> None:
        self._send("t.labels", Label(event_id=event_id, entity_id=entity, ts=ts, label=y))

    def _send(self, topic: str, value: Any) -> None:
        raw = value.model_dump_json().encode()
        decoded = self.proc.subscriptions()[topic](raw)
        self.out += self.proc.handle([Incoming(topic, 0, next(self.offset), None, raw, decoded)])

    def pairs(self, pairs: list[tuple[Any, Any, dict[str, float] | None]], version: int = 1, prefix: str = "e",
              **kwargs: Any) -> None:
        for n, (y, y_pred, proba) in enumerate(pairs):
            self.predict(f"{prefix}{n}", y_pred, proba, version=version, **kwargs)
            self.label(f"{prefix}{n}", y)

    def tick(self) -> list[QualityEvent]:
        self.proc._last_emit -= self.proc.spec.monitor.quality_interval_s + 1
        return [o.value for o in self.proc.tick(123.0)]


def river_figures(pairs, make, window: int, value=lambda y, y_pred, proba: (y, y_pred)) -> tuple[float, float]:
    """(rolling over the last ``window``, cumulative) of a River metric on the pairs."""
    rolling, cumulative = utils.Rolling(make, window_size=window), make()
    for y, y_pred, proba in pairs:
        args = value(y, y_pred, proba)
        if args is None:
            continue
        rolling.update(*args)
        cumulative.update(*args)
    return rolling.get(), cumulative.get()


def by_metric(events: list[QualityEvent]) -> dict[str, QualityEvent]:
    assert len({e.metric for e in events}) == len(events), events
    return {e.metric: e for e in events}


REGISTRIES: dict[int, RuntimeMetrics] = {}


def monitor(spec: PipelineSpec) -> MonitorProcessor:
    metrics_ = RuntimeMetrics("monitor")
    proc = MonitorProcessor(spec, SETTINGS, metrics_)
    REGISTRIES[id(proc)] = metrics_
    return proc


def _sample(proc: MonitorProcessor, name: str, labels: dict[str, str]) -> float | None:
    """A sample of the monitor's /metrics, as Prometheus would scrape it."""
    return REGISTRIES[id(proc)].registry.get_sample_value(name, {"service": "monitor", **labels})


# ---- binary ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def phishing_pairs():
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    return progressive(datasets.Phishing(), model, 600)


def _p_true(y, y_pred, proba):
    return (y, proba["True"]) if proba else None


def test_binary_figures_equal_rivers(phishing_pairs):
    proc = monitor(all_metrics("phishing"))
    feed = Feed(proc)
    feed.pairs(phishing_pairs)
    events = by_metric(feed.tick())
    assert set(events) == {"accuracy", "log_loss", "roc_auc", "precision", "recall", "f1"}
    made = [(y, yp, p) for y, yp, p in phishing_pairs if yp is not None]
    expected = {
        "accuracy": river_figures(made, metrics.Accuracy, WINDOW),
        "precision": river_figures(made, metrics.Precision, WINDOW),
        "recall": river_figures(made, metrics.Recall, WINDOW),
        "f1": river_figures(made, metrics.F1, WINDOW),
        "log_loss": river_figures(made, metrics.LogLoss, WINDOW, _p_true),
    }
    for name, (rolling, cumulative) in expected.items():
        e = events[name]
        assert e.value == pytest.approx(rolling, abs=1e-12), name
        assert e.cumulative == pytest.approx(cumulative, abs=1e-12), name
        assert (e.labelled, e.window, e.model_version, e.shadow) == (len(made), WINDOW, 1, False)
        assert _sample(proc, "streamlearn_model_quality", {"model": "phishing-logreg", "model_version": "1",
                                                           "metric": name, "window": "cumulative"}) == e.cumulative
    # ROC AUC: the window's is River's RollingROCAUC; the cumulative one is exact up to ties within
    # 1e-4 of probability (River's own ROCAUC interpolates over 10 thresholds by default)
    rolling_auc, exact_auc = metrics.RollingROCAUC(window_size=WINDOW), metrics.RollingROCAUC(window_size=10**6)
    for y, _, p in made:
        rolling_auc.update(y, p["True"])
        exact_auc.update(y, p["True"])
    assert events["roc_auc"].value == pytest.approx(rolling_auc.get(), abs=1e-12)
    assert events["roc_auc"].cumulative == pytest.approx(exact_auc.get(), abs=1e-3)
    assert 0.8 < exact_auc.get() < 1.0


def test_zero_one_and_text_labels_judge_bool_predictions(phishing_pairs):
    proc = monitor(all_metrics("phishing"))
    feed = Feed(proc)
    encode = [int, lambda y: "true" if y else "false", bool]
    feed.pairs([(encode[n % 3](y), yp, p) for n, (y, yp, p) in enumerate(phishing_pairs[:90])])
    reference = metrics.F1()
    for y, yp, _ in phishing_pairs[:90]:
        reference.update(y, yp)
    assert by_metric(feed.tick())["f1"].cumulative == pytest.approx(reference.get())


def test_predictions_without_proba_skip_the_probability_metrics():
    proc = monitor(all_metrics("phishing"))
    feed = Feed(proc)
    feed.pairs([(True, True, None), (False, True, None)])
    assert set(by_metric(feed.tick())) == {"accuracy", "precision", "recall", "f1"}


def test_binned_roc_auc_handles_ties_and_reverts():
    auc = BinnedROCAUC()
    pairs = [(True, 0.5), (False, 0.5), (True, 0.9), (False, 0.1)]
    for y, p in pairs:
        auc.update(y, p)
    assert auc.get() == 0.875  # the tied pair counts one half
    auc.revert(True, 0.9)
    auc.revert(False, 0.1)
    assert auc.get() == 0.5


# ---- multiclass -----------------------------------------------------------------------------------

def test_multiclass_figures_equal_rivers():
    pairs = progressive(datasets.ImageSegments(),
                        preprocessing.StandardScaler() | linear_model.SoftmaxRegression(), 400)
    assert pairs[0][1] is None  # an untrained model predicts nothing: not judged
    proc = monitor(all_metrics("image_segments"))
    feed = Feed(proc)
    feed.pairs(pairs)
    events = by_metric(feed.tick())
    assert set(events) == {"accuracy", "log_loss", "macro_precision", "macro_recall", "macro_f1"}
    made = [(y, yp, p) for y, yp, p in pairs if yp is not None]
    expected = {
        "accuracy": river_figures(made, metrics.Accuracy, WINDOW),
        "macro_precision": river_figures(made, metrics.MacroPrecision, WINDOW),
        "macro_recall": river_figures(made, metrics.MacroRecall, WINDOW),
        "macro_f1": river_figures(made, metrics.MacroF1, WINDOW),
        "log_loss": river_figures(made, metrics.CrossEntropy, WINDOW, lambda y, yp, p: (y, p)),
    }
    for name, (rolling, cumulative) in expected.items():
        assert (events[name].value, events[name].cumulative) == (pytest.approx(rolling, abs=1e-12),
                                                                 pytest.approx(cumulative, abs=1e-12)), name
        assert events[name].labelled == len(made)


# ---- regression -----------------------------------------------------------------------------------

def test_regression_figures_equal_rivers():
    pairs = progressive(datasets.TrumpApproval(), preprocessing.StandardScaler() | linear_model.LinearRegression(),
                        300, proba=False)
    proc = monitor(all_metrics("trump_approval"))
    feed = Feed(proc)
    feed.pairs(pairs)
    events = by_metric(feed.tick())
    assert set(events) == {"mae", "rmse", "r2"}
    for name, make in (("mae", metrics.MAE), ("rmse", metrics.RMSE), ("r2", metrics.R2)):
        rolling, cumulative = river_figures(pairs, make, WINDOW)
        assert events[name].value == pytest.approx(rolling, rel=1e-9, abs=1e-9), name
        assert events[name].cumulative == pytest.approx(cumulative, rel=1e-9, abs=1e-9), name


# ---- versions, challengers, coverage, delay ------------------------------------------------------

def test_all_versions_figure_keeps_pruned_versions_and_only_labelled_versions_emit(phishing_pairs):
    proc = monitor(all_metrics("phishing"))
    feed = Feed(proc)
    chunks = [phishing_pairs[i * 100:(i + 1) * 100] for i in range(5)]
    for version, chunk in enumerate(chunks, start=1):
        feed.pairs(chunk, version=version, prefix=f"v{version}-")
    events = feed.tick()
    assert {e.model_version for e in events} == {3, 4, 5}  # the newest 3 versions
    made = [pair for chunk in chunks for pair in chunk if pair[1] is not None]
    _, accuracy = river_figures(made, metrics.Accuracy, WINDOW)
    _, f1 = river_figures(made, metrics.F1, WINDOW)
    labels = {"model": "phishing-logreg", "model_version": "all", "window": "cumulative"}
    assert _sample(proc, "streamlearn_model_quality", {**labels, "metric": "accuracy"}) == pytest.approx(accuracy)
    assert _sample(proc, "streamlearn_model_quality", {**labels, "metric": "f1"}) == pytest.approx(f1)
    assert _sample(proc, "streamlearn_model_quality_labelled", {"model": "phishing-logreg"}) == len(made)
    assert _sample(proc, "streamlearn_model_quality", {**labels, "metric": "accuracy", "model_version": "1"}) is None
    # a late label for a pruned version counts in "all" only; versions without new labels stay quiet
    feed.predict("late", True, {"True": 0.9, "False": 0.1}, version=1)
    feed.label("late", True)
    assert feed.tick() == []
    assert _sample(proc, "streamlearn_model_quality_labelled", {"model": "phishing-logreg"}) == len(made) + 1
    assert (("phishing-logreg", 1)) not in proc.quality


def test_challengers_get_their_own_quality_and_the_champions_shadow_predictions_do_not_count():
    proc = monitor(all_metrics("phishing"))
    feed = Feed(proc)
    challenger = "phishing-logreg.tree"
    for n in range(10):
        feed.predict(f"e{n}", True, version=4)  # served by the champion
        feed.predict(f"e{n}", n % 2 == 0, version=2, model=challenger, shadow=True)
        feed.label(f"e{n}", True)
    feed.predict("canary", False, version=2, model=challenger)  # a canary entity: the challenger was served
    feed.predict("canary", True, version=4, shadow=True)  # ... the champion's is the shadow one
    feed.label("canary", False)
    events = {(e.model, e.metric): e for e in feed.tick()}
    champion = events[("phishing-logreg", "accuracy")]
    assert (champion.shadow, champion.labelled, champion.cumulative) == (False, 10, 1.0)
    other = events[(challenger, "accuracy")]
    assert (other.shadow, other.labelled, other.cumulative, other.model_version) == (True, 11, 6 / 11, 2)
    assert _sample(proc, "streamlearn_model_quality_labelled", {"model": challenger}) == 11


def test_label_coverage_and_delay():
    proc = monitor(all_metrics("phishing"))
    feed = Feed(proc)
    for n in range(8):
        feed.predict(f"e{n}", True, ts=1000.0 + n)
    for n, delay in zip(range(4), (0.5, 30.0, 30.0, 3000.0), strict=True):
        feed.label(f"e{n}", True, ts=1000.0 + n + delay)
    feed.tick()
    assert _sample(proc, "streamlearn_monitor_label_coverage", {"model": "phishing-logreg",
                                                                "model_version": "1"}) == 0.5
    delay = {"model": "phishing-logreg"}
    assert _sample(proc, "streamlearn_monitor_label_delay_seconds_count", delay) == 4
    assert _sample(proc, "streamlearn_monitor_label_delay_seconds_sum", delay) == pytest.approx(3060.5)
    assert _sample(proc, "streamlearn_monitor_label_delay_seconds_bucket", {**delay, "le": "60.0"}) == 3


# ---- several replicas: additive terms -------------------------------------------------------------

def test_replicas_terms_sum_to_the_combined_figures(phishing_pairs):
    """Two replicas, each with the partitions of half of the entities: their exported terms, summed
    as PromQL's sum(...) would, give River's figures on all the pairs."""
    replicas = [monitor(all_metrics("phishing")), monitor(all_metrics("phishing"))]
    feeds = [Feed(r) for r in replicas]
    for n, (y, y_pred, proba) in enumerate(phishing_pairs):
        feed = feeds[(n % 7) % 2]  # entity u0..u6: partitions of even entities on one replica
        feed.predict(f"e{n}", y_pred, proba, entity=f"u{n % 7}")
        feed.label(f"e{n}", y, entity=f"u{n % 7}")
    made = [p for p in phishing_pairs if p[1] is not None]

    def total(term: str, version: str = "1") -> float:
        return sum(_sample(r, "streamlearn_monitor_quality_terms_total",
                           {"model": "phishing-logreg", "model_version": version, "term": term}) for r in replicas)

    assert all(r.quality[("phishing-logreg", 1)].labelled < len(made) for r in replicas)
    assert total("labelled") == total("labelled", "all") == len(made)
    assert total("predicted") == len(phishing_pairs)
    assert total("correct") / total("labelled") == pytest.approx(river_figures(made, metrics.Accuracy, 10**6)[1])
    tp, fp, fn = total("tp"), total("fp"), total("fn")
    assert tp / (tp + fp) == pytest.approx(river_figures(made, metrics.Precision, 10**6)[1])
    assert tp / (tp + fn) == pytest.approx(river_figures(made, metrics.Recall, 10**6)[1])
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(river_figures(made, metrics.F1, 10**6)[1])
    assert total("log_loss") / total("labelled_proba") == pytest.approx(
        river_figures(made, metrics.LogLoss, 10**6, _p_true)[1])


def test_regression_terms_sum_to_mae_rmse_and_r2():
    pairs = progressive(datasets.TrumpApproval(), preprocessing.StandardScaler() | linear_model.LinearRegression(),
                        200, proba=False)
    replicas = [VersionQuality("regression", WINDOW), VersionQuality("regression", WINDOW)]
    for n, (y, y_pred, _) in enumerate(pairs):
        replicas[n % 2].update(y, y_pred)
    s = {k: sum(r.sums()[k] for r in replicas) for k in replicas[0].sums()}
    n = s["labelled"]
    label_sum = s["label_sum_pos"] - s["label_sum_neg"]
    assert s["abs_error"] / n == pytest.approx(river_figures(pairs, metrics.MAE, 10**6)[1])
    assert math.sqrt(s["squared_error"] / n) == pytest.approx(river_figures(pairs, metrics.RMSE, 10**6)[1])
    assert 1 - s["squared_error"] / (s["label_squared"] - label_sum**2 / n) == pytest.approx(
        river_figures(pairs, metrics.R2, 10**6)[1])


# ---- the spec -------------------------------------------------------------------------------------

def test_metrics_that_do_not_fit_the_task_fail_at_build():
    spec = spec_of("phishing", ("metrics: [accuracy]", "metrics: [accuracy, rmse]"))
    with pytest.raises(SpecError, match=r"monitor\.metrics: \['rmse'\] do not fit a binary model"):
        monitor(spec)


def test_spec_alert_bounds_are_exported_for_the_alert_rules():
    proc = monitor(load_spec("phishing"))  # thresholds: accuracy {min: 0.7}; min_label_coverage: 0.5
    assert _sample(proc, "streamlearn_model_quality_threshold",
                   {"model": "phishing-logreg", "metric": "accuracy", "bound": "min"}) == 0.7
    assert _sample(proc, "streamlearn_model_quality_threshold",
                   {"model": "phishing-logreg", "metric": "accuracy", "bound": "max"}) is None
    assert _sample(proc, "streamlearn_monitor_label_coverage_min", {"model": "phishing-logreg"}) == 0.5


def test_bounds_of_unreported_metrics_or_without_a_bound_fail_at_start():
    spec = spec_of("phishing", ("accuracy: {min: 0.7}", "f1: {min: 0.7}"))
    with pytest.raises(SpecError, match=r"monitor\.thresholds: \['f1'\] are not reported"):
        monitor(spec)
    with pytest.raises(SpecError, match=r"monitor\.thresholds\.accuracy.*min or max"):
        spec_of("phishing", ("accuracy: {min: 0.7}", "accuracy: {}"))


def test_bundled_specs_build_a_monitor():
    for name in ("phishing", "image_segments", "trump_approval", "sensors"):
        proc = monitor(load_spec(name))
        assert proc.metric_names


def test_anomaly_detector_is_judged_by_its_flag_and_its_score():
    rng = np.random.default_rng(2)
    truth = rng.random(300) < 0.1
    scores = np.clip(rng.normal(0.4, 0.15, 300) + 0.4 * truth, 0, 1)
    proc = monitor(load_spec("sensors"))
    feed = Feed(proc)
    for n, (y, s) in enumerate(zip(truth.tolist(), scores.tolist(), strict=True)):
        feed.predict(f"e{n}", s >= 0.8, score=s)
        feed.label(f"e{n}", y)
    events = by_metric(feed.tick())
    assert set(events) == {"accuracy", "roc_auc", "precision", "recall", "f1"}
    exact = metrics.RollingROCAUC(window_size=10**6)
    f1 = metrics.F1()
    for y, s in zip(truth.tolist(), scores.tolist(), strict=True):
        exact.update(y, s)
        f1.update(y, s >= 0.8)
    assert events["roc_auc"].cumulative == pytest.approx(exact.get(), abs=1e-3)
    assert events["f1"].cumulative == pytest.approx(f1.get())


def test_a_label_that_is_not_a_number_is_counted_as_an_error_for_a_regression():
    proc = monitor(all_metrics("trump_approval"))
    feed = Feed(proc)
    feed.pairs([(40.0, 41.0, None), ("n/a", 41.0, None), (42.0, 41.0, None)])
    assert by_metric(feed.tick())["mae"].labelled == 2
    assert _sample(proc, "streamlearn_errors_total", {"kind": "label_type"}) == 1
