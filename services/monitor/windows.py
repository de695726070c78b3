"""Windowed distribution tests against a reference window, with River's drift-detector contract.

The first ``reference_size`` values (after skipping ``reference_start``) form the reference. Then,
every ``stride`` values, the last ``window_size`` values are compared with it; ``drift_detected`` is
True after the update at which the statistic exceeded ``threshold``. The next update starts a new
reference from the values that follow (as River's detectors reset after a detection), so one shift
fires once instead of at every later window.

=========  =====================================================  ==================================
test       statistic                                              default threshold
=========  =====================================================  ==================================
PSI        population stability index over bins                   0.2 (the usual "significant shift")
JS         Jensen-Shannon distance (base 2, in [0, 1]) over bins  0.1
KS         two-sample Kolmogorov-Smirnov D (numbers only)         critical D at ``alpha`` = 0.001
ChiSquare  Pearson chi-square, reference vs window counts         critical value at ``alpha`` = 0.001
=========  =====================================================  ==================================

Bins: for numbers, the reference's deciles (``bins`` quantiles), or its distinct values when it has
no more than ``bins`` of them (flags, small integer codes); for categories (``categorical=True``) the
``bins - 1`` most frequent reference categories. Values outside the reference's categories fall in
one more "other" bin. Per update the cost is O(1) (a bisection and two counter moves); each check
costs O(bins), or O(window_size log window_size) for KS.

>>> import numpy as np
>>> rng = np.random.default_rng(7)
>>> stream = np.concatenate([rng.normal(0, 1, 3000), rng.normal(1, 1, 1000)])
>>> psi = PSI(reference_size=1000, window_size=500, stride=100)
>>> fired = []
>>> for i, x in enumerate(stream):
...     psi.update(x)
...     if psi.drift_detected:
...         fired.append((i, round(psi.statistic, 2), psi.threshold))
>>> fired
[(3199, 0.27, 0.2)]
"""

from __future__ import annotations

import bisect
import collections
import math
from statistics import NormalDist
from typing import Any

import numpy as np
from river import base

_EPS = 1e-4  # proportions are clipped to this in PSI (an empty bin would make the index infinite)


class ReferenceWindowTest(base.DriftDetector):
    """Base of the windowed tests: reference collection, binning, the sliding window and the schedule.

    Parameters
    ----------
    reference_size
        Values in the reference window.
    window_size
        Values in the current window compared with the reference.
    stride
        Test every ``stride`` values once the window is full (``window_size`` gives tumbling windows).
    threshold
        Drift when the statistic exceeds it (default: the test's, see the module docstring).
    bins
        Bins of the histogram tests (PSI, JS, ChiSquare).
    categorical
        Values are categories (compared by equality) rather than numbers.
    reference_start
        Values to skip before the reference starts (e.g. a model's warm-up).
    """

    default_threshold: float | None = None
    needs_values = False  # KS keeps the raw values of the window, the others bin indexes and counts

    def __init__(self, reference_size: int = 1000, window_size: int = 500, stride: int = 100,
                 threshold: float | None = None, bins: int = 10, categorical: bool = False,
                 reference_start: int = 0):
        super().__init__()
        if min(reference_size, window_size, stride) < 1 or bins < 2 or reference_start < 0:
            raise ValueError("reference_size, window_size and stride must be >= 1, bins >= 2, "
                             "reference_start >= 0")
        self.reference_size = reference_size
        self.window_size = window_size
        self.stride = stride
        self.threshold = self.default_threshold if threshold is None else threshold
        self.bins = bins
        self.categorical = categorical
        self.reference_start = reference_start
        self.statistic: float | None = None
        self.n = 0
        self._reset()
        self._to_skip = reference_start

    def _reset(self) -> None:
        super()._reset()
        self._reference: list[Any] = []
        self._edges: list[float] | None = None  # numeric bins: inner edges
        self._codes: dict[Any, int] | None = None  # discrete bins: value -> bin
        self._ref_counts: np.ndarray | None = None
        self._window: collections.deque = collections.deque()
        self._counts: list[int] = []
        self._since_test = 0
        self._to_skip = 0

    @property
    def ready(self) -> bool:
        """The reference is complete (tests can run)."""
        return self._ref_counts is not None

    def update(self, x: Any) -> None:
        if self._drift_detected:
            self._reset()
        self.n += 1
        if self._to_skip:
            self._to_skip -= 1
            return
        if self._ref_counts is None:
            self._reference.append(x)
            if len(self._reference) == self.reference_size:
                self._freeze_reference()
            return
        window = self._window
        if self.needs_values:  # KS: the raw values
            window.append(x)
            if len(window) > self.window_size:
                window.popleft()
        else:  # the histogram tests: bin indexes and counts per bin
            b = self._bin(x)
            window.append(b)
            self._counts[b] += 1
            if len(window) > self.window_size:
                self._counts[window.popleft()] -= 1
        self._since_test += 1
        if len(self._window) == self.window_size and self._since_test >= self.stride:
            self._since_test = 0
            self.statistic, threshold = self._test()
            self.threshold = threshold
            self._drift_detected = threshold is not None and self.statistic > threshold

    # ---- bins ------------------------------------------------------------------------------------

    def _freeze_reference(self) -> None:
        ref = self._reference
        distinct = collections.Counter(ref)
        if self.categorical or len(distinct) <= self.bins:
            kept = [v for v, _ in distinct.most_common(self.bins - 1 if len(distinct) > self.bins else None)]
            self._codes = {v: i for i, v in enumerate(kept)}
            n_bins = len(kept) + 1  # + "other"
        else:
            qs = np.quantile(np.asarray(ref, dtype=float), np.linspace(0, 1, self.bins + 1)[1:-1])
            self._edges = sorted(set(qs.tolist()))
            n_bins = len(self._edges) + 1
        self._counts = [0] * n_bins
        ref_counts = [0] * n_bins
        for x in ref:
            ref_counts[self._bin(x)] += 1
        self._ref_counts = np.asarray(ref_counts, dtype=float)
        self._reference = []

    def _bin(self, x: Any) -> int:
        if self._codes is not None:
            return self._codes.get(x, len(self._codes))
        return bisect.bisect_right(self._edges, x)

    # ---- the test --------------------------------------------------------------------------------

    def _test(self) -> tuple[float, float | None]:
        """(statistic, threshold) for the current window."""
        raise NotImplementedError

    def _proportions(self) -> tuple[np.ndarray, np.ndarray]:
        ref = self._ref_counts
        return ref / ref.sum(), np.asarray(self._counts, dtype=float) / len(self._window)


