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


class Sensors:
    """A synthetic sensor stream for anomaly detection: three readings around a slow cycle, 2% of
    them anomalous (a large excursion on one reading); the label says which. Seeded, so the same
    stream every time.

    >>> x, y = next(iter(Sensors(n=1)))
    >>> sorted(x), y
    (['pressure', 'temperature', 'vibration'], False)
    """

    def __init__(self, n: int = 2000, seed: int = 42, anomaly_rate: float = 0.02):
        self.n, self.seed, self.anomaly_rate = n, seed, anomaly_rate

    def __iter__(self):
        import math
        import random

        rng = random.Random(self.seed)
        for i in range(self.n):
            phase = math.sin(i / 50)
            x = {"temperature": 0.5 + 0.1 * phase + rng.gauss(0, 0.02),
                 "vibration": 0.3 + rng.gauss(0, 0.03),
                 "pressure": 0.6 - 0.05 * phase + rng.gauss(0, 0.02)}
            anomalous = i > 100 and rng.random() < self.anomaly_rate
            if anomalous:
                name = rng.choice(sorted(x))
                x[name] = min(1.0, max(0.0, x[name] + rng.choice((-1, 1)) * rng.uniform(0.3, 0.45)))
            yield {k: min(1.0, max(0.0, v)) for k, v in x.items()}, anomalous


_DATASETS = {
    "phishing": (datasets.Phishing, "page_visit"),
    "image_segments": (datasets.ImageSegments, "image_region"),
    "trump_approval": (datasets.TrumpApproval, "poll_day"),
    "sensors": (Sensors, "reading"),
}


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
    if spec.model.task == "anomaly":
        raise ValueError("progressive validation needs a supervised task")
    model = build_pipeline(spec.model.pipeline)
    metric = metrics.MAE() if spec.model.task == "regression" else metrics.Accuracy()
    stream = (xy for i, xy in enumerate(dataset) if limit is None or i < limit)
    evaluate.progressive_val_score(stream, model, metric, delay=delay if delay > 0 else None)
    return metric.get()
