"""Online feature store: the latest feature vector per entity, with a TTL and a freshness check.

:class:`OnlineStore` is the narrow interface; :class:`RedisOnlineStore` implements it with one
pipelined round trip per batch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

import orjson
import redis


class OnlineStore(Protocol):
    def write_batch(self, rows: Mapping[str, tuple[float, dict[str, Any]]]) -> None:
        """``entity_id -> (event ts, features)``; the latest row per entity wins."""

    def read(self, entity_id: str, max_age_s: float | None = None) -> tuple[float, dict[str, Any]] | None:
        """The entity's latest (ts, features), or ``None`` when missing or older than ``max_age_s``."""

    def close(self) -> None: ...


class RedisOnlineStore:
    def __init__(self, client: redis.Redis, namespace: str, feature_set: str, ttl_s: float):
        self.redis = client
        self.prefix = f"{namespace}:fs:{feature_set}:"
        self.ttl_ms = max(1, int(ttl_s * 1000))

    def write_batch(self, rows: Mapping[str, tuple[float, dict[str, Any]]]) -> None:
        if not rows:
            return
        pipe = self.redis.pipeline(transaction=False)
        now = time.time()
        for entity, (ts, features) in rows.items():
            pipe.set(self.prefix + entity, orjson.dumps({"ts": ts, "written": now, "f": features}),
                     px=self.ttl_ms)
        pipe.execute()

    def read(self, entity_id: str, max_age_s: float | None = None) -> tuple[float, dict[str, Any]] | None:
        raw = self.redis.get(self.prefix + entity_id)
        if raw is None:
            return None
        row = orjson.loads(raw)
        if max_age_s is not None and time.time() - row["written"] > max_age_s:
            return None
        return row["ts"], row["f"]

    def close(self) -> None:
        self.redis.close()
