"""Redis client construction from settings (URL with AUTH / TLS honoured)."""

from __future__ import annotations

import redis

from services.runtime.settings import RedisSettings


def make_redis(settings: RedisSettings) -> redis.Redis:
    """A client for ``settings.url`` (``redis://``, ``rediss://`` for TLS, ``unix://``); an explicit
    ``STREAMLEARN_REDIS_PASSWORD`` overrides one in the URL. No connection is made until first use."""
    kwargs: dict[str, object] = {"socket_timeout": settings.socket_timeout_s,
                                 "socket_connect_timeout": settings.socket_timeout_s,
                                 "health_check_interval": 30}
    if settings.password is not None:
        kwargs["password"] = settings.password.get_secret_value()
    return redis.Redis.from_url(settings.url.get_secret_value(), **kwargs)
