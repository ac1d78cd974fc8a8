"""The router's hot path: route by prefix, per-IP bucket, body limit, relay.

Per request: per-IP token bucket (decided in process, shared through Redis every 0.1 s), body limit,
request id and traceparent (set by the observability middleware, passed on), then a healthy member of
the domain's pool behind the domain's breaker. A connect error, a timeout, the member found down, or an
unflagged 5xx before the first byte sends the same request to the fallback gateway
(`x-dualgate-route: fallback`). After the first byte the answer is relayed as it comes, unbuffered,
and never replayed; a stream cut then ends with an error event.

It is a Litestar ASGI handler mounted at "/" (the app's own routes, /status, /healthz, /readyz and
/metrics, match first): relaying bytes is all it does, so it takes scope/receive/send as they are
rather than parsing a request and building a response it would only copy.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httpx
import msgspec
from litestar.handlers import asgi
from litestar.types import Receive, Scope, Send

from common.breaker import BreakerOpen
from common.contracts import DEGRADED_HEADER, ROUTE_HEADER, UPSTREAM_HEADER, route_of
from common.errors import ApiError, not_found
from common.http import HOP_HEADERS, UNSENDABLE, unsendable
from common.limits import rate_headers, retry_after
from common.logging import request_id_var, trace_id_var
from common.metrics import FAILOVERS, FALLBACKS, RATE_LIMITED
from common.sse import error_event
from router.pools import GatewayPool, Member, MemberDown

if TYPE_CHECKING:
    from router.app import RouterDeps

log = logging.getLogger(__name__)

TRUSTED_PROXIES = frozenset({"127.0.0.1", "::1"})
SMALL_BODY = 65_536  # whole answers up to this size are passed on whole
_DROP_REQUEST = frozenset(h.encode() for h in HOP_HEADERS)
_DROP_RESPONSE = frozenset(h.encode() for h in HOP_HEADERS) | {b"content-length", b"date", b"server",
                                                              b"x-request-id"}
_encoder = msgspec.json.Encoder()
_DEGRADED = DEGRADED_HEADER.encode()
_ROUTE = ROUTE_HEADER.encode()
_SSE = b"text/event-stream"


def domain_of(path: str) -> str | None:
    found = route_of(path)
    return found[0] if found else None


class _ClientGone(Exception):
    """The client disconnected before its request arrived whole."""


class _Failed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NoBreaker:
    """Stands in for a pool without a breaker (the fallback gateway's)."""

    class _Verdict:
        failed: bool | None = None

    class _Guard:
        async def __aenter__(self):
            return _NoBreaker._Verdict()

        async def __aexit__(self, *exc) -> bool:
            return False

    def guard(self):
        return self._Guard()


_NO_BREAKER = _NoBreaker()


async def _try_pool(pool: GatewayPool, method: str, path_qs: str, body: bytes, headers: list[tuple[bytes, bytes]],
                    first_byte_timeout: float) -> httpx.Response:
    """A response from a healthy member (trying the next one after a refused connection), or _Failed."""
    breaker = pool.breaker or _NO_BREAKER
    tried: tuple[Member, ...] = ()
    while (member := pool.pick(exclude=tried)) is not None:
        tried += (member,)
        try:
            async with breaker.guard() as attempt:
                try:
                    response = await pool.send(member, method, member.url + path_qs, body, headers,
                                               first_byte_timeout)
                except httpx.ConnectError:
                    attempt.failed = True
                    member.mark_down("connection refused")
                    raise
                except UNSENDABLE:
                    raise
                except (MemberDown, TimeoutError, httpx.HTTPError):
                    attempt.failed = True
                    raise
                # a flagged degraded answer, an upstream's own error passed on, or a limit's 429 comes
                # from a healthy gateway: relayed, not failed over
                attempt.failed = (response.status_code >= 500 and DEGRADED_HEADER not in response.headers
                                  and UPSTREAM_HEADER not in response.headers)
        except BreakerOpen:
            raise _Failed("circuit open") from None
        except UNSENDABLE as exc:  # never sent: the caller's 400, no verdict on the gateway, no failover
            raise unsendable(exc) from None
        except httpx.ConnectError:
            continue  # nothing was sent: the next member may take it
        except MemberDown as exc:
            raise _Failed(f"gateway down ({exc})") from None
        except (TimeoutError, httpx.TimeoutException):
            raise _Failed("no first byte in time") from None
        except httpx.HTTPError as exc:
            raise _Failed(type(exc).__name__) from None
        if attempt.failed:
            await response.aclose()
            raise _Failed(f"status {response.status_code}")
        return response
    raise _Failed("no healthy gateway")


async def _send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, error: ApiError, extra: dict[str, str] | None = None) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in {**error.headers, **(extra or {})}.items()]
    await _send_whole(send, error.status, headers, _encoder.encode(error.body))


