"""The pipeline spec: one declarative YAML file per pipeline, validated by pydantic.

It declares the event schema, the features, the model (a River pipeline and its parameters), the
label join, the learner's cadence and the monitor's quality window and drift detectors. A bad spec
fails at load with an error naming the field path and its line in the file.

>>> spec = load_spec("phishing")
>>> spec.model.task, len(spec.event.fields)
('binary', 9)
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.runtime.expressions import Expression


class SpecError(ValueError):
    """The pipeline spec is invalid. The message names the field (and line, when known)."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(_Spec):
    type: Literal["float", "int", "bool", "str"]
    required: bool = True
    min: float | None = None
    max: float | None = None
    allow_nan: bool = False
    max_length: int = Field(default=1024, ge=1)
    values: list[str] | None = Field(default=None, description="allowed values of a str field")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> FieldSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class EventSpec(_Spec):
    types: list[str] = Field(default=["event"], min_length=1)
    max_bytes: int = Field(default=65536, ge=64)
    fields: dict[str, FieldSpec] = Field(min_length=1)


class DerivedFeature(_Spec):
    name: str
    expr: str

    @field_validator("expr")
    @classmethod
    def _parses(cls, value: str) -> str:
        Expression(value)  # raises ValueError with the reason
        return value


class FeaturesSpec(_Spec):
    name: str = "default"
    version: int = Field(default=1, ge=1)
    passthrough: Literal["all"] | list[str] = "all"
    derived: list[DerivedFeature] = []


class LabelSpec(_Spec):
    type: Literal["bool", "int", "float", "str"]
    join_ttl_s: float = Field(default=3600.0, gt=0)
    max_pending: int = Field(default=100_000, ge=1, description="bound of the label-join buffer")


Step = dict[str, dict[str, Any]]


class ModelSpec(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    task: Literal["binary", "multiclass", "regression", "anomaly"]
    pipeline: list[Step] = Field(min_length=1)
    anomaly_threshold: float = Field(default=0.8, description="anomaly task: score >= threshold is an anomaly")

    @field_validator("pipeline")
    @classmethod
    def _one_estimator_per_step(cls, steps: list[Step]) -> list[Step]:
        for i, step in enumerate(steps):
            if len(step) != 1:
                raise ValueError(f"step {i} must map exactly one River class to its parameters")
        return steps


class LearnerSpec(_Spec):
    publish_every: int = Field(default=50, ge=1, description="publish a version every N examples")
    publish_interval_s: float = Field(default=1.0, gt=0, description="... or after T seconds")
    checkpoint_every: int = Field(default=500, ge=1)
    checkpoint_interval_s: float = Field(default=5.0, gt=0)
    keep_versions: int = Field(default=20, ge=2)


class DriftSpec(_Spec):
    detector: Literal["ADWIN", "PageHinkley", "KSWIN", "DDM", "EDDM"]
    target: str = Field(description="'error', 'prediction' or a feature name")
    params: dict[str, Any] = {}
    cooldown: int = Field(default=500, ge=0, description="updates to stay quiet after firing")


class MonitorSpec(_Spec):
    quality_window: int = Field(default=200, ge=1)
    quality_interval_s: float = Field(default=2.0, gt=0)
    join_ttl_s: float = Field(default=3600.0, gt=0)
    drift: list[DriftSpec] = []


class PipelineSpec(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    event: EventSpec
    label: LabelSpec
    features: FeaturesSpec = FeaturesSpec()
    model: ModelSpec
    learner: LearnerSpec = LearnerSpec()
    monitor: MonitorSpec = MonitorSpec()

    @model_validator(mode="after")
    def _references_exist(self) -> PipelineSpec:
        fields = set(self.event.fields)
        if self.features.passthrough != "all":
            for i, name in enumerate(self.features.passthrough):
                if name not in fields:
                    raise ValueError(f"features.passthrough.{i}: unknown event field {name!r}")
        known = set(fields)
        for i, derived in enumerate(self.features.derived):
            missing = Expression(derived.expr).names - known
            if missing:
                raise ValueError(f"features.derived.{i}.expr: unknown names {sorted(missing)}")
            known.add(derived.name)
        feature_names = set(self.feature_names())
        for i, drift in enumerate(self.monitor.drift):
            if drift.target not in {"error", "prediction"} | feature_names:
                raise ValueError(f"monitor.drift.{i}.target: unknown target {drift.target!r}")
        return self

    def feature_names(self) -> list[str]:
        names = list(self.event.fields) if self.features.passthrough == "all" else list(
            self.features.passthrough)
        return names + [d.name for d in self.features.derived]

    def spec_hash(self) -> str:
        """Stable hash of the whole spec (recorded in every model version)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]


def bundled_specs() -> list[str]:
    """Names of the specs shipped with streamlearn."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("services.specs").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_spec_path(name_or_path: str) -> Path:
    if name_or_path in bundled_specs():
        return Path(str(resources.files("services.specs") / f"{name_or_path}.yaml"))
    path = Path(name_or_path)
    if not path.is_file():
        raise SpecError(f"spec {name_or_path!r}: no such file and not a bundled spec "
                        f"(bundled: {', '.join(bundled_specs())})")
    return path


def load_spec(name_or_path: str) -> PipelineSpec:
    """Load and validate a spec by bundled name or file path (raises :class:`SpecError`)."""
    path = resolve_spec_path(name_or_path)
    return parse_spec(path.read_text(), source=str(path))


def parse_spec(text: str, source: str = "<spec>") -> PipelineSpec:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a mapping")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [str(part) for part in err["loc"]]
            msg = err["msg"].removeprefix("Value error, ")
            if msg.split(":")[0].count(".") and msg.split(":")[0].split(".")[0] in PipelineSpec.model_fields:
                loc, msg = msg.split(":", 1)[0].split("."), msg.split(":", 1)[1].strip()
            where = ".".join(loc) or "(top level)"
            line = _line_of(root, loc)
            lines.append(f"{source}{f':{line}' if line else ''}: {where}: {msg}")
        raise SpecError("invalid pipeline spec:\n  " + "\n  ".join(lines)) from None


def _line_of(node: yaml.Node | None, loc: list[str]) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of its deepest existing parent)."""
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
            if node is None:
                # the key is missing or misnamed: point at the mapping that should hold it
                return line
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            break
    return node.start_mark.line + 1 if node is not None else line
