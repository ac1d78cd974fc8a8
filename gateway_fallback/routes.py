"""The fallback gateway's route: today every request gets the last layer of the fallback chain.

Cached auth and the earlier layers of the chain come with the edge-resilience work.
"""

from __future__ import annotations

from litestar import HttpMethod, Request, Response, route
from litestar.datastructures import State

from fallback import degraded_response


@route("/v1/{path:path}", http_method=[HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH,
                                       HttpMethod.DELETE])
async def serve_degraded(request: Request, state: State) -> Response:
    return degraded_response(state.service, "primary gateway unavailable")


route_handlers = [serve_degraded]
