"""Ingestion: validates raw events and publishes feature vectors.

Consumes: ``events`` (raw JSON bytes, keyed by entity).
Produces: ``features`` (:class:`schemas.Features`, keyed by entity); ``dlq`` for every event that
fails validation (original bytes, reason / field / source in headers).
State: the latest feature vector per entity in the Redis online store (TTL, pipelined writes).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from schemas import Features
from services.ingestion.features import FeatureComputer
from services.ingestion.store import OnlineStore, RedisOnlineStore
from services.ingestion.validation import EventValidator
from services.runtime.messages import Decoder, Incoming, Outgoing, Reject, Rejected, Transient
from services.runtime.metrics import RuntimeMetrics
from services.runtime.redis_client import make_redis
from services.runtime.settings import Settings
from services.runtime.spec import PipelineSpec, load_spec


class IngestionProcessor:
    name = "ingestion"

    def __init__(self, spec: PipelineSpec, settings: Settings, metrics: RuntimeMetrics,
                 store: OnlineStore | None):
        self.spec = spec
        self.events_topic = settings.topics.name("events")
        self.features_topic = settings.topics.name("features")
        self.validate = EventValidator(spec)
        self.compute = FeatureComputer(spec)
        self.store = store
        self.features_out = metrics.counter("streamlearn_ingestion_features_total",
                                            "Feature vectors computed", ["service", "feature_set"])

    def subscriptions(self) -> dict[str, Decoder]:
        return {self.events_topic: self.validate}

    def handle(self, batch: list[Incoming]) -> Iterable[Outgoing | Rejected]:
        now = time.time()
        outputs: list[Outgoing | Rejected] = []
        latest: dict[str, tuple[float, dict]] = {}
        fs = self.spec.features
        for msg in batch:
            event = msg.value
            try:
                features = self.compute(event.data.__dict__)
            except Reject as reject:
                outputs.append(Rejected(msg, reject))
                continue
            outputs.append(Outgoing(self.features_topic, Features(
                event_id=event.event_id, entity_id=event.entity_id, ts=event.ts, feature_set=fs.name,
                feature_set_version=fs.version, features=features, ingested_at=now), event.entity_id))
            previous = latest.get(event.entity_id)
            if previous is None or previous[0] <= event.ts:
                latest[event.entity_id] = (event.ts, features)
        if self.store is not None:
            try:
                self.store.write_batch(latest)
            except redis.RedisError as exc:
                raise Transient(f"online store: {exc}") from exc
        self.features_out.labels(self.name, fs.name).inc(sum(isinstance(o, Outgoing) for o in outputs))
        return outputs

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def build(settings: Settings, metrics: RuntimeMetrics) -> IngestionProcessor:
    spec = load_spec(settings.service.spec)
    store = RedisOnlineStore(make_redis(settings.redis), settings.redis.namespace, spec.features.name,
                             ttl_s=spec.label.join_ttl_s)
    return IngestionProcessor(spec, settings, metrics, store)
