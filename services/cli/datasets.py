"""Example datasets for the demo and the tests, turned into streamlearn events and labels."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from river import datasets


@dataclass(frozen=True, slots=True)
class Example:
    event: dict[str, Any]
    label: dict[str, Any]


_DATASETS = {"phishing": (datasets.Phishing, "page_visit")}


def dataset_for(spec_name: str) -> tuple[Any, str]:
    if spec_name not in _DATASETS:
        raise ValueError(f"no bundled dataset for spec {spec_name!r} (have: {sorted(_DATASETS)})")
    factory, event_type = _DATASETS[spec_name]
    return factory(), event_type


def examples(spec_name: str, limit: int | None = None, run_id: str | None = None,
             entities: int = 97, start_ts: float | None = None) -> Iterator[Example]:
    """Events (``data`` = the dataset's features) and their labels, with unique event ids."""
    dataset, event_type = dataset_for(spec_name)
    run_id = run_id or f"{int(time.time())}"
    start_ts = time.time() if start_ts is None else start_ts
    for i, (x, y) in enumerate(dataset):
        if limit is not None and i >= limit:
            return
        event_id = f"{spec_name}-{run_id}-{i:07d}"
        entity_id = f"entity-{i % entities}"
        ts = start_ts + i * 0.001
        yield Example(
            event={"schema_version": 1, "event_id": event_id, "entity_id": entity_id, "ts": ts,
                   "type": event_type, "data": dict(x)},
            label={"schema_version": 1, "event_id": event_id, "entity_id": entity_id, "ts": ts,
                   "label": y},
        )


def river_reference(spec, limit: int | None, delay: int) -> float:
    """River's own progressive validation of the spec's model on the same data and label delay."""
    from river import evaluate, metrics

    from services.runtime.river_models import build_pipeline

    dataset, _ = dataset_for(spec.name)
    model = build_pipeline(spec.model.pipeline)
    metric = metrics.MAE() if spec.model.task == "regression" else metrics.Accuracy()
    stream = (xy for i, xy in enumerate(dataset) if limit is None or i < limit)
    evaluate.progressive_val_score(stream, model, metric, delay=delay if delay > 0 else None)
    return metric.get()
