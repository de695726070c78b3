"""Drift detectors, one per spec entry, with a cooldown so that one shift is one alert.

A spec entry names either a streaming detector from River (``ADWIN``, ``PageHinkley``, ``KSWIN``,
``DDM``, ``EDDM``; parameters in ``params``) or a windowed test against a reference window
(``PSI``, ``JS``, ``KS``, ``ChiSquare``; see :mod:`services.monitor.windows`). Without a
``detector`` the entry gets the default for its target:

- ``error`` (concept drift): ADWIN on the 0/1 loss (classification) or the absolute error
  (regression): the fastest of the measured detectors with no false alarm in the benchmark;
- ``prediction`` and features (prediction / data drift): KS for numbers, ChiSquare for categories.

What a :class:`schemas.DriftEvent` reports as ``statistic`` / ``threshold`` per detector:

===========  =========================================  ======================================
detector     statistic                                  threshold
===========  =========================================  ======================================
ADWIN        mean of the adaptive window                ``delta``
PageHinkley  the Page-Hinkley statistic                 ``threshold``
KSWIN        p-value of the last KS test (fires below)  ``alpha``
DDM          error rate + its standard deviation        p_min + drift_threshold * s_min
EDDM         (mean + 2 sd of the error distance) / max  ``beta`` (fires below)
PSI, JS, ..  the test statistic                         the test's threshold (critical value)
===========  =========================================  ======================================

>>> from services.runtime.spec import DriftSpec
>>> d = Detector(DriftSpec(detector="PageHinkley", target="error", params={"threshold": 5}, cooldown=10))
>>> fired = [(i, round(d.statistic, 2), d.threshold) for i, x in enumerate([0.0] * 200 + [1.0] * 50) if d.update(x)]
>>> fired, d.name, d.kind
([(205, 5.87, 5.0)], 'PageHinkley', 'concept')
"""

from __future__ import annotations

import math
from typing import Any

from services.monitor.windows import WINDOW_TESTS
from services.runtime.river_models import build_object
from services.runtime.spec import RIVER_DETECTORS, DriftSpec

KIND = {"error": "concept", "prediction": "prediction"}  # anything else is a feature: "data"
BINARY_INPUT = {"DDM", "EDDM"}  # River's binary detectors: 0/1 values only
NUMBERS_ONLY = {"ADWIN", "PageHinkley", "KSWIN", "KS"}


def default_detector(target: str, categorical: bool) -> str:
    """The detector of a spec entry that names none."""
    if target == "error":
        return "ADWIN"
    return "ChiSquare" if categorical else "KS"


class Detector:
    """One spec entry: the River detector or windowed test it names, fed with one value at a time.

    Parameters
    ----------
    spec
        The entry of ``monitor.drift``.
    categorical
        The target's values are categories (a ``str`` feature, the class of a multiclass model).
    """

    def __init__(self, spec: DriftSpec, categorical: bool = False):
        self.spec = spec
        self.name = spec.detector or default_detector(spec.target, categorical)
        self.categorical = categorical
        self.kind = KIND.get(spec.target, "data")
        if categorical and self.name in NUMBERS_ONLY:
            raise ValueError(f"{self.name} needs numbers but {spec.target!r} is categorical: "
                             "use ChiSquare, PSI or JS")
        if self.name in RIVER_DETECTORS:
            self.detector = build_object(RIVER_DETECTORS[self.name], spec.params, "params")
        else:
            options: dict[str, Any] = {"reference_size": spec.reference_size, "window_size": spec.window_size,
                                       "stride": spec.stride, "threshold": spec.threshold, "bins": spec.bins,
                                       "categorical": categorical, "reference_start": spec.reference_start}
            if spec.alpha is not None:
                options["alpha"] = spec.alpha
            self.detector = WINDOW_TESTS[self.name](**options)
        self.seen = 0
        self._quiet_until = 0

    def update(self, value: Any) -> bool:
        """Feed one value; True when drift is detected (and not within the cooldown)."""
        self.seen += 1
        detector = self.detector
        detector.update(value)
        if detector.drift_detected and self.seen >= self._quiet_until:
            self._quiet_until = self.seen + self.spec.cooldown
            return True
        return False

    @property
    def statistic(self) -> float | None:
        d = self.detector
        try:
            if self.name == "ADWIN":
                value = d.estimation
            elif self.name == "PageHinkley":
                value = max(d._sum_increase - d._min_increase, d._max_decrease - d._sum_decrease)
            elif self.name == "KSWIN":
                value = d.p_value
            elif self.name == "DDM":
                p = d._p.get()
                value = p + math.sqrt(p * (1 - p) / d._p.n)
            elif self.name == "EDDM":
                distances = d._error_distances
                value = (distances.mean.get() + 2 * distances.get() ** 0.5) / d._p2s_prime_max
            else:
                value = d.statistic
        except (AttributeError, ZeroDivisionError, TypeError):  # River internals moved: report nothing
            return None
        return _finite(value)

    @property
    def threshold(self) -> float | None:
        d = self.detector
        try:
            if self.name == "ADWIN":
                value = d.delta
            elif self.name == "KSWIN":
                value = d.alpha
            elif self.name == "DDM":
                value = d._p_min + d.drift_threshold * d._s_min
            elif self.name == "EDDM":
                value = d.beta
            else:  # PageHinkley and the windowed tests
                value = d.threshold
        except (AttributeError, TypeError):
            return None
        return _finite(value)


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None
