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


class WindowSpec(_Spec):
    """An event-time window over one entity's events (see ``services/ingestion/windows.py``).

    ``tumbling``: ``[k*size, (k+1)*size)``; ``hopping``: ``[k*step, k*step+size)`` (``size_s`` a
    multiple of ``step_s``); ``sliding``: ``(ts-size, ts]`` relative to each event. An event more than
    ``grace_s`` behind the entity's latest event time is too late for a window that has closed."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]{1,64}$")
    type: Literal["tumbling", "hopping", "sliding"]
    size_s: float = Field(gt=0)
    step_s: float | None = Field(default=None, gt=0, description="hopping windows only: the hop")
    grace_s: float = Field(default=0.0, ge=0, description="how late an event may be and still count")

    @model_validator(mode="after")
    def _step_fits(self) -> WindowSpec:
        if self.type != "hopping":
            if self.step_s is not None:
                raise ValueError(f"step_s is only for hopping windows (this one is {self.type})")
            return self
        if self.step_s is None:
            raise ValueError("a hopping window needs step_s")
        panes = self.size_s / self.step_s
        if self.step_s > self.size_s or abs(panes - round(panes)) > 1e-9:
            raise ValueError(f"size_s ({self.size_s}) must be a multiple of step_s ({self.step_s})")
        if round(panes) > 1000:
            raise ValueError(f"size_s / step_s is {round(panes)}; at most 1000 hops per window")
        return self


class AggregateSpec(_Spec):
    """A per-entity aggregate feature: ``count`` (events, or non-null values of ``field``), ``sum``,
    ``mean``, ``min``, ``max`` (of a numeric field), ``distinct`` (distinct values of a field) over
    ``window``; ``since_last``: seconds since the entity's latest earlier event (no field, no window).
    ``default`` replaces a missing value (empty window, too-late event, first event) in the vector."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    fn: Literal["count", "sum", "mean", "min", "max", "distinct", "since_last"]
    field: str | None = None
    window: str | None = None
    default: float | None = None

    @model_validator(mode="after")
    def _arguments(self) -> AggregateSpec:
        if self.fn == "since_last":
            if self.field is not None or self.window is not None:
                raise ValueError("since_last takes no field and no window")
            return self
        if self.window is None:
            raise ValueError(f"{self.fn} needs a window")
        if self.field is None and self.fn != "count":
            raise ValueError(f"{self.fn} needs a field")
        return self


class StoreSpec(_Spec):
    """The online store: the latest feature vector per entity, expiring ``ttl_s`` after its last
    write; a read reports a vector whose event time is older than ``max_age_s`` as missing."""

    ttl_s: float = Field(default=86400.0, gt=0)
    max_age_s: float | None = Field(default=None, gt=0)


class FeaturesSpec(_Spec):
    name: str = "default"
    version: int = Field(default=1, ge=1)
    passthrough: Literal["all"] | list[str] = "all"
    derived: list[DerivedFeature] = []
    windows: list[WindowSpec] = []
    aggregates: list[AggregateSpec] = []
    state_ttl_s: float = Field(default=7 * 86400.0, gt=0,
                               description="per-entity aggregate state expires this long after its last event")
    store: StoreSpec = StoreSpec()

    @model_validator(mode="after")
    def _windows_exist(self) -> FeaturesSpec:
        windows = {}
        for i, window in enumerate(self.windows):
            if window.name in windows:
                raise ValueError(f"features.windows.{i}.name: duplicate window {window.name!r}")
            if window.size_s + window.grace_s > self.state_ttl_s:
                raise ValueError(f"features.windows.{i}.size_s: size_s + grace_s is longer than state_ttl_s "
                                 f"({self.state_ttl_s})")
            windows[window.name] = window
        names: set[str] = set()
        for i, agg in enumerate(self.aggregates):
            if agg.window is not None and agg.window not in windows:
                raise ValueError(f"features.aggregates.{i}.window: unknown window {agg.window!r}")
            if agg.name in names:
                raise ValueError(f"features.aggregates.{i}.name: duplicate feature {agg.name!r}")
            names.add(agg.name)
        return self

    def check_event_fields(self, event: EventSpec) -> None:
        """Aggregates refer to event fields of the right type and do not shadow other features
        (raises ``ValueError`` naming the spec path)."""
        taken = set(event.fields) if self.passthrough == "all" else set(self.passthrough)
        taken |= {d.name for d in self.derived}
        for i, agg in enumerate(self.aggregates):
            if agg.name in taken:
                raise ValueError(f"features.aggregates.{i}.name: {agg.name!r} is already a feature")
            if agg.field is None:
                continue
            field = event.fields.get(agg.field)
            if field is None:
                raise ValueError(f"features.aggregates.{i}.field: unknown event field {agg.field!r}")
            if agg.fn in ("sum", "mean", "min", "max") and field.type not in ("int", "float"):
                raise ValueError(f"features.aggregates.{i}.field: {agg.fn} needs an int or float field, "
                                 f"{agg.field!r} is {field.type}")

    def store_name(self) -> str:
        """The online store's key part for this feature set (ingestion writes it, the scorer reads it)."""
        return f"{self.name}:v{self.version}"

    def aggregate_names(self) -> list[str]:
        return [a.name for a in self.aggregates]


