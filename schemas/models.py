"""Topic contracts: one pydantic model per topic family.

Every message carries ``schema_version``. A breaking change to a model bumps its version and shows
as a diff in the generated JSON Schema files (``schemas/json``), which a snapshot test pins.

>>> Label(event_id="e1", entity_id="u1", ts=0.0, label=True).schema_version
1
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FeatureValue = float | int | bool | str | None


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Event(_Message):
    """A raw event as produced by users (topic ``events``, keyed by ``entity_id``).

    ``data`` holds the fields that the pipeline spec declares; ingestion validates them against it.
    ``ts`` is the event time in seconds since the epoch.
    """

    schema_version: Literal[1] = 1
    event_id: str = Field(min_length=1, max_length=256)
    entity_id: str = Field(min_length=1, max_length=256)
    ts: float
    type: str = Field(default="event", min_length=1, max_length=128)
    data: dict[str, Any]


class Label(_Message):
    """The label of an earlier event (topic ``labels``, keyed by ``entity_id``)."""

    schema_version: Literal[1] = 1
    event_id: str = Field(min_length=1, max_length=256)
    entity_id: str = Field(min_length=1, max_length=256)
    ts: float
    label: bool | int | float | str


class Features(_Message):
    """A feature vector computed by ingestion (topic ``features``, keyed by ``entity_id``)."""

    schema_version: Literal[1] = 1
    event_id: str
    entity_id: str
    ts: float
    feature_set: str
    feature_set_version: int
    features: dict[str, FeatureValue]
    ingested_at: float = Field(description="wall-clock time ingestion produced the vector (s)")


class Prediction(_Message):
    """One model's prediction for one event (topic ``predictions``, keyed by ``entity_id``)."""

    schema_version: Literal[1] = 1
    event_id: str
    entity_id: str
    ts: float
    model: str
    model_version: int
    prediction: bool | int | float | str | None
    proba: dict[str, float] | None = None
    score: float | None = None
    scored_at: float
    latency_ms: float = Field(description="event time to scored_at, milliseconds")
    shadow: bool = False


class Stage(StrEnum):
    champion = "champion"
    challenger = "challenger"
    retired = "retired"


class ModelAnnouncement(_Message):
    """A model version published by the learner (compacted topic ``models``, keyed by model name).

    The artifact itself lives in the registry (Redis) under ``artifact_key``; ``signature`` is the
    HMAC-SHA256 of its bytes, which every loader verifies before unpickling.
    """

    schema_version: Literal[1] = 1
    model: str
    version: int = Field(ge=0)
    stage: Stage
    artifact_key: str
    signature: str
    sha256: str
    examples_seen: int = Field(ge=0)
    metrics: dict[str, float] = {}
    spec_hash: str
    created_at: float


class Severity(StrEnum):
    info = "info"
    warning = "warning"
    critical = "critical"


class DriftEvent(_Message):
    """A drift detection by the monitor (topic ``drift``, keyed by model name)."""

    schema_version: Literal[1] = 1
    model: str
    model_version: int | None = None
    detector: str
    kind: Literal["data", "prediction", "concept"]
    target: str = Field(description="feature name, 'prediction' or 'error'")
    statistic: float | None = None
    threshold: float | None = None
    window: int = Field(description="events seen by the detector when it fired")
    severity: Severity
    detected_at: float


class QualityEvent(_Message):
    """Periodic quality of one model version (topic ``quality``, keyed by model name)."""

    schema_version: Literal[1] = 1
    model: str
    model_version: int
    shadow: bool = False
    metric: str
    value: float
    window: int = Field(description="labelled predictions in the rolling window")
    cumulative: float
    labelled: int
    emitted_at: float


class DlqRecord(_Message):
    """How a DLQ message is described: the value is the original bytes, untouched; the reason and
    origin travel in headers named ``streamlearn.<field>``. ``streamlearn tail dlq --json`` prints this
    model."""

    schema_version: Literal[1] = 1
    reason: str
    field: str | None = None
    error: str
    service: str
    source_topic: str
    source_partition: int
    source_offset: int
    expected_schema_version: int | None = None
    key: str | None = None
    value: str = Field(description="the original bytes, decoded as UTF-8 with replacement for display")
