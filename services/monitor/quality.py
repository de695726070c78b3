"""Quality of one model version (or of all versions of a model): River metrics over joined
(label, prediction) pairs, on a rolling window of the last ``window`` labelled predictions and
cumulatively, plus the additive sums behind the cumulative figures (exported so that several
monitor replicas can be combined with PromQL ``sum(...) / sum(...)``).

=========== ==============================================================================
task        metrics (River classes)
=========== ==============================================================================
binary      accuracy, log_loss (LogLoss on P(positive)), roc_auc (RollingROCAUC in the window;
            :class:`BinnedROCAUC` cumulatively), precision, recall, f1 (of the positive class)
multiclass  accuracy, log_loss (CrossEntropy on ``proba``), macro_precision, macro_recall, macro_f1
regression  mae, rmse, r2
=========== ==============================================================================

The positive class of a binary task is ``True`` (labels 1 / "true" count as ``True``); its
probability is ``proba["True"]`` (or ``proba["1"]``). Probability metrics skip predictions without
``proba``.

>>> q = VersionQuality("binary", window=3)
>>> for y, p in [(True, 0.9), (False, 0.4), (True, 0.3), (False, 0.2)]:
...     q.update(y, p > 0.5, {"True": p, "False": 1 - p})
>>> for name, (rolling, cumulative) in q.figures().items():
...     print(f"{name:9} {rolling:.2f} {cumulative:.2f}")
accuracy  0.67 0.75
log_loss  0.65 0.51
roc_auc   0.50 0.75
precision 0.00 1.00
recall    0.00 0.50
f1        0.00 0.67
>>> q.labelled, q.in_window, q.sums()["correct"]
(4, 3, 3.0)
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np
from river import metrics

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("accuracy", "log_loss", "roc_auc", "precision", "recall", "f1"),
    "multiclass": ("accuracy", "log_loss", "macro_precision", "macro_recall", "macro_f1"),
    "regression": ("mae", "rmse", "r2"),
    # an anomaly detector judged against labels: its flag like a binary prediction, its score as P(anomaly)
    "anomaly": ("accuracy", "roc_auc", "precision", "recall", "f1"),
}

# metrics that read a shared confusion matrix: updated once per pair, read by each
_CM_METRICS = {"accuracy": metrics.Accuracy, "precision": metrics.Precision, "recall": metrics.Recall,
               "f1": metrics.F1, "macro_precision": metrics.MacroPrecision, "macro_recall": metrics.MacroRecall,
               "macro_f1": metrics.MacroF1}
_REGRESSION = {"mae": metrics.MAE, "rmse": metrics.RMSE, "r2": metrics.R2}
_TRUE = {"true", "1", "1.0", "yes"}


class BinnedROCAUC(metrics.base.BinaryMetric):
    """ROC AUC of all the pairs seen, from a histogram of P(positive) per class in ``n_bins`` bins.

    Memory is bounded (two arrays of ``n_bins`` counts) and the value is the exact Mann-Whitney AUC
    of the scores rounded to ``1 / n_bins`` (pairs in the same bin count one half). River's
    ``ROCAUC`` instead interpolates the curve over ``n_thresholds`` (10 by default) points.

    >>> auc = BinnedROCAUC()
    >>> for y, p in [(0, .1), (0, .4), (1, .35), (1, .8)]:
    ...     auc.update(y, p)
    >>> auc.get()
    0.75
    """

    def __init__(self, n_bins: int = 10_000, pos_val: Any = True):
        super().__init__(pos_val=pos_val)
        self.n_bins = n_bins
        self._counts = np.zeros((2, n_bins + 1), dtype=np.int64)  # row 1: positives

    @property
    def requires_labels(self) -> bool:
        return False

    def _bin(self, y_pred: Any) -> int:
        p = y_pred.get(True, 0.0) if isinstance(y_pred, dict) else y_pred
        return int(min(max(p, 0.0), 1.0) * self.n_bins)

    def update(self, y_true: Any, y_pred: Any, w: float = 1.0) -> None:
        self._counts[int(y_true == self.pos_val), self._bin(y_pred)] += 1

    def revert(self, y_true: Any, y_pred: Any, w: float = 1.0) -> None:
        self._counts[int(y_true == self.pos_val), self._bin(y_pred)] -= 1

    def get(self) -> float:
        neg, pos = self._counts
        n_neg, n_pos = neg.sum(), pos.sum()
        if not n_neg or not n_pos:
            return 0.0
        below = np.cumsum(neg) - neg  # negatives strictly below each bin
        return float((pos * (below + neg / 2)).sum() / (n_neg * n_pos))


class VersionQuality:
    """Rolling and cumulative quality of one stream of (label, prediction) pairs.

    Parameters
    ----------
    task
        ``binary``, ``multiclass``, ``regression`` or ``anomaly`` (judged as binary).
    window
        Labelled predictions in the rolling window.
    names
        Metrics to compute (default: all of :data:`TASK_METRICS` for the task).
    """

    def __init__(self, task: str, window: int, names: tuple[str, ...] | list[str] | None = None):
        self.task = "binary" if task == "anomaly" else task
        self.window = window
        self.names = tuple(names or TASK_METRICS[task])
        unknown = set(self.names) - set(TASK_METRICS[task])
        if unknown:
            raise ValueError(f"metrics {sorted(unknown)} do not fit a {task} task (use {TASK_METRICS[task]})")
        self.labelled = 0
        self.predicted = 0
        self._pairs: collections.deque = collections.deque()
        self._rolling: dict[str, Any] = {}
        self._cumulative: dict[str, Any] = {}
        if self.task == "regression":
            for name in self.names:
                self._rolling[name], self._cumulative[name] = _REGRESSION[name](), _REGRESSION[name]()
            self._cms = ()
        else:
            self._cms = (metrics.ConfusionMatrix(), metrics.ConfusionMatrix())
            for name in self.names:
                if name in _CM_METRICS:
                    self._rolling[name] = _CM_METRICS[name](cm=self._cms[0])
                    self._cumulative[name] = _CM_METRICS[name](cm=self._cms[1])
            self._proba = "log_loss" in self.names or "roc_auc" in self.names
            loss = metrics.LogLoss if self.task == "binary" else metrics.CrossEntropy
            if "log_loss" in self.names:
                self._rolling["log_loss"], self._cumulative["log_loss"] = loss(), loss()
            if "roc_auc" in self.names:
                self._rolling["roc_auc"] = metrics.RollingROCAUC(window_size=window)
                self._cumulative["roc_auc"] = BinnedROCAUC()
        self._with_proba = 0  # pairs with a probability, in the window
        # additive sums of the cumulative figures (see sums())
        self._correct = self._loss = self._n_proba = 0.0
        self._tp = self._fp = self._fn = 0.0
        self._abs = self._sq = self._y_pos = self._y_neg = self._y_sq = 0.0

    # ---- updates ---------------------------------------------------------------------------------

    def update(self, y_true: Any, y_pred: Any, proba: dict[str, float] | None = None) -> None:
        """One labelled prediction (``y_pred`` None is ignored: nothing was predicted)."""
        if y_pred is None:
            return
        if self.task == "regression":
            pair = (float(y_true), float(y_pred), None)  # raises on a label that is not a number
            self._add_regression(*pair)
        else:
            pair = self._classification_pair(y_true, y_pred, proba)
            self._add_classification(*pair)
        self.labelled += 1
        self._pairs.append(pair)
        if len(self._pairs) > self.window:
            self._revert(*self._pairs.popleft())

    def _classification_pair(self, y_true: Any, y_pred: Any, proba: dict[str, float] | None) -> tuple:
        if self.task == "binary":
            y, yp = as_positive(y_true), as_positive(y_pred)
            return y, yp, None if proba is None or not self._proba else positive_proba(proba)
        return str(y_true), str(y_pred), (proba or None) if self._proba else None

    def _add_classification(self, y: Any, yp: Any, p: Any) -> None:
        rolling, cumulative = self._rolling, self._cumulative
        for cm in self._cms:
            cm.update(y, yp)
        self._correct += y == yp
        if self.task == "binary":
            self._tp += y and yp
            self._fp += yp and not y
            self._fn += y and not yp
        if p is None:
            return
        self._with_proba += 1
        if "log_loss" in rolling:
            rolling["log_loss"].update(y, p)
            cumulative["log_loss"].update(y, p)
            self._loss += _log_loss(y, p)
        self._n_proba += 1
        if "roc_auc" in rolling:
            rolling["roc_auc"].update(y, p)
            cumulative["roc_auc"].update(y, p)

    def _add_regression(self, y: float, yp: float, _: None) -> None:
        for name in self.names:
            self._rolling[name].update(y, yp)
            self._cumulative[name].update(y, yp)
        error = y - yp
        self._abs += abs(error)
        self._sq += error * error
        if y >= 0:
            self._y_pos += y
        else:
            self._y_neg -= y
        self._y_sq += y * y

    def _revert(self, y: Any, yp: Any, p: Any) -> None:
        if self.task == "regression":
            for name in self.names:
                self._rolling[name].revert(y, yp)
            return
        self._cms[0].revert(y, yp)
        if p is not None:
            self._with_proba -= 1
            if "log_loss" in self._rolling:
                self._rolling["log_loss"].revert(y, p)
            # RollingROCAUC keeps its own window of the last `window` pairs with a probability

    # ---- reading ---------------------------------------------------------------------------------

    @property
    def in_window(self) -> int:
        return len(self._pairs)

    def figures(self) -> dict[str, tuple[float, float]]:
        """metric -> (rolling, cumulative); metrics that need ``proba`` appear once one had it."""
        out = {}
        for name in self.names:
            if name in ("log_loss", "roc_auc") and not self._with_proba:
                continue  # no prediction in the window had probabilities
            out[name] = (float(self._rolling[name].get()), float(self._cumulative[name].get()))
        return out

    def sums(self) -> dict[str, float]:
        """Additive terms of the cumulative figures: summed over monitor replicas they give the
        combined figure (accuracy = correct / labelled, log_loss = log_loss / labelled_proba,
        precision = tp / (tp + fp), recall = tp / (tp + fn), mae = abs_error / labelled,
        rmse = sqrt(squared_error / labelled), r2 = 1 - squared_error / (label_squared -
        (label_sum_pos - label_sum_neg)^2 / labelled))."""
        out = {"predicted": float(self.predicted), "labelled": float(self.labelled)}
        if self.task == "regression":
            out.update(abs_error=self._abs, squared_error=self._sq, label_sum_pos=self._y_pos,
                       label_sum_neg=self._y_neg, label_squared=self._y_sq)
            return out
        out["correct"] = float(self._correct)
        if "log_loss" in self.names:
            out.update(log_loss=self._loss, labelled_proba=self._n_proba)
        if self.task == "binary":
            out.update(tp=float(self._tp), fp=float(self._fp), fn=float(self._fn))
        return out


def _log_loss(y: Any, p: Any) -> float:
    """The term River's LogLoss (binary, ``p`` a float) or CrossEntropy (``p`` a dict) averages."""
    q = (p if y else 1.0 - p) if not isinstance(p, dict) else p.get(y, 0.0)
    return -math.log(min(max(q, 1e-15), 1 - 1e-15))


def as_positive(value: Any) -> bool:
    """A binary label or prediction as a bool: True, 1 and "true" / "1" / "yes" are positive."""
    if isinstance(value, str):
        return value.strip().lower() in _TRUE
    return value is True or value == 1


def positive_proba(proba: dict[str, float]) -> float | None:
    """P(positive class) from a prediction's ``proba`` (keys are the classes as strings)."""
    for key in ("True", "true", "1", "1.0"):
        if key in proba:
            return float(proba[key])
    return None
