"""Build River estimators from the spec's declarative pipelines.

A step is ``{"module.Class": {param: value}}`` where ``module`` is a River submodule. A parameter
whose value is itself a one-key mapping naming a River class is built the same way, so optimizers
and base models can be nested. Unknown classes or parameters fail with :class:`ModelSpecError`.

>>> model = build_pipeline([{"preprocessing.StandardScaler": {}},
...                         {"linear_model.LogisticRegression": {"optimizer": {"optim.SGD": {"lr": 0.1}}}}])
>>> type(model).__name__, model.steps["LogisticRegression"].optimizer.lr.learning_rate
('Pipeline', 0.1)
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

from river import base, compose

_CLASS = re.compile(r"^[a-z_]+(\.[a-z_]+)*\.[A-Z][A-Za-z0-9_]*$")


class ModelSpecError(ValueError):
    """The spec names a River class or parameter that does not exist or does not fit."""


def _is_class_ref(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and bool(_CLASS.match(next(iter(value))))


def build_object(ref: str, params: dict[str, Any] | None, where: str) -> Any:
    """Instantiate ``river.<ref>`` with ``params`` (nested class references are built too)."""
    if not _CLASS.match(ref):
        raise ModelSpecError(f"{where}: {ref!r} is not of the form 'module.Class'")
    module_name, _, class_name = ref.rpartition(".")
    try:
        module = importlib.import_module(f"river.{module_name}")
        cls = getattr(module, class_name)
    except (ImportError, AttributeError):
        raise ModelSpecError(f"{where}: river has no {ref!r}") from None
    if not inspect.isclass(cls):
        raise ModelSpecError(f"{where}: river.{ref} is not a class")
    params = dict(params or {})
    for key, value in params.items():
        if _is_class_ref(value):
            (sub_ref, sub_params), = value.items()
            params[key] = build_object(sub_ref, sub_params, f"{where}.{key}")
    accepted = inspect.signature(cls).parameters
    has_kwargs = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in params if k not in accepted and not has_kwargs]
    if unknown:
        raise ModelSpecError(f"{where}: river.{ref} has no parameter(s) {unknown}; "
                             f"it takes {sorted(k for k in accepted if k not in ('self',))}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ModelSpecError(f"{where}: river.{ref}({params}) failed: {exc}") from None


def build_pipeline(steps: list[dict[str, dict[str, Any]]], where: str = "model.pipeline") -> base.Estimator:
    """Compose the steps with River's ``|``; a single step is returned as is."""
    built = []
    for i, step in enumerate(steps):
        (ref, params), = step.items()
        obj = build_object(ref, params, f"{where}.{i}")
        if not isinstance(obj, base.Estimator):
            raise ModelSpecError(f"{where}.{i}: river.{ref} is not an estimator")
        built.append(obj)
    model = built[0] if len(built) == 1 else compose.Pipeline(*built)
    return model


def check_task(model: base.Estimator, task: str, where: str = "model") -> None:
    """Fail when the final estimator cannot do ``task``."""
    final = model
    if isinstance(model, compose.Pipeline):
        final = list(model.steps.values())[-1]
    ok = {
        "anomaly": isinstance(final, base.AnomalyDetector),
        "binary": isinstance(final, base.Classifier),
        "multiclass": isinstance(final, base.Classifier) and final._multiclass,
        "regression": isinstance(final, base.Regressor),
    }[task]
    if not ok:
        raise ModelSpecError(f"{where}.task: {type(final).__name__} cannot do {task!r}")
