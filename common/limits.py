"""Request rate limits and daily token budgets, exact across every replica (atomic Lua in Redis).

Requests per period per key use GCRA (the generic cell rate algorithm): one Redis key per
client holds its theoretical arrival time (TAT); a request is admitted when it would not push
TAT more than one period past now. That is a token bucket of `limit` requests refilled evenly
over the period, stored as one number, with exact remaining / reset / retry-after figures.

Tokens per UTC day per user use reserve/settle: a request holds its maximum cost before the
call, a stream grows its hold as it goes, and settle replaces the hold with the real usage.
Holds carry deadlines, so a replica that dies before settling leaks nothing for long.

A chat completion asks both, and its response cache, in one round trip (TokenBudget.admit): the
request is counted first, then a fresh cached answer comes back instead of a reservation.

Redis being unreachable or slow never reaches the caller: every Redis call is bounded by a
short timeout, and the in-process limiter with the same interface answers instead, with the
replica's share of each limit (limit // replicas).
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_TIMEOUT = 0.1  # the most a request waits on Redis before the in-process limiter answers
REDIS_COOLDOWN = 1.0  # after a failure, skip Redis this long: an outage costs one timeout, not one per request
DAY = 86_400
KEY_GRACE = 3_600  # a day's budget keys outlive midnight this long, so late settles still land


class RateDecision(msgspec.Struct, frozen=True, kw_only=True):
    """The answer for one request, with what the `x-ratelimit-*` and Retry-After headers need."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float  # until the full limit is available again
    retry_after: float  # 0 when allowed
    local: bool = False  # decided in process because Redis was unavailable


@dataclass(slots=True, kw_only=True)
class Reservation:
    """One request's hold on its user's daily tokens. Settle or release it once; both are idempotent."""

    id: str
    user_id: str
    day: str  # the UTC day it is charged to (the day the request started), YYYYMMDD
    limit: int
    reserved: int  # tokens held for this request now
    local: bool  # held by the in-process budget; stays there even when Redis comes back
    refresh_at: float = 0.0  # monotonic time after which consume() renews the hold's deadline
    done: bool = False


class BudgetDecision(msgspec.Struct, frozen=True, kw_only=True):
    allowed: bool
    limit: int
    remaining: int  # tokens left today once this request's hold is counted
    reset_seconds: float  # until UTC midnight
    retry_after: float  # 0 when allowed
    reservation: Reservation | None  # None when denied
    local: bool = False


class Admission(msgspec.Struct, frozen=True):
    """TokenBudget.admit's answer: the requests/min decision; then either the token decision, or the
    cached answer found fresh (no tokens held); both None when requests/min refused the request."""

    requests: RateDecision
    tokens: BudgetDecision | None = None
    cached: bytes | None = None


def _today(now: float) -> tuple[str, float]:
    """The UTC day for `now` (YYYYMMDD) and the seconds left until it ends."""
    return time.strftime("%Y%m%d", time.gmtime(now)), DAY - now % DAY


@functools.lru_cache(maxsize=4)
def _day_end(day: str) -> int:
    """Epoch seconds at which the UTC day `day` (YYYYMMDD) ends: parsed once per day, not per request."""
    return calendar.timegm(time.strptime(day, "%Y%m%d")) + DAY


