"""Forwarding one request to an upstream and relaying its answer byte for byte (router and gateways).

`Hop` is one upstream as a gateway sees it: a long-lived client, a circuit breaker, timeouts for
connect / first byte / the whole answer, and retries (tenacity) that happen only before the first
byte, only for requests that are safe to repeat, and only while the retry budget allows.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
from litestar import Request
from litestar.response import Stream
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from common.breaker import AsyncBreaker, BreakerOpen
from common.http import HOP_HEADERS, UNSENDABLE, relay, unsendable

# Response headers that describe the upstream's framing, not the content.
_RESPONSE_DROP = HOP_HEADERS | {"content-length", "date", "server", "x-request-id"}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_ERROR_BODY = 65_536
# the request could not be put on the wire as it is: the caller's input, never the upstream's failure
async def open_upstream(client: httpx.AsyncClient, request: Request, url: str, *, body: bytes,
                        headers: dict[str, str]) -> httpx.Response:
    """Send and wait for the status line and headers only; the body is relayed later, unbuffered."""
    upstream_request = client.build_request(request.method, url, params=request.url.query or None,
                                            content=body, headers=headers)
    return await client.send(upstream_request, stream=True)


def response_headers(upstream: httpx.Response, extra_headers: dict[str, str] | None = None) -> dict[str, str]:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP}
    if extra_headers:
        headers.update(extra_headers)
    return headers


def relay_response(upstream: httpx.Response, extra_headers: dict[str, str] | None = None) -> Stream:
    return Stream(relay(upstream), status_code=upstream.status_code,
                  headers=response_headers(upstream, extra_headers), media_type=upstream.headers.get("content-type"))


def request_body_too_large(request: Request, limit: int) -> bool:
    length = request.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) > limit


def may_retry(method: str, headers: object) -> bool:
    """Safe methods, and requests the caller made idempotent with an Idempotency-Key."""
    return method in SAFE_METHODS or bool(headers.get("idempotency-key"))


@dataclass(frozen=True)
class ErrorAnswer:
    """A 5xx the upstream itself sent (its own, honest error body), kept for callers that pass it on."""

    status: int
    headers: dict[str, str]
    content: bytes


class UpstreamUnavailable(Exception):
    """The upstream failed before its first byte (connect error, timeout, 5xx, open circuit)."""

    def __init__(self, upstream: str, reason: str, *, retry_after: float | None = None,
                 answer: ErrorAnswer | None = None) -> None:
        super().__init__(f"{upstream}: {reason}")
        self.upstream = upstream
        self.reason = reason
        self.retry_after = retry_after
        self.answer = answer  # the upstream's own 5xx answer, when there was one


class _AttemptFailed(Exception):
    def __init__(self, reason: str, *, connect: bool = False, answer: ErrorAnswer | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connect = connect  # the request never left: safe to repeat whatever the method
        self.answer = answer


@dataclass
class RetryBudget:
    """Retries may add at most `ratio` of the traffic (plus `per_second` as a floor), never a storm."""

    ratio: float = 0.1
    per_second: float = 2.0
    cap: float = 20.0
    initial: float = 5.0  # retries held at the start
    _balance: float = field(init=False)
    _at: float = field(default_factory=time.monotonic, init=False)

    def __post_init__(self) -> None:
        self._balance = self.initial

    def deposit(self) -> None:
        self._refill()
        self._balance = min(self.cap, self._balance + self.ratio)

    def withdraw(self) -> bool:
        self._refill()
        if self._balance >= 1.0:
            self._balance -= 1.0
            return True
        return False

    def _refill(self) -> None:
        now = time.monotonic()
        self._balance = min(self.cap, self._balance + (now - self._at) * self.per_second)
        self._at = now


@dataclass
class Hop:
    """One upstream: client, breaker, timeouts, retries. Built once per process."""

    name: str
    client: httpx.AsyncClient
    breaker: AsyncBreaker
    first_byte_timeout: float
    total_timeout: float
    attempts: int = 2  # 1 = never retry
    budget: RetryBudget = field(default_factory=RetryBudget)

    async def open(self, method: str, url: str, *, content: bytes = b"", headers: dict[str, str] | None = None,
                   params: object = None, retry_ok: bool = False) -> httpx.Response:
        """The upstream's response with its body still unread, for any status below 500.

        Raises UpstreamUnavailable for a failure before the first byte (after the retries allowed).
        """
        self.budget.deposit()

        def retryable(exc: BaseException) -> bool:
            return (isinstance(exc, _AttemptFailed) and (retry_ok or exc.connect)
                    and self.budget.withdraw())

        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(self.attempts),
                                               wait=wait_random_exponential(multiplier=0.02, max=0.2),
                                               retry=retry_if_exception(retryable), reraise=True):
                with attempt:
                    return await self._once(method, url, content, headers, params)
        except BreakerOpen as exc:
            raise UpstreamUnavailable(self.name, "circuit open", retry_after=exc.retry_after) from None
        except _AttemptFailed as exc:
            raise UpstreamUnavailable(self.name, exc.reason, answer=exc.answer) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, method: str, url: str, content: bytes, headers: dict[str, str] | None,
                    params: object) -> httpx.Response:
        try:
            request = self.client.build_request(method, url, content=content, headers=headers, params=params)
        except UNSENDABLE as exc:
            raise unsendable(exc) from None
        try:
            async with self.breaker.guard() as attempt:
                async with asyncio.timeout(self.first_byte_timeout):
                    response = await self.client.send(request, stream=True)
                attempt.record(response)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _AttemptFailed(f"connect error: {exc!r}", connect=True) from None
        except (TimeoutError, httpx.TimeoutException):
            raise _AttemptFailed("no first byte in time") from None
        except UNSENDABLE as exc:  # not a verdict on the upstream (the breaker does not count it)
            raise unsendable(exc) from None
        except httpx.HTTPError as exc:
            raise _AttemptFailed(f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 500:
            answer = None
            try:
                async with asyncio.timeout(self.first_byte_timeout):
                    content = await response.aread()
                if len(content) <= _MAX_ERROR_BODY:
                    answer = ErrorAnswer(response.status_code, response_headers(response), content)
            except (TimeoutError, httpx.HTTPError):
                pass
            finally:
                await response.aclose()
            raise _AttemptFailed(f"status {response.status_code}", answer=answer)
        return response
