"""Model registry in Redis: signed, versioned artifacts, a champion pointer, and signed blobs for
learner checkpoints.

Nothing is unpickled unless its HMAC-SHA256 (key from settings) verifies: someone who can write to
the models topic or to Redis but does not hold the key cannot make a service load their bytes.
The signature covers the model name and version too, so an old artifact cannot be replayed under a
new version.

>>> signer = Signer(b"0123456789abcdef")
>>> blob = signer.dumps({"a": 1}, context="ckpt")
>>> signer.loads(blob, context="ckpt")
{'a': 1}
>>> try:
...     signer.loads(blob[:-1] + b"x", context="ckpt")
... except SignatureError as exc:
...     print(exc)
ckpt: signature does not verify (tampered or signed with another key)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import time
import zlib
from collections.abc import Callable
from typing import Any

import redis

from schemas import ModelAnnouncement, Stage

_SIG_LEN = 64  # hex sha256
# Drop the versions beyond the newest ARGV[1] (never the champion) with their artifacts (ARGV[2] is
# the artifact key without the version). Runs inside publish's MULTI.
_PRUNE = """
local old = redis.call('ZRANGE', KEYS[1], 0, -tonumber(ARGV[1]) - 1)
local champion = redis.call('GET', KEYS[2])
local dropped = 0
for _, v in ipairs(old) do
  if v ~= champion then
    redis.call('ZREM', KEYS[1], v)
    redis.call('DEL', ARGV[2] .. v)
    dropped = dropped + 1
  end
end
return dropped
"""


class SignatureError(ValueError):
    """An artifact is unsigned, tampered, or signed with another key. It was not loaded."""


class Signer:
    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("signing key must be at least 16 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "Signer(<key hidden>)"

    def sign(self, data: bytes, context: str) -> str:
        return hmac.new(self._key, context.encode() + b"\0" + data, hashlib.sha256).hexdigest()

    def verify(self, data: bytes, signature: str | bytes | None, context: str) -> None:
        if isinstance(signature, bytes):
            signature = signature.decode(errors="replace")
        if not signature:
            raise SignatureError(f"{context}: unsigned")
        if not hmac.compare_digest(self.sign(data, context), signature):
            raise SignatureError(f"{context}: signature does not verify (tampered or signed with another key)")

    def dumps(self, obj: Any, context: str) -> bytes:
        """Pickle ``obj`` and prefix the signature (for checkpoints)."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return self.sign(data, context).encode() + data

    def loads(self, blob: bytes, context: str) -> Any:
        signature, data = blob[:_SIG_LEN], blob[_SIG_LEN:]
        self.verify(data, signature, context)
        return pickle.loads(data)  # noqa: S301 - verified above


