"""Rate limits and token budgets: exact across replicas on one real Valkey, and still answering without it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from edge_support import free_port, valkey_process
from redis.asyncio import Redis
from support import eventually

from common.limits import (
    KeyRate, LocalRateLimiter, LocalTokenBudget, RequestRateLimiter, SyncedRateLimiter, TokenBudget,
)

BOUND = 0.5  # no call may wait on a frozen Redis longer than this (the limiters' timeout is 0.1 s)


@pytest.fixture(scope="module")
def valkey() -> subprocess.Popen:
    with valkey_process() as process:
        yield process


@pytest.fixture
async def connect(valkey: subprocess.Popen) -> AsyncIterator[Callable[[], Redis]]:
    """One client per call, as each replica builds its own."""
    clients: list[Redis] = []

    def new_client(port: int = valkey.port) -> Redis:
        client = Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        clients.append(client)
        return client

    yield new_client
    for client in clients:
        await client.aclose()


def name() -> str:
    return uuid.uuid4().hex[:8]


# ---- requests per minute --------------------------------------------------------------------

async def test_two_replicas_admit_exactly_the_limit_of_parallel_requests(connect):
    replicas = [RequestRateLimiter(connect(), "key", timeout=2.0) for _ in range(2)]
    key = name()
    decisions = await asyncio.gather(*(replicas[i % 2].hit(key, 25) for i in range(200)))
    assert sum(d.allowed for d in decisions) == 25
    assert not any(d.local for d in decisions)
    assert all(d.remaining == 0 and d.retry_after > 0 for d in decisions if not d.allowed)


async def test_rate_limit_headers_count_down_and_say_when_to_retry(connect):
    limiter = RequestRateLimiter(connect(), "key", period=60.0)
    key = name()
    assert [(await limiter.hit(key, 3)).remaining for _ in range(3)] == [2, 1, 0]
    denied = await limiter.hit(key, 3)
    assert not denied.allowed and denied.limit == 3 and denied.remaining == 0
    assert 19 < denied.retry_after <= 20  # one request back every 60 / 3 seconds
    assert 59 < denied.reset_seconds <= 60  # the whole limit back in a minute


async def test_a_spent_limit_refills_over_its_period(connect):
    limiter = RequestRateLimiter(connect(), "ip", period=0.3)
    key = name()
    assert [(await limiter.hit(key, 2)).allowed for _ in range(3)] == [True, True, False]

    async def admitted() -> bool:
        return (await limiter.hit(key, 2)).allowed

    await eventually(admitted, timeout=3)


async def test_rate_limit_keys_are_namespaced_and_expire(connect):
    client = connect()
    limiter = RequestRateLimiter(client, "ip", period=60.0)
    await limiter.hit("203.0.113.7", 100)
    assert 0 < await client.pttl("dualgate:rl:ip:203.0.113.7") <= 60_000


async def test_synced_replicas_take_over_what_the_others_admitted_at_each_sync(connect):
    a, b = (SyncedRateLimiter(connect(), "ip", period=60.0) for _ in range(2))
    client = name()
    assert all([(await a.hit(client, 10)).allowed for _ in range(10)])
    assert not (await a.hit(client, 10)).allowed  # one replica alone is exact
    await a.sync()
    # b has not synced since: it decides on what it knew (the documented bound), then learns
    assert (await b.hit(client, 10)).allowed
    await b.sync()
    refused = await b.hit(client, 10)
    assert not refused.allowed and refused.retry_after > 0 and refused.limit == 10
    # a learns of b's admission too: the shared state counts every replica's requests
    await a.sync()
    assert not (await a.hit(client, 10)).allowed


async def test_synced_limiter_decides_alone_while_redis_is_down_and_hands_its_counts_over_after(connect, valkey):
    shared = connect()
    limiter = SyncedRateLimiter(shared, "ip", replicas=2, cooldown=0.2)
    client = name()
    assert (await limiter.hit(client, 20)).allowed
    await limiter.sync()
    os.kill(valkey.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert (await limiter.hit(client, 20)).allowed
        await limiter.sync()  # fails within its bound: the counts wait for a later sync
        decisions = [await limiter.hit(client, 20) for _ in range(11)]
        assert time.monotonic() - started < BOUND
        assert all(d.local and d.limit == 20 for d in decisions)
        # now on its share, 10 a minute over 2 replicas; the 2 admitted at 20 a minute spent one of it
        assert sum(d.allowed for d in decisions) == 9
    finally:
        os.kill(valkey.pid, signal.SIGCONT)

    async def handed_over() -> bool:
        await limiter.sync()
        # 11 admitted in all at 20 a minute (3 s each): the shared TAT lies ~33 s ahead
        return 30_000 < await shared.pttl(f"dualgate:rl:ip:{client}") <= 33_000

    await eventually(handed_over)
    assert not (await limiter.hit(client, 20)).local


async def test_the_router_limiter_syncs_by_itself_and_once_more_on_stop(connect):
    shared = connect()
    limiter = SyncedRateLimiter(shared, "ip", sync_interval=0.05)
    await limiter.start()
    client = name()
    await limiter.hit(client, 100)

    async def synced() -> bool:
        return await shared.exists(f"dualgate:rl:ip:{client}") == 1

    await eventually(synced)
    last = name()
    await limiter.hit(last, 100)
    await limiter.stop()
    assert await shared.exists(f"dualgate:rl:ip:{last}") == 1


async def test_in_process_fallback_state_stays_bounded():
    capped = LocalRateLimiter(max_keys=100)
    for i in range(1_000):
        await capped.hit(f"client-{i}", 10)
    assert len(capped) == 100

    idle = LocalRateLimiter(period=0.05)
    for i in range(50):
        await idle.hit(f"client-{i}", 10)

    async def idle_keys_dropped() -> bool:
        await idle.hit("probe", 1_000)
        return len(idle) == 1

    await eventually(idle_keys_dropped, timeout=3)

    budget = LocalTokenBudget(max_users=10)
    for i in range(100):
        await budget.reserve(f"usr_{i}", 1, 100)
    assert len(budget) == 10


# ---- tokens per day -------------------------------------------------------------------------

async def test_two_replicas_grant_exactly_the_daily_budget_to_parallel_reservations(connect):
    replicas = [TokenBudget(connect(), timeout=2.0) for _ in range(2)]
    user = name()
    decisions = await asyncio.gather(*(replicas[i % 2].reserve(user, 100, 1_000) for i in range(60)))
    assert sum(d.allowed for d in decisions) == 10
    assert not any(d.local for d in decisions)
    denied = next(d for d in decisions if not d.allowed)
    assert denied.reservation is None and denied.remaining == 0
    assert 0 < denied.retry_after == denied.reset_seconds <= 86_400


async def test_settling_refunds_what_the_request_did_not_use(connect):
    budget = TokenBudget(connect())
    user = name()
    first = await budget.reserve(user, 800, 1_000)
    assert first.allowed and first.remaining == 200
    assert not (await budget.reserve(user, 300, 1_000)).allowed
    await budget.settle(first.reservation, 300)
    await budget.settle(first.reservation, 300)  # a second settle charges nothing
    second = await budget.reserve(user, 700, 1_000)
    assert second.allowed and second.remaining == 0
    assert not (await budget.reserve(user, 1, 1_000)).allowed


async def test_a_released_reservation_gives_every_token_back(connect):
    budget = TokenBudget(connect())
    user = name()
    held = await budget.reserve(user, 1_000, 1_000)
    assert not (await budget.reserve(user, 1, 1_000)).allowed
    await budget.release(held.reservation)
    assert (await budget.reserve(user, 1_000, 1_000)).allowed


async def test_a_stream_that_would_cross_the_daily_budget_is_stopped(connect):
    other_replica = TokenBudget(connect())
    budget = TokenBudget(connect(), grow_by=50)
    user = name()
    elsewhere = await other_replica.reserve(user, 600, 1_000)
    stream = (await budget.reserve(user, 100, 1_000)).reservation
    for tokens in range(0, 401, 10):
        assert await budget.consume(stream, tokens), tokens
    assert not await budget.consume(stream, 401)  # 600 held elsewhere + 401 > 1000
    await budget.settle(stream, 401)
    await other_replica.settle(elsewhere.reservation, 599)
    assert not (await budget.reserve(user, 1, 1_000)).allowed
    assert not await budget.consume(stream, 402)  # a settled reservation lets nothing more through


async def test_checking_a_stream_inside_its_hold_costs_no_redis_call(connect):
    client = connect()
    budget = TokenBudget(client)
    reservation = (await budget.reserve(name(), 500, 1_000)).reservation

    async def evalsha_calls() -> int:
        stats = await client.info("commandstats")
        return stats.get("cmdstat_evalsha", {}).get("calls", 0)

    before = await evalsha_calls()
    for tokens in range(0, 501, 5):
        assert await budget.consume(reservation, tokens)
    assert await evalsha_calls() == before


async def test_an_unsettled_reservation_expires(connect):
    crashed_replica = TokenBudget(connect(), reservation_ttl=0.2)
    budget = TokenBudget(connect())
    user = name()
    assert (await crashed_replica.reserve(user, 100, 100)).allowed  # never settled
    assert not (await budget.reserve(user, 1, 100)).allowed

    async def budget_back() -> bool:
        return (await budget.reserve(user, 100, 100)).allowed

    await eventually(budget_back, timeout=3)


async def test_a_long_stream_keeps_its_hold_past_the_reservation_ttl(connect):
    # the holds' deadlines are the subject, not Redis's bound: a busy machine must not turn this into a
    # test of the in-process stand-in
    budget = TokenBudget(connect(), reservation_ttl=0.6, timeout=2.0)
    other = TokenBudget(connect(), timeout=2.0)
    user = name()
    stream = (await budget.reserve(user, 100, 100)).reservation
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # a stream producing tokens for 2.5 TTLs
        assert await budget.consume(stream, 50)
        assert not (await other.reserve(user, 1, 100)).allowed
        await asyncio.sleep(0.05)
    await budget.settle(stream, 50)
    assert (await other.reserve(user, 50, 100)).allowed


async def test_one_round_trip_admission_counts_exactly_and_holds_tokens_only_for_what_it_admits(connect):
    """requests/min and the token reservation in one script, from two replicas at once: 25 of 60 parallel
    requests pass the limit, and of those only the 10 that fit today's 100 tokens hold any."""
    # the exact counts are the scripts' doing: a generous Redis bound keeps a busy machine from turning
    # this into a test of the in-process stand-in
    replicas = [(RequestRateLimiter(connect(), "key", timeout=2.0), TokenBudget(connect(), timeout=2.0))
                for _ in range(2)]
    key, user = name(), name()
    answers = await asyncio.gather(*(budget.admit(KeyRate(limiter, key, 25), user, 10, 100)
                                     for limiter, budget in (replicas[i % 2] for i in range(60))))
    counted = [a for a in answers if a.requests.allowed]
    assert len(counted) == 25
    assert all(a.tokens is None for a in answers if not a.requests.allowed)  # refused: nothing held
    holding = [a.tokens for a in counted if a.tokens.allowed]
    assert len(holding) == 10 and not any(a.tokens.local for a in counted)
    budget = replicas[0][1]
    assert not (await budget.reserve(user, 1, 100)).allowed  # the 10 holds fill the day
    for decision in holding:
        await budget.settle(decision.reservation, 0)
    assert (await budget.reserve(user, 100, 100)).allowed


