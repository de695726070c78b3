"""streamlearn topic contracts (pydantic v2). See :mod:`schemas.models` and :mod:`schemas.registry`."""

from schemas.models import (
    DlqRecord,
    DriftEvent,
    Event,
    Features,
    Label,
    ModelAnnouncement,
    Prediction,
    QualityEvent,
    Severity,
    Stage,
)
from schemas.registry import TOPIC_SCHEMAS, export, json_schemas

__all__ = [
    "DlqRecord", "DriftEvent", "Event", "Features", "Label", "ModelAnnouncement", "Prediction",
    "QualityEvent", "Severity", "Stage", "TOPIC_SCHEMAS", "export", "json_schemas",
]
