"""``streamlearn models reproduce MODEL VERSION``: rebuild a model version from the Kafka offsets it
learned from (recorded in its lineage) with the learner's own code, and check that it predicts
exactly like the stored, signed artifact."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from confluent_kafka import Consumer
from pydantic import BaseModel

from schemas import Features, Label
from services.learner.core import apply, new_state
from services.runtime.kafka import consumer_config, read_ranges
from services.runtime.messages import Reject, schema_decoder
from services.runtime.registry import ModelRegistry
from services.runtime.settings import KafkaSettings
from services.runtime.spec import PipelineSpec


@dataclass
class Reproduction:
    examples: int
    sample: int
    identical: bool
    max_difference: float
    spec_matches: bool


def _read_ranges(kafka: KafkaSettings, runs: list[list]) -> dict[tuple[str, int], dict[int, bytes]]:
    """Every message of the runs' topic-partitions between the lowest and highest recorded offset."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for topic, partition, start, end in runs:
        a, b = spans.get((topic, partition), (start, end))
        spans[(topic, partition)] = (min(a, start), max(b, end))
    consumer = Consumer(consumer_config(kafka, "streamlearn-reproduce", **{"enable.partition.eof": True}))
    messages: dict[tuple[str, int], dict[int, bytes]] = defaultdict(dict)
    try:
        for msg in read_ranges(consumer, spans, timeout=300):
            messages[(msg.topic(), msg.partition())][msg.offset()] = msg.value() or b""
    finally:
        consumer.close()
    return messages


def reproduce(spec: PipelineSpec, registry: ModelRegistry, kafka: KafkaSettings, model: str, version: int,
              labels_topic: str, sample: int = 200) -> Reproduction:
    meta = registry.meta(model, version)
    lineage = registry.lineage(model, version)
    if lineage is None or lineage.get("truncated"):
        raise RuntimeError(f"{model} v{version}: lineage missing or truncated; not reproducible")
    stored = registry.load(model, version)
    runs = lineage["runs"]
    messages = _read_ranges(kafka, runs)
    decoders = {"labels": schema_decoder(Label), "features": schema_decoder(Features)}
    state = new_state(spec)
    probes: list[dict] = []
    for topic, partition, start, end in runs:
        role = "labels" if topic == labels_topic else "features"
        for offset in range(start, end):
            raw = messages[(topic, partition)].get(offset)
            if raw is None:
                raise RuntimeError(f"{topic}[{partition}]@{offset} is gone (retention?): not reproducible")
            value: BaseModel = decoders[role](raw)
            try:
                apply(state, spec, role, topic, partition, offset, value)
            except Reject:
                pass  # rejected the same way the learner did
            if role == "features":
                probes.append(value.features)
    probes = probes[-sample:]
    worst = 0.0
    identical = True
    for x in probes:
        if spec.model.task == "regression":
            a, b = stored.predict_one(x), state.model.predict_one(x)
            worst = max(worst, abs(a - b))
            identical &= a == b
        else:
            pa, pb = stored.predict_proba_one(x), state.model.predict_proba_one(x)
            worst = max([worst] + [abs(pa.get(k, 0.0) - pb.get(k, 0.0)) for k in set(pa) | set(pb)])
            identical &= pa == pb
    identical &= state.examples_seen == meta["examples_seen"]
    return Reproduction(state.examples_seen, len(probes), identical, worst,
                        meta.get("spec_hash") == spec.spec_hash())
