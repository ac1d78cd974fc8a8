"""Tokens per UTC day per user, with reserve/settle.

A request holds its maximum cost before the call, a stream grows its hold as it goes, and settle
replaces the hold with the real usage. Holds carry deadlines, so a replica that dies before settling
leaks nothing for long. A chat completion asks requests/min, the token hold and its response cache in
one round trip (TokenBudget.admit).
"""

from __future__ import annotations

import calendar
import functools
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import msgspec
from redis.asyncio import Redis

from common.limits.decisions import Admission, BudgetDecision, Reservation
from common.limits.rates import KeyRate, local_share, rate_decision
from common.limits.redis_calls import REDIS_COOLDOWN, REDIS_TIMEOUT, RedisCalls, RedisUnavailable, lua

DAY = 86_400
KEY_GRACE = 3_600  # a day's budget keys outlive midnight this long, so late settles still land

_TOK_KEYS = "local TOK, HOLDS = KEYS[1], KEYS[2]\n"
_RESERVE = _TOK_KEYS + lua("budget.lua", "reserve.lua")
_CONSUME = _TOK_KEYS + lua("budget.lua", "consume.lua")
_SETTLE = _TOK_KEYS + lua("budget.lua", "settle.lua")
_ADMIT = lua("gcra.lua") + "local TOK, HOLDS = KEYS[2], KEYS[3]\n" + lua("budget.lua", "admit.lua")


def _today(now: float) -> tuple[str, float]:
    """The UTC day for `now` (YYYYMMDD) and the seconds left until it ends."""
    return time.strftime("%Y%m%d", time.gmtime(now)), DAY - now % DAY


@functools.lru_cache(maxsize=4)
def _day_end(day: str) -> int:
    """Epoch seconds at which the UTC day `day` (YYYYMMDD) ends: parsed once per day, not per request."""
    return calendar.timegm(time.strptime(day, "%Y%m%d")) + DAY


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
        decision = await self._local.reserve(user_id, max_cost, local_share(limit, self._replicas))
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
                reservation.limit = local_share(reservation.limit, self._replicas)
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
