"""Event validation compiled from the pipeline spec.

The envelope (:class:`schemas.Event`) and the spec's ``data`` fields are compiled into one pydantic
model, so one ``model_validate_json`` call (pydantic-core, in Rust) checks everything. Every failure
becomes a :class:`Reject` with a reason from :data:`REASONS` and the failing field.

>>> from services.runtime.spec import load_spec
>>> validate = EventValidator(load_spec("phishing"))
>>> try:
...     validate(b'{"event_id":"e","entity_id":"u","ts":1,"type":"page_visit","data":{"https":2}}')
... except Reject as r:
...     print(r.reason, r.field)
missing_field data.empty_server_form_handler
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, create_model

from schemas import Event
from services.runtime.messages import Reject
from services.runtime.spec import FieldSpec, PipelineSpec

REASONS = (
    "oversized", "encoding", "invalid_json", "not_an_object", "schema_version", "missing_field",
    "unknown_field", "wrong_type", "out_of_bounds", "not_finite", "unknown_type", "invalid_timestamp",
    "invalid_value", "derived_error",
)

_TYPE_REASONS = {
    "missing": "missing_field", "extra_forbidden": "unknown_field", "finite_number": "not_finite",
    "greater_than_equal": "out_of_bounds", "less_than_equal": "out_of_bounds",
    "string_too_long": "out_of_bounds", "string_too_short": "invalid_value",
    "json_invalid": "invalid_json", "model_type": "not_an_object", "dict_type": "wrong_type",
}


def _field_type(spec: FieldSpec) -> Any:
    if spec.type == "float":
        return Annotated[float, Field(ge=spec.min, le=spec.max, allow_inf_nan=spec.allow_nan, strict=True)]
    if spec.type == "int":
        return Annotated[StrictInt, Field(ge=spec.min, le=spec.max)]
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
        ts=(Annotated[float, Field(allow_inf_nan=False, strict=False)], ...),
        data=(data_model, ...),
    )


class EventValidator:
    """Callable decoder: raw bytes -> validated event, or :class:`Reject`."""

    def __init__(self, spec: PipelineSpec):
        self.max_bytes = spec.event.max_bytes
        self.model = compile_event_model(spec)

    def __call__(self, raw: bytes) -> Event:
        if len(raw) > self.max_bytes:
            raise Reject("oversized", f"{len(raw)} bytes > max_bytes {self.max_bytes}", None, 1)
        try:
            return self.model.model_validate_json(raw)
        except ValidationError as exc:
            raise self._reject(exc, raw) from None

    @staticmethod
    def _reject(exc: ValidationError, raw: bytes) -> Reject:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) or None
        kind = err["type"]
        if kind == "json_invalid":
            try:
                raw.decode("utf-8")
                reason = "invalid_json"
            except UnicodeDecodeError as uerr:
                return Reject("encoding", f"not UTF-8: {uerr}"[:300], None, 1)
            return Reject(reason, err["msg"][:300], None, 1)
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            what = "an event" if not loc else f"field {field!r}"
            return Reject("not_an_object", f"{what} must be a JSON object", field, 1)
        if loc == ["schema_version"]:
            reason = "schema_version"
        elif loc == ["type"] and kind == "literal_error":
            reason = "unknown_type"
        elif loc == ["ts"] and kind != "missing":
            reason = "invalid_timestamp"
        elif kind in _TYPE_REASONS:
            reason = _TYPE_REASONS[kind]
        elif kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
            reason = "wrong_type"
        else:
            reason = "invalid_value"
        return Reject(reason, err["msg"][:300], field, 1)