class LabelSpec(_Spec):
    type: Literal["bool", "int", "float", "str"]
    join_ttl_s: float = Field(default=3600.0, gt=0)
    max_pending: int = Field(default=100_000, ge=1, description="bound of the label-join buffer")


Step = dict[str, dict[str, Any]]


class ChallengerSpec(_Spec):
    """Another model trained on the same stream; served in shadow, promoted when clearly better."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    pipeline: list[Step] = Field(min_length=1)


class PromotionSpec(_Spec):
    """Promote a challenger when its prequential metric over the last ``window`` labelled examples
    beats the champion's by ``margin`` (accuracy for classification, MAE for regression)."""

    window: int = Field(default=500, ge=10)
    margin: float = Field(default=0.02, ge=0)
    min_examples: int = Field(default=500, ge=1, description="examples a challenger must have seen")


class ModelSpec(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    task: Literal["binary", "multiclass", "regression", "anomaly"]
    pipeline: list[Step] = Field(min_length=1)
    anomaly_threshold: float = Field(default=0.8, description="anomaly task: score >= threshold is an anomaly")
    challengers: list[ChallengerSpec] = []
    promotion: PromotionSpec | None = None

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
    on_drift: Literal["ignore", "reset", "challenger"] = Field(
        default="ignore", description="reaction to a concept drift event of the champion: nothing, a fresh "
                                      "champion, or a fresh challenger started at the drift point")


# the monitor's drift detectors: River's streaming detectors (by their River class) and the
# windowed tests against a reference window of services/monitor/windows.py
RIVER_DETECTORS = {"ADWIN": "drift.ADWIN", "PageHinkley": "drift.PageHinkley", "KSWIN": "drift.KSWIN",
                   "DDM": "drift.binary.DDM", "EDDM": "drift.binary.EDDM"}
WINDOW_TESTS = ("PSI", "JS", "KS", "ChiSquare")
_WINDOW_FIELDS = ("reference_size", "reference_start", "window_size", "stride", "bins", "threshold", "alpha")
QUALITY_METRICS = ("accuracy", "log_loss", "roc_auc", "precision", "recall", "f1", "macro_precision",
                   "macro_recall", "macro_f1", "mae", "rmse", "r2")


class DriftSpec(_Spec):
    """One drift detector of the monitor on ``target``: a River detector (parameters in ``params``)
    or a windowed test against a reference window (``reference_size`` ... ``alpha``). Without
    ``detector``: ADWIN on 'error', KS on numbers, ChiSquare on categories."""

    detector: Literal["ADWIN", "PageHinkley", "KSWIN", "DDM", "EDDM", "PSI", "JS", "KS", "ChiSquare"] | None = None
    target: str = Field(description="'error', 'prediction' or a feature name")
    params: dict[str, Any] = Field(default={}, description="constructor parameters of the River detector")
    cooldown: int = Field(default=500, ge=0, description="updates to stay quiet after firing")
    severity: Literal["info", "warning", "critical"] = "warning"
    reference_size: int = Field(default=1000, ge=2, description="values in the reference window")
    reference_start: int = Field(default=0, ge=0, description="values skipped before the reference starts")
    window_size: int = Field(default=500, ge=2, description="values in the window compared with the reference")
    stride: int = Field(default=100, ge=1, description="test every N values")
    bins: int = Field(default=10, ge=2, description="histogram bins (PSI, JS, ChiSquare)")
    threshold: float | None = Field(default=None, gt=0, description="drift when the statistic exceeds it "
                                    "(default: PSI 0.2, JS 0.1, KS and ChiSquare the critical value at alpha)")
    alpha: float | None = Field(default=None, gt=0, lt=1, description="KS, ChiSquare: significance level "
                                "(default 0.001)")

    @model_validator(mode="after")
    def _options_fit_the_detector(self) -> DriftSpec:
        detector = self.detector or ("ADWIN" if self.target == "error" else None)
        if detector in RIVER_DETECTORS:
            misplaced = [f for f in _WINDOW_FIELDS if f in self.model_fields_set]
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)}: only for the windowed tests ({', '.join(WINDOW_TESTS)}); "
                                 f"{detector} takes its parameters in params")
            from services.runtime.river_models import build_object  # River is imported only when needed

            build_object(RIVER_DETECTORS[detector], self.params, "params")  # unknown or invalid parameters
            return self
        if self.params:
            raise ValueError(f"params: only for River's detectors ({', '.join(RIVER_DETECTORS)}); "
                             "a windowed test takes reference_size, window_size, stride, bins, threshold, alpha")
        if self.alpha is not None and detector in ("PSI", "JS"):
            raise ValueError(f"alpha: only for KS and ChiSquare; {detector} fires above threshold")
        if self.alpha is not None and self.threshold is not None:
            raise ValueError("alpha: give either threshold or alpha")
        return self


