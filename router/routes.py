"""The router's routes: its own /status, the public OpenAPI document, then every other path relayed by
router.proxy."""

from __future__ import annotations

from litestar import Response, get
from litestar.datastructures import State

from common.openapi import load_public_document
from router.proxy import proxy

OPENAPI_DOCUMENT = load_public_document()


@get("/status", include_in_schema=False)
async def status(state: State) -> Response:
    """Every component as the router sees it: gateways (health, breakers, cache, fallbacks), services."""
    return Response(await state.deps.status(), media_type="application/json")


@get("/schema/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_document() -> Response:
    """Every public route with its request body and error answers: the services' schemas, merged ahead of
    time (common.openapi), since the router cannot import the services. It takes the path of Litestar's
    own schema, which the app turns off."""
    return Response(OPENAPI_DOCUMENT, media_type="application/json")


route_handlers = [status, proxy]
