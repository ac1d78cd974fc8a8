"""Circuit breakers for upstream hops: pybreaker's state machine, shared through Redis, never blocking.

pybreaker decides (count consecutive failures, open at fail_max, half-open after reset_timeout,
close or re-open on the trial call) against an in-memory storage, so a call never waits on I/O.
A background task syncs that storage with one Redis hash per upstream: a replica that opens or
closes the circuit publishes it, the others adopt it within `sync_interval`. The newest change
wins. Failure counts stay per replica; Redis being down only stops the sharing.

What counts as a failure is the upstream's health, never the caller's requests: 5xx, timeouts
and connection errors do; no 4xx does (400, 401, 404, 413, 422, and 429 too: a full queue sheds
load request by request, and a limit one caller hits must not turn everyone away). A request that
never left (refused as malformed before sending) is no verdict at all. The decision is made on the
status line, so a stream is judged before its body is relayed.

    response = await breaker.call(client.send, request, stream=True)   # raises BreakerOpen
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import ParamSpec

import httpx
import pybreaker
from prometheus_client import Gauge
from pybreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

P = ParamSpec("P")

BREAKER_STATE = Gauge("dualgate_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                      ["upstream"])
_GAUGE_VALUE = {STATE_CLOSED: 0, STATE_HALF_OPEN: 1, STATE_OPEN: 2}

REDIS_TIMEOUT = 0.2
STATE_TTL = 86_400  # an upstream's shared state outlives its last change this long
_SHARED = (STATE_OPEN, STATE_CLOSED)  # half-open is one replica probing: each probes for itself

# KEYS[1] the upstream's hash; ARGV state, opened_at, changed_at, ttl. Writes only when newer,
# and answers with what Redis holds afterwards.
_PUBLISH = """
local current = tonumber(redis.call('HGET', KEYS[1], 'changed_at')) or 0
if tonumber(ARGV[3]) > current then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'opened_at', ARGV[2], 'changed_at', ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'changed_at')
"""

_FAILURE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError,
                   OSError)  # OSError covers the builtin TimeoutError of asyncio.timeout


def is_upstream_failure(outcome: httpx.Response | BaseException) -> bool:
    """5xx, timeouts and connection errors are the upstream's failures; no 4xx is."""
    if isinstance(outcome, httpx.HTTPStatusError):
        outcome = outcome.response
    if isinstance(outcome, httpx.Response):
        return outcome.status_code >= 500
    return isinstance(outcome, _FAILURE_ERRORS)


class BreakerOpen(Exception):
    """The circuit is open: the upstream was not called. Fail over, or answer 503 with Retry-After."""

    def __init__(self, upstream: str, retry_after: float) -> None:
        super().__init__(f"circuit for {upstream} is open; retry in {retry_after:.1f}s")
        self.upstream = upstream
        self.retry_after = retry_after


class _SharedStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's in-memory storage, remembering when the state last changed and whether to publish it."""

    def __init__(self) -> None:
        super().__init__(STATE_CLOSED)
        self.changed_at = 0.0
        self.unpublished = False

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        self.changed_at = time.time()
        self.unpublished = state in _SHARED

    def adopt(self, state: str, opened_at: float, changed_at: float) -> None:
        self._state = state
        self._opened_at = datetime.fromtimestamp(opened_at, UTC) if opened_at else None
        self.changed_at = changed_at
        self.unpublished = False


class _UpstreamFailed(Exception):
    """Replays a failed call into pybreaker's state machine."""


def _replay(failed: bool) -> None:
    if failed:
        raise _UpstreamFailed


class Attempt:
    """One admitted call. `record` its response (or exception); the guard settles it on exit."""

    __slots__ = ("generation", "trial", "failed")

    def __init__(self, generation: int, trial: bool) -> None:
        self.generation = generation
        self.trial = trial
        self.failed: bool | None = None

    def record(self, outcome: httpx.Response | BaseException) -> None:
        self.failed = is_upstream_failure(outcome)


class _OnStateChange(pybreaker.CircuitBreakerListener):
    def __init__(self, callback: Callable[[str], None]) -> None:
        self._callback = callback

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: pybreaker.CircuitBreakerState | None,
                     new_state: pybreaker.CircuitBreakerState) -> None:
        self._callback(new_state.name)


