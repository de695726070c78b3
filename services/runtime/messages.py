"""What handlers see and return: decoded incoming messages, outgoing messages, rejects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError


@dataclass(slots=True)
class Incoming:
    """One consumed message after decoding. ``value`` is the decoded object; ``raw`` the bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes
    value: Any = None
    timestamp_ms: int | None = None


@dataclass(slots=True)
class Outgoing:
    """A message to produce. ``value`` is a pydantic model or bytes; ``key`` a str or bytes."""

    topic: str
    value: BaseModel | bytes
    key: str | bytes | None = None
    headers: list[tuple[str, bytes]] | None = None

    def encoded(self) -> tuple[bytes | None, bytes]:
        value = self.value
        if isinstance(value, BaseModel):
            value = value.__pydantic_serializer__.to_json(value)
        key = self.key.encode() if isinstance(self.key, str) else self.key
        return key, value


class Reject(Exception):
    """Raised by a decoder or a handler for one message: it goes to the DLQ with this reason."""

    def __init__(self, reason: str, error: str, field: str | None = None,
                 schema_version: int | None = None):
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error
        self.field = field
        self.schema_version = schema_version


class Transient(Exception):
    """Raised by a handler when a dependency (Redis, ...) is unavailable: the runtime backs off and
    retries the same batch instead of sending anything to the DLQ."""


@dataclass(slots=True)
class Rejected:
    """Returned by a handler in its outputs: route ``message`` to the DLQ."""

    message: Incoming
    reject: Reject
    extra: dict[str, str] = field(default_factory=dict)


Decoder = Callable[[bytes], Any]


def schema_decoder(model: type[BaseModel]) -> Decoder:
    """Decoder validating JSON bytes against a topic schema; errors become a :class:`Reject`.

    >>> from schemas import Label
    >>> schema_decoder(Label)(b'{"event_id": "e", "entity_id": "u", "ts": 1, "label": 1}').label
    1
    >>> try:
    ...     schema_decoder(Label)(b'{"event_id": "e"}')
    ... except Reject as r:
    ...     print(r.reason, r.field)
    missing_field entity_id
    """
    version = model.model_fields["schema_version"].default if "schema_version" in model.model_fields else None

    def decode(raw: bytes) -> BaseModel:
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise reject_from_validation(exc, version) from None

    return decode


_REASONS = {"json_invalid": "invalid_json", "missing": "missing_field", "extra_forbidden": "unknown_field",
            "literal_error": "schema_version", "json_type": "invalid_json", "model_type": "invalid_json"}


def reject_from_validation(exc: ValidationError, schema_version: int | None = None) -> Reject:
    """Turn the first pydantic error into a :class:`Reject` naming the reason and the field."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or None
    reason = _REASONS.get(err["type"], "wrong_type" if err["type"].endswith("_type") or
                          err["type"].endswith("_parsing") else "invalid_value")
    if reason == "invalid_json":
        loc = None
    return Reject(reason, err["msg"][:300], loc, schema_version)
