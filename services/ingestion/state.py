"""Durable per-entity aggregate state: exactly-once updates under at-least-once delivery.

The runtime re-delivers the events after the last committed offset when a process dies or a
partition moves. :class:`WindowedAggregates` makes that harmless. It keeps the entities of its
partitions in memory (a write-through cache) and, per source partition and batch, writes to the
backend in **one atomic step** (a Lua script in Redis):

1. check that the partition's *applied offset* in the store is the one this process computed on
   (compare-and-set: a second writer, e.g. a zombie after a rebalance, makes the step fail, and the
   batch is recomputed from the store's state);
2. write the new state of every entity the batch touched (one hash per entity, with a TTL);
3. cache each emitted feature vector by offset (a sorted set per partition, trimmed and with a TTL);
4. record the batch's last offset as the partition's applied offset.

An event at an offset the store has already applied is **not** applied again: its cached vector is
emitted, byte for byte the first emission. The cache keeps at least the last ``replay_keep``
offsets per partition (far more than the uncommitted tail the runtime can re-deliver); should an
older offset come back anyway, its vector is recomputed from the current state without applying
the event, and ``streamlearn_ingestion_replayed_events_total{result="recomputed"}`` counts it.

Events must be keyed by ``entity_id`` (as the architecture says): then one entity's events are in
one partition, in offset order, and the aggregates are a deterministic function of that order.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from services.ingestion.windows import EntityState, WindowEngine
from services.runtime.messages import Transient
from services.runtime.metrics import RuntimeMetrics

log = logging.getLogger(__name__)

TP = tuple[str, int]


@dataclass(slots=True)
class Item:
    """One validated event on its way through the aggregates."""

    index: int
    topic: str
    partition: int
    offset: int
    entity: str
    ts: float
    data: Mapping[str, Any]
    base: dict[str, Any]


@dataclass(slots=True)
class Snapshot:
    """What :meth:`StateBackend.read` returns, read atomically."""

    applied: dict[TP, int] = field(default_factory=dict)
    replayed: dict[TP, dict[int, bytes]] = field(default_factory=dict)
    states: dict[str, list[bytes | None]] = field(default_factory=dict)


@dataclass(slots=True)
class Write:
    """One partition's batch: apply only if the stored applied offset is still ``basis``."""

    basis: int
    applied: int
    states: dict[str, list[bytes]]
    outputs: list[tuple[int, bytes]]


class StateBackend(Protocol):
    """Where entity states, applied offsets and replay vectors live."""

    def read(self, ranges: Mapping[TP, tuple[int, int]], entities: list[str]) -> Snapshot:
        """Atomically: the applied offset and cached vectors in ``[lo, hi]`` of each partition in
        ``ranges``, and the stored state of each entity (``[None, ...]`` when it has none)."""

    def commit(self, writes: Mapping[TP, Write]) -> dict[TP, bool]:
        """Apply each partition's write atomically; ``False`` where the applied offset moved."""

    def close(self) -> None: ...


