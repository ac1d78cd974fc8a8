"""Route by path prefix to a domain's gateway pool; fail over to the fallback gateway before the first byte.

Per request: per-IP token bucket, body limit, request id and traceparent (the app's middleware and
the client's hook), then a healthy member of the domain's pool behind the domain's breaker. A
connect error, a timeout, the member found down, or an unflagged 5xx before the first byte sends the
same request to the fallback gateway (`x-dualgate-route: fallback`). After the first byte the
answer is relayed as it comes, unbuffered, and never replayed.
"""

from __future__ import annotations

import contextlib
import logging

import httpx
from litestar import HttpMethod, Request, Response, get, route
from litestar.datastructures import State
from litestar.response import Stream

from common.breaker import BreakerOpen
from common.errors import ApiError, not_found
from common.http import forward_headers
from common.limits import rate_headers, retry_after
from common.metrics import FAILOVERS, RATE_LIMITED
from common.proxy import relay_response, request_body_too_large
from fallback import DEGRADED_HEADER, degraded_response
from router.pools import GatewayPool, Member, MemberDown

log = logging.getLogger(__name__)

DOMAIN_PREFIXES: tuple[tuple[str, str], ...] = (
    ("/v1/chat", "ai"), ("/v1/models", "ai"), ("/v1/conversations", "ai"),
    ("/v1/auth", "identity"), ("/v1/keys", "identity"), ("/v1/users", "identity"), ("/v1/usage", "identity"),
    ("/.well-known", "identity"),
)
ROUTE_HEADER = "x-dualgate-route"
TRUSTED_PROXIES = frozenset({"127.0.0.1", "::1"})


def domain_of(path: str) -> str | None:
    for prefix, domain in DOMAIN_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return domain
    return None


def client_ip(request: Request) -> str:
    """The caller's address: the edge's X-Forwarded-For when the edge is who connected, else the peer."""
    peer = request.client.host if request.client else ""
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded and peer in TRUSTED_PROXIES:
        return forwarded.rsplit(",", 1)[-1].strip()
    return peer


class _Failed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NoBreaker:
    """Stands in for a pool without a breaker (the fallback gateway's)."""

    @contextlib.asynccontextmanager
    async def guard(self):
        yield _Verdict()


class _Verdict:
    failed: bool | None = None


async def _try_pool(pool: GatewayPool, request: Request, path: str, body: bytes, headers: dict[str, str],
                    first_byte_timeout: float) -> httpx.Response:
    """A response from a healthy member (trying the next one after a refused connection), or _Failed."""
    breaker = pool.breaker or _NoBreaker()
    tried: tuple[Member, ...] = ()
    while (member := pool.pick(exclude=tried)) is not None:
        tried += (member,)
        upstream = pool.client.build_request(request.method, member.url + path, params=request.url.query or None,
                                             content=body, headers=headers)
        try:
            async with breaker.guard() as attempt:
                try:
                    response = await pool.send(member, upstream, first_byte_timeout)
                except httpx.ConnectError:
                    attempt.failed = True
                    member.mark_down("connection refused")
                    raise
                except (MemberDown, TimeoutError, httpx.HTTPError):
                    attempt.failed = True
                    raise
                # a flagged degraded answer or a limit's 429 comes from a healthy gateway
                attempt.failed = response.status_code >= 500 and DEGRADED_HEADER not in response.headers
        except BreakerOpen:
            raise _Failed("circuit open") from None
        except httpx.ConnectError:
            continue  # nothing was sent: the next member may take it
        except MemberDown as exc:
            raise _Failed(f"gateway down ({exc})") from None
        except TimeoutError:
            raise _Failed("no first byte in time") from None
        except httpx.HTTPError as exc:
            raise _Failed(type(exc).__name__) from None
        if attempt.failed:
            await response.aclose()
            raise _Failed(f"status {response.status_code}")
        return response
    raise _Failed("no healthy gateway")


@route("/{path:path}", http_method=[HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH,
                                    HttpMethod.DELETE])
async def route_request(request: Request, state: State) -> Response | Stream:
    deps = state.deps
    path = request.url.path
    domain = domain_of(path)
    if domain is None:
        raise not_found(f"No route for {request.method} {path}.", code="unknown_route")
    ip = client_ip(request)
    decision = await deps.ip_limiter.hit(ip, deps.ip_limit)
    if not decision.allowed:
        RATE_LIMITED.labels("router", "ip").inc()
        raise ApiError(429, f"Too many requests from this address ({decision.limit} per minute).", type="requests",
                       code="rate_limit_exceeded",
                       headers={**rate_headers(requests=decision), "Retry-After": retry_after(decision.retry_after)})
    if request_body_too_large(request, deps.max_body_bytes):
        raise ApiError(413, "Request body too large.", code="request_too_large")
    body = await request.body()
    if len(body) > deps.max_body_bytes:
        raise ApiError(413, "Request body too large.", code="request_too_large")
    headers = forward_headers(request.headers)
    headers["x-forwarded-for"] = ip
    pool: GatewayPool = deps.pools[domain]
    try:
        upstream = await _try_pool(pool, request, path, body, headers, deps.first_byte_timeout)
        return relay_response(upstream, {ROUTE_HEADER: domain})
    except _Failed as failed:
        reason = failed.reason
    # nothing has reached the client yet: the same request goes to the fallback gateway
    pool.failovers += 1
    FAILOVERS.labels(domain, reason.split(" ")[0]).inc()
    log.warning("gateway failed before first byte, failing over", extra={"domain": domain, "reason": reason})
    fallback: GatewayPool = deps.fallback
    try:
        upstream = await _try_pool(fallback, request, path, body, headers, deps.first_byte_timeout)
    except _Failed as failed:
        return degraded_response("router", f"{domain} gateway: {reason}; fallback gateway: {failed.reason}",
                                 {ROUTE_HEADER: "none"})
    return relay_response(upstream, {ROUTE_HEADER: "fallback"})


@get("/status", include_in_schema=False)
async def status(state: State) -> Response:
    """Every component as the router sees it: gateways (health, breakers, cache, fallbacks), services."""
    return Response(await state.deps.status(), media_type="application/json")


route_handlers = [status, route_request]
