"""Event validation compiled from the pipeline spec.

The envelope (:class:`schemas.Event`) and the spec's ``data`` fields are compiled into one pydantic
model, so one ``model_validate_json`` call (pydantic-core, in Rust) checks everything. Every failure
becomes a :class:`Reject` with a reason from :data:`REASONS` and the failing field; the runtime sends
the original bytes to the DLQ with both in headers and moves
``streamlearn_dlq_messages_total{reason, field}``.

Event time ``ts`` is epoch seconds (a JSON number, or a string holding one) or an ISO-8601 string
(``2024-05-01T12:00:00.5+02:00``, ``...Z``; without an offset it is UTC), between 1970 and 9999.

>>> from services.runtime.spec import load_spec
>>> validate = EventValidator(load_spec("phishing"))
>>> try:
...     validate(b'{"event_id":"e","entity_id":"u","ts":1,"type":"page_visit","data":{"https":2}}')
... except Reject as r:
...     print(r.reason, r.field)
missing_field data.empty_server_form_handler
>>> parse_ts("2024-01-01T00:00:00Z"), parse_ts("1704067200.5")
(1704067200.0, 1704067200.5)
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
)

from schemas import Event
from services.runtime.messages import Reject
from services.runtime.spec import FieldSpec, PipelineSpec

REASONS = (
    "oversized", "encoding", "invalid_json", "not_an_object", "schema_version", "missing_field",
    "unknown_field", "wrong_type", "out_of_bounds", "not_finite", "unknown_type", "invalid_timestamp",
    "invalid_value", "derived_error",
)

SCHEMA_VERSION = 1
MAX_TS = 253402300799.0  # 9999-12-31T23:59:59Z: larger numbers are milliseconds or garbage
INT64 = (-(2**63), 2**63 - 1)

_TYPE_REASONS = {
    "missing": "missing_field", "extra_forbidden": "unknown_field", "finite_number": "not_finite",
    "greater_than_equal": "out_of_bounds", "less_than_equal": "out_of_bounds",
    "string_too_long": "out_of_bounds", "string_too_short": "invalid_value",
    "json_invalid": "invalid_json", "model_type": "not_an_object", "dict_type": "wrong_type",
}
_NUMBER = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*")
_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32BE"), (b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\xef\xbb\xbf", "UTF-8 with a BOM"),
         (b"\xfe\xff", "UTF-16BE"), (b"\xff\xfe", "UTF-16LE"))


def parse_ts(value: Any) -> Any:
    """Event time in epoch seconds from a number, a numeric string or an ISO-8601 string.

    Anything else is returned unchanged for the float validator to reject, except booleans."""
    if isinstance(value, bool):
        raise ValueError("event time must be epoch seconds or an ISO-8601 string, not a boolean")
    if not isinstance(value, str):
        return value
    if _NUMBER.fullmatch(value):
        return float(value)
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"not epoch seconds nor an ISO-8601 time: {value[:60]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


Timestamp = Annotated[float, BeforeValidator(parse_ts), Field(strict=True, allow_inf_nan=False, ge=0, le=MAX_TS)]


def _field_type(spec: FieldSpec) -> Any:
    if spec.type == "float":
        return Annotated[float, Field(ge=spec.min, le=spec.max, allow_inf_nan=spec.allow_nan, strict=True)]
    if spec.type == "int":
        low = INT64[0] if spec.min is None else max(spec.min, INT64[0])
        high = INT64[1] if spec.max is None else min(spec.max, INT64[1])
        return Annotated[StrictInt, Field(ge=low, le=high)]
    if spec.type == "bool":
        return StrictBool
    if spec.values:
        return Literal[tuple(spec.values)]
    return Annotated[StrictStr, Field(max_length=spec.max_length)]


def compile_event_model(spec: PipelineSpec) -> type[Event]:
    """A pydantic model for this pipeline's events (envelope + typed ``data``)."""
    data_fields = {
        name: (_field_type(f) if f.required else _field_type(f) | None, ... if f.required else None)
        for name, f in spec.event.fields.items()
    }
    data_model = create_model(f"{spec.name.title()}Data", __config__=ConfigDict(extra="forbid"),
                              **data_fields)
    return create_model(
        f"{spec.name.title()}Event", __base__=Event,
        type=(Literal[tuple(spec.event.types)], ...),
        ts=(Timestamp, ...),
        data=(data_model, ...),
    )


def encoding_problem(raw: bytes) -> str | None:
    """Why ``raw`` is not UTF-8 JSON text, or ``None`` (checked only once parsing failed)."""
    for bom, name in _BOMS:
        if raw.startswith(bom):
            return f"{name}: JSON must be UTF-8 without a byte order mark"
    head = raw[:4]
    if len(head) >= 2 and b"\x00" in head:
        return "NUL bytes at the start: UTF-16 or UTF-32 text, not UTF-8"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8: {err}"
    return None


class EventValidator:
    """Callable decoder: raw bytes -> validated event, or :class:`Reject`."""

    def __init__(self, spec: PipelineSpec):
        self.max_bytes = spec.event.max_bytes
        self.model = compile_event_model(spec)

    def __call__(self, raw: bytes) -> Event:
        if len(raw) > self.max_bytes:
            raise Reject("oversized", f"{len(raw)} bytes > max_bytes {self.max_bytes}", None, SCHEMA_VERSION)
        try:
            return self.model.model_validate_json(raw)
        except ValidationError as exc:
            raise self._reject(exc, raw) from None

    @staticmethod
    def _reject(exc: ValidationError, raw: bytes) -> Reject:
        err = exc.errors(include_url=False, include_input=False)[0]
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) or None
        kind = err["type"]
        if kind == "json_invalid":
            problem = encoding_problem(raw)
            if problem is not None:
                return Reject("encoding", problem[:300], None, SCHEMA_VERSION)
            error = "empty message" if not raw.strip() else err["msg"]
            return Reject("invalid_json", error[:300], None, SCHEMA_VERSION)
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            what = "an event" if not loc else f"field {field!r}"
            return Reject("not_an_object", f"{what} must be a JSON object", field, SCHEMA_VERSION)
        if loc == ["schema_version"]:
            reason = "schema_version"
        elif loc == ["type"] and kind == "literal_error":
            reason = "unknown_type"
        elif loc == ["ts"] and kind != "missing":
            reason = "invalid_timestamp"
        elif kind == "literal_error" and loc[:1] == ["data"]:
            reason = "invalid_value"  # a str field outside its allowed values
        elif kind in _TYPE_REASONS:
            reason = _TYPE_REASONS[kind]
        elif kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
            reason = "wrong_type"
        else:
            reason = "invalid_value"
        return Reject(reason, err["msg"][:300], field, SCHEMA_VERSION)
