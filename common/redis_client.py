"""The Redis client every process builds, with one set of timeouts."""

from __future__ import annotations

from redis.asyncio import Redis

from common.settings import Settings


def redis_client(settings: Settings) -> Redis:
    """Redis at DUALGATE_REDIS_URL: a refused connection fails at once, a stalled Redis costs a call at
    most a second (callers on the request path bound their own waits tighter)."""
    return Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=0.5)
