"""Per-entity windowed aggregates by event time: the pure computation (no I/O).

Every event of an entity updates that entity's state and gets the aggregates *as of itself*, in the
order the events are processed (offset order: one entity lives in one partition). The result is a
deterministic function of that order, which is what makes a replay, a restart after a crash and a
rebalance produce the same features as an uninterrupted run.

Definitions (``W`` is the entity's watermark: the latest event time it has seen, this event included):

- **tumbling** ``size``: windows ``[k*size, (k+1)*size)``. An event counts in its window unless the
  window has *closed*: ``W >= end + grace``. Its features are the window's aggregates so far.
- **hopping** ``size``/``step``: windows ``[k*step, k*step+size)``; an event belongs to
  ``size/step`` of them. It counts in the ones still open; its features are those of the *oldest
  open* window containing it (the one closest to complete). Tumbling is hopping with step = size.
- **sliding** ``size``: the window ``(ts-size, ts]`` of each event: the events of the entity
  processed so far (this one included) whose time falls in it. An event with ``ts < W - grace``
  is too late: it does not count (no later event sees it).
- **since_last**: ``ts`` minus the entity's watermark before this event (negative when the event is
  out of order: by how much it is late); ``None`` for an entity's first event.

A **too-late** event (its window closed) is not added to that window and gets ``None`` (or the
aggregate's ``default``) for that window's aggregates (it still gets a feature vector, and every
other feature);
``streamlearn_ingestion_late_events_total{window}`` counts it. ``None``, NaN and infinite values of a
field are skipped by the aggregates over that field (``count`` without a field counts events).
Empty aggregates: ``sum`` 0.0, ``count``/``distinct`` 0, ``mean``/``min``/``max`` ``None``.

>>> from services.runtime.spec import parse_spec
>>> spec = parse_spec('''
... name: doc
... event: {fields: {amount: {type: float}}}
... label: {type: bool}
... model: {name: m, task: binary, pipeline: [{linear_model.LogisticRegression: {}}]}
... features:
...   windows: [{name: m1, type: tumbling, size_s: 60, grace_s: 10}]
...   aggregates:
...     - {name: n, fn: count, window: m1}
...     - {name: total, fn: sum, field: amount, window: m1}
...     - {name: gap, fn: since_last}
... ''')
>>> engine = WindowEngine(spec)
>>> state = engine.new_state()
>>> for ts, amount in [(0.0, 1.0), (30.0, 2.0), (65.0, 4.0), (58.0, 8.0), (50.0, 16.0), (75.0, 0.0), (40.0, 0.0)]:
...     print(engine.update(state, ts, {"amount": amount}))
({'n': 1, 'total': 1.0, 'gap': None}, [])
({'n': 2, 'total': 3.0, 'gap': 30.0}, [])
({'n': 1, 'total': 4.0, 'gap': 35.0}, [])
({'n': 3, 'total': 11.0, 'gap': -7.0}, [])
({'n': 4, 'total': 27.0, 'gap': -15.0}, [])
({'n': 2, 'total': 4.0, 'gap': 10.0}, [])
({'n': None, 'total': None, 'gap': -35.0}, ['m1'])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import orjson

from services.runtime.spec import AggregateSpec, PipelineSpec, WindowSpec

META = "m"


class EntityState:
    """One entity's state: its watermark and one state object per window."""

    __slots__ = ("wm", "windows")

    def __init__(self, wm: float | None, windows: list[Any]):
        self.wm = wm
        self.windows = windows

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EntityState) and (self.wm, self.windows) == (other.wm, other.windows)

    def __repr__(self) -> str:
        return f"EntityState(wm={self.wm!r}, windows={self.windows!r})"