@asgi("/", is_mount=True, copy_scope=False)
async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
    """Every path the app's own routes do not match: a domain's, relayed, or a 404."""
    # as the client sent it, relayed unchanged (the mount rewrites scope["path"])
    path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    domain = domain_of(path)
    scope["path_template"] = f"/proxy/{domain}" if domain else "unmatched"
    try:
        if domain is None:
            raise not_found(f"No route for {scope['method']} {path}.", code="unknown_route")
        await _route(scope["app"].state.deps, domain, path, scope, receive, send)
    except ApiError as error:
        await _send_error(send, error)
    except _ClientGone:
        pass


async def _route(deps: RouterDeps, domain: str, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    peer = scope["client"][0] if scope.get("client") else ""
    forwarded = request_id = traceparent = None
    length = -1
    headers: list[tuple[bytes, bytes]] = []  # relayed as the bytes they came as (latin-1 allowed)
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            forwarded = value.decode("latin-1")
            continue
        if name == b"content-length":
            length = int(value) if value.isdigit() else -1
        elif name == b"x-request-id":
            request_id = value
        elif name == b"traceparent":
            traceparent = value
        if name not in _DROP_REQUEST:
            headers.append((name, value))
    ip = forwarded.rsplit(",", 1)[-1].strip() if forwarded and peer in TRUSTED_PROXIES else peer
    decision = await deps.ip_limiter.hit(ip, deps.ip_limit)
    if not decision.allowed:
        RATE_LIMITED.labels("router", "ip").inc()
        raise ApiError(429, f"Too many requests from this address ({decision.limit} per minute).",
                       type="requests", code="rate_limit_exceeded",
                       headers={**rate_headers(requests=decision), "Retry-After": retry_after(decision.retry_after)})
    if length > deps.max_body_bytes:
        raise ApiError(413, "Request body too large.", code="request_too_large")
    body = await _read_body(receive, deps.max_body_bytes)
    headers.append((b"x-forwarded-for", ip.encode("latin-1")))
    if request_id is None:
        headers.append((b"x-request-id", request_id_var.get().encode()))
    if traceparent is None:
        headers.append((b"traceparent", f"00-{trace_id_var.get()}-{'0' * 15}1-01".encode()))
    query = scope.get("query_string") or b""
    path_qs = path + ("?" + query.decode("latin-1") if query else "")
    method = scope["method"]
    pool: GatewayPool = deps.pools[domain]
    try:
        upstream = await _try_pool(pool, method, path_qs, body, headers, deps.first_byte_timeout)
        route = domain
    except _Failed as failed:
        # nothing has reached the client yet: the same request goes to the fallback gateway
        pool.failovers += 1
        FAILOVERS.labels(domain, failed.reason.split(" ")[0]).inc()
        log.warning("gateway failed before first byte, failing over",
                    extra={"domain": domain, "reason": failed.reason})
        try:
            upstream = await _try_pool(deps.fallback, method, path_qs, body, headers, deps.first_byte_timeout)
            route = "fallback"
        except _Failed as also:
            FALLBACKS.labels("router", "degraded").inc()
            raise ApiError(503, f"The service is degraded and cannot answer this request now ({domain} gateway: "
                           f"{failed.reason}; fallback gateway: {also.reason}). Retry shortly.",
                           type="service_unavailable", code="degraded",
                           headers={"Retry-After": "5", DEGRADED_HEADER: "degraded", ROUTE_HEADER: "none"}) from None
    await _relay(upstream, route, receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "Request body too large.", code="request_too_large")
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def _relay(upstream: httpx.Response, route: str, receive: Receive, send: Send) -> None:
    headers = [(name.lower(), value) for name, value in upstream.headers.raw if name.lower() not in _DROP_RESPONSE]
    headers.append((_ROUTE, route.encode()))
    content_type = upstream.headers.get("content-type", "").encode()
    length = upstream.headers.get("content-length")
    try:
        if length is not None and length.isdigit() and int(length) <= SMALL_BODY and not content_type.startswith(_SSE):
            try:
                body = b"".join([chunk async for chunk in upstream.aiter_raw()])
            except httpx.HTTPError:
                raise ApiError(502, "The gateway's answer was cut before it finished.", type="server_error",
                               code="stream_interrupted") from None
            await _send_whole(send, upstream.status_code, headers, body)
            return
        await send({"type": "http.response.start", "status": upstream.status_code, "headers": headers})
        gone = asyncio.ensure_future(receive())  # resolves when the client disconnects
        ended_clean = True
        try:
            async for chunk in upstream.aiter_raw():
                if gone.done():
                    return
                ended_clean = chunk.endswith(b"\n\n")
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError:
            if content_type.startswith(_SSE):  # never a silent cut: the client is told
                tail = b"" if ended_clean else b"\n\n"
                await send({"type": "http.response.body", "more_body": True,
                            "body": tail + error_event("The gateway's stream was cut before it finished.",
                                                       code="stream_interrupted")})
        finally:
            gone.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await upstream.aclose()  # back to the pool when read whole, closed otherwise
