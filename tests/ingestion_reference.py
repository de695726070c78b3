"""The windowed aggregates of a spec computed with pandas, independently of the ingestion code: the
definitions of ``services/ingestion/windows.py`` written as masks over a DataFrame of the events.

Events are processed per entity in the order given (one entity lives in one partition, and a
partition is consumed in offset order). ``W`` is the running maximum of ``ts`` per entity.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from services.runtime.spec import PipelineSpec


def events_frame(events: list[dict[str, Any]], spec: PipelineSpec) -> pd.DataFrame:
    rows = [{"event_id": e["event_id"], "entity_id": e["entity_id"], "ts": float(e["ts"]),
             **{f: e["data"].get(f) for f in spec.event.fields}} for e in events]
    frame = pd.DataFrame(rows)
    frame["seq"] = np.arange(len(frame))
    return frame


def _window_columns(frame: pd.DataFrame, w) -> pd.DataFrame:
    """Per event: accepted into the window (not too late), and the emitted window's bounds (in
    panes for tumbling / hopping, in seconds for sliding; NaN when every window is closed)."""
    ts, wm = frame["ts"].to_numpy(), frame["wm"].to_numpy()
    if w.type == "sliding":
        accepted = ts >= wm - w.grace_s
        lo = np.where(accepted, ts - w.size_s, np.nan)
        return pd.DataFrame({"accepted": accepted, "lo": lo, "hi": np.where(accepted, ts, np.nan),
                             "key": ts}, index=frame.index)
    step = w.step_s if w.type == "hopping" else w.size_s
    panes = round(w.size_s / step)
    pane = np.floor(ts / step)
    accepted = wm < pane * step + w.size_s + w.grace_s
    start = np.full(len(frame), np.nan)
    for j in range(panes - 1, -1, -1):  # the oldest open window containing ts wins
        s = pane - j
        is_open = ~(wm >= s * step + w.size_s + w.grace_s)
        start = np.where(np.isnan(start) & is_open, s, start)
    return pd.DataFrame({"accepted": accepted, "lo": start, "hi": start + panes, "key": pane}, index=frame.index)


def reference(events: list[dict[str, Any]], spec: PipelineSpec) -> tuple[pd.DataFrame, dict[str, int]]:
    """(aggregate features per event_id, too-late events per window).

    For each window, a self-join of each entity's events (event ``i`` x earlier-or-same event ``j``)
    keeps the pairs where ``j`` was accepted into the window and falls in ``i``'s emitted window,
    then a groupby aggregates them."""
    fs = spec.features
    frame = events_frame(events, spec)
    frame["wm"] = frame.groupby("entity_id", sort=False)["ts"].cummax()
    frame["wm_before"] = frame.groupby("entity_id", sort=False)["wm"].shift()
    result = pd.DataFrame(index=frame["event_id"])
    late = {}
    for w in fs.windows:
        aggs = [a for a in fs.aggregates if a.window == w.name]
        if not aggs:
            continue
        cols = frame.join(_window_columns(frame, w))
        late[w.name] = int((~cols["accepted"]).sum())
        fields = sorted({a.field for a in aggs if a.field})
        left = cols[["event_id", "entity_id", "seq", "lo", "hi"]].dropna(subset=["lo"])
        right = cols.loc[cols["accepted"], ["entity_id", "seq", "key", *fields]].rename(columns={"seq": "seq_j"})
        pairs = left.merge(right, on="entity_id")
        inside = (pairs["seq_j"] <= pairs["seq"])
        if w.type == "sliding":
            inside &= (pairs["key"] > pairs["lo"]) & (pairs["key"] <= pairs["hi"])
        else:
            inside &= (pairs["key"] >= pairs["lo"]) & (pairs["key"] < pairs["hi"])
        grouped = pairs[inside].groupby("event_id")
        for a in aggs:
            if a.fn == "count" and a.field is None:
                values = grouped.size()
            else:
                how = {"count": "count", "sum": "sum", "mean": "mean", "min": "min", "max": "max",
                       "distinct": "nunique"}[a.fn]
                values = grouped[a.field].agg(how)
            values = values.astype(object).where(values.notna(), None)
            result[a.name] = values.reindex(result.index)
    since = (frame["ts"] - frame["wm_before"]).to_numpy()
    for a in fs.aggregates:
        if a.fn == "since_last":
            result[a.name] = [None if np.isnan(v) else float(v) for v in since]
    result = result[[a.name for a in fs.aggregates]].astype(object)
    for a in fs.aggregates:
        if a.default is not None:
            result[a.name] = [a.default if v is None or (isinstance(v, float) and np.isnan(v)) else v
                              for v in result[a.name]]
    return result, late


def tumbling_counts(events: list[dict[str, Any]], spec: PipelineSpec, window: str) -> pd.Series:
    """Second opinion for a tumbling window's ``count``, vectorised: a cumulative count of the
    accepted events per (entity, window), ``NaN`` for too-late events."""
    w = next(w for w in spec.features.windows if w.name == window)
    frame = events_frame(events, spec)
    frame["wm"] = frame.groupby("entity_id")["ts"].cummax()
    frame["pane"] = np.floor(frame["ts"] / w.size_s)
    frame["ok"] = frame["wm"] < frame["pane"] * w.size_s + w.size_s + w.grace_s
    counts = frame[frame["ok"]].groupby(["entity_id", "pane"]).cumcount() + 1
    return counts.reindex(frame.index).set_axis(frame["event_id"])


def same(a: Any, b: Any) -> bool:
    """Equal, with float tolerance (pandas may sum in another order) and None == NaN."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    if b is None:
        return False
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)


def mismatches(expected: pd.DataFrame, actual: dict[str, dict[str, Any]], limit: int = 10) -> list[str]:
    """Readable differences between the reference and the features emitted per event_id."""
    problems = []
    for event_id, row in expected.iterrows():
        got = actual.get(event_id)
        if got is None:
            problems.append(f"{event_id}: no features")
            continue
        for name, value in row.items():
            if not same(value, got.get(name)):
                problems.append(f"{event_id}.{name}: expected {value!r}, got {got.get(name)!r}")
        if len(problems) >= limit:
            break
    return problems
