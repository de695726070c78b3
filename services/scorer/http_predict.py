"""``POST /predict`` on the scorer: features of an entity from the online store, merged with the
request's own fields, scored by the current champion.

Request: ``{"entity_id": "u1", "features": {"https": 1.0}}`` (``features`` optional). Answers:
200 with the prediction, model version and feature freshness; 400 for a body that is not a JSON
object of that shape; 404 when the entity has no fresh features and the request does not bring them
all; 503 when the store cannot be read. Bodies over 64 KiB are refused (413) by the HTTP server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.runtime.online_store import OnlineStore
from services.scorer.models import Served

FeatureValue = float | int | bool | str | None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entity_id: str = Field(min_length=1, max_length=256)
    features: dict[str, FeatureValue] = Field(default_factory=dict, max_length=1000)


def _json(status: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", orjson.dumps(body)


class PredictRoute:
    def __init__(self, store: OnlineStore, served: Callable[[], Served], task: str, feature_names: list[str],
                 predict: Callable, threshold: float, latency):
        self.store = store
        self.served = served
        self.task = task
        self.feature_names = feature_names
        self.predict = predict
        self.threshold = threshold
        self.latency = latency

    def __call__(self, body: bytes) -> tuple[int, str, bytes]:
        started = time.perf_counter()
        try:
            return self._handle(body)
        finally:
            self.latency.observe(time.perf_counter() - started)

    def _handle(self, body: bytes) -> tuple[int, str, bytes]:
        try:
            request = PredictRequest.model_validate_json(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            return _json(400, {"error": err["msg"], "field": ".".join(map(str, err["loc"])) or None})
        try:
            row = self.store.read(request.entity_id)
        except redis.RedisError:
            return _json(503, {"error": "online store unavailable"})
        stored_ts, stored = row if row is not None else (None, {})
        x = {**stored, **request.features}
        missing = [name for name in self.feature_names if x.get(name) is None]
        if row is None and missing:
            return _json(404, {"error": "no fresh features for this entity (unknown or stale)",
                               "entity_id": request.entity_id, "missing": missing})
        served = self.served()
        prediction, proba, score = self.predict(served.model, self.task, {k: v for k, v in x.items() if v is not None},
                                                self.threshold)
        return _json(200, {
            "entity_id": request.entity_id, "model": served.name, "model_version": served.version,
            "prediction": prediction, "proba": proba, "score": score,
            "features_ts": stored_ts, "feature_age_s": None if stored_ts is None else max(0.0, time.time() - stored_ts),
            "features_from_request": sorted(request.features), "missing": missing,
        })