async def test_token_keys_are_namespaced_and_expire(connect):
    client = connect()
    budget = TokenBudget(client)
    user = name()
    decision = await budget.reserve(user, 10, 100)
    for key in (f"dualgate:tok:{{{user}}}:{decision.reservation.day}",
                f"dualgate:tok:{{{user}}}:{decision.reservation.day}:holds"):
        assert 0 < await client.ttl(key) <= 86_400 + 600 + 3_600


# ---- Redis down -----------------------------------------------------------------------------

async def test_token_budget_keeps_answering_when_redis_is_unreachable(connect):
    budget = TokenBudget(connect(port=free_port()), replicas=2)
    user = name()
    first = await budget.reserve(user, 400, 1_000)
    assert first.allowed and first.local and first.limit == 1_000
    assert not (await budget.reserve(user, 200, 1_000)).allowed  # this replica's share is 500
    assert not await budget.consume(first.reservation, 501)
    await budget.settle(first.reservation, 100)
    assert (await budget.reserve(user, 400, 1_000)).allowed


async def test_one_round_trip_admission_keeps_answering_when_redis_is_unreachable(connect):
    limiter = RequestRateLimiter(connect(port=free_port()), "key", replicas=2)
    budget = TokenBudget(connect(port=free_port()), replicas=2)
    rate, user = KeyRate(limiter, name(), 4), name()
    answers = [await budget.admit(rate, user, 300, 1_000) for _ in range(3)]
    assert [a.requests.allowed for a in answers] == [True, True, False]  # 4 a minute over 2 replicas
    assert all(a.requests.local for a in answers)
    # this replica's share of the day is 500: the first holds 300, the second cannot
    assert [a.tokens.allowed for a in answers[:2]] == [True, False] and answers[0].tokens.local
    assert answers[2].tokens is None


