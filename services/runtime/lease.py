"""A Redis lease: one writer per model. The holder renews it; a standby blocks until it expires.

Writes that must come from the holder only (the learner's checkpoints) are fenced with the lease
token in the same Lua script, so a stalled ex-holder that wakes up after losing the lease cannot
overwrite the new holder's state.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_FENCED_SET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


class LeaseLost(RuntimeError):
    """The lease expired or was taken over: this process must not write any more."""


class Lease:
    def __init__(self, client: redis.Redis, key: str, ttl_s: float, on_lost: Callable[[], None]):
        self.redis = client
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._renew = client.register_script(_RENEW)
        self._fenced_set = client.register_script(_FENCED_SET)

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until this process holds the lease (False if ``stop`` was set first)."""
        waiting_logged = False
        while not (stop and stop.is_set()):
            try:
                if self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
                    log.info("lease %s acquired by %s", self.key, self.token)
                    threading.Thread(target=self._keep, name="lease", daemon=True).start()
                    return True
                if not waiting_logged:
                    log.info("standby: lease %s is held by %s", self.key, self.redis.get(self.key))
                    waiting_logged = True
            except redis.RedisError as exc:
                log.warning("lease %s: %s", self.key, exc)
            self._stop.wait(self.ttl_ms / 3000)
        return False

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                renewed = self._renew(keys=[self.key], args=[self.token, self.ttl_ms])
            except redis.RedisError as exc:
                log.warning("lease %s renewal failed: %s", self.key, exc)
                continue  # the next renewal may still be in time
            if not renewed:
                log.error("lease %s lost: stopping (another writer holds it now)", self.key)
                self.on_lost()
                return

    def fenced_set(self, key: str, value: bytes) -> None:
        """SET ``key`` only while holding the lease (atomically), else raise :class:`LeaseLost`."""
        if not self._fenced_set(keys=[self.key, key], args=[self.token, value]):
            raise LeaseLost(f"lease {self.key} is not held by {self.token}")

    def release(self) -> None:
        self._stop.set()
        try:
            self.redis.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                            "return 0", 1, self.key, self.token)
        except redis.RedisError:
            pass
