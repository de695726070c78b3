"""Quality per model version: rolling and cumulative River metrics over joined (prediction, label).

>>> q = VersionQuality("binary", window=2)
>>> for y_pred, y in [(True, True), (False, True), (True, True)]:
...     q.update(y, y_pred)
>>> q.metric_name, round(q.rolling.get(), 2), round(q.cumulative.get(), 2), q.labelled
('accuracy', 0.5, 0.67, 3)
"""

from __future__ import annotations

from typing import Any

from river import metrics, utils


class VersionQuality:
    def __init__(self, task: str, window: int):
        factory = metrics.MAE if task == "regression" else metrics.Accuracy
        self.metric_name = "mae" if task == "regression" else "accuracy"
        self.rolling = utils.Rolling(factory, window_size=window)
        self.cumulative = factory()
        self.window = window
        self.labelled = 0

    def update(self, y_true: Any, y_pred: Any) -> None:
        self.rolling.update(y_true, y_pred)
        self.cumulative.update(y_true, y_pred)
        self.labelled += 1

    @property
    def in_window(self) -> int:
        return min(self.labelled, self.window)