async def test_limits_keep_answering_when_redis_is_down(connect, valkey):
    limiter = RequestRateLimiter(connect(), "key", replicas=2, cooldown=0.2)
    budget = TokenBudget(connect(), replicas=2, grow_by=100, cooldown=0.2)
    key, user = name(), name()
    assert not (await limiter.hit(key, 10)).local
    stream = (await budget.reserve(user, 100, 1_000)).reservation
    assert not stream.local

    os.kill(valkey.pid, signal.SIGSTOP)
    try:
        async def timed(call):
            started = time.monotonic()
            result = await call
            assert time.monotonic() - started < BOUND
            return result

        decisions = [await timed(limiter.hit(key, 10)) for _ in range(10)]
        assert all(d.local for d in decisions)
        assert sum(d.allowed for d in decisions) == 5  # 10 per minute over 2 replicas
        # a stream going past its hold carries on against this replica's share (500)
        assert await timed(budget.consume(stream, 300))
        assert not await timed(budget.consume(stream, 501))
        fresh = await timed(budget.reserve(name(), 100, 1_000))
        assert fresh.allowed and fresh.local
    finally:
        os.kill(valkey.pid, signal.SIGCONT)

    async def back_on_redis() -> bool:
        return not (await limiter.hit(name(), 10)).local

    await eventually(back_on_redis)