class AsyncBreaker:
    """A circuit breaker for one upstream, safe on the event loop, shared by all replicas.

    Give it `redis=None` for a breaker local to this process. Call `start()` to begin syncing
    and `stop()` at shutdown.
    """

    def __init__(self, upstream: str, redis: Redis | None, *, fail_max: int = 5, reset_timeout: float = 30.0,
                 sync_interval: float = 0.5, redis_timeout: float = REDIS_TIMEOUT) -> None:
        self.upstream = upstream
        self._redis = redis
        self._key = f"dualgate:breaker:{upstream}"
        self._publish = redis.register_script(_PUBLISH) if redis is not None else None
        self._sync_interval = sync_interval
        self._redis_timeout = redis_timeout
        self._storage = _SharedStorage()
        self._cb = pybreaker.CircuitBreaker(fail_max=fail_max, reset_timeout=reset_timeout,
                                            state_storage=self._storage, listeners=[_OnStateChange(self._state_changed)],
                                            name=upstream)
        # results of calls admitted before the latest state change are stale: they must not
        # close a circuit that opened meanwhile, nor count towards the next one
        self._generation = 0
        self._trial_in_flight = False
        self._changed = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._redis_down = False
        BREAKER_STATE.labels(upstream).set(0)

    @property
    def state(self) -> str:
        """closed, half-open or open."""
        return self._cb.state.name

    # ---- calls ----------------------------------------------------------------------------

    async def call(self, fn: Callable[P, Awaitable[httpx.Response]], *args: P.args,
                   **kwargs: P.kwargs) -> httpx.Response:
        """Await `fn(*args, **kwargs)` if the circuit lets it through and judge its response.

        Returns the response whatever its status (the caller decides what a 503 means to it);
        raises BreakerOpen without calling `fn` while the circuit is open.
        """
        async with self.guard() as attempt:
            response = await fn(*args, **kwargs)
            attempt.record(response)
            return response

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[Attempt]:
        """For calls `call` cannot wrap: `async with breaker.guard() as attempt: ... attempt.record(resp)`.

        An exception leaving the block is judged by itself; a block that neither raises nor
        records is a bug and raises RuntimeError (it would otherwise hide every 5xx).
        """
        attempt = self._admit()
        try:
            yield attempt
        except BaseException as exc:
            if attempt.failed is None and is_upstream_failure(exc):
                attempt.failed = True
            self._settle(attempt)
            raise
        self._settle(attempt)
        if attempt.failed is None:
            raise RuntimeError(f"breaker guard for {self.upstream} exited without record()")

    def _admit(self) -> Attempt:
        state = self._cb.state.name
        if state == STATE_OPEN:
            wait = self.reopens_in()
            if wait > 0:
                raise BreakerOpen(self.upstream, wait)
            self._cb.half_open()
            state = STATE_HALF_OPEN
        if state == STATE_HALF_OPEN:
            if self._trial_in_flight:  # one trial at a time; the rest wait for its verdict
                raise BreakerOpen(self.upstream, min(self._cb.reset_timeout, 1.0))
            self._trial_in_flight = True
            return Attempt(self._generation, trial=True)
        return Attempt(self._generation, trial=False)

    def _settle(self, attempt: Attempt) -> None:
        if attempt.trial:
            self._trial_in_flight = False
        if attempt.failed is None or attempt.generation != self._generation:
            return
        with contextlib.suppress(_UpstreamFailed, pybreaker.CircuitBreakerError):
            self._cb.call(_replay, attempt.failed)

    def reopens_in(self) -> float:
        """Seconds until an open breaker lets a trial call through (0 when it would now, or is not open)."""
        opened_at = self._storage.opened_at
        if opened_at is None:
            return 0.0
        return opened_at.timestamp() + self._cb.reset_timeout - time.time()

    def _state_changed(self, state: str) -> None:
        self._generation += 1
        BREAKER_STATE.labels(self.upstream).set(_GAUGE_VALUE[state])
        log.warning("circuit state changed", extra={"upstream": self.upstream, "state": state})
        self._changed.set()  # publish a local change now rather than at the next poll

    # ---- sharing through Redis --------------------------------------------------------------

    async def start(self) -> None:
        if self._redis is not None:
            self._stopping = False
            self._sync_task = asyncio.create_task(self._sync_forever(), name=f"breaker-sync-{self.upstream}")

    async def stop(self) -> None:
        task = self._sync_task
        if task is None:
            return
        # a flag, not only cancel(): on 3.11 a cancel landing as a timeout fires can be swallowed
        self._stopping = True
        self._changed.set()
        await asyncio.wait({task}, timeout=self._redis_timeout + 1.0)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        self._sync_task = None

    async def _sync_forever(self) -> None:
        while not self._stopping:
            try:
                await self._sync_once()
            except Exception:  # a bad value in Redis must not end the sharing for good
                log.exception("breaker sync failed", extra={"upstream": self.upstream})
            # a local change is published at once; otherwise poll for the other replicas' changes
            if not self._stopping:
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({changed}, timeout=self._sync_interval)
                changed.cancel()
            self._changed.clear()

    async def _sync_once(self) -> None:
        assert self._redis is not None and self._publish is not None
        storage = self._storage
        pushed = storage.changed_at if storage.unpublished else None
        try:
            async with asyncio.timeout(self._redis_timeout):
                if pushed is not None:
                    opened_at = storage.opened_at.timestamp() if storage.opened_at else 0.0
                    remote = await self._publish(keys=[self._key],
                                                 args=[storage.state, repr(opened_at), repr(pushed), STATE_TTL])
                else:
                    remote = await self._redis.hmget(self._key, ["state", "opened_at", "changed_at"])
        except (RedisError, OSError) as exc:  # local state keeps working; sharing resumes later
            if not self._redis_down:
                self._redis_down = True
                log.warning("breaker state not shared: redis unavailable",
                            extra={"upstream": self.upstream, "error": repr(exc)})
            return
        self._redis_down = False
        if pushed is not None and storage.changed_at == pushed:
            storage.unpublished = False
        self._adopt(remote)

    def _adopt(self, remote: list[bytes | str | None]) -> None:
        state, opened_at, changed_at = (v.decode() if isinstance(v, bytes) else v for v in remote)
        if state not in _SHARED or changed_at is None or float(changed_at) <= self._storage.changed_at:
            return
        self._storage.adopt(state, float(opened_at or 0), float(changed_at))
        self._cb.state  # noqa: B018 -- pybreaker notices the new state now, so stale results are fenced
