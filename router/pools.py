"""Gateway pools: members with active health checks, one circuit breaker per domain.

A member that fails its health check (or refuses a connection) is taken out at once, and every
request still waiting for its first byte from it is released to fail over: one hung gateway never
holds every request. It comes back on its first passing check.

The hot path speaks to gateways through one long-lived httpx transport per pool (keep-alive
connections sized for the concurrency), by httpx's transport API: the router only relays bytes, so
the client layer's cookie jar, redirects, hooks and URL merging would be pure cost on every request.
Health checks and /status use their own client, so a slow probe never takes a connection a request
is waiting for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx

from common.breaker import AsyncBreaker
from common.http import FastTransport
from common.settings import Settings

log = logging.getLogger(__name__)

MAX_PARSED_URLS = 4096


class MemberDown(Exception):
    """The member was found down while this request waited for its first byte."""


@dataclass(eq=False)
class GatewayConnections:
    """A pool's keep-alive connections; the read timeout is the router's first-byte (and idle) bound."""

    transport: FastTransport
    timeout: dict[str, float]
    # parsed once: the same few routes come again and again, and httpx parses a URL string in Python
    _urls: dict[str, httpx.URL] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, max_connections: int = 256) -> GatewayConnections:
        return cls(
            transport=FastTransport(max_connections),
            timeout={"connect": settings.connect_timeout, "read": settings.router_first_byte_timeout,
                     "write": 5.0, "pool": 5.0})

    async def send(self, method: str, url: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> httpx.Response:
        """Status line and headers; the body is read (or the connection released) by the caller."""
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= MAX_PARSED_URLS:  # query strings vary without end: start again
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        request = httpx.Request(method, parsed, content=body or None, headers=headers,
                                extensions={"timeout": self.timeout})
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self.transport.aclose()


@dataclass(eq=False)
class Member:
    url: str
    healthy: bool = True
    last_error: str = ""
    checked_at: float = 0.0
    _down: asyncio.Future | None = field(default=None, repr=False)

    def down_signal(self) -> asyncio.Future:
        """Resolved when this member is marked down (shared by every waiting request)."""
        if self._down is None or self._down.done():
            self._down = asyncio.get_running_loop().create_future()
        return self._down

    def mark_down(self, why: str) -> None:
        if self.healthy:
            log.warning("gateway marked down", extra={"url": self.url, "why": why})
        self.healthy = False
        self.last_error = why
        if self._down is not None and not self._down.done():
            self._down.set_result(why)

    def mark_up(self) -> None:
        if not self.healthy:
            log.info("gateway back up", extra={"url": self.url})
        self.healthy = True
        self.last_error = ""


@dataclass(eq=False)
class GatewayPool:
    name: str
    connections: GatewayConnections
    members: list[Member]
    breaker: AsyncBreaker | None = None
    failovers: int = 0
    _next: int = 0

    @classmethod
    def of(cls, name: str, connections: GatewayConnections, urls: list[str], breaker: AsyncBreaker | None = None):
        return cls(name=name, connections=connections, members=[Member(u) for u in urls], breaker=breaker)

    def pick(self, exclude: tuple[Member, ...] = ()) -> Member | None:
        """Round robin over the healthy members."""
        count = len(self.members)
        for i in range(count):
            member = self.members[(self._next + i) % count]
            if member.healthy and member not in exclude:
                self._next = (self._next + i + 1) % count
                return member
        return None

    async def send(self, member: Member, method: str, url: str, body: bytes, headers: list[tuple[bytes, bytes]],
                   first_byte_timeout: float) -> httpx.Response:
        """The member's status line and headers (body unread), or MemberDown / TimeoutError / httpx errors."""
        down = member.down_signal()
        sending = asyncio.ensure_future(self.connections.send(method, url, body, headers))
        done, _ = await asyncio.wait((sending, down), timeout=first_byte_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if sending in done:
            return sending.result()
        sending.cancel()
        try:
            response = await sending
            await response.aclose()
        except BaseException:  # cancelled or failed: either way it is abandoned
            pass
        if down in done:
            raise MemberDown(member.last_error)
        raise TimeoutError("no first byte in time")

    def view(self) -> dict:
        return {
            "breaker": self.breaker.state if self.breaker else None,
            "failovers": self.failovers,
            "gateways": [{"url": m.url, "healthy": m.healthy, "last_error": m.last_error,
                          "checked_at": round(m.checked_at, 3)} for m in self.members],
        }


class HealthChecker:
    """Probes every member's /readyz every `interval`; `timeout` bounds each probe."""

    def __init__(self, client: httpx.AsyncClient, pools: list[GatewayPool], *, interval: float, timeout: float) -> None:
        self._client = client
        self._pools = pools
        self._interval = interval
        self._timeout = timeout
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        members = [m for pool in self._pools for m in pool.members]
        while True:
            started = time.monotonic()
            await asyncio.gather(*(self.check(m) for m in members))
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def check(self, member: Member) -> None:
        try:
            response = await self._client.get(f"{member.url}/readyz", timeout=self._timeout)
            ok, why = response.status_code == 200, f"readyz {response.status_code}"
        except (httpx.HTTPError, OSError) as exc:
            ok, why = False, f"{type(exc).__name__}"
        member.checked_at = time.time()
        if ok:
            member.mark_up()
        else:
            member.mark_down(why)
