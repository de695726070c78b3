"""The learner's state and how one message changes it, free of I/O: the service and
``streamlearn models reproduce`` run exactly this code.

>>> from services.runtime.spec import load_spec
>>> spec = load_spec("phishing")
>>> state = new_state(spec)
>>> apply(state, spec, "features", "features", 0, 7, {"event_id": "e", "ts": 1.0, "features": {"https": 1.0}})
>>> apply(state, spec, "labels", "labels", 0, 3, {"event_id": "e", "ts": 2.0, "label": True})
1.0
>>> state.examples_seen, state.lineage.runs
(1, [['features', 0, 7, 8], ['labels', 0, 3, 4]])
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from river import metrics as river_metrics
from river import utils

from services.runtime.join import LabelJoin
from services.runtime.messages import Reject
from services.runtime.river_models import build_pipeline, check_task
from services.runtime.spec import PipelineSpec

_LABEL_TYPES = {"bool": (bool,), "int": (int,), "float": (float, int), "str": (str,)}
# Replayable history is bounded: past this many consumption runs the oldest are dropped and the model
# is reported as not reproducible (its offset ranges stay exact). Each publish serialises the runs,
# so the bound also bounds publish and checkpoint cost (measured: 200k runs cost ~440 ms a publish).
MAX_LINEAGE_RUNS = 20_000


def coerce_label(value: Any, kind: str) -> Any:
    """Check a label against the spec's label type (0/1 accepted for bool).

    >>> coerce_label(1, "bool"), coerce_label(2, "float")
    (True, 2.0)
    """
    if kind == "bool" and isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if kind in ("int", "float") and isinstance(value, bool):
        raise Reject("wrong_type", f"label {value!r} is not a {kind}", "label")
    if not isinstance(value, _LABEL_TYPES[kind]):
        raise Reject("wrong_type", f"label {value!r} is not a {kind}", "label")
    return float(value) if kind == "float" else value


@dataclass
class Lineage:
    """What a model learned from: the consumed messages as runs ``[topic, partition, from, to)`` in
    consumption order (Kafka is the data version). Replaying the runs through :func:`apply`
    rebuilds the model exactly."""

    runs: list[list] = field(default_factory=list)
    truncated: bool = False
    spans: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # kept as runs are recorded
    # [compressor, compressed chunks, runs compressed]: see blob(); not part of the checkpoint
    _stream: list | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_stream"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _stream=None)

    def blob(self) -> bytes:
        """The lineage as zlib-compressed JSON ``{"runs": [...], "truncated": ...}``, what the
        registry stores with each version. Every run but the last is final (only the last one
        grows), so they are compressed once, as they become final, and each call only compresses
        the new ones: publishing a version no longer re-serialises up to 20,000 runs (30 ms each
        time, measured; the learner's CPU share doubled over a 10-minute soak).

        >>> import json, zlib
        >>> lineage = Lineage()
        >>> for offset in (5, 6, 9):
        ...     lineage.record("labels", 0, offset)
        >>> json.loads(zlib.decompress(lineage.blob()))
        {'runs': [['labels', 0, 5, 7], ['labels', 0, 9, 10]], 'truncated': False}
        >>> lineage.record("labels", 0, 10)
        >>> json.loads(zlib.decompress(lineage.blob()))["runs"]
        [['labels', 0, 5, 7], ['labels', 0, 9, 11]]
        """
        if self._stream is None:
            compressor = zlib.compressobj(6)
            self._stream = [compressor, [compressor.compress(b'{"runs":[')], 0]
        compressor, chunks, done = self._stream
        final = len(self.runs) - 1
        if final > done:
            chunks.append(compressor.compress(b"".join(orjson.dumps(r) + b"," for r in self.runs[done:final])))
            self._stream[2] = final
        tail = compressor.copy()
        last = orjson.dumps(self.runs[-1]) if self.runs else b""
        end = tail.compress(last + b'],"truncated":' + (b"true" if self.truncated else b"false") + b"}")
        return b"".join(chunks) + end + tail.flush()

    def record(self, topic: str, partition: int, offset: int) -> None:
        span = self.spans.get((topic, partition))
        if span is None:
            self.spans[(topic, partition)] = [offset, offset + 1]
        else:
            span[0], span[1] = min(span[0], offset), max(span[1], offset + 1)
        if self.runs:
            last = self.runs[-1]
            if last[0] == topic and last[1] == partition and last[3] == offset:
                last[3] = offset + 1
                return
        if len(self.runs) >= MAX_LINEAGE_RUNS:
            self.truncated = True  # too long to replay; older history is dropped
            del self.runs[: MAX_LINEAGE_RUNS // 10]
            self._stream = None  # compressed again from the new first run at the next blob()
        self.runs.append([topic, partition, offset, offset + 1])

    def ranges(self) -> list[dict[str, Any]]:
        """Offset range per topic-partition: ``[{topic, partition, from, to}]``."""
        return [{"topic": t, "partition": p, "from": a, "to": b} for (t, p), (a, b) in sorted(self.spans.items())]


@dataclass
class Challenger:
    """A model trained on the same stream as the champion, with its prequential window."""

    name: str
    model: Any
    window: Any
    examples: int = 0


@dataclass
class LearnerState:
    """Everything a checkpoint holds; restored as one piece."""

    model: Any
    join: LabelJoin
    metric: Any
    examples_seen: int = 0
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    last_version: int = 0
    lineage: Lineage = field(default_factory=Lineage)
    window: Any = None  # the champion's prequential metric over the promotion window
    challengers: dict[str, Challenger] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)  # promotions / resets, for the service to announce


def _metric(task: str) -> Any:
    return river_metrics.MAE() if task == "regression" else river_metrics.Accuracy()


def _window(spec: PipelineSpec) -> Any:
    size = spec.model.promotion.window if spec.model.promotion else 500
    return utils.Rolling(river_metrics.MAE if spec.model.task == "regression" else river_metrics.Accuracy,
                         window_size=size)


def _build(spec: PipelineSpec, steps: list, where: str) -> Any:
    model = build_pipeline(steps, where)
    check_task(model, spec.model.task)
    return model


def new_state(spec: PipelineSpec) -> LearnerState:
    state = LearnerState(model=_build(spec, spec.model.pipeline, "model.pipeline"),
                         metric=_metric(spec.model.task), window=_window(spec),
                         join=LabelJoin(spec.label.join_ttl_s, spec.label.max_pending))
    for i, ch in enumerate(spec.model.challengers):
        state.challengers[ch.name] = Challenger(ch.name, _build(spec, ch.pipeline, f"model.challengers.{i}.pipeline"),
                                                _window(spec))
    return state


def _better(spec: PipelineSpec, challenger: float, champion: float) -> bool:
    margin = spec.model.promotion.margin if spec.model.promotion else 0.0
    if spec.model.task == "regression":  # an error: lower is better
        return challenger < champion - margin
    return challenger > champion + margin


def _maybe_promote(state: LearnerState, spec: PipelineSpec) -> None:
    """Swap a challenger in as champion when it is better by the margin over the full window."""
    promo = spec.model.promotion
    if promo is None or len(state.window.window) < promo.window:  # champion window not full yet
        return
    best = None
    for ch in state.challengers.values():
        if ch.examples >= promo.min_examples and len(ch.window.window) >= promo.window \
                and _better(spec, ch.window.get(), state.window.get()):
            if best is None or _better(spec, ch.window.get(), best.window.get()):
                best = ch
    if best is None:
        return
    state.events.append({"event": "promotion", "challenger": best.name, "at_example": state.examples_seen,
                         "challenger_metric": best.window.get(), "champion_metric": state.window.get()})
    # the old champion keeps learning in the challenger's slot (and can win back)
    state.model, best.model = best.model, state.model
    state.window, best.window = best.window, state.window


def _react_to_drift(state: LearnerState, spec: PipelineSpec, drift: Any) -> None:
    get = drift.get if isinstance(drift, dict) else lambda k: getattr(drift, k)
    policy = spec.learner.on_drift
    if policy == "ignore" or get("model") != spec.model.name or get("kind") != "concept":
        return
    if policy == "reset":
        state.model = _build(spec, spec.model.pipeline, "model.pipeline")
        state.window = _window(spec)
        state.events.append({"event": "reset", "at_example": state.examples_seen, "detector": get("detector")})
    else:
        name = "drift"
        state.challengers[name] = Challenger(name, _build(spec, spec.model.pipeline, "model.pipeline"), _window(spec))
        state.events.append({"event": "drift_challenger", "at_example": state.examples_seen,
                             "detector": get("detector")})


def apply(state: LearnerState, spec: PipelineSpec, role: str, topic: str, partition: int, offset: int,
          value: Any) -> float | None:
    """Feed one decoded message (``role`` 'features' or 'labels'); returns the label delay when an
    example was learned. Raises :class:`Reject` for a label of the wrong type (after recording it)."""
    state.lineage.record(topic, partition, offset)
    get = value.get if isinstance(value, dict) else lambda k: getattr(value, k)
    if role == "drift":
        _react_to_drift(state, spec, value)
        return None
    if spec.model.task == "anomaly":  # unsupervised: learn every feature vector, no labels
        if role == "features":
            state.model.learn_one(get("features"))
            state.examples_seen += 1
            return 0.0
        return None
    if role == "labels":
        y = coerce_label(get("label"), spec.label.type)
        matched = state.join.add_label(get("event_id"), get("ts"), y)
    else:
        matched = state.join.add_item(get("event_id"), get("ts"), get("features"))
    if matched is None:
        return None
    x, y, delay = matched
    y_pred = state.model.predict_one(x)
    state.metric.update(y, y_pred)
    state.window.update(y, y_pred)
    state.model.learn_one(x, y)
    for ch in state.challengers.values():  # prequential too: predict, then learn
        ch.window.update(y, ch.model.predict_one(x))
        ch.model.learn_one(x, y)
        ch.examples += 1
    state.examples_seen += 1
    if state.challengers:
        _maybe_promote(state, spec)
    return delay
