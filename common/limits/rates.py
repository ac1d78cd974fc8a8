"""Requests per period per key, with GCRA (the generic cell rate algorithm).

One Redis key per client holds its theoretical arrival time (TAT); a request is admitted when it would
not push TAT more than one period past now. That is a token bucket of `limit` requests refilled evenly
over the period, stored as one number, with exact remaining / reset / retry-after figures. Each limiter
has an in-process stand-in with the same interface for when Redis does not answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
from redis.asyncio import Redis

from common.limits.decisions import RateDecision
from common.limits.redis_calls import REDIS_COOLDOWN, REDIS_TIMEOUT, RedisCalls, RedisUnavailable, lua

log = logging.getLogger("common.limits")

# KEYS[1] the client's TAT; ARGV limit, period_ms.
_GCRA = lua("gcra.lua") + "return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))\n"
_GCRA_ADD = lua("gcra_add.lua")


def local_share(limit: int, replicas: int) -> int:
    """What one replica may admit alone while Redis is away."""
    return max(1, limit // replicas)


class LocalRateLimiter:
    """GCRA in process memory: the Redis limiter's stand-in, same interface.

    Memory is bounded: a key whose bucket has refilled holds nothing worth keeping and is
    dropped, and past `max_keys` the least recently used key goes (it restarts with a full bucket).
    """

    def __init__(self, *, period: float = 60.0, max_keys: int = 100_000) -> None:
        self._period = period
        self._max_keys = max_keys
        self._tat: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tat)

    async def hit(self, key: str, limit: int) -> RateDecision:
        now = time.monotonic()
        interval = self._period / limit
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + interval
        retry = new_tat - self._period - now
        if retry > 0:
            return RateDecision(allowed=False, limit=limit, remaining=0, reset_seconds=tat - now,
                                retry_after=retry, local=True)
        self._tat[key] = new_tat
        self._tat.move_to_end(key)
        self._evict(now)
        remaining = int((self._period - (new_tat - now)) / interval + 1e-9)
        return RateDecision(allowed=True, limit=limit, remaining=remaining, reset_seconds=new_tat - now,
                            retry_after=0.0, local=True)

    def catch_up(self, key: str, tat: float) -> None:
        """Move `key`'s TAT up to `tat` (what other replicas admitted); never back."""
        if tat > self._tat.get(key, 0.0):
            self._tat[key] = tat
            self._tat.move_to_end(key)
            self._evict(time.monotonic())

    def _evict(self, now: float) -> None:
        while self._tat:
            oldest, tat = next(iter(self._tat.items()))
            if tat > now and len(self._tat) <= self._max_keys:
                return
            del self._tat[oldest]


class RequestRateLimiter:
    """Requests per `period` per key (API key id, client IP), one limit shared by all replicas.

    `scope` names what is limited ("ip", "key") and keeps the counters of different limits apart.
    """

    def __init__(self, redis: Redis, scope: str, *, period: float = 60.0, replicas: int = 1,
                 timeout: float = REDIS_TIMEOUT, cooldown: float = REDIS_COOLDOWN,
                 max_local_keys: int = 100_000) -> None:
        self._prefix = f"dualgate:rl:{scope}:"
        self._period_ms = int(period * 1000)
        self._replicas = replicas
        self._script = redis.register_script(_GCRA)
        self._redis = RedisCalls(f"rl:{scope}", timeout, cooldown)
        self._local = LocalRateLimiter(period=period, max_keys=max_local_keys)

    @property
    def period_ms(self) -> int:
        return self._period_ms

    def redis_key(self, key: str) -> str:
        return self._prefix + key

    async def hit(self, key: str, limit: int) -> RateDecision:
        """Count one request for `key` against `limit`; never raises because of Redis."""
        try:
            reply = await self._redis.run(
                lambda: self._script(keys=[self._prefix + key], args=[limit, self._period_ms]))
        except RedisUnavailable:
            return await self.hit_local(key, limit)
        return rate_decision(reply, limit)

    async def hit_local(self, key: str, limit: int) -> RateDecision:
        """The decision without Redis: this replica's share of `limit`."""
        return await self._local.hit(key, local_share(limit, self._replicas))


