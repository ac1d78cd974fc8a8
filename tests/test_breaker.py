"""Circuit breakers: only upstream failures open them, recovery is probed, replicas share the state."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest
from edge_support import free_port, valkey_process
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from support import eventually

from common.breaker import AsyncBreaker, BreakerOpen, is_upstream_failure


@dataclass
class Valkey:
    process: subprocess.Popen
    port: int


@pytest.fixture(scope="module")
def valkey() -> Valkey:
    with valkey_process() as process:
        yield Valkey(process, process.port)


class Upstream:
    """An upstream answering with the scripted outcomes in turn (a status, or an exception to raise)."""

    def __init__(self) -> None:
        self.script: list[int | Exception] = []
        self.calls = 0
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self._handle), base_url="http://upstream")

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        outcome = self.script.pop(0) if self.script else 200
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome, json={})

    async def send(self, *outcomes: int | Exception) -> httpx.Response:
        self.script.extend(outcomes)
        return await self.client.get("/v1/chat/completions")


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    upstream = Upstream()
    yield upstream
    await upstream.client.aclose()


@pytest.fixture
async def make_breaker(valkey: Valkey) -> AsyncIterator[Callable[..., AsyncBreaker]]:
    """Started breakers, each with its own Redis client like a replica; stopped and closed after."""
    made: list[tuple[AsyncBreaker, Redis]] = []

    async def make(upstream: str, *, port: int = valkey.port, **options: float) -> AsyncBreaker:
        client = Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        breaker = AsyncBreaker(upstream, client, **options)
        await breaker.start()
        made.append((breaker, client))
        return breaker

    yield make
    for breaker, client in made:
        await breaker.stop()
        await client.aclose()


def gauge(upstream: str) -> float | None:
    return REGISTRY.get_sample_value("dualgate_breaker_state", {"upstream": upstream})


def name() -> str:
    return f"chat-{uuid.uuid4().hex[:8]}"


async def fail(breaker: AsyncBreaker, upstream: Upstream, outcome: int | Exception) -> None:
    try:
        await breaker.call(upstream.send, outcome)
    except httpx.HTTPError:
        pass


ERRORS = {
    "timeout": httpx.ReadTimeout("read timed out"),
    "connect": httpx.ConnectError("connection refused"),
    "reset": httpx.RemoteProtocolError("server disconnected"),
}


@pytest.mark.parametrize("outcome", [500, 502, 503, 504, *ERRORS], ids=str)
def test_5xx_timeouts_and_connect_errors_are_upstream_failures(outcome):
    request = httpx.Request("POST", "http://upstream/v1/chat/completions")
    value = ERRORS[outcome] if isinstance(outcome, str) else httpx.Response(outcome, request=request)
    assert is_upstream_failure(value)


@pytest.mark.parametrize("status", [200, 201, 204, 400, 401, 403, 404, 409, 413, 422, 429])
def test_answers_and_caller_mistakes_are_not_upstream_failures(status):
    assert not is_upstream_failure(httpx.Response(status))
    assert not is_upstream_failure(ValueError("a bug on our side says nothing about the upstream"))


async def test_a_burst_of_400s_does_not_open_the_breaker(make_breaker, upstream):
    breaker = await make_breaker(name(), fail_max=3)
    for status in [400, 401, 403, 404, 413, 422, 429] * 10:
        assert (await breaker.call(upstream.send, status)).status_code == status
    assert breaker.state == "closed"
    assert upstream.calls == 70


async def test_5xx_and_timeouts_open_it_and_it_then_rejects_without_calling(make_breaker, upstream):
    upstream_name = name()
    breaker = await make_breaker(upstream_name, fail_max=3, reset_timeout=30)
    assert gauge(upstream_name) == 0
    await fail(breaker, upstream, 503)
    await fail(breaker, upstream, ERRORS["timeout"])
    assert breaker.state == "closed"
    await fail(breaker, upstream, ERRORS["connect"])
    assert breaker.state == "open" and gauge(upstream_name) == 2

    with pytest.raises(BreakerOpen) as rejected:
        await breaker.call(upstream.send)
    assert upstream.calls == 3
    assert 29 < rejected.value.retry_after <= 30 and rejected.value.upstream == upstream_name


async def test_only_consecutive_failures_count(make_breaker, upstream):
    breaker = await make_breaker(name(), fail_max=3)
    for _ in range(5):
        await fail(breaker, upstream, 500)
        await fail(breaker, upstream, 502)
        await breaker.call(upstream.send, 200)
    assert breaker.state == "closed"


async def test_half_open_lets_one_trial_through_and_its_success_closes_the_circuit(make_breaker):
    upstream_name = name()
    breaker = await make_breaker(upstream_name, fail_max=1, reset_timeout=0.2)
    trial_started, finish_trial = asyncio.Event(), asyncio.Event()

    async def slow_ok() -> httpx.Response:
        trial_started.set()
        await finish_trial.wait()
        return httpx.Response(200)

    async def broken() -> httpx.Response:
        return httpx.Response(502)

    await breaker.call(broken)
    with pytest.raises(BreakerOpen) as rejected:
        await breaker.call(slow_ok)
    await asyncio.sleep(rejected.value.retry_after)  # what a client honouring Retry-After does

    trial = asyncio.create_task(breaker.call(slow_ok))
    await trial_started.wait()
    assert breaker.state == "half-open" and gauge(upstream_name) == 1
    with pytest.raises(BreakerOpen):  # one trial at a time
        await breaker.call(slow_ok)
    finish_trial.set()
    assert (await trial).status_code == 200
    assert breaker.state == "closed" and gauge(upstream_name) == 0
    assert (await breaker.call(slow_ok)).status_code == 200


async def test_a_failed_trial_opens_it_again(make_breaker, upstream):
    breaker = await make_breaker(name(), fail_max=2, reset_timeout=0.2)
    await fail(breaker, upstream, 500)
    await fail(breaker, upstream, 500)
    with pytest.raises(BreakerOpen) as rejected:
        await breaker.call(upstream.send)
    await asyncio.sleep(rejected.value.retry_after)
    await fail(breaker, upstream, ERRORS["timeout"])  # the trial
    assert breaker.state == "open"
    with pytest.raises(BreakerOpen) as again:
        await breaker.call(upstream.send)
    assert 0.1 < again.value.retry_after <= 0.2


async def test_a_stream_is_judged_on_its_status_line_before_its_body(make_breaker):
    body_may_end = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"data: {}\n\n"
        await body_may_end.wait()
        yield b"data: [DONE]\n\n"

    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, content=body())))
    breaker = await make_breaker(name(), fail_max=1)
    try:
        request = client.build_request("POST", "http://upstream/v1/chat/completions")
        response = await asyncio.wait_for(breaker.call(client.send, request, stream=True), 1)
        assert response.status_code == 200 and breaker.state == "closed"
        body_may_end.set()
        assert (await response.aread()).endswith(b"[DONE]\n\n")
    finally:
        await client.aclose()


async def test_a_caller_who_goes_away_is_not_an_upstream_failure(make_breaker):
    breaker = await make_breaker(name(), fail_max=1)
    started = asyncio.Event()

    async def hangs() -> httpx.Response:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    call = asyncio.create_task(breaker.call(hangs))
    await started.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert breaker.state == "closed"


async def test_a_guard_that_records_nothing_is_reported_as_a_bug(make_breaker, upstream):
    breaker = await make_breaker(name())
    with pytest.raises(RuntimeError, match="without record"):
        async with breaker.guard():
            await upstream.send(503)
    async with breaker.guard() as attempt:
        attempt.record(await upstream.send(200))


async def test_one_replica_opening_it_makes_the_others_see_it_within_a_second(make_breaker, upstream):
    upstream_name = name()
    # the reset timeout outlasts one sync interval (0.5 s), so the second replica sees it still open
    first = await make_breaker(upstream_name, fail_max=2, reset_timeout=1.5)
    second = await make_breaker(upstream_name, fail_max=2, reset_timeout=1.5)
    await fail(first, upstream, 500)
    await fail(first, upstream, 503)
    assert first.state == "open"
    await eventually(lambda: second.state == "open", timeout=1.0)
    calls = upstream.calls
    with pytest.raises(BreakerOpen):
        await second.call(upstream.send)
    assert upstream.calls == calls

    with pytest.raises(BreakerOpen) as rejected:
        await first.call(upstream.send)
    await asyncio.sleep(rejected.value.retry_after)
    await first.call(upstream.send, 200)  # the first replica's trial succeeds
    assert first.state == "closed"
    await eventually(lambda: second.state == "closed", timeout=1.0)


async def test_the_breaker_keeps_working_when_redis_is_down(make_breaker, upstream):
    breaker = await make_breaker(name(), port=free_port(), fail_max=2, reset_timeout=0.2, sync_interval=0.05)
    started = time.monotonic()
    await fail(breaker, upstream, 500)
    await fail(breaker, upstream, 500)
    with pytest.raises(BreakerOpen) as rejected:
        await breaker.call(upstream.send)
    assert time.monotonic() - started < 0.1  # nothing waits on Redis
    await asyncio.sleep(rejected.value.retry_after)
    await breaker.call(upstream.send, 200)
    assert breaker.state == "closed"
