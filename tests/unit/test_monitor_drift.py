"""Drift detection of the monitor: streams with a known drift point (River's ConceptDriftStream over
SEA, FriedmanDrift, and numpy-generated features), the windowed tests against reference
implementations, the spec's drift entries, and drift events out of the monitor's handler.

The streams are those of ``tests/bench/bench_drift.py`` (fixed seeds): each detector must fire within
a bounded delay after the drift point, never before it, and never on the same stream without drift."""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from schemas import DriftEvent, Features, Prediction
from services.monitor.app import MonitorProcessor
from services.monitor.drift import Detector, default_detector
from services.monitor.windows import JS, KS, PSI, ChiSquare, chi2_critical
from services.runtime.messages import Incoming, Outgoing
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import Settings
from services.runtime.spec import DriftSpec, PipelineSpec, SpecError, parse_spec, resolve_spec_path
from tests.bench.bench_drift import PH_REGRESSION, STREAMS, alarms, make_detector

N, POSITION, SEEDS = 6000, 3000, (0, 1, 2)
SETTINGS = Settings({"STREAMLEARN_MODEL_SIGNING_KEY": "k" * 32, "STREAMLEARN_TOPIC_PREFIX": "t."})


@functools.cache
def stream(name: str, seed: int, drift: bool) -> tuple[Any, ...]:
    return tuple(STREAMS[name][0](seed, N, POSITION, drift))


# (stream, spec entry, the largest delay allowed): the defaults first (no `detector`: the monitor
# picks ADWIN for the error, KS for numbers, ChiSquare for categories), then the others that meet
# the same bar on these streams
CASES = [
    ("sea", {}, 600),
    ("friedman", {}, 100),
    ("mean", {}, 600),
    ("scale", {}, 600),
    ("category", {}, 800),
    ("sea", {"detector": "PageHinkley"}, 800),
    ("sea", {"detector": "KS"}, 1000),
    ("sea", {"detector": "ChiSquare"}, 800),
    ("sea", {"detector": "JS"}, 800),
    ("friedman", {"detector": "PageHinkley", "params": PH_REGRESSION}, 100),
    ("friedman", {"detector": "KS"}, 300),
    ("friedman", {"detector": "PSI"}, 300),
    ("mean", {"detector": "ADWIN"}, 300),
    ("mean", {"detector": "PSI"}, 800),
    ("mean", {"detector": "ChiSquare"}, 600),
    ("scale", {"detector": "PSI"}, 800),
    ("scale", {"detector": "ChiSquare"}, 600),
    ("category", {"detector": "JS"}, 800),
]


@pytest.mark.parametrize(("name", "entry", "bound"), CASES,
                         ids=[f"{n}-{e.get('detector', 'default')}" for n, e, _ in CASES])
@pytest.mark.parametrize("seed", SEEDS)
def test_detects_within_a_bounded_delay_and_never_without_drift(name, entry, bound, seed):
    fired = alarms(make_detector(name, entry), list(stream(name, seed, True)))
    assert fired, "no detection"
    assert POSITION <= fired[0] <= POSITION + bound, f"first detection at {fired[0] - POSITION} after the drift"
    assert alarms(make_detector(name, entry), list(stream(name, seed, False))) == []


def test_defaults_per_target():
    assert make_detector("sea", {}).name == "ADWIN"
    assert make_detector("mean", {}).name == "KS"
    assert make_detector("category", {}).name == "ChiSquare"
    assert default_detector("prediction", categorical=True) == "ChiSquare"
    assert make_detector("sea", {}).detector.delta == 0.002  # River's defaults


@pytest.mark.parametrize("test", [PSI, JS, KS, ChiSquare])
def test_a_lasting_shift_fires_once_then_the_reference_restarts(test):
    """After a detection the next values form a new reference (as River's detectors reset), so one
    shift gives one detection even without a cooldown."""
    values = list(stream("mean", 0, True))
    d = test()
    fired = [i for i, x in enumerate(values) if (d.update(x), d.drift_detected)[1]]
    assert len(fired) == 1 and fired[0] > POSITION


# ---- the statistics against reference implementations -------------------------------------------

def _window_test(test, reference: list[Any], window: list[Any], **kwargs: Any):
    d = test(reference_size=len(reference), window_size=len(window), stride=len(window), **kwargs)
    for x in [*reference, *window]:
        d.update(x)
    return d


def test_ks_statistic_and_critical_value():
    rng = np.random.default_rng(3)
    ref, cur = rng.normal(0, 1, 400).tolist(), rng.normal(0.2, 1.2, 300).tolist()
    d = _window_test(KS, ref, cur)
    assert d.statistic == pytest.approx(stats.ks_2samp(ref, cur).statistic, abs=1e-12)
    # the asymptotic critical value: P(D > threshold) = alpha under the null
    n_eff = 400 * 300 / 700
    assert stats.kstwobign.sf(d.threshold * math.sqrt(n_eff)) == pytest.approx(0.001, rel=0.01)