class PSI(ReferenceWindowTest):
    """Population stability index: sum over bins of (window - reference) * ln(window / reference)."""

    default_threshold = 0.2

    def _test(self) -> tuple[float, float | None]:
        p, q = (np.clip(a, _EPS, None) for a in self._proportions())
        return float(np.sum((q - p) * np.log(q / p))), self.threshold


class JS(ReferenceWindowTest):
    """Jensen-Shannon distance (the square root of the divergence, base 2) between the histograms."""

    default_threshold = 0.1

    def _test(self) -> tuple[float, float | None]:
        p, q = self._proportions()
        m = (p + q) / 2
        divergence = 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
        return math.sqrt(max(divergence, 0.0)), self.threshold


class _SignificanceTest(ReferenceWindowTest):
    """A test whose default threshold is the critical value of its statistic at level ``alpha``."""

    def __init__(self, alpha: float = 0.001, **kwargs: Any):
        if not 0 < alpha < 1:
            raise ValueError("alpha must be in (0, 1)")
        self.alpha = alpha
        self._fixed_threshold = kwargs.get("threshold")
        super().__init__(**kwargs)


class KS(_SignificanceTest):
    """Two-sample Kolmogorov-Smirnov D between the reference and the window (numbers only); the
    default threshold is the asymptotic critical value ``c(alpha) * sqrt((n + m) / (n m))``."""

    needs_values = True

    def __init__(self, alpha: float = 0.001, **kwargs: Any):
        if kwargs.get("categorical"):
            raise ValueError("KS compares numbers: use PSI, JS or ChiSquare for categories")
        super().__init__(alpha=alpha, **kwargs)

    def _test(self) -> tuple[float, float | None]:
        ref = self._reference_sorted
        cur = np.sort(np.fromiter(self._window, dtype=float, count=len(self._window)))
        points = np.concatenate([ref, cur])
        d = np.abs(np.searchsorted(ref, points, side="right") / ref.size
                   - np.searchsorted(cur, points, side="right") / cur.size).max()
        if self._fixed_threshold is not None:
            return float(d), self._fixed_threshold
        n, m = ref.size, cur.size
        return float(d), math.sqrt(-math.log(self.alpha / 2) / 2) * math.sqrt((n + m) / (n * m))

    def _freeze_reference(self) -> None:  # no histogram: the sorted reference
        self._ref_counts = np.zeros(1)
        self._reference_sorted = np.sort(np.asarray(self._reference, dtype=float))
        self._reference = []


class ChiSquare(_SignificanceTest):
    """Pearson's chi-square test of homogeneity on the 2 x bins table of reference and window counts;
    the default threshold is the critical value at ``alpha`` with (non-empty bins - 1) degrees of
    freedom (Wilson-Hilferty approximation)."""

    def _test(self) -> tuple[float, float | None]:
        ref, cur = self._ref_counts, np.asarray(self._counts, dtype=float)
        keep = (ref + cur) > 0
        ref, cur = ref[keep], cur[keep]
        df = ref.size - 1
        if df < 1:
            return 0.0, self._fixed_threshold
        total = ref + cur
        n_ref, n_cur = ref.sum(), cur.sum()
        e_ref, e_cur = total * n_ref / (n_ref + n_cur), total * n_cur / (n_ref + n_cur)
        chi2 = float(np.sum((ref - e_ref) ** 2 / e_ref) + np.sum((cur - e_cur) ** 2 / e_cur))
        if self._fixed_threshold is not None:
            return chi2, self._fixed_threshold
        return chi2, chi2_critical(df, self.alpha)


def chi2_critical(df: int, alpha: float) -> float:
    """Upper ``alpha`` critical value of the chi-square distribution (exact for 1 and 2 degrees of
    freedom, Wilson-Hilferty above).

    >>> round(chi2_critical(9, 0.001), 1)  # exact: 27.88 (within 2 % for every df)
    28.1
    """
    if df == 1:
        return NormalDist().inv_cdf(1 - alpha / 2) ** 2
    if df == 2:
        return -2 * math.log(alpha)  # exact: the chi-square with 2 df is exponential
    z = NormalDist().inv_cdf(1 - alpha)
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log2(p[mask] / q[mask])))


WINDOW_TESTS: dict[str, type[ReferenceWindowTest]] = {"PSI": PSI, "JS": JS, "KS": KS, "ChiSquare": ChiSquare}
