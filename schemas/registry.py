"""Topic -> schema registry and JSON Schema export."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.models import (
    DlqRecord,
    DriftEvent,
    Event,
    Features,
    Label,
    ModelAnnouncement,
    Prediction,
    QualityEvent,
)

#: One model per topic role. Topic *names* are settings (with a prefix); roles are fixed.
TOPIC_SCHEMAS: dict[str, type[BaseModel]] = {
    "events": Event,
    "labels": Label,
    "features": Features,
    "predictions": Prediction,
    "models": ModelAnnouncement,
    "drift": DriftEvent,
    "quality": QualityEvent,
    "dlq": DlqRecord,
}


def json_schemas() -> dict[str, dict]:
    """JSON Schema of every topic, keyed by topic role.

    >>> sorted(json_schemas())[:3]
    ['dlq', 'drift', 'events']
    """
    return {role: model.model_json_schema(mode="serialization") for role, model in TOPIC_SCHEMAS.items()}


def export(directory: Path) -> list[Path]:
    """Write ``<role>.schema.json`` for every topic into ``directory``; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for role, schema in json_schemas().items():
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        path = directory / f"{role}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