class _Window:
    """Common part: which fields the window's aggregates read and how to turn stats into values.

    Per field, stats are ``[non-null count, sum, min, max, set of values or None]``."""

    def __init__(self, spec: WindowSpec, aggs: list[AggregateSpec], numeric: set[str]):
        self.name = spec.name
        self.size = spec.size_s
        self.grace = spec.grace_s
        self.fields = list(dict.fromkeys(a.field for a in aggs if a.field is not None))
        index = {f: i for i, f in enumerate(self.fields)}
        self.numeric = [f in numeric for f in self.fields]
        self.distinct = [any(a.fn == "distinct" and a.field == f for a in aggs) for f in self.fields]
        self.outputs = [(a.name, a.fn, None if a.field is None else index[a.field]) for a in aggs]
        self.names = [a.name for a in aggs]
        self._scratch = self.new_stats()

    def values_of(self, data: Mapping[str, Any]) -> list[Any]:
        out = []
        for f in self.fields:
            v = data.get(f)
            if v.__class__ is float and not -math.inf < v < math.inf:  # NaN and +-inf
                v = None
            out.append(v)
        return out

    def new_stats(self) -> list[list[Any]]:
        return [[0, 0.0, None, None, set() if d else None] for d in self.distinct]

    def scratch(self) -> list[list[Any]]:
        """This window's accumulator for a read, reset (one per window object: no allocation per
        event; the engine is single-threaded and results are copied out as plain values)."""
        acc = self._scratch
        for st, d in zip(acc, self.distinct, strict=True):
            st[0], st[1], st[2], st[3] = 0, 0.0, None, None
            if d:
                st[4] = set()
        return acc

    def add_to_stats(self, stats: list[list[Any]], values: list[Any], start: int = 0) -> None:
        for i, st in enumerate(stats):
            v = values[i + start]
            if v is None:
                continue
            st[0] += 1
            if self.numeric[i]:
                st[1] += v
                if st[2] is None or v < st[2]:
                    st[2] = v
                if st[3] is None or v > st[3]:
                    st[3] = v
            if st[4] is not None:
                st[4].add(v)

    def results(self, out: dict[str, Any], n: int, stats: list[list[Any]]) -> None:
        for name, fn, i in self.outputs:
            if fn == "count":
                out[name] = n if i is None else stats[i][0]
            elif fn == "sum":
                out[name] = stats[i][1]
            elif fn == "mean":
                out[name] = stats[i][1] / stats[i][0] if stats[i][0] else None
            elif fn == "min":
                out[name] = stats[i][2]
            elif fn == "max":
                out[name] = stats[i][3]
            else:  # distinct
                out[name] = len(stats[i][4])

    def none(self, out: dict[str, Any]) -> None:
        for name in self.names:
            out[name] = None


class PaneWindow(_Window):
    """Tumbling and hopping windows, kept as panes of ``step`` seconds: ``{pane index: [n, stats]}``.

    The window starting at pane ``s`` is closed once ``W >= s*step + size + grace``."""

    def __init__(self, spec: WindowSpec, aggs: list[AggregateSpec], numeric: set[str]):
        super().__init__(spec, aggs, numeric)
        self.step = spec.step_s if spec.type == "hopping" else spec.size_s
        self.panes = max(1, round(self.size / self.step))

    def new(self) -> dict[int, list[Any]]:
        return {}

    def update(self, state: dict[int, list[Any]], wm: float, ts: float, values: list[Any],
               out: dict[str, Any]) -> bool:
        """Add the event (unless too late) and write its aggregates into ``out``."""
        step = self.step
        idx = math.floor(ts / step)
        if wm >= idx * step + self.size + self.grace:  # even the newest window containing ts is closed
            self.none(out)
            return False
        pane = state.get(idx)
        if pane is None:
            pane = state[idx] = [0, self.new_stats()]
        pane[0] += 1
        self.add_to_stats(pane[1], values)
        if self.panes == 1:
            self.results(out, pane[0], pane[1])
            return True
        start = idx - self.panes + 1  # the oldest open window containing ts
        while wm >= start * step + self.size + self.grace:
            start += 1
        n, stats = 0, self.scratch()
        for s in range(start, start + self.panes):
            pane = state.get(s)
            if pane is None:
                continue
            n += pane[0]
            for acc, st in zip(stats, pane[1], strict=True):
                acc[0] += st[0]
                acc[1] += st[1]
                if st[2] is not None and (acc[2] is None or st[2] < acc[2]):
                    acc[2] = st[2]
                if st[3] is not None and (acc[3] is None or st[3] > acc[3]):
                    acc[3] = st[3]
                if acc[4] is not None:
                    acc[4] |= st[4]
        self.results(out, n, stats)
        return True

    def evict(self, state: dict[int, list[Any]], wm: float) -> None:
        """Drop panes whose every window is closed (no event can read or change them again)."""
        for idx in [i for i in state if wm >= i * self.step + self.size + self.grace]:
            del state[idx]

    def encode(self, state: dict[int, list[Any]]) -> list[Any]:
        return [[idx, pane[0], [[*st[:4], None if st[4] is None else list(st[4])] for st in pane[1]]]
                for idx, pane in sorted(state.items())]

    def decode(self, data: list[Any]) -> dict[int, list[Any]]:
        return {idx: [n, [[*st[:4], None if st[4] is None else set(st[4])] for st in stats]]
                for idx, n, stats in data}


