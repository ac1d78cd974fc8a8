"""The router's own routes: /status. Proxied paths are served by router.proxy.EdgeProxy."""

from __future__ import annotations

from litestar import HttpMethod, Request, Response, get, route
from litestar.datastructures import State

from common.errors import not_found


@get("/status", include_in_schema=False)
async def status(state: State) -> Response:
    """Every component as the router sees it: gateways (health, breakers, cache, fallbacks), services."""
    return Response(await state.deps.status(), media_type="application/json")


@route("/{path:path}", http_method=[HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH,
                                    HttpMethod.DELETE], include_in_schema=False)
async def unknown(request: Request) -> Response:
    raise not_found(f"No route for {request.method} {request.url.path}.", code="unknown_route")


route_handlers = [status, unknown]