# KEYS: applied hash, replay zset, entity hashes...
# ARGV: partition field, basis, applied, state ttl ms, replay ttl ms, trim below (exclusive),
#       number of state fields, the field names, each entity's values, then the batch's replay member
_COMMIT = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if cur ~= tonumber(ARGV[2]) then return {0, cur} end
local nf = tonumber(ARGV[7])
local i = 8 + nf
for k = 3, #KEYS do
  local args = {}
  for j = 1, nf do
    args[#args + 1] = ARGV[7 + j]
    args[#args + 1] = ARGV[i]
    i = i + 1
  end
  redis.call('HSET', KEYS[k], unpack(args))
  redis.call('PEXPIRE', KEYS[k], ARGV[4])
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[i])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1, cur}
"""


def pack_outputs(outputs: list[tuple[int, bytes]]) -> bytes:
    """One replay-cache member for a batch: ``<offset> <length>\\n<payload>`` per vector.

    >>> unpack_outputs(pack_outputs([(7, b"a b"), (9, b"")]))
    {7: b'a b', 9: b''}
    """
    return b"".join(b"%d %d\n%s" % (offset, len(payload), payload) for offset, payload in outputs)


def unpack_outputs(member: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i < len(member):
        newline = member.index(b"\n", i)
        offset, length = member[i:newline].split(b" ")
        start = newline + 1
        out[int(offset)] = member[start:start + int(length)]
        i = start + int(length)
    return out


class RedisStateBackend:
    """Entity state as one hash per entity (``<prefix>e:<entity>``: the watermark and one field per
    window), applied offsets in one hash (``<prefix>applied``, field ``topic:partition``), replay
    vectors in one sorted set per partition (``<prefix>replay:<topic>:<partition>``): one member per
    batch (:func:`pack_outputs`), scored by the batch's last offset."""

    def __init__(self, client: redis.Redis, prefix: str, fields: list[str], state_ttl_s: float,
                 replay_keep: int = 50_000, replay_ttl_s: float = 7 * 86400.0):
        self.redis = client
        self.prefix = prefix
        self.fields = fields
        self.state_ttl_ms = str(max(1, int(state_ttl_s * 1000)))
        self.replay_ttl_ms = str(max(1, int(replay_ttl_s * 1000)))
        self.replay_keep = replay_keep
        self._sha: str | None = None

    def _entity(self, entity: str) -> str:
        return f"{self.prefix}e:{entity}"

    def _replay(self, tp: TP) -> str:
        return f"{self.prefix}replay:{tp[0]}:{tp[1]}"

    @property
    def applied_key(self) -> str:
        return f"{self.prefix}applied"

    def read(self, ranges: Mapping[TP, tuple[int, int]], entities: list[str]) -> Snapshot:
        pipe = self.redis.pipeline(transaction=True)
        tps = list(ranges)
        for tp in tps:
            lo, hi = ranges[tp]
            pipe.hget(self.applied_key, f"{tp[0]}:{tp[1]}")
            pipe.zrangebyscore(self._replay(tp), lo, "+inf")
        for entity in entities:
            pipe.hmget(self._entity(entity), self.fields)
        replies = pipe.execute()
        snap = Snapshot()
        for n, tp in enumerate(tps):
            applied, members = replies[2 * n], replies[2 * n + 1]
            snap.applied[tp] = -1 if applied is None else int(applied)
            lo, hi = ranges[tp]
            cached = {}
            for member in members:
                cached.update((o, v) for o, v in unpack_outputs(member).items() if lo <= o <= hi)
            snap.replayed[tp] = cached
        for entity, values in zip(entities, replies[2 * len(tps):], strict=True):
            snap.states[entity] = values
        return snap

    def commit(self, writes: Mapping[TP, Write]) -> dict[TP, bool]:
        if not writes:
            return {}
        out: dict[TP, bool] = {}
        todo = list(writes)
        for _ in range(2):
            if self._sha is None:
                self._sha = self.redis.script_load(_COMMIT)
            pipe = self.redis.pipeline(transaction=False)
            for tp in todo:
                w = writes[tp]
                keys = [self.applied_key, self._replay(tp), *(self._entity(e) for e in w.states)]
                args: list[Any] = [f"{tp[0]}:{tp[1]}", w.basis, w.applied, self.state_ttl_ms, self.replay_ttl_ms,
                                   w.applied - self.replay_keep + 1, len(self.fields), *self.fields]
                for values in w.states.values():
                    args.extend(values)
                args.append(pack_outputs(w.outputs))
                pipe.evalsha(self._sha, len(keys), *keys, *args)
            unloaded = []
            for tp, reply in zip(todo, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(reply, redis.exceptions.NoScriptError):
                    unloaded.append(tp)  # Redis restarted or flushed its scripts: load and run again
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    out[tp] = bool(reply[0])
            if not unloaded:
                return out
            self._sha, todo = None, unloaded
        raise redis.exceptions.NoScriptError("the commit script cannot be loaded")

    def close(self) -> None:
        self.redis.close()


class MemoryStateBackend:
    """The same contract in memory (unit tests; a single process that need not survive restarts)."""

    def __init__(self, fields: list[str], replay_keep: int = 50_000):
        self.fields = fields
        self.replay_keep = replay_keep
        self.applied: dict[TP, int] = {}
        self.replays: dict[TP, dict[int, bytes]] = {}
        self.states: dict[str, list[bytes]] = {}
        self.commits = 0

    def read(self, ranges: Mapping[TP, tuple[int, int]], entities: list[str]) -> Snapshot:
        snap = Snapshot()
        for tp, (lo, hi) in ranges.items():
            snap.applied[tp] = self.applied.get(tp, -1)
            snap.replayed[tp] = {o: p for o, p in self.replays.get(tp, {}).items() if lo <= o <= hi}
        for entity in entities:
            snap.states[entity] = list(self.states.get(entity, [None] * len(self.fields)))
        return snap

    def commit(self, writes: Mapping[TP, Write]) -> dict[TP, bool]:
        out = {}
        for tp, w in writes.items():
            if self.applied.get(tp, -1) != w.basis:
                out[tp] = False
                continue
            self.states.update(w.states)
            replay = self.replays.setdefault(tp, {})
            replay.update(w.outputs)
            for offset in [o for o in replay if o <= w.applied - self.replay_keep]:
                del replay[offset]
            self.applied[tp] = w.applied
            self.commits += 1
            out[tp] = True
        return out

    def close(self) -> None:
        pass


# (aggregate features) -> (payload bytes, full feature dict)
Render = Callable[[Item, dict[str, Any]], tuple[bytes, dict[str, Any]]]


class _Entry:
    __slots__ = ("state", "tp", "touched")

    def __init__(self, state: EntityState, tp: TP, touched: float):
        self.state, self.tp, self.touched = state, tp, touched


class WindowedAggregates:
    """Applies batches of events to entity states exactly once (see the module docstring)."""

    def __init__(self, engine: WindowEngine, backend: StateBackend, state_ttl_s: float,
                 metrics: RuntimeMetrics | None = None, service: str = "ingestion", feature_set: str = "",
                 max_entities: int = 100_000, max_attempts: int = 5):
        self.engine = engine
        self.backend = backend
        self.state_ttl_s = state_ttl_s
        self.max_entities = max_entities
        self.max_attempts = max_attempts
        self.applied: dict[TP, int] = {}
        self.entities: OrderedDict[str, _Entry] = OrderedDict()
        self.labels = (service, feature_set)
        self.late = self.replayed = self.conflicts = None
        if metrics is not None:
            self.late = metrics.counter(
                "streamlearn_ingestion_late_events_total",
                "Events too late for a window (closed beyond its grace period): not counted in it",
                ["service", "feature_set", "window"])
            self.replayed = metrics.counter(
                "streamlearn_ingestion_replayed_events_total",
                "Re-delivered events whose offsets were already applied: vector from the replay cache "
                "(cached) or recomputed without re-applying (recomputed)",
                ["service", "feature_set", "result"])
            self.conflicts = metrics.counter(
                "streamlearn_ingestion_state_conflicts_total",
                "Batches recomputed because another writer moved a partition's applied offset",
                ["service", "feature_set"])

    # ---- partition ownership ---------------------------------------------------------------------

    def forget(self, tps: list[TP] | set[TP]) -> None:
        """Drop what this process knows of these partitions (revoked, assigned, or a failed step);
        the next batch re-reads it from the backend."""
        tps = set(tps)
        for tp in tps:
            self.applied.pop(tp, None)
        for entity in [e for e, entry in self.entities.items() if entry.tp in tps]:
            del self.entities[entity]

    # ---- one batch ---------------------------------------------------------------------------------

    def process(self, items: list[Item], render: Render) -> list[tuple[bytes, dict[str, Any] | None]]:
        """Payload and features of each item (``None`` features for vectors replayed from the cache)."""
        groups: dict[TP, list[Item]] = {}
        for item in items:
            groups.setdefault((item.topic, item.partition), []).append(item)
        results: dict[int, tuple[bytes, dict[str, Any] | None]] = {}
        pending = dict(groups)
        try:
            for _ in range(self.max_attempts):
                replayed = self._sync(pending)
                writes: dict[TP, Write | None] = {}
                late: dict[TP, Counter] = {}
                reused: dict[TP, Counter] = {}
                for tp, group in pending.items():
                    writes[tp], late[tp], reused[tp] = self._compute(tp, group, replayed.get(tp, {}), render, results)
                outcome = self.backend.commit({tp: w for tp, w in writes.items() if w is not None})
                now = time.time()
                for tp in list(pending):
                    w = writes[tp]
                    if w is not None and not outcome[tp]:
                        if self.conflicts is not None:
                            self.conflicts.labels(*self.labels).inc()
                        log.warning("partition %s:%d was applied by another writer; recomputing", *tp)
                        self.forget([tp])
                        continue
                    if w is not None:
                        self.applied[tp] = w.applied
                        for entity in w.states:
                            if entity in self.entities:
                                self.entities[entity].touched = now
                    self._count(late[tp], reused[tp])
                    del pending[tp]
                if not pending:
                    break
            else:
                raise Transient(f"partitions {sorted(pending)} keep changing under this writer")
        except redis.RedisError as exc:
            self.forget(groups)
            raise Transient(f"aggregate state: {exc}") from exc
        except BaseException:
            self.forget(groups)
            raise
        while len(self.entities) > self.max_entities:
            self.entities.popitem(last=False)
        return [results[item.index] for item in items]

    def _count(self, late: Counter, reused: Counter) -> None:
        if self.late is not None:
            for window, n in late.items():
                self.late.labels(*self.labels, window).inc(n)
        if self.replayed is not None:
            for result, n in reused.items():
                self.replayed.labels(*self.labels, result).inc(n)

    def _sync(self, pending: dict[TP, list[Item]]) -> dict[TP, dict[int, bytes]]:
        """Read what is unknown: applied offsets (and cached vectors) of partitions this process has
        not written last or whose batch starts at an applied offset, and entities not in memory."""
        need = {tp: (g[0].offset, g[-1].offset) for tp, g in pending.items()
                if tp not in self.applied or g[0].offset <= self.applied[tp]}
        if need:
            self.forget(list(need))
        now = time.time()
        missing: dict[str, TP] = {}
        for tp, group in pending.items():
            for item in group:
                entry = self.entities.get(item.entity)
                if entry is not None and now - entry.touched > self.state_ttl_s:
                    del self.entities[item.entity]  # expired in the store too: read what it has
                    entry = None
                if entry is None and item.entity not in missing:
                    missing[item.entity] = tp
        if not need and not missing:
            return {}
        snap = self.backend.read(need, list(missing))
        self.applied.update(snap.applied)
        for entity, values in snap.states.items():
            state = self.engine.decode(values) or self.engine.new_state()
            self.entities[entity] = _Entry(state, missing[entity], now)
        return snap.replayed

    def _compute(self, tp: TP, group: list[Item], replayed: dict[int, bytes], render: Render,
                 results: dict[int, tuple[bytes, dict[str, Any] | None]]
                 ) -> tuple[Write | None, Counter, Counter]:
        applied = self.applied[tp]
        late: Counter = Counter()
        reused: Counter = Counter()
        outputs: list[tuple[int, bytes]] = []
        dirty: dict[str, EntityState] = {}
        for item in group:
            entry = self.entities[item.entity]
            self.entities.move_to_end(item.entity)
            if item.offset <= applied:
                payload = replayed.get(item.offset)
                if payload is not None:
                    results[item.index] = (payload, None)
                    reused["cached"] += 1
                else:
                    results[item.index] = render(item, self.engine.peek(entry.state, item.ts, item.data))
                    reused["recomputed"] += 1
                continue
            features, late_for = self.engine.update(entry.state, item.ts, item.data)
            for window in late_for:
                late[window] += 1
            entry.tp = tp
            payload, full = render(item, features)
            results[item.index] = (payload, full)
            outputs.append((item.offset, payload))
            dirty[item.entity] = entry.state
        if not outputs:
            return None, late, reused
        states = {entity: self.engine.encode(state) for entity, state in dirty.items()}
        return Write(applied, group[-1].offset, states, outputs), late, reused
