"""``streamlearn models reproduce MODEL VERSION``: rebuild a model version from the Kafka offsets it
learned from (recorded in its lineage) with the learner's own code, and check that it predicts
exactly like the stored, signed artifact."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, TopicPartition
from pydantic import BaseModel

from schemas import Features, Label
from services.learner.core import apply, new_state
from services.runtime.kafka import consumer_config
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
    spans: dict[tuple[str, int], list[int]] = {}
    for topic, partition, start, end in runs:
        span = spans.setdefault((topic, partition), [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    consumer = Consumer(consumer_config(kafka, "streamlearn-reproduce", **{"enable.partition.eof": True}))
    messages: dict[tuple[str, int], dict[int, bytes]] = defaultdict(dict)
    try:
        consumer.assign([TopicPartition(t, p, a) for (t, p), (a, _) in spans.items()])
        done: set[tuple[str, int]] = set()
        while len(done) < len(spans):
            for msg in consumer.consume(1000, 1.0):
                tp = (msg.topic(), msg.partition())
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        done.add(tp)
                        continue
                    raise RuntimeError(str(msg.error()))
                if msg.offset() < spans[tp][1]:
                    messages[tp][msg.offset()] = msg.value() or b""
                if msg.offset() + 1 >= spans[tp][1]:
                    done.add(tp)
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