class ModelRegistry:
    """``publish`` / ``load`` / ``promote`` / ``rollback`` / ``versions`` over Redis."""

    def __init__(self, client: redis.Redis, signer: Signer | None, namespace: str = "streamlearn"):
        self.redis = client
        self.signer = signer
        self.ns = namespace

    def _key(self, model: str, *parts: object) -> str:
        return ":".join([self.ns, "model", model, *map(str, parts)])

    @staticmethod
    def context(model: str, version: int) -> str:
        return f"model:{model}:v{version}"

    def _require_signer(self) -> Signer:
        if self.signer is None:
            raise SignatureError("no signing key configured (STREAMLEARN_MODEL_SIGNING_KEY)")
        return self.signer

    def publish(self, model: str, obj: Any, *, stage: Stage, examples_seen: int, spec_hash: str,
                metrics: dict[str, float] | None = None, extra: dict[str, Any] | None = None,
                lineage: bytes | None = None, keep: int = 20) -> ModelAnnouncement:
        """Store a new signed version; return its announcement (the caller produces it).

        ``lineage`` (the consumed offset runs as zlib-compressed JSON, :meth:`Lineage.blob`) is
        stored beside the artifact; ``extra`` goes into the metadata."""
        signer = self._require_signer()
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        version = int(self.redis.incr(self._key(model, "next_version")))
        signature = signer.sign(data, self.context(model, version))
        announcement = ModelAnnouncement(
            model=model, version=version, stage=stage, artifact_key=self._key(model, "v", version),
            signature=signature, sha256=hashlib.sha256(data).hexdigest(), examples_seen=examples_seen,
            metrics=metrics or {}, spec_hash=spec_hash, created_at=time.time())
        meta = announcement.model_dump(mode="json") | {"extra": extra or {}}
        # one round trip for everything after the version number (which the signature covers):
        # store, index, point the champion, drop versions beyond ``keep``. It was four: 1.3 ms wall and
        # 0.95 ms CPU per publication, now 0.7 and 0.5 (a learner publishing per batch does it 50-130
        # times a second at 1,000 events/s)
        pipe = self.redis.pipeline(transaction=True)
        fields = {"artifact": data, "signature": signature, "meta": json.dumps(meta)}
        if lineage is not None:
            fields["lineage"] = lineage
        pipe.hset(announcement.artifact_key, mapping=fields)
        pipe.zadd(self._key(model, "versions"), {str(version): version})
        if stage is Stage.champion:
            pipe.set(self._key(model, "champion"), version)
        pipe.eval(_PRUNE, 2, self._key(model, "versions"), self._key(model, "champion"), keep,
                  self._key(model, "v", ""))
        pipe.execute()
        return announcement

    def load(self, model: str, version: int, expected_signature: str | None = None) -> Any:
        """Fetch, verify and unpickle one version (raises :class:`SignatureError`, ``KeyError``)."""
        signer = self._require_signer()
        stored = self.redis.hmget(self._key(model, "v", version), ["artifact", "signature"])
        data, signature = stored
        if data is None:
            raise KeyError(f"{model} v{version}: no such artifact in the registry")
        signature = (signature or b"").decode(errors="replace")
        if expected_signature is not None and not hmac.compare_digest(signature, expected_signature):
            raise SignatureError(f"{self.context(model, version)}: stored signature differs from the announced one")
        signer.verify(data, signature, self.context(model, version))
        return pickle.loads(data)  # noqa: S301 - verified above

    def meta(self, model: str, version: int) -> dict[str, Any]:
        raw = self.redis.hget(self._key(model, "v", version), "meta")
        if raw is None:
            raise KeyError(f"{model} v{version}: no such version")
        return json.loads(raw)

    def lineage(self, model: str, version: int) -> dict[str, Any] | None:
        raw = self.redis.hget(self._key(model, "v", version), "lineage")
        return None if raw is None else json.loads(zlib.decompress(raw))

    def versions(self, model: str) -> list[int]:
        return [int(v) for v in self.redis.zrange(self._key(model, "versions"), 0, -1)]

    def champion(self, model: str) -> int | None:
        value = self.redis.get(self._key(model, "champion"))
        return int(value) if value is not None else None

    def models(self) -> list[str]:
        prefix = f"{self.ns}:model:"
        names = {k.decode()[len(prefix):].rsplit(":", 1)[0]
                 for k in self.redis.scan_iter(match=prefix + "*:versions")}
        return sorted(names)

    def promote(self, model: str, version: int) -> ModelAnnouncement:
        """Make ``version`` the champion; return the announcement to produce."""
        meta = self.meta(model, version)
        self.redis.set(self._key(model, "champion"), version)
        fields = {k: v for k, v in meta.items() if k in ModelAnnouncement.model_fields}
        return ModelAnnouncement.model_validate(fields | {"stage": Stage.champion, "created_at": time.time()})

    def rollback(self, model: str) -> ModelAnnouncement:
        """Promote the newest version older than the current champion."""
        current = self.champion(model)
        older = [v for v in self.versions(model) if current is None or v < current]
        if not older:
            raise KeyError(f"{model}: no version older than the champion (v{current}) to roll back to")
        return self.promote(model, older[-1])

    # ---- checkpoints (learner state + the offsets it reflects, one atomic write) -----------------

    def save_checkpoint(self, name: str, state: Any,
                        write: Callable[[str, bytes], None] | None = None) -> int:
        """One signed value, one atomic write; ``write`` (e.g. a lease-fenced SET) replaces SET."""
        blob = self._require_signer().dumps(state, context=f"checkpoint:{name}")
        key = f"{self.ns}:checkpoint:{name}"
        if write is None:
            self.redis.set(key, blob)
        else:
            write(key, blob)
        return len(blob)

    def load_checkpoint(self, name: str) -> Any | None:
        blob = self.redis.get(f"{self.ns}:checkpoint:{name}")
        if blob is None:
            return None
        return self._require_signer().loads(blob, context=f"checkpoint:{name}")