def test_chi_square_statistic_and_critical_value():
    ref = list("aaaabbbccd" * 30)
    cur = list("aaabbbccdd" * 20) + ["e"] * 5  # "e" is not in the reference: the "other" bin
    d = _window_test(ChiSquare, ref, cur, categorical=True)
    table = np.array([[120, 90, 60, 30, 0], [60, 60, 40, 40, 5]])
    expected = stats.chi2_contingency(table, correction=False)
    assert d.statistic == pytest.approx(expected.statistic, rel=1e-12)
    assert d.threshold == pytest.approx(stats.chi2.ppf(0.999, 4), rel=0.02)
    assert d.drift_detected
    for df in (1, 2, 3, 5, 9, 20, 50):  # Wilson-Hilferty against the exact quantile
        assert chi2_critical(df, 0.001) == pytest.approx(stats.chi2.ppf(0.999, df), rel=0.02)


def test_psi_and_js_on_quantile_bins():
    rng = np.random.default_rng(4)
    ref, cur = rng.normal(0, 1, 1000), rng.normal(0.3, 1, 500)
    edges = np.quantile(ref, np.linspace(0, 1, 11)[1:-1])
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=10) / 1000
    q = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=10) / 500
    psi = _window_test(PSI, ref.tolist(), cur.tolist())
    assert psi.statistic == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-9)
    js = _window_test(JS, ref.tolist(), cur.tolist())
    assert js.statistic == pytest.approx(float(jensenshannon(p, q, base=2)), rel=1e-9)


def test_discrete_numbers_get_one_bin_per_value_and_reference_start_skips_values():
    d = _window_test(ChiSquare, [0.0, 1.0] * 50, [1.0] * 100, reference_start=0)
    assert d._codes == {0.0: 0, 1.0: 1} and d.drift_detected
    skipping = ChiSquare(reference_size=4, window_size=2, stride=2, reference_start=3)
    for x in [9.0, 9.0, 9.0, 1.0, 2.0, 1.0, 2.0]:
        skipping.update(x)
    assert set(skipping._codes) == {1.0, 2.0}


# ---- spec entries ---------------------------------------------------------------------------------

PHISHING = resolve_spec_path("phishing").read_text()
DRIFT = "  drift:\n    - detector: ADWIN\n      target: error\n      params: {delta: 0.002}\n"


def spec_with_drift(entries: str, extra_field: str = "") -> PipelineSpec:
    assert PHISHING.count(DRIFT) == 1
    text = PHISHING.replace(DRIFT, "  drift:\n" + entries)
    if extra_field:
        text = text.replace("    ip_in_url: {type: int, min: 0, max: 1}\n",
                            "    ip_in_url: {type: int, min: 0, max: 1}\n" + extra_field)
    return parse_spec(text)


@pytest.mark.parametrize(("entry", "message"), [
    ("{detector: ADWIN, target: error, window_size: 100}", "window_size: only for the windowed tests"),
    ("{target: error, threshold: 0.3}", "threshold: only for the windowed tests"),
    ("{detector: KS, target: https, params: {delta: 0.1}}", "params: only for River's detectors"),
    ("{detector: PSI, target: https, alpha: 0.01}", "alpha: only for KS and ChiSquare"),
    ("{detector: KS, target: https, alpha: 0.01, threshold: 0.2}", "give either threshold or alpha"),
    ("{detector: ADWIN, target: error, params: {delt: 0.1}}", "river.drift.ADWIN has no parameter(s) ['delt']"),
    ("{detector: KS, target: https, window_size: 1}", "greater than or equal to 2"),
])
def test_bad_drift_entries_name_the_entry_and_its_line(entry, message):
    with pytest.raises(SpecError) as info:
        spec_with_drift(f"    - {entry}\n")
    text = str(info.value)
    line = PHISHING.splitlines().index("  drift:") + 2  # 1-based line of the entry
    assert f"<spec>:{line}: monitor.drift.0" in text and message in text, text


@pytest.mark.parametrize(("entry", "message"), [
    ("{detector: DDM, target: https}", "DDM reads a 0/1 stream"),
    ("{detector: KS, target: browser}", "KS needs numbers but 'browser' is categorical"),
    ("{detector: ADWIN, target: browser}", "ADWIN needs numbers"),
])
def test_detectors_that_cannot_read_their_target_fail_at_build(entry, message):
    spec = spec_with_drift(f"    - {entry}\n", extra_field="    browser: {type: str}\n")
    with pytest.raises(SpecError, match=r"monitor\.drift\.0"):
        MonitorProcessor(spec, SETTINGS, RuntimeMetrics("monitor"))
    with pytest.raises(SpecError, match=message):
        MonitorProcessor(spec, SETTINGS, RuntimeMetrics("monitor"))


# ---- drift events out of the monitor --------------------------------------------------------------