class SlidingWindow(_Window):
    """``(ts - size, ts]`` per event, kept as the list of ``[ts, *values]`` still reachable."""

    def new(self) -> list[list[Any]]:
        return []

    def update(self, state: list[list[Any]], wm: float, ts: float, values: list[Any],
               out: dict[str, Any]) -> bool:
        if ts < wm - self.grace:
            self.none(out)
            return False
        state.append([ts, *values])
        low = ts - self.size
        n, stats = 0, self.scratch()
        for entry in state:
            if low < entry[0] <= ts:
                n += 1
                self.add_to_stats(stats, entry, 1)
        self.results(out, n, stats)
        return True

    def evict(self, state: list[list[Any]], wm: float) -> None:
        """Drop events no accepted event can see: accepted events have ``ts >= wm - grace``."""
        horizon = (wm - self.grace) - self.size
        state[:] = [entry for entry in state if entry[0] > horizon]

    def encode(self, state: list[list[Any]]) -> list[Any]:
        return state

    def decode(self, data: list[Any]) -> list[list[Any]]:
        return data


class WindowEngine:
    """The aggregates of one pipeline spec: new / update / encode / decode of an entity's state."""

    def __init__(self, spec: PipelineSpec):
        fs = spec.features
        fs.check_event_fields(spec.event)
        numeric = {name for name, f in spec.event.fields.items() if f.type in ("int", "float")}
        by_window: dict[str, list[AggregateSpec]] = {w.name: [] for w in fs.windows}
        for agg in fs.aggregates:
            if agg.window is not None:
                by_window[agg.window].append(agg)
        # only windows some aggregate uses keep state
        self.windows: list[PaneWindow | SlidingWindow] = [
            (SlidingWindow if w.type == "sliding" else PaneWindow)(w, by_window[w.name], numeric)
            for w in fs.windows if by_window[w.name]]
        self.aggregates = list(fs.aggregates)
        self.names = [a.name for a in fs.aggregates]
        #: the fields of an entity's state in the store: the watermark, then one per window
        self.state_fields = [META, *(w.name for w in self.windows)]
        self._since_last = [a.name for a in fs.aggregates if a.fn == "since_last"]
        self._defaults = {a.name: a.default for a in fs.aggregates if a.default is not None}
        natural = [name for w in self.windows for name in w.names] + self._since_last
        self._reorder = natural != self.names

    def new_state(self) -> EntityState:
        return EntityState(None, [w.new() for w in self.windows])

    def update(self, state: EntityState, ts: float, data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Add one event; return its aggregate features (spec order) and the windows it was too late for."""
        before = state.wm
        wm = ts if before is None or ts > before else before
        state.wm = wm
        late: list[str] = []
        out: dict[str, Any] = {}
        for window, wstate in zip(self.windows, state.windows, strict=True):
            if not window.update(wstate, wm, ts, window.values_of(data), out):
                late.append(window.name)
        for name in self._since_last:
            out[name] = None if before is None else ts - before
        if self._reorder:
            out = {name: out[name] for name in self.names}
        for name, default in self._defaults.items():
            if out[name] is None:
                out[name] = default
        return out, late

    def peek(self, state: EntityState, ts: float, data: Mapping[str, Any]) -> dict[str, Any]:
        """The features ``update`` would give, leaving ``state`` unchanged."""
        return self.update(copy.deepcopy(state), ts, data)[0]

    def encode(self, state: EntityState) -> list[bytes]:
        """The state as store values (``state_fields`` order); evicts what no event can reach first."""
        out = [orjson.dumps([state.wm])]
        for window, wstate in zip(self.windows, state.windows, strict=True):
            if state.wm is not None:
                window.evict(wstate, state.wm)
            out.append(orjson.dumps(window.encode(wstate)))
        return out

    def decode(self, values: list[bytes | None]) -> EntityState | None:
        """The state from store values, ``None`` when the entity has none (new or expired)."""
        if not values or values[0] is None:
            return None
        windows = []
        for window, raw in zip(self.windows, values[1:], strict=True):
            windows.append(window.new() if raw is None else window.decode(orjson.loads(raw)))
        return EntityState(orjson.loads(values[0])[0], windows)
