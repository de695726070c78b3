"""Drift detectors from River, one per spec entry, with a cooldown so one shift is one alert.

>>> from services.runtime.spec import DriftSpec
>>> d = Detector(DriftSpec(detector="PageHinkley", target="error", params={"threshold": 5}, cooldown=10))
>>> fired = [i for i, x in enumerate([0.0] * 200 + [1.0] * 50) if d.update(x)]
>>> fired[:1]
[205]
"""

from __future__ import annotations

from river import drift

from services.runtime.spec import DriftSpec

_DETECTORS = {"ADWIN": drift.ADWIN, "PageHinkley": drift.PageHinkley, "KSWIN": drift.KSWIN,
              "DDM": drift.binary.DDM, "EDDM": drift.binary.EDDM}
KIND = {"error": "concept", "prediction": "prediction"}


class Detector:
    def __init__(self, spec: DriftSpec):
        self.spec = spec
        self.detector = _DETECTORS[spec.detector](**spec.params)
        self.kind = KIND.get(spec.target, "data")
        self.seen = 0
        self._quiet_until = 0

    def update(self, value: float) -> bool:
        """Feed one value; True when drift is detected (and not within the cooldown)."""
        self.seen += 1
        self.detector.update(value)
        if self.detector.drift_detected and self.seen >= self._quiet_until:
            self._quiet_until = self.seen + self.spec.cooldown
            return True
        return False

    @property
    def statistic(self) -> float | None:
        for attr in ("estimation", "_mean", "mean"):
            value = getattr(self.detector, attr, None)
            if isinstance(value, int | float):
                return float(value)
        return None

    @property
    def threshold(self) -> float | None:
        for attr in ("delta", "threshold", "alpha", "warm_start"):
            if attr in self.spec.params:
                return float(self.spec.params[attr])
        value = getattr(self.detector, "delta", getattr(self.detector, "threshold", None))
        return float(value) if isinstance(value, int | float) else None