def rate_decision(reply: list, limit: int) -> RateDecision:
    """A GCRA step's {allowed, remaining, reset_ms, retry_ms} as a decision."""
    allowed, remaining, reset_ms, retry_ms = reply[:4]
    return RateDecision(allowed=bool(allowed), limit=limit, remaining=int(remaining),
                        reset_seconds=int(reset_ms) / 1000, retry_after=int(retry_ms) / 1000)


@dataclass(frozen=True, slots=True)
class KeyRate:
    """Who a request is counted as against which requests/min limit."""

    limiter: RequestRateLimiter
    key: str
    limit: int




class SyncedRateLimiter:
    """Requests per `period` per key, decided in process and shared through Redis every `sync_interval`.

    For the router's per-IP bucket, a coarse guard in front of the exact per-key limits: a Redis round
    trip on every request cost the router a quarter of its CPU per cached answer (BENCHMARKS.md). Each
    replica decides with its own GCRA state; every `sync_interval` it adds what it admitted to the
    shared state in one pipeline and takes back what the other replicas admitted. One replica: exact.
    N replicas: at most what the others admit within one interval over the limit. Redis away: the
    replica decides alone on its share of the limit and hands its counts over once Redis answers.
    """

    def __init__(self, redis: Redis, scope: str, *, period: float = 60.0, replicas: int = 1,
                 sync_interval: float = 0.1, timeout: float = REDIS_TIMEOUT, cooldown: float = REDIS_COOLDOWN,
                 max_keys: int = 100_000) -> None:
        self._redis = redis
        self._prefix = f"dualgate:rl:{scope}:"
        self._period_ms = int(period * 1000)
        self._replicas = replicas
        self._sync_interval = sync_interval
        self._max_keys = max_keys
        self._script = redis.register_script(_GCRA_ADD)
        self._calls = RedisCalls(f"rl:{scope}", timeout, cooldown)
        self._local = LocalRateLimiter(period=period, max_keys=max_keys)
        self._seen: dict[str, tuple[int, int]] = {}  # key -> (admitted since the last sync, its limit)
        self._shared = True  # the last sync reached Redis
        self._task: asyncio.Task | None = None

    async def hit(self, key: str, limit: int) -> RateDecision:
        """Count one request for `key` against `limit`, in process; never waits on Redis."""
        decision = await self._local.hit(key, limit if self._shared else local_share(limit, self._replicas))
        self._count(key, int(decision.allowed), limit)
        return msgspec.structs.replace(decision, limit=limit, local=not self._shared)

    def _count(self, key: str, admitted: int, limit: int) -> None:
        """Note `admitted` requests for `key` for the next sync (a key seen with none is refreshed)."""
        if key in self._seen or len(self._seen) < self._max_keys:
            self._seen[key] = (self._seen.get(key, (0, limit))[0] + admitted, limit)

    async def sync(self) -> None:
        """Add what this replica admitted to the shared state; take back what the others admitted."""
        if not self._seen:
            return
        batch, self._seen = self._seen, {}

        async def call() -> list:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, (admitted, limit) in batch.items():
                    await self._script(keys=[self._prefix + key], args=[admitted, limit, self._period_ms],
                                       client=pipe)
                return await pipe.execute()

        try:
            ahead_ms = await self._calls.run(call)
        except RedisUnavailable:
            self._shared = False
            for key, (admitted, limit) in batch.items():  # handed over on a later sync
                self._count(key, admitted, limit)
            return
        self._shared = True
        now = time.monotonic()
        for key, ahead in zip(batch, ahead_ms):
            self._local.catch_up(key, now + int(ahead) / 1000)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._sync_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.sync()

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval)  # the sync period itself, not a wait on a condition
            try:
                await self.sync()
            except Exception:  # never let one bad sync end the loop
                log.exception("rate limit sync failed", extra={"prefix": self._prefix})
