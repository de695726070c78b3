"""Drift detectors of the monitor on streams with a known drift point, and the monitor's throughput.

    PYTHONPATH=. python -m tests.bench.bench_drift [--seeds 5] [--quick]

For each stream and detector (built by the monitor's own :class:`services.monitor.drift.Detector`
from a spec entry, cooldown 0 so that every raw detection counts), over several seeds:

- delay: events after the drift point until the first detection (median over seeds; a detector that
  has not fired ``HORIZON`` events after the drift point missed it);
- false alarms per 100k events on the same stream without the drift;
- cost: microseconds per update (best of 3 runs over 20,000 values of the no-drift stream; KSWIN 2,000);

then the monitor's throughput: messages per second through ``MonitorProcessor.handle`` in memory
(features, predictions and labels delayed by 50 events, in batches of 500, already decoded as the
runtime hands them over; and with decoding). Prints a table, writes ``bench-results/drift.json``.

The streams (also used by ``tests/unit/test_monitor_drift.py``):

- ``sea``: the 0/1 loss of a classifier that learned SEA's first concept (f0 + f1 > 8) on River's
  ``ConceptDriftStream`` from SEA variant 0 to variant 3 (threshold 9.5), 10 % label noise: the error
  rate goes from 0.10 to about 0.21;
- ``agrawal``: the 0/1 loss of an online Hoeffding tree (learning all along, 2,000 events of warm-up)
  on ``ConceptDriftStream`` from Agrawal function 0 to function 2: error 0.00 -> 0.45, then adapts;
- ``friedman``: the absolute error of the exact pre-drift function on ``FriedmanDrift`` (global
  recurring abrupt drift): mean 0.8 (the noise) -> about 4;
- ``mean``: a numeric feature N(0, 1) -> N(0.5, 1); ``scale``: N(0, 1) -> N(0, 1.5^2);
- ``category``: a categorical feature with frequencies (.4, .3, .2, .1) -> (.3, .3, .2, .2).

River's ``ConceptDriftStream`` overflows (``math.exp``) when ``position / width`` exceeds about 177,
so its width is ``position / 150``: the switch is 88 % done ``width / 2`` events after the drift point.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from river.datasets import synth

from services.monitor.drift import Detector
from services.runtime.spec import DriftSpec

HORIZON = 5000  # a detection later than this after the drift point counts as missed
COOLDOWN = 500  # the spec default, for the "emitted" false-alarm column


# ---- streams with a known drift point ------------------------------------------------------------

def sea_errors(seed: int, n: int, position: int, drift: bool = True) -> list[float]:
    """0/1 loss of a classifier that learned SEA's first concept (f0 + f1 > 8)."""
    base = synth.SEA(variant=0, seed=seed, noise=0.1)
    stream = synth.ConceptDriftStream(base, synth.SEA(variant=3, seed=seed + 10_000, noise=0.1),
                                      position=position, width=_width(position), seed=seed) if drift else base
    return [float((x[0] + x[1] > 8) != y) for x, y in itertools.islice(stream, n)]


def agrawal_errors(seed: int, n: int, position: int, drift: bool = True, warmup: int = 2000) -> list[float]:
    """0/1 loss of an online Hoeffding tree (prequential: predict, then learn) after ``warmup`` events."""
    from river import tree

    base = synth.Agrawal(classification_function=0, seed=seed)
    stream = synth.ConceptDriftStream(
        base, synth.Agrawal(classification_function=2, seed=seed + 10_000), position=warmup + position,
        width=_width(warmup + position), seed=seed) if drift else base
    model = tree.HoeffdingTreeClassifier()
    errors = []
    for x, y in itertools.islice(stream, warmup + n):
        errors.append(float(model.predict_one(x) != y))
        model.learn_one(x, y)
    return errors[warmup:]


def friedman_errors(seed: int, n: int, position: int, drift: bool = True) -> list[float]:
    """Absolute error of Friedman's pre-drift function (the noise, N(0, 1)) on ``FriedmanDrift``."""
    at = (position, 10**12) if drift else (10**12 - 1, 10**12)
    stream = synth.FriedmanDrift(drift_type="gra", position=at, transition_window=0, seed=seed)

    def f(x: dict[int, float]) -> float:
        return 10 * math.sin(math.pi * x[0] * x[1]) + 20 * (x[2] - 0.5) ** 2 + 10 * x[3] + 5 * x[4]

    return [abs(y - f(x)) for x, y in itertools.islice(stream, n)]


