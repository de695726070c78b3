"""Feature computation from a validated event: pass-through and derived fields.

One code path for live and replayed events: the CLI's replay produces events to the same topic.
"""

from __future__ import annotations

import math

from services.runtime.expressions import Expression
from services.runtime.messages import Reject
from services.runtime.spec import PipelineSpec


class FeatureComputer:
    def __init__(self, spec: PipelineSpec):
        fs = spec.features
        self.passthrough = list(spec.event.fields) if fs.passthrough == "all" else list(fs.passthrough)
        self.derived = [(d.name, Expression(d.expr)) for d in fs.derived]

    def __call__(self, data: dict[str, object]) -> dict[str, object]:
        features = {name: data.get(name) for name in self.passthrough}
        if self.derived:
            scope = {**data, **features}
            for name, expr in self.derived:
                try:
                    value = expr.evaluate(scope)
                except (ArithmeticError, ValueError, TypeError) as exc:
                    raise Reject("derived_error", f"{expr.source}: {exc}", f"features.{name}", 1) from None
                if isinstance(value, float) and not math.isfinite(value):
                    raise Reject("derived_error", f"{expr.source} is not finite", f"features.{name}", 1)
                features[name] = value
                scope[name] = value
        return features
