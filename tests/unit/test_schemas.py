"""Topic contracts: the committed JSON Schema files are a snapshot of the pydantic models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

import schemas
from schemas import (
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

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "schemas" / "json"
REGENERATE = "run `streamlearn schemas export schemas/json` and review the diff"

EXAMPLES: dict[str, BaseModel] = {
    "events": Event(event_id="e1", entity_id="u1", ts=1.5, type="page_visit", data={"https": 1.0, "n": 2}),
    "labels": Label(event_id="e1", entity_id="u1", ts=2.0, label=True),
    "features": Features(event_id="e1", entity_id="u1", ts=1.5, feature_set="phishing", feature_set_version=1,
                         features={"a": 0.5, "b": 1, "c": True, "d": "x", "e": None}, ingested_at=3.0),
    "predictions": Prediction(event_id="e1", entity_id="u1", ts=1.5, model="m", model_version=3,
                              prediction=True, proba={"False": 0.25, "True": 0.75}, scored_at=3.5,
                              latency_ms=2000.0),
    "models": ModelAnnouncement(model="m", version=3, stage=Stage.champion, artifact_key="ns:model:m:v:3",
                                signature="ab" * 32, sha256="cd" * 32, examples_seen=10,
                                metrics={"accuracy": 0.9}, spec_hash="0123456789abcdef", created_at=4.0),
    "drift": DriftEvent(model="m", model_version=3, detector="ADWIN", kind="concept", target="error",
                        statistic=0.4, threshold=0.002, window=320, severity=Severity.warning, detected_at=5.0),
    "quality": QualityEvent(model="m", model_version=3, metric="accuracy", value=0.8, window=200,
                            cumulative=0.85, labelled=500, emitted_at=6.0),
    "dlq": DlqRecord(reason="wrong_type", field="data.https", error="Input should be a valid number",
                     service="ingestion", source_topic="events", source_partition=0, source_offset=42,
                     expected_schema_version=1, key="u1", value='{"data": {"https": "a"}}'),
}


def test_registry_covers_every_topic_role_and_examples_cover_the_registry():
    assert set(schemas.TOPIC_SCHEMAS) == {"events", "labels", "features", "predictions", "models", "drift",
                                          "quality", "dlq"}
    assert set(EXAMPLES) == set(schemas.TOPIC_SCHEMAS)
    assert set(schemas.json_schemas()) == set(schemas.TOPIC_SCHEMAS)


def test_exported_json_schemas_match_the_committed_snapshot(tmp_path):
    written = schemas.export(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in tmp_path.iterdir())
    generated = {p.name: p.read_bytes() for p in written}
    committed = {p.name: p.read_bytes() for p in COMMITTED.glob("*.schema.json")}
    missing = sorted(set(generated) - set(committed))
    stale = sorted(set(committed) - set(generated))
    assert not missing, f"schema files missing from schemas/json: {missing}; {REGENERATE}"
    assert not stale, f"schemas/json has files no topic produces: {stale}; {REGENERATE}"
    changed = sorted(name for name in generated if generated[name] != committed[name])
    assert not changed, f"topic contracts changed ({', '.join(changed)}); {REGENERATE}"


def test_export_is_deterministic(tmp_path):
    first = {p.name: p.read_bytes() for p in schemas.export(tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in schemas.export(tmp_path / "b")}
    assert first == second


@pytest.mark.parametrize("role", sorted(schemas.TOPIC_SCHEMAS))
def test_every_topic_schema_has_a_schema_version(role):
    model = schemas.TOPIC_SCHEMAS[role]
    assert "schema_version" in model.model_fields, f"{model.__name__} has no schema_version"
    assert model.model_fields["schema_version"].default == 1
    exported = schemas.json_schemas()[role]
    assert "schema_version" in exported["properties"]
    committed = json.loads((COMMITTED / f"{role}.schema.json").read_text())
    assert "schema_version" in committed["properties"]


@pytest.mark.parametrize("role", sorted(EXAMPLES))
def test_each_model_round_trips_through_json(role):
    model = schemas.TOPIC_SCHEMAS[role]
    original = EXAMPLES[role]
    assert isinstance(original, model)
    raw = original.model_dump_json()
    again = model.model_validate_json(raw)
    assert again == original
    assert again.model_dump(mode="json") == json.loads(raw)
    assert json.loads(raw)["schema_version"] == 1


@pytest.mark.parametrize("role", sorted(EXAMPLES))
def test_models_reject_unknown_fields_and_another_schema_version(role):
    model = schemas.TOPIC_SCHEMAS[role]
    doc = EXAMPLES[role].model_dump(mode="json")
    with pytest.raises(ValidationError):
        model.model_validate({**doc, "surprise": 1})
    with pytest.raises(ValidationError):
        model.model_validate({**doc, "schema_version": 2})


def test_cli_schemas_export_writes_eight_files(tmp_path):
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "schemas", "export", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.glob("*.schema.json"))
    assert len(files) == 8, [f.name for f in files]
    assert sorted(f.name for f in files) == sorted(f"{role}.schema.json" for role in schemas.TOPIC_SCHEMAS)
    for f in files:
        assert f.read_bytes() == (COMMITTED / f.name).read_bytes(), f"{f.name} differs; {REGENERATE}"
        assert str(f) in proc.stdout
