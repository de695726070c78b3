"""Ingestion: validates raw events and publishes feature vectors.

Consumes: ``events`` (raw JSON bytes, keyed by entity).
Produces: ``features`` (:class:`schemas.Features`, keyed by entity): pass-through and derived fields
and, when the spec declares them, windowed per-entity aggregates by event time; ``dlq`` for every
event that fails validation (original bytes, reason / field / source in headers). Every event yields
one of the two.
State: per-entity aggregate state in Redis, applied exactly once per source offset (see
:mod:`services.ingestion.state`), and the latest feature vector per entity in the Redis online store
(TTL, freshness check, one round trip per batch). ``POST /features`` with ``{"entity_ids": [...]}``
reads the online store.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson
import redis

from schemas import Features
from services.ingestion.features import FeatureComputer
from services.ingestion.state import Item, MemoryStateBackend, RedisStateBackend, StateBackend, WindowedAggregates
from services.ingestion.validation import EventValidator
from services.ingestion.windows import WindowEngine
from services.runtime.http import Route
from services.runtime.messages import Decoder, Incoming, Outgoing, Reject, Rejected, Transient
from services.runtime.metrics import RuntimeMetrics
from services.runtime.online_store import OnlineStore, RedisOnlineStore
from services.runtime.redis_client import make_redis
from services.runtime.settings import Settings
from services.runtime.spec import PipelineSpec, load_spec

MAX_READ_ENTITIES = 100


class IngestionProcessor:
    name = "ingestion"
    # features and DLQ records with the consumed offsets in one Kafka transaction (Apache Kafka): a
    # read_committed reader - the scorer, the learner - sees each event's feature vector once, so the
    # scorer's own transactions give exactly one prediction per event end to end
    exactly_once = True

    def __init__(self, spec: PipelineSpec, settings: Settings, metrics: RuntimeMetrics,
                 store: OnlineStore | None, state: StateBackend | None = None):
        self.spec = spec
        self.events_topic = settings.topics.name("events")
        self.features_topic = settings.topics.name("features")
        self.validate = EventValidator(spec)
        self.compute = FeatureComputer(spec)
        self.store = store
        fs = spec.features
        self.aggregates: WindowedAggregates | None = None
        if fs.aggregates:
            engine = WindowEngine(spec)
            backend = state if state is not None else MemoryStateBackend(engine.state_fields)
            self.aggregates = WindowedAggregates(engine, backend, fs.state_ttl_s, metrics, self.name, fs.name)
        self.features_out = metrics.counter("streamlearn_ingestion_features_total",
                                            "Feature vectors computed", ["service", "feature_set"])
        self.misrouted = metrics.counter(
            "streamlearn_ingestion_misrouted_events_total",
            "Events whose Kafka key is not their entity_id (their entity's state may be split across "
            "partitions)", ["service"]).labels(self.name)

    def subscriptions(self) -> dict[str, Decoder]:
        return {self.events_topic: self.validate}

    # ---- partition ownership: entity state lives with the partition's owner ----------------------

    def assigned(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        if self.aggregates is not None:
            self.aggregates.forget(partitions)
        return {}

    def revoked(self, partitions: list[tuple[str, int]]) -> None:
        if self.aggregates is not None:
            self.aggregates.forget(partitions)

    # ---- one batch ---------------------------------------------------------------------------------

    def handle(self, batch: list[Incoming]) -> Iterable[Outgoing | Rejected]:
        now = time.time()
        fs = self.spec.features
        outputs: list[Outgoing | Rejected | None] = [None] * len(batch)
        latest: dict[str, tuple[float, dict]] = {}
        items: list[Item] = []
        for i, msg in enumerate(batch):
            event = msg.value
            if msg.key is not None and msg.key != event.entity_id.encode():
                self.misrouted.inc()
            data = event.data.__dict__
            try:
                features = self.compute(data)
            except Reject as reject:
                outputs[i] = Rejected(msg, reject)
                continue
            if self.aggregates is not None:
                items.append(Item(i, msg.topic, msg.partition, msg.offset, event.entity_id, event.ts, data, features))
                continue
            outputs[i] = Outgoing(self.features_topic, Features(
                event_id=event.event_id, entity_id=event.entity_id, ts=event.ts, feature_set=fs.name,
                feature_set_version=fs.version, features=features, ingested_at=now), event.entity_id)
            _keep_latest(latest, event.entity_id, event.ts, features)
        if items:
            def render(item: Item, aggregates: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
                event = batch[item.index].value
                features = {**item.base, **aggregates}
                return orjson.dumps({
                    "schema_version": 1, "event_id": event.event_id, "entity_id": event.entity_id,
                    "ts": event.ts, "feature_set": fs.name, "feature_set_version": fs.version,
                    "features": features, "ingested_at": now}), features

            for item, (payload, features) in zip(items, self.aggregates.process(items, render), strict=True):
                outputs[item.index] = Outgoing(self.features_topic, payload, item.entity)
                if features is None:  # replayed from the cache: the vector emitted the first time
                    features = orjson.loads(payload)["features"]
                _keep_latest(latest, item.entity, item.ts, features)
        if self.store is not None:
            try:
                self.store.write_batch(latest)
            except redis.RedisError as exc:
                raise Transient(f"online store: {exc}") from exc
        self.features_out.labels(self.name, fs.name).inc(sum(isinstance(o, Outgoing) for o in outputs))
        return outputs  # type: ignore[return-value]

    # ---- online store reads ------------------------------------------------------------------------

    def routes(self) -> dict[tuple[str, str], Route]:
        return {("POST", "/features"): self._read_features}

    def _read_features(self, body: bytes) -> tuple[int, str, bytes]:
        """``{"entity_ids": [...]}`` -> ``{entity_id: {"ts": ..., "features": {...}} or null}``;
        missing, expired and stale vectors are ``null``."""
        try:
            request = orjson.loads(body)
            ids = request["entity_ids"]
            if not (isinstance(ids, list) and all(isinstance(e, str) for e in ids)):
                raise TypeError("entity_ids must be a list of strings")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            return 400, "application/json", orjson.dumps({"error": f"expected {{\"entity_ids\": [...]}}: {exc}"})
        if self.store is None:
            return 404, "application/json", orjson.dumps({"error": "this ingestion has no online store"})
        if len(ids) > MAX_READ_ENTITIES:
            return 400, "application/json", orjson.dumps({"error": f"at most {MAX_READ_ENTITIES} entity_ids"})
        out = {}
        for entity in ids:
            row = self.store.read(entity)
            out[entity] = None if row is None else {"ts": row[0], "features": row[1]}
        return 200, "application/json", orjson.dumps(out)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.aggregates is not None:
            self.aggregates.backend.close()


def _keep_latest(latest: dict[str, tuple[float, dict]], entity: str, ts: float, features: dict) -> None:
    previous = latest.get(entity)
    if previous is None or previous[0] <= ts:
        latest[entity] = (ts, features)


def build(settings: Settings, metrics: RuntimeMetrics) -> IngestionProcessor:
    spec = load_spec(settings.service.spec)
    fs = spec.features
    client = make_redis(settings.redis)
    namespace = settings.redis.namespace
    store = RedisOnlineStore(client, namespace, fs.store_name(), ttl_s=fs.store.ttl_s,
                             max_age_s=fs.store.max_age_s, metrics=metrics)
    state = None
    if fs.aggregates:
        state = RedisStateBackend(client, f"{namespace}:agg:{fs.name}:v{fs.version}:",
                                  WindowEngine(spec).state_fields, fs.state_ttl_s)
    return IngestionProcessor(spec, settings, metrics, store, state)