class CanarySpec(_Spec):
    """Send ``share`` of the entities (by a stable hash of the entity id) to a challenger: its
    prediction is the one consumers get for them, the champion's is then the shadow one."""

    challenger: str
    share: float = Field(gt=0, lt=1)


class ScorerSpec(_Spec):
    shadow: Literal["same", "separate", "off"] = Field(
        default="same", description="challengers' shadow predictions: on the predictions topic (flagged "
                                    "shadow), on '<predictions>-shadow', or not at all")
    canary: CanarySpec | None = None


class QualityThreshold(_Spec):
    """Alert bounds of one quality metric (the rolling figure of each champion version)."""

    min: float | None = Field(default=None, description="alert when the figure falls below (accuracy, f1, ...)")
    max: float | None = Field(default=None, description="alert when the figure rises above (log_loss, mae, ...)")

    @model_validator(mode="after")
    def _one_bound(self) -> QualityThreshold:
        if self.min is None and self.max is None:
            raise ValueError("give min or max (or both)")
        return self


class MonitorSpec(_Spec):
    quality_window: int = Field(default=200, ge=1)
    quality_interval_s: float = Field(default=2.0, gt=0)
    join_ttl_s: float = Field(default=3600.0, gt=0)
    metrics: list[Literal[QUALITY_METRICS]] | None = Field(  # type: ignore[valid-type]
        default=None, min_length=1, description="quality metrics to report (default: all that fit the task)")
    drift: list[DriftSpec] = []
    thresholds: dict[Literal[QUALITY_METRICS], QualityThreshold] = Field(  # type: ignore[valid-type]
        default={}, description="quality alert bounds per metric (exported; alert StreamlearnModelQualityLow)")
    min_label_coverage: float | None = Field(
        default=None, ge=0, le=1,
        description="alert when fewer predictions than this share get their label (StreamlearnLabelCoverageLow)")

    @field_validator("metrics")
    @classmethod
    def _distinct(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError("each metric once")
        return names


class PipelineSpec(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    event: EventSpec
    label: LabelSpec
    features: FeaturesSpec = FeaturesSpec()
    model: ModelSpec
    learner: LearnerSpec = LearnerSpec()
    scorer: ScorerSpec = ScorerSpec()
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
        challengers = [c.name for c in self.model.challengers]
        if len(set(challengers)) != len(challengers):
            raise ValueError("model.challengers: names must be unique")
        if self.scorer.canary and self.scorer.canary.challenger not in challengers:
            raise ValueError(f"scorer.canary.challenger: {self.scorer.canary.challenger!r} is not a challenger "
                             f"of model.challengers ({challengers})")
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