def mean_shift(seed: int, n: int, position: int, drift: bool = True) -> list[float]:
    x = np.random.default_rng(seed).normal(0.0, 1.0, n)
    if drift:
        x[position:] += 0.5
    return x.tolist()


def scale_change(seed: int, n: int, position: int, drift: bool = True) -> list[float]:
    x = np.random.default_rng(seed).normal(0.0, 1.0, n)
    if drift:
        x[position:] *= 1.5
    return x.tolist()


def category_shift(seed: int, n: int, position: int, drift: bool = True) -> list[str]:
    rng = np.random.default_rng(seed)
    cats = np.array(["a", "b", "c", "d"])
    x = rng.choice(cats, size=n, p=[0.4, 0.3, 0.2, 0.1])
    if drift:
        x[position:] = rng.choice(cats, size=n - position, p=[0.3, 0.3, 0.2, 0.2])
    return x.tolist()


def _width(position: int) -> int:
    return max(1, math.ceil(position / 150))


STREAMS: dict[str, tuple[Callable[..., list[Any]], str]] = {
    "sea": (sea_errors, "error"), "agrawal": (agrawal_errors, "error"), "friedman": (friedman_errors, "error"),
    "mean": (mean_shift, "x"), "scale": (scale_change, "x"), "category": (category_shift, "x"),
}

# (stream, label, spec entry, default?) — "default" marks the detector a spec entry without
# `detector` gets for that target (see services/monitor/drift.py)
PH_REGRESSION = {"mode": "up", "alpha": 1.0, "delta": 0.1, "threshold": 25}
CASES: list[tuple[str, str, dict[str, Any], bool]] = [
    ("sea", "ADWIN", {}, True),
    ("sea", "DDM", {"detector": "DDM"}, False),
    ("sea", "EDDM", {"detector": "EDDM"}, False),
    ("sea", "PageHinkley", {"detector": "PageHinkley"}, False),
    ("sea", "KSWIN", {"detector": "KSWIN", "params": {"seed": 1}}, False),
    ("sea", "KS", {"detector": "KS"}, False),
    ("sea", "ChiSquare", {"detector": "ChiSquare"}, False),
    ("sea", "PSI", {"detector": "PSI"}, False),
    ("sea", "JS", {"detector": "JS"}, False),
    ("agrawal", "ADWIN", {}, True),
    ("agrawal", "DDM", {"detector": "DDM"}, False),
    ("agrawal", "EDDM", {"detector": "EDDM"}, False),
    ("agrawal", "PageHinkley", {"detector": "PageHinkley"}, False),
    ("friedman", "ADWIN", {}, True),
    ("friedman", "PageHinkley", {"detector": "PageHinkley"}, False),
    ("friedman", "PageHinkley tuned", {"detector": "PageHinkley", "params": PH_REGRESSION}, False),
    ("friedman", "KS", {"detector": "KS"}, False),
    ("friedman", "PSI", {"detector": "PSI"}, False),
    ("friedman", "JS", {"detector": "JS"}, False),
    ("mean", "KS", {}, True),
    ("mean", "ADWIN", {"detector": "ADWIN"}, False),
    ("mean", "PageHinkley", {"detector": "PageHinkley"}, False),
    ("mean", "KSWIN", {"detector": "KSWIN", "params": {"seed": 1}}, False),
    ("mean", "PSI", {"detector": "PSI"}, False),
    ("mean", "JS", {"detector": "JS"}, False),
    ("mean", "ChiSquare", {"detector": "ChiSquare"}, False),
    ("scale", "KS", {}, True),
    ("scale", "ADWIN", {"detector": "ADWIN"}, False),
    ("scale", "PSI", {"detector": "PSI"}, False),
    ("scale", "JS", {"detector": "JS"}, False),
    ("scale", "ChiSquare", {"detector": "ChiSquare"}, False),
    ("category", "ChiSquare", {}, True),
    ("category", "PSI", {"detector": "PSI"}, False),
    ("category", "JS", {"detector": "JS"}, False),
]
SLOW = {"KSWIN"}  # ~0.3-1 ms per update: shorter streams


