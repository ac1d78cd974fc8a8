"""The router's routes: its own /status, then every other path relayed by router.proxy."""

from __future__ import annotations

from litestar import Response, get
from litestar.datastructures import State

from router.proxy import proxy


@get("/status", include_in_schema=False)
async def status(state: State) -> Response:
    """Every component as the router sees it: gateways (health, breakers, cache, fallbacks), services."""
    return Response(await state.deps.status(), media_type="application/json")


route_handlers = [status, proxy]
