"""Every Redis call a limit makes is bounded; after a failure Redis is skipped for a while, so an
outage costs one timeout, not one per request, and the in-process limiter answers meanwhile."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger("common.limits")

T = TypeVar("T")

REDIS_TIMEOUT = 0.1  # the most a request waits on Redis before the in-process limiter answers
REDIS_COOLDOWN = 1.0  # after a failure, skip Redis this long: an outage costs one timeout, not one per request
_LUA = Path(__file__).with_name("lua")


def lua(*names: str) -> str:
    """The Lua scripts in lua/ named, in order, as one script (later parts call what earlier ones define)."""
    return "".join((_LUA / name).read_text() for name in names)


class RedisUnavailable(Exception):
    """Redis did not answer in time (or is cooling down after it did not)."""


class RedisCalls:
    """Bounds every Redis call; after a failure skips Redis for `cooldown` seconds."""

    def __init__(self, what: str, timeout: float, cooldown: float) -> None:
        self._what = what
        self._timeout = timeout
        self._cooldown = cooldown
        self._down_until = 0.0
        self._down = False

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        if time.monotonic() < self._down_until:
            raise RedisUnavailable
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    result = await call()
                except RedisConnectionError:
                    # a pooled connection can be stale (the server restarted, or dropped it): one fresh
                    # try inside the same bound before Redis counts as away for the cooldown
                    result = await call()
        except (RedisError, OSError) as exc:  # builtin TimeoutError is an OSError
            self._down_until = time.monotonic() + self._cooldown
            if not self._down:
                self._down = True
                log.warning("redis unavailable, limiting in process",
                            extra={"limiter": self._what, "error": repr(exc)})
            raise RedisUnavailable from exc
        if self._down:
            self._down = False
            log.info("redis reachable again", extra={"limiter": self._what})
        return result
