"""The gateway's only route: authenticate, then forward to the domain's service, streaming."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx
from litestar import HttpMethod, Request, Response, route
from litestar.datastructures import State
from litestar.response import Stream

from common.authn import Identity
from common.errors import ApiError, not_found
from common.http import forward_headers
from common.proxy import open_upstream, relay_response, request_body_too_large
from common.security import INTERNAL_TOKEN_HEADER, service_principal
from fallback import degraded_response

log = logging.getLogger(__name__)

# which service answers which path prefix, per domain
ROUTES: dict[str, tuple[tuple[str, str], ...]] = {
    "ai": (("/v1/chat/completions", "chat"), ("/v1/conversations", "chat"), ("/v1/models", "models")),
    "identity": (("/v1/keys", "auth"), ("/v1/auth", "auth"), ("/v1/users", "users"), ("/v1/usage", "users"),
                 ("/.well-known/jwks.json", "auth")),
}
# answered without credentials: public key material
PUBLIC_PATHS = frozenset({"/.well-known/jwks.json"})
_DROP_REQUEST_HEADERS = frozenset({"authorization", "cookie", INTERNAL_TOKEN_HEADER})


@dataclass(frozen=True)
class Upstream:
    audience: str
    client: httpx.AsyncClient


def match(domain: str, path: str) -> str | None:
    for prefix, service in ROUTES[domain]:
        if path == prefix or path.startswith(prefix + "/"):
            return service
    return None


@route(["/v1/{path:path}", "/.well-known/{path:path}"],
       http_method=[HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH, HttpMethod.DELETE])
async def forward(request: Request, state: State) -> Response | Stream:
    deps = state.deps
    service = match(deps.domain, request.url.path)
    if service is None:
        raise not_found(f"No route for {request.method} {request.url.path}.", code="unknown_route")
    if request.url.path in PUBLIC_PATHS:
        identity = Identity(service_principal(deps.service))
    else:
        identity = await deps.auth.authenticate(request)
    if request_body_too_large(request, deps.max_body_bytes):
        raise ApiError(413, "Request body too large.", code="request_too_large")
    body = await request.body()
    upstream = deps.upstreams[service]
    headers = forward_headers(request.headers, _DROP_REQUEST_HEADERS)
    headers.update(deps.tokens.headers(upstream.audience, identity.principal))
    try:
        response = await open_upstream(upstream.client, request, request.url.path, body=body, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("upstream failed before first byte", extra={"upstream": service, "error": repr(exc)})
        return degraded_response(deps.service, f"{service} unreachable")
    return relay_response(response)


route_handlers = [forward]
