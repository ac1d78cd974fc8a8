"""Route by path prefix to a domain's gateway pool; fail over to the fallback gateway before the first byte."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import httpx
from litestar import HttpMethod, Request, Response, route
from litestar.datastructures import State
from litestar.response import Stream

from common.errors import ApiError, not_found
from common.http import forward_headers
from common.proxy import open_upstream, relay_response, request_body_too_large

log = logging.getLogger(__name__)

DOMAIN_PREFIXES: tuple[tuple[str, str], ...] = (
    ("/v1/chat", "ai"), ("/v1/models", "ai"), ("/v1/conversations", "ai"),
    ("/v1/auth", "identity"), ("/v1/keys", "identity"), ("/v1/users", "identity"), ("/v1/usage", "identity"),
    ("/.well-known", "identity"),
)
ROUTE_HEADER = "x-dualgate-route"


@dataclass
class GatewayPool:
    name: str
    client: httpx.AsyncClient
    urls: list[str]
    _next: itertools.cycle = field(init=False)

    def __post_init__(self) -> None:
        self._next = itertools.cycle(self.urls)

    def pick(self) -> str:
        return next(self._next)


def domain_of(path: str) -> str | None:
    for prefix, domain in DOMAIN_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return domain
    return None


@route("/{path:path}", http_method=[HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH,
                                    HttpMethod.DELETE])
async def route_request(request: Request, state: State) -> Response | Stream:
    deps = state.deps
    path = request.url.path
    domain = domain_of(path)
    if domain is None:
        raise not_found(f"No route for {request.method} {path}.", code="unknown_route")
    if request_body_too_large(request, deps.max_body_bytes):
        raise ApiError(413, "Request body too large.", code="request_too_large")
    body = await request.body()
    if len(body) > deps.max_body_bytes:
        raise ApiError(413, "Request body too large.", code="request_too_large")
    headers = forward_headers(request.headers)
    client_ip = request.client.host if request.client else ""
    headers["x-forwarded-for"] = ", ".join(filter(None, (request.headers.get("x-forwarded-for"), client_ip)))
    pool: GatewayPool = deps.pools[domain]
    try:
        upstream = await open_upstream(pool.client, request, pool.pick() + path, body=body, headers=headers)
        if upstream.status_code < 500:
            return relay_response(upstream, {ROUTE_HEADER: domain})
        await upstream.aclose()
        reason = f"status {upstream.status_code}"
    except httpx.HTTPError as exc:
        reason = repr(exc)
    # nothing has reached the client yet: the same request goes to the fallback gateway
    log.warning("gateway failed before first byte, failing over", extra={"domain": domain, "reason": reason})
    fallback: GatewayPool = deps.fallback
    upstream = await open_upstream(fallback.client, request, fallback.pick() + path, body=body, headers=headers)
    return relay_response(upstream, {ROUTE_HEADER: "fallback"})


route_handlers = [route_request]
