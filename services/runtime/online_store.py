"""Online feature store: the latest feature vector (pass-through, derived and aggregate features) per
entity, with a TTL and a freshness check at read time.

:class:`OnlineStore` is the narrow interface (``write_batch`` / ``read`` / ``close``);
:class:`RedisOnlineStore` implements it with one round trip per batch: a Lua script that writes an
entity's row only if its event time is not older than the stored one, so a re-delivered or
out-of-order batch never moves an entity backwards in event time.

Freshness: a row expires ``ttl_s`` after its last write (Redis TTL), and a read reports a row whose
event time is more than ``max_age_s`` old as missing (``None``), never as a stale value.
``streamlearn_feature_age_seconds`` observes the event-time age of every row found at read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

import orjson
import redis

from services.runtime.metrics import RuntimeMetrics

AGE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0)


class OnlineStore(Protocol):
    def write_batch(self, rows: Mapping[str, tuple[float, dict[str, Any]]]) -> None:
        """``entity_id -> (event ts, features)``; a row older (in event time) than the stored one is
        ignored, a newer or equally old one replaces it."""

    def read(self, entity_id: str, max_age_s: float | None = None) -> tuple[float, dict[str, Any]] | None:
        """The entity's latest ``(ts, features)``, or ``None`` when missing, expired or older than
        ``max_age_s`` (default: the store's own ``max_age_s``)."""

    def close(self) -> None: ...


# KEYS: one row hash per entity; ARGV: ttl ms, then (ts, row) per key
_WRITE = """
local written = 0
for k = 1, #KEYS do
  local ts = ARGV[2 * k]
  local cur = redis.call('HGET', KEYS[k], 'ts')
  if (not cur) or tonumber(cur) <= tonumber(ts) then
    redis.call('HSET', KEYS[k], 'ts', ts, 'row', ARGV[2 * k + 1])
    redis.call('PEXPIRE', KEYS[k], ARGV[1])
    written = written + 1
  end
end
return written
"""


class RedisOnlineStore:
    """Rows are hashes ``<namespace>:fs:<feature set>:<entity>`` with ``ts`` (event time) and ``row``
    (JSON: ``ts``, ``written`` wall-clock time, ``f`` features)."""

    def __init__(self, client: redis.Redis, namespace: str, feature_set: str, ttl_s: float,
                 max_age_s: float | None = None, metrics: RuntimeMetrics | None = None,
                 service: str = "ingestion"):
        self.redis = client
        self.feature_set = feature_set
        self.prefix = f"{namespace}:fs:{feature_set}:"
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.max_age_s = max_age_s
        self._write = client.register_script(_WRITE)
        self._age = self._reads = None
        if metrics is not None:
            self._age = metrics.histogram("streamlearn_feature_age_seconds",
                                          "Event-time age of the feature vectors read from the online store",
                                          ["service", "feature_set"], buckets=AGE_BUCKETS
                                          ).labels(service, feature_set)
            reads = metrics.counter("streamlearn_feature_store_reads_total",
                                    "Online store reads by result (hit, missing, stale)",
                                    ["service", "feature_set", "result"])
            self._reads = {r: reads.labels(service, feature_set, r) for r in ("hit", "missing", "stale")}

    def write_batch(self, rows: Mapping[str, tuple[float, dict[str, Any]]]) -> None:
        if not rows:
            return
        now = time.time()
        keys, args = [], [self.ttl_ms]
        for entity, (ts, features) in rows.items():
            keys.append(self.prefix + entity)
            args.extend((repr(float(ts)), orjson.dumps({"ts": ts, "written": now, "f": features})))
        self._write(keys=keys, args=args)

    def read(self, entity_id: str, max_age_s: float | None = None) -> tuple[float, dict[str, Any]] | None:
        raw = self.redis.hget(self.prefix + entity_id, "row")
        if raw is None:
            self._count("missing")
            return None
        row = orjson.loads(raw)
        age = max(0.0, time.time() - row["ts"])
        if self._age is not None:
            self._age.observe(age)
        limit = self.max_age_s if max_age_s is None else max_age_s
        if limit is not None and age > limit:
            self._count("stale")
            return None
        self._count("hit")
        return row["ts"], row["f"]

    def _count(self, result: str) -> None:
        if self._reads is not None:
            self._reads[result].inc()

    def close(self) -> None:
        self.redis.close()
