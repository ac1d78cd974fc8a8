"""The gateway's routes: authenticate, limit, then the chat path or a resilient forward to the domain's service."""

from __future__ import annotations

import time

from litestar import HttpMethod, Request, Response, get, route
from litestar.datastructures import State
from litestar.response import Stream

from common.contracts import route_of
from common.errors import ApiError, not_found
from common.metrics import stage_done
from common.security import service_principal
from gateway.authn import Identity
from gateway.forward import admit, forward_to, key_rate
from gateway.proxy import request_body_too_large

# answered without credentials: public key material
PUBLIC_PATHS = frozenset({"/.well-known/jwks.json"})
CHAT_COMPLETIONS = "/v1/chat/completions"


def match(domain: str, path: str) -> str | None:
    """The service answering `path` on this domain's gateway."""
    found = route_of(path)
    return found[1] if found and found[0] == domain else None


@route(["/v1/{path:path}", "/.well-known/{path:path}"],
       http_method=[HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH, HttpMethod.DELETE])
async def forward(request: Request, state: State) -> Response | Stream:
    deps = state.deps
    path = request.url.path
    service = match(deps.domain, path)
    if service is None:
        raise not_found(f"No route for {request.method} {path}.", code="unknown_route")
    if path in PUBLIC_PATHS:  # public key material: no credentials, no per-key limit
        identity = Identity(service_principal(deps.service))
        return await forward_to(deps.service, deps.upstreams[service], deps.tokens, deps.last_known, request,
                                identity, {}, deps.total_timeout)
    started = time.perf_counter()
    identity = await deps.auth.authenticate(request)
    stage_done(deps.service, "auth", started)
    rate = key_rate(deps.requests, identity, identity.plan.requests_per_min)
    if request_body_too_large(request, deps.max_body_bytes):
        await admit(deps.service, rate)  # counted all the same; over the limit, the caller hears the 429
        raise ApiError(413, "Request body too large.", code="request_too_large")
    if service == "chat" and path == CHAT_COMPLETIONS and request.method == "POST":
        return await deps.chat_path.handle(request, identity, rate)
    return await forward_to(deps.service, deps.upstreams[service], deps.tokens, deps.last_known, request, identity,
                            await admit(deps.service, rate), deps.total_timeout)


@get("/internal/status", include_in_schema=False, sync_to_thread=False)
def internal_status(state: State) -> dict:
    """What the router's /status shows of this gateway: breakers, cache, fallbacks."""
    return state.deps.status()


route_handlers = [forward, internal_status]