def make_detector(stream: str, entry: dict[str, Any], cooldown: int = 0) -> Detector:
    target = STREAMS[stream][1]
    return Detector(DriftSpec(target=target, cooldown=cooldown, **entry), categorical=stream == "category")


def alarms(detector: Detector, values: list[Any]) -> list[int]:
    return [i for i, x in enumerate(values) if detector.update(x)]


def first_after(indices: list[int], position: int, horizon: int = HORIZON) -> int | None:
    """Delay of the first detection at or after ``position`` (None: none within ``horizon``)."""
    return next((i - position for i in indices if position <= i < position + horizon), None)


def emitted(indices: list[int], cooldown: int = COOLDOWN) -> int:
    """How many of the raw detections the monitor's cooldown lets through."""
    count, quiet_until = 0, -1
    for i in indices:
        if i >= quiet_until:
            count, quiet_until = count + 1, i + cooldown
    return count


# ---- the benchmark -------------------------------------------------------------------------------

def bench_detectors(seeds: int, n_drift: int, position: int, n_clean: int) -> list[dict[str, Any]]:
    cache: dict[tuple[str, int, bool, int], list[Any]] = {}

    def stream(name: str, seed: int, drift: bool, n: int) -> list[Any]:
        key = (name, seed, drift, n)
        if key not in cache:
            cache[key] = STREAMS[name][0](seed, n, position, drift)
        return cache[key]

    rows = []
    for name, label, entry, default in CASES:
        clean_n = min(n_clean, 10_000) if label in SLOW else (min(n_clean, 40_000) if name == "agrawal" else n_clean)
        delays: list[int | None] = []
        raw_fa = emitted_fa = events = 0
        for seed in range(seeds):
            delays.append(first_after(alarms(make_detector(name, entry), stream(name, seed, True, n_drift)),
                                      position))
            clean = stream(name, seed, False, clean_n)
            fired = alarms(make_detector(name, entry), clean)
            raw_fa += len(fired)
            emitted_fa += emitted(fired)
            events += len(clean)
        found = [d for d in delays if d is not None]
        cost = per_update_us(name, entry, stream(name, 0, False, clean_n)[:2000 if label in SLOW else 20_000])
        rows.append({
            "stream": name, "detector": label, "default": default, "spec": entry, "seeds": seeds,
            "delays": delays, "median_delay": statistics.median(found) if found else None,
            "detected": len(found), "false_alarms_per_100k": raw_fa * 1e5 / events,
            "emitted_false_alarms_per_100k": emitted_fa * 1e5 / events, "clean_events": events,
            "us_per_update": cost,
        })
        print(_row(rows[-1]), flush=True)
    return rows


def per_update_us(name: str, entry: dict[str, Any], values: list[Any], repeat: int = 3) -> float:
    """Microseconds per ``Detector.update`` (best of ``repeat`` runs: the least disturbed by other load)."""
    best = math.inf
    for _ in range(repeat):
        detector = make_detector(name, entry)
        update = detector.update
        started = time.perf_counter()
        for x in values:
            update(x)
        best = min(best, time.perf_counter() - started)
    return best / len(values) * 1e6


