"""The delayed-label join: items (feature vectors in the learner, predictions in the monitor) wait
for their label and labels for their items, by ``event_id``, in a buffer bounded by event-time TTL
and by size. In the learner the buffer is part of the checkpoint, so a restart neither forgets a
waiting example nor learns one twice.

>>> join = LabelJoin(ttl_s=10, max_pending=100)
>>> join.add_item("e1", 1.0, {"x": 1})
>>> join.add_label("e1", 5.0, True)
({'x': 1}, True, 4.0)
>>> join.add_label("e2", 20.0, False)   # label first: held
>>> join.add_item("e3", 40.0, {"x": 2}) # event time moved 20 s past e2: e2 expires
>>> join.expired_labels
1
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class LabelJoin:
    def __init__(self, ttl_s: float, max_pending: int):
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self.features: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self.labels: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self.watermark = float("-inf")
        self.expired_features = 0
        self.expired_labels = 0
        self.duplicates = 0

    def add_item(self, event_id: str, ts: float, x: Any) -> tuple[Any, Any, float] | None:
        """Returns (item, label, label delay) when the label was waiting, else holds the item."""
        self._advance(ts)
        if event_id in self.labels:
            label_ts, y = self.labels.pop(event_id)
            return x, y, label_ts - ts
        if event_id in self.features:
            self.duplicates += 1
            return None
        self.features[event_id] = (ts, x)
        self._bound()
        return None

    def add_label(self, event_id: str, ts: float, y: Any) -> tuple[Any, Any, float] | None:
        """Returns (item, label, label delay) when the item was waiting, else holds the label."""
        self._advance(ts)
        if event_id in self.features:
            feature_ts, x = self.features.pop(event_id)
            return x, y, ts - feature_ts
        if event_id in self.labels:
            self.duplicates += 1
            return None
        self.labels[event_id] = (ts, y)
        self._bound()
        return None

    def _advance(self, ts: float) -> None:
        if ts <= self.watermark:
            return
        self.watermark = ts
        horizon = ts - self.ttl_s
        for buffer, kind in ((self.features, "features"), (self.labels, "labels")):
            while buffer:
                oldest = next(iter(buffer.values()))[0]
                if oldest >= horizon:
                    break
                buffer.popitem(last=False)
                self._expired(kind)

    def _bound(self) -> None:
        while len(self.features) + len(self.labels) > self.max_pending:
            buffer, kind = ((self.features, "features") if len(self.features) >= len(self.labels)
                            else (self.labels, "labels"))
            buffer.popitem(last=False)
            self._expired(kind)

    def _expired(self, kind: str) -> None:
        if kind == "features":
            self.expired_features += 1
        else:
            self.expired_labels += 1

    def __len__(self) -> int:
        return len(self.features) + len(self.labels)
