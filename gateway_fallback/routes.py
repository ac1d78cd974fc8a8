"""The fallback gateway's routes.

AI domain: chat completions go to the chat service directly with a short wait, then the fallback
chain; the model list comes from the models service or its last good copy. Identity domain:
read-only answers (/v1/users/me, /v1/usage) from the users service or the last good copy; every
write answers 503 with Retry-After, flagged as degraded.
"""

from __future__ import annotations

from litestar import HttpMethod, Request, Response, get, route
from litestar.datastructures import State
from litestar.response import Stream

from common.contracts import route_of
from common.errors import ApiError, not_found
from fallback import degraded_response
from gateway.forward import admit, forward_to, key_rate
from gateway.proxy import request_body_too_large

READS = {"/v1/users/me": "users", "/v1/usage": "users", "/v1/models": "models"}
CHAT_COMPLETIONS = "/v1/chat/completions"


@route("/v1/{path:path}", http_method=[HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH,
                                       HttpMethod.DELETE])
async def serve(request: Request, state: State) -> Response | Stream:
    deps = state.deps
    path, method = request.url.path, request.method
    if route_of(path) is None:
        raise not_found(f"No route for {method} {path}.", code="unknown_route")
    identity = await deps.auth.authenticate(request)
    rate = key_rate(deps.requests, identity, deps.request_limit(identity.plan.requests_per_min))
    if request_body_too_large(request, deps.max_body_bytes):
        await admit(deps.service, rate)  # counted all the same; over the limit, the caller hears the 429
        raise ApiError(413, "Request body too large.", code="request_too_large")
    if path == CHAT_COMPLETIONS and method == "POST":
        return await deps.chat_path.handle(request, identity, rate)
    headers = await admit(deps.service, rate)
    service = READS.get(path) if method == "GET" else None
    if service is not None:
        return await forward_to(deps.service, deps.upstreams[service], deps.tokens, deps.last_known, request,
                                identity, headers, deps.total_timeout)
    what = "Changes" if method != "GET" else "This read"
    return degraded_response(deps.service, f"{what} cannot be served while the primary gateway is down", headers)


@get("/internal/status", include_in_schema=False, sync_to_thread=False)
def internal_status(state: State) -> dict:
    return state.deps.status()


route_handlers = [serve, internal_status]