def bench_throughput(events: int = 20_000, batch: int = 500, delay: int = 50) -> list[dict[str, Any]]:
    """Messages per second through MonitorProcessor.handle for the bundled phishing spec and for a
    'full' one (every binary metric; ADWIN on the error, KS on the prediction and on the 9 features)."""
    from schemas import Features, Label, Prediction
    from services.monitor.app import MonitorProcessor
    from services.runtime.messages import Incoming
    from services.runtime.metrics import RuntimeMetrics
    from services.runtime.settings import Settings
    from services.runtime.spec import load_spec, parse_spec, resolve_spec_path

    settings = Settings({"STREAMLEARN_MODEL_SIGNING_KEY": "k" * 32, "STREAMLEARN_TOPIC_PREFIX": "b."})
    bundled = load_spec("phishing")
    text = resolve_spec_path("phishing").read_text().replace("  metrics: [accuracy]\n", "")
    features = list(bundled.event.fields)
    full_drift = "".join(f"    - {{target: {t}}}\n" for t in ["prediction", *features])
    full = parse_spec(text.replace("      params: {delta: 0.002}\n", "      params: {delta: 0.002}\n" + full_drift))
    rng = np.random.default_rng(0)
    raw: list[tuple[str, bytes]] = []
    for i in range(events):
        x = {name: float(rng.integers(0, 2)) for name in features}
        p = float(rng.random())
        common = {"event_id": f"e{i}", "entity_id": f"u{i % 997}", "ts": 1000.0 + i}
        raw.append(("b.features", Features(**common, feature_set="phishing", feature_set_version=1, features=x,
                                           ingested_at=0.0).model_dump_json().encode()))
        raw.append(("b.predictions", Prediction(**common, model=bundled.model.name, model_version=i // 100,
                                                prediction=p > 0.5, proba={"False": 1 - p, "True": p},
                                                scored_at=0.0, latency_ms=0.0).model_dump_json().encode()))
        if i >= delay:
            j = i - delay
            raw.append(("b.labels", Label(event_id=f"e{j}", entity_id=f"u{j % 997}", ts=1000.0 + i,
                                          label=bool(rng.random() < 0.5)).model_dump_json().encode()))
    rows = []
    for label, spec in (("phishing (bundled)", bundled), ("full", full)):
        for decoding in (False, True):
            seconds = math.inf
            for _ in range(3):  # best of 3: the run least disturbed by other load
                proc = MonitorProcessor(spec, settings, RuntimeMetrics("monitor"))
                decoders = proc.subscriptions()
                messages = [(t, b) for t, b in raw if t in decoders]
                if not decoding:
                    decoded = [Incoming(t, 0, k, None, b, decoders[t](b)) for k, (t, b) in enumerate(messages)]
                started = time.perf_counter()
                for start in range(0, len(messages), batch):
                    if decoding:
                        chunk = [Incoming(t, 0, k, None, b, decoders[t](b))
                                 for k, (t, b) in enumerate(messages[start:start + batch])]
                    else:
                        chunk = decoded[start:start + batch]
                    proc.handle(chunk)
                    proc.tick(time.time())
                seconds = min(seconds, time.perf_counter() - started)
            rows.append({"spec": label, "decoding": decoding, "messages": len(messages),
                         "messages_per_s": len(messages) / seconds, "detectors": len(proc.detectors),
                         "metrics": list(proc.metric_names)})
            print(f"  {label:20s} {'decode+handle' if decoding else 'handle':14s} {len(messages):>7,} messages "
                  f"{len(messages) / seconds:>10,.0f} msg/s", flush=True)
    return rows


def _row(r: dict[str, Any]) -> str:
    median = "-" if r["median_delay"] is None else f"{r['median_delay']:.0f}"
    return (f"  {r['stream']:9s} {r['detector'] + (' *' if r['default'] else ''):19s} {median:>7s} "
            f"{r['detected']:>3d}/{r['seeds']:<3d} {r['false_alarms_per_100k']:>8.1f} "
            f"{r['emitted_false_alarms_per_100k']:>8.1f} {r['us_per_update']:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="shorter streams (a smoke run)")
    parser.add_argument("--out", default="bench-results/drift.json")
    args = parser.parse_args()
    n_drift, position, n_clean = (6000, 3000, 10_000) if args.quick else (20_000, 10_000, 100_000)
    print(f"drift point at {position} of {n_drift} events; false alarms on {n_clean:,} clean events per seed "
          f"(KSWIN 10,000, agrawal 40,000); {args.seeds} seeds; * = default detector for the target")
    print(f"  {'stream':9s} {'detector':19s} {'delay':>7s} {'found':>7s} {'FA/100k':>8s} {'emitted':>8s} "
          f"{'us/update':>9s}")
    rows = bench_detectors(args.seeds, n_drift, position, n_clean)
    events = 5000 if args.quick else 20_000
    print(f"monitor throughput ({events:,} events: features, predictions, labels 50 events later; batches of 500)")
    throughput = bench_throughput(events=events)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"position": position, "n_drift": n_drift, "n_clean": n_clean, "horizon": HORIZON,
                               "cooldown": COOLDOWN, "detectors": rows, "throughput": throughput}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