def _local_share(limit: int, replicas: int) -> int:
    return max(1, limit // replicas)


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


# ---- requests per period ------------------------------------------------------------------

# gcra(key, limit, period_ms): one request for the client whose TAT (ms, server clock) is at `key`.
# Returns {allowed, remaining, reset_ms, retry_ms}.
_GCRA_STEP = """
local function gcra(key, limit, period)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local interval = period / limit
  local tat = math.max(tonumber(redis.call('GET', key)) or now, now)
  local new_tat = tat + interval
  local retry = new_tat - period - now
  if retry > 0 then
    return {0, 0, math.ceil(tat - now), math.ceil(retry)}
  end
  redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
  return {1, math.floor((period - (new_tat - now)) / interval + 1e-9), math.ceil(new_tat - now), 0}
end
"""

# KEYS[1] the client's TAT; ARGV limit, period_ms.
_GCRA = _GCRA_STEP + "return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))\n"


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
        return await self._local.hit(key, _local_share(limit, self._replicas))


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


# KEYS[1] the client's TAT (ms, server clock); ARGV admitted (by one replica since its last sync), limit,
# period_ms. Adds those requests to the shared TAT; returns how far past now it lies (ms).
_GCRA_ADD = """
local admitted, limit, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = math.max(tonumber(redis.call('GET', KEYS[1])) or now, now) + admitted * period / limit
if tat > now then
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now))
end
return math.floor(tat - now)
"""


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
        decision = await self._local.hit(key, limit if self._shared else _local_share(limit, self._replicas))
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


# ---- tokens per day -----------------------------------------------------------------------

# TOK hash: used, held, r:<id> -> tokens held by that reservation (KEYS[1] unless a script says otherwise)
# HOLDS zset: reservation id -> deadline (ms, server clock) (KEYS[2] unless a script says otherwise)
# Every script first drops the holds whose deadline has passed.
_TOK_KEYS = "local TOK, HOLDS = KEYS[1], KEYS[2]\n"
_PRUNE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', HOLDS, '-inf', now)
for _, id in ipairs(expired) do
  local amount = tonumber(redis.call('HGET', TOK, 'r:' .. id)) or 0
  redis.call('HINCRBY', TOK, 'held', -amount)
  redis.call('HDEL', TOK, 'r:' .. id)
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', HOLDS, '-inf', now)
end
local used = tonumber(redis.call('HGET', TOK, 'used')) or 0
local held = tonumber(redis.call('HGET', TOK, 'held')) or 0
local function hold(id, amount, old, ttl)
  redis.call('HSET', TOK, 'r:' .. id, amount)
  redis.call('HINCRBY', TOK, 'held', amount - old)
  redis.call('ZADD', HOLDS, now + ttl, id)
end
local function keep_until(at)
  redis.call('EXPIREAT', TOK, at)
  redis.call('EXPIREAT', HOLDS, at)
end
-- hold `cost` of `limit` for a new reservation `id`, or refuse: {1|0, remaining}
local function reserve(id, cost, limit, ttl, expire_at)
  if used + held + cost > limit then
    return {0, limit - used - held}
  end
  hold(id, cost, 0, ttl)
  keep_until(expire_at)
  return {1, limit - used - held - cost}
end
"""

# ARGV id, cost, limit, ttl_ms, expire_at. Returns {allowed, remaining}.
_RESERVE = _TOK_KEYS + _PRUNE + """
return reserve(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
"""

# ARGV id, tokens_so_far, grow_by, limit, ttl_ms, expire_at. Returns {allowed, tokens held}.
# A hold that already expired (missed renewals) is taken again from what is left.
_CONSUME = _TOK_KEYS + _PRUNE + """
local id, tokens, grow, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local amount = tonumber(redis.call('HGET', TOK, 'r:' .. id)) or 0
local available = limit - used - (held - amount)
if tokens > available then
  return {0, amount}
end
local new = math.max(amount, math.min(tokens + grow, available))
hold(id, new, amount, tonumber(ARGV[5]))
keep_until(ARGV[6])
return {1, new}
"""

# ARGV id, actual tokens, expire_at. Charged even when the hold already expired: the tokens were used.
_SETTLE = _TOK_KEYS + _PRUNE + """
local amount = tonumber(redis.call('HGET', TOK, 'r:' .. ARGV[1]))
if amount then
  redis.call('HINCRBY', TOK, 'held', -amount)
  redis.call('HDEL', TOK, 'r:' .. ARGV[1])
  redis.call('ZREM', HOLDS, ARGV[1])
end
redis.call('HINCRBY', TOK, 'used', tonumber(ARGV[2]))
keep_until(ARGV[3])
return 1
"""


# One chat completion's way in, in one round trip: requests/min first (a refused request holds nothing);
# then a fresh cached answer, if the caller names one, which costs no tokens; else the token reservation.
# KEYS rate TAT, TOK, HOLDS[, cache entry]; ARGV rate limit, period_ms, id, cost, limit, ttl_ms, expire_at,
# the cache entry's least remaining ms to count as fresh (it was stored for stale_ttl, is fresh for ttl).
# Returns the GCRA reply, then {1|0 reserved, remaining} or {-1, 0, cached answer}.
_ADMIT = _GCRA_STEP + "local TOK, HOLDS = KEYS[2], KEYS[3]\n" + _PRUNE + """
local rate = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if rate[1] == 0 then
  return rate
end
if #KEYS == 4 and redis.call('PTTL', KEYS[4]) > tonumber(ARGV[8]) then
  rate[5], rate[6], rate[7] = -1, 0, redis.call('GET', KEYS[4])
  return rate
end
local tokens = reserve(ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7])
rate[5], rate[6] = tokens[1], tokens[2]
return rate
"""


@dataclass(slots=True)
class _LocalDay:
    used: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (tokens, deadline)

    def held(self, now: float, excluding: str = "") -> int:
        for rid in [rid for rid, (_, deadline) in self.holds.items() if deadline <= now]:
            del self.holds[rid]
        return sum(tokens for rid, (tokens, _) in self.holds.items() if rid != excluding)


class LocalTokenBudget:
    """The same reserve/consume/settle/release in process memory: the Redis budget's stand-in.

    Bounded: one entry per (user, day), least recently used dropped past `max_users`.
    """

    def __init__(self, *, reservation_ttl: float = 600.0, grow_by: int = 256, max_users: int = 100_000) -> None:
        self._ttl = reservation_ttl
        self._grow_by = grow_by
        self._max_users = max_users
        self._days: OrderedDict[tuple[str, str], _LocalDay] = OrderedDict()

    def __len__(self) -> int:
        return len(self._days)

    def _day(self, user_id: str, day: str) -> _LocalDay:
        key = (user_id, day)
        entry = self._days.get(key)
        if entry is None:
            entry = self._days[key] = _LocalDay()
            # least recently used first: earlier days, then whoever is over the cap
            while len(self._days) > self._max_users or next(iter(self._days))[1] < day:
                self._days.popitem(last=False)
        self._days.move_to_end(key)
        return entry

    async def reserve(self, user_id: str, max_cost: int, limit: int) -> BudgetDecision:
        day, reset = _today(time.time())
        now = time.monotonic()
        entry = self._day(user_id, day)
        left = limit - entry.used - entry.held(now)
        if max_cost > left:
            return BudgetDecision(allowed=False, limit=limit, remaining=max(0, left), reset_seconds=reset,
                                  retry_after=reset, reservation=None, local=True)
        reservation = Reservation(id=uuid.uuid4().hex, user_id=user_id, day=day, limit=limit,
                                  reserved=max_cost, local=True, refresh_at=now + self._ttl / 2)
        entry.holds[reservation.id] = (max_cost, now + self._ttl)
        return BudgetDecision(allowed=True, limit=limit, remaining=left - max_cost, reset_seconds=reset,
                              retry_after=0.0, reservation=reservation, local=True)

    async def consume(self, reservation: Reservation, tokens_so_far: int) -> bool:
        if reservation.done:
            return False
        now = time.monotonic()
        entry = self._day(reservation.user_id, reservation.day)
        available = reservation.limit - entry.used - entry.held(now, excluding=reservation.id)
        if tokens_so_far > available:
            return False
        reservation.reserved = max(reservation.reserved, min(tokens_so_far + self._grow_by, available))
        reservation.refresh_at = now + self._ttl / 2
        entry.holds[reservation.id] = (reservation.reserved, now + self._ttl)
        return True

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        if not reservation.done:
            reservation.done = True
            self._charge(reservation, actual_tokens)

    def _charge(self, reservation: Reservation, actual_tokens: int) -> None:
        entry = self._day(reservation.user_id, reservation.day)
        entry.holds.pop(reservation.id, None)
        entry.used += actual_tokens

    async def release(self, reservation: Reservation) -> None:
        await self.settle(reservation, 0)


class TokenBudget:
    """Tokens per UTC day per user, shared by all replicas, charged before the call and trued up after.

        decision = await budget.reserve(user_id, max_cost, limit)     # 429 when not allowed
        ... every N tokens of a stream:  if not await budget.consume(res, n): stop the stream
        await budget.settle(res, actual)   # or budget.release(res) when the call failed

    `max_cost` and `tokens_so_far` count the same thing (prompt + completion tokens).
    consume() is free while the stream stays inside its hold: it only goes to Redis to grow the
    hold (by `grow_by` past the tokens so far) or to renew its deadline (every reservation_ttl / 2).
    A hold that is never settled is dropped after `reservation_ttl`.
    """

    def __init__(self, redis: Redis, *, replicas: int = 1, reservation_ttl: float = 600.0, grow_by: int = 256,
                 timeout: float = REDIS_TIMEOUT, cooldown: float = REDIS_COOLDOWN,
                 max_local_users: int = 100_000) -> None:
        self._replicas = replicas
        self._ttl = reservation_ttl
        self._grow_by = grow_by
        self._reserve = redis.register_script(_RESERVE)
        self._admit = redis.register_script(_ADMIT)
        self._consume = redis.register_script(_CONSUME)
        self._settle = redis.register_script(_SETTLE)
        self._redis = RedisCalls("tok", timeout, cooldown)
        self._local = LocalTokenBudget(reservation_ttl=reservation_ttl, grow_by=grow_by, max_users=max_local_users)

    def _keys(self, user_id: str, day: str) -> list[str]:
        # the braces keep both keys of one user-day in one cluster slot
        base = f"dualgate:tok:{{{user_id}}}:{day}"
        return [base, base + ":holds"]

    def _expire_at(self, day: str) -> int:
        day_end = _day_end(day)
        return day_end + int(self._ttl) + KEY_GRACE

    async def reserve(self, user_id: str, max_cost: int, limit: int) -> BudgetDecision:
        """Hold `max_cost` tokens of today's `limit`; denied when used + held + max_cost > limit."""
        day, reset = _today(time.time())
        rid = uuid.uuid4().hex
        try:
            allowed, remaining = await self._redis.run(lambda: self._reserve(
                keys=self._keys(user_id, day),
                args=[rid, max_cost, limit, int(self._ttl * 1000), self._expire_at(day)]))
        except RedisUnavailable:
            return await self._reserve_local(user_id, max_cost, limit)
        return self._decision(bool(allowed), int(remaining), rid, user_id, day, reset, max_cost, limit)

    async def admit(self, rate: KeyRate, user_id: str, max_cost: int, limit: int, *, cached: str | None = None,
                    fresh_pttl_ms: int = 0) -> Admission:
        """Count the request against `rate`, then hold `max_cost` tokens as reserve() does, in one round
        trip. `cached` names a cache entry (its Redis key): when it holds more than `fresh_pttl_ms` of its
        life, it comes back instead and no tokens are held. The script runs on this budget's Redis, so
        `rate.limiter` must count on the same server (the gateways build both on one client)."""
        day, reset = _today(time.time())
        rid = uuid.uuid4().hex
        keys = [rate.limiter.redis_key(rate.key), *self._keys(user_id, day), *([cached] if cached else [])]
        try:
            reply = await self._redis.run(lambda: self._admit(
                keys=keys, args=[rate.limit, rate.limiter.period_ms, rid, max_cost, limit, int(self._ttl * 1000),
                                 self._expire_at(day), fresh_pttl_ms]))
        except RedisUnavailable:
            requests = await rate.limiter.hit_local(rate.key, rate.limit)
            if not requests.allowed:
                return Admission(requests)
            return Admission(requests, await self._reserve_local(user_id, max_cost, limit))
        requests = rate_decision(reply, rate.limit)
        if len(reply) == 4:  # refused by requests/min
            return Admission(requests)
        if reply[4] == -1:
            return Admission(requests, cached=reply[6])
        return Admission(requests, self._decision(reply[4] == 1, int(reply[5]), rid, user_id, day, reset, max_cost,
                                                  limit))

    def _decision(self, allowed: bool, remaining: int, rid: str, user_id: str, day: str, reset: float,
                  max_cost: int, limit: int) -> BudgetDecision:
        if not allowed:
            return BudgetDecision(allowed=False, limit=limit, remaining=max(0, remaining),
                                  reset_seconds=reset, retry_after=reset, reservation=None)
        reservation = Reservation(id=rid, user_id=user_id, day=day, limit=limit, reserved=max_cost, local=False,
                                  refresh_at=time.monotonic() + self._ttl / 2)
        return BudgetDecision(allowed=True, limit=limit, remaining=remaining, reset_seconds=reset,
                              retry_after=0.0, reservation=reservation)

    async def _reserve_local(self, user_id: str, max_cost: int, limit: int) -> BudgetDecision:
        decision = await self._local.reserve(user_id, max_cost, _local_share(limit, self._replicas))
        # headers show the user's real limit; the local share only decides
        return msgspec.structs.replace(decision, limit=limit)

    async def consume(self, reservation: Reservation, tokens_so_far: int) -> bool:
        """May a stream that has used `tokens_so_far` go on? False: stop it, then settle what it used."""
        if reservation.done:
            return False
        if tokens_so_far <= reservation.reserved and time.monotonic() < reservation.refresh_at:
            return True
        if not reservation.local:
            try:
                allowed, held = await self._redis.run(lambda: self._consume(
                    keys=self._keys(reservation.user_id, reservation.day),
                    args=[reservation.id, tokens_so_far, self._grow_by, reservation.limit,
                          int(self._ttl * 1000), self._expire_at(reservation.day)]))
            except RedisUnavailable:
                # the Redis hold expires by itself; from now on this replica's share holds the stream
                reservation.local = True
                reservation.reserved = 0
                reservation.limit = _local_share(reservation.limit, self._replicas)
            else:
                if allowed:
                    reservation.reserved = int(held)
                    reservation.refresh_at = time.monotonic() + self._ttl / 2
                return bool(allowed)
        return await self._local.consume(reservation, tokens_so_far)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Replace the hold with the tokens really used (the difference goes back to the user)."""
        if reservation.done:
            return
        reservation.done = True
        if not reservation.local:
            try:
                await self._redis.run(lambda: self._settle(
                    keys=self._keys(reservation.user_id, reservation.day),
                    args=[reservation.id, actual_tokens, self._expire_at(reservation.day)]))
                return
            except RedisUnavailable:
                pass  # the Redis hold expires by itself; this replica's share carries the charge
        self._local._charge(reservation, actual_tokens)

    async def release(self, reservation: Reservation) -> None:
        """The call failed: give every held token back."""
        await self.settle(reservation, 0)


# ---- what the caller is told ---------------------------------------------------------------

def _duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1.5s, 6m0s, 3h2m1s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def rate_headers(requests: RateDecision | None = None, tokens: BudgetDecision | None = None) -> dict[str, str]:
    """`x-ratelimit-limit/remaining/reset-requests|tokens` for every answer a limit looked at."""
    headers: dict[str, str] = {}
    if requests is not None:
        headers["x-ratelimit-limit-requests"] = str(requests.limit)
        headers["x-ratelimit-remaining-requests"] = str(requests.remaining)
        headers["x-ratelimit-reset-requests"] = _duration(requests.reset_seconds)
    if tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(tokens.limit)
        headers["x-ratelimit-remaining-tokens"] = str(tokens.remaining)
        headers["x-ratelimit-reset-tokens"] = _duration(tokens.reset_seconds)
    return headers


def retry_after(seconds: float) -> str:
    """Retry-After in whole seconds, never 0 for a refusal."""
    return str(max(1, math.ceil(seconds)))