class Monitor:
    def __init__(self, spec: PipelineSpec):
        self.metrics = RuntimeMetrics("monitor")
        self.proc = MonitorProcessor(spec, SETTINGS, self.metrics)
        self.offset = itertools.count()

    def send(self, topic: str, value: Any) -> list[DriftEvent]:
        raw = value.model_dump_json().encode()
        msg = Incoming(topic, 0, next(self.offset), None, raw, self.proc.subscriptions()[topic](raw))
        out: list[Outgoing] = list(self.proc.handle([msg]))
        assert all(o.topic == "t.drift" and o.key == self.proc.champion for o in out)
        return [o.value for o in out]

    def features(self, n: int, **values: Any) -> list[DriftEvent]:
        return self.send("t.features", Features(event_id=f"f{n}", entity_id="u", ts=float(n), feature_set="phishing",
                                                feature_set_version=1, features=values, ingested_at=0.0))

    def prediction(self, n: int, prediction: Any, proba: dict[str, float] | None, version: int = 7,
                   model: str | None = None) -> list[DriftEvent]:
        return self.send("t.predictions", Prediction(
            event_id=f"p{n}", entity_id="u", ts=float(n), model=model or self.proc.champion, model_version=version,
            prediction=prediction, proba=proba, scored_at=0.0, latency_ms=0.0))


def test_feature_drift_is_one_data_drift_event_with_its_statistic():
    m = Monitor(spec_with_drift("    - {target: https, severity: critical}\n"
                                "    - {detector: ChiSquare, target: browser}\n",
                                extra_field="    browser: {type: str}\n"))
    assert set(m.proc.subscriptions()) == {"t.predictions", "t.labels", "t.features"}
    m.prediction(0, True, {"True": 0.6, "False": 0.4}, version=9)  # the champion's latest version: 9
    values = list(stream("mean", 1, True))
    categories = list(stream("category", 1, True))
    events = [e for n, (x, c) in enumerate(zip(values, categories, strict=True))
              for e in m.features(n, https=x, browser=c, popup_window=None)]
    assert [(e.detector, e.kind, e.target) for e in events] == [("KS", "data", "https"),
                                                                 ("ChiSquare", "data", "browser")]
    ks, chi = events
    assert (ks.model, ks.model_version, ks.severity, chi.severity) == ("phishing-logreg", 9, "critical", "warning")
    assert ks.statistic > ks.threshold > 0 and chi.statistic > chi.threshold > 0
    assert POSITION < ks.window <= POSITION + 600
    assert m.metrics.registry.get_sample_value("streamlearn_drift_detections_total", {
        "service": "monitor", "model": "phishing-logreg", "detector": "KS", "kind": "data", "target": "https"}) == 1


def test_a_river_detector_on_a_feature_alerts_once_per_cooldown():
    m = Monitor(spec_with_drift("    - {detector: ADWIN, target: https, cooldown: 5000}\n"))
    flapping = [0.0] * 1000 + [1.0] * 500 + [0.0] * 500 + [1.0] * 500
    raw = Detector(DriftSpec(detector="ADWIN", target="https", cooldown=0))
    assert sum(raw.update(x) for x in flapping) > 1
    events = [e for n, x in enumerate(flapping) for e in m.features(n, https=x)]
    assert len(events) == 1 and events[0].threshold == 0.002


def test_prediction_drift_watches_p_positive_of_the_champion_only():
    m = Monitor(spec_with_drift("    - {target: prediction, reference_size: 300, window_size: 200}\n"))
    rng = np.random.default_rng(5)
    scores = np.concatenate([rng.beta(2, 5, 1000), rng.beta(5, 2, 1000)])
    events = []
    for n, p in enumerate(scores):
        proba = {"True": float(p), "False": 1 - float(p)}
        m.prediction(n, p > 0.5, proba, model="phishing-logreg.challenger")  # a challenger: not watched
        events += m.prediction(n, p > 0.5, proba)
    assert [(e.detector, e.kind, e.target, e.model_version) for e in events] == [("KS", "prediction", "prediction", 7)]
    assert 1000 <= events[0].window <= 1300


def test_multiclass_prediction_drift_compares_class_frequencies():
    text = resolve_spec_path("image_segments").read_text()
    spec = parse_spec(text[:text.index("  drift:")] + "  drift:\n    - {target: prediction}\n")
    m = Monitor(spec)
    assert m.proc.detectors[0].name == "ChiSquare"
    rng = np.random.default_rng(6)
    classes = np.concatenate([rng.choice(["sky", "grass", "path"], 2000, p=[.5, .3, .2]),
                              rng.choice(["sky", "grass", "path"], 1000, p=[.2, .3, .5])])
    events = [e for n, c in enumerate(classes) for e in m.prediction(n, str(c), {str(c): 1.0})]
    assert len(events) == 1 and events[0].kind == "prediction" and events[0].window > 2000
