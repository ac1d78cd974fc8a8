"""The public OpenAPI document: every service's own Litestar schema, merged into one for the edge.

Handlers read their bodies themselves (common.errors.decode_body, so a bad body is a 400 naming the
field), which Litestar's schema cannot see: `documented()` puts the struct a handler decodes and the
errors it answers on the handler, and `public_document()` merges the services' schemas, keeping the
public routes (common.contracts.API_ROUTES) and adding the request bodies. The router, which may not
import the services, serves the merged document built ahead of time (`dualgate openapi` writes
PUBLIC_DOCUMENT; a test fails when it is stale).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi.datastructures import ResponseSpec
from litestar.routes import HTTPRoute

from common.contracts import route_of
from common.errors import ErrorEnvelope
from common.openai_schema import ChatCompletion

PUBLIC_DOCUMENT = Path(__file__).with_name("openapi.json")
OPENAPI_VERSION = "3.1.0"
REF_PREFIX = "#/components/schemas/"

# what every public operation can answer whatever its handler does: a bad parameter or body, no valid
# credential (the gateways), a limit (the router's per-IP bucket, the gateways' per-key and per-user
# limits) and a degraded chain that cannot answer
COMMON_ERRORS = (400, 401, 429, 503)
ERROR_DESCRIPTIONS = {
    400: "Invalid request: a parameter or a body field is missing, malformed or out of range (`param` names it).",
    401: "No valid API key or token.",
    403: "The credential lacks the scope for this operation.",
    404: "No such resource (another user's is answered the same).",
    409: "Conflicts with the current state (already exists, or still being answered); see `code`.",
    413: "Request body too large.",
    422: "This Idempotency-Key was already used with a different request.",
    429: "A rate limit or quota was reached; see Retry-After.",
    503: "Temporarily unavailable (flagged x-dualgate-degraded); retry after Retry-After.",
}
_BODY_KEY = "openapi_request_body"


# a handler answering a Response or a Stream has no answer schema Litestar can see
CHAT_COMPLETION_ANSWERS = {200: ResponseSpec(
    data_container=ChatCompletion, generate_examples=False,
    description="A chat.completion; with `stream: true`, text/event-stream of chat.completion.chunk events "
                "ending in `data: [DONE]` (a failure after the first byte is an `error` event).")}


def documented(body: type[msgspec.Struct] | None = None, *, body_required: bool = True,
               errors: Iterable[int] = (), answers: Mapping[int, ResponseSpec] | None = None) -> dict[str, Any]:
    """Route handler keyword arguments documenting the body the handler decodes itself and its errors
    (OpenAI-style error bodies): COMMON_ERRORS, 413 with a body, and `errors` (403, 404, 409 ...);
    `answers` for what Litestar cannot read from the handler's signature."""
    statuses = sorted({*COMMON_ERRORS, *errors, *((413,) if body else ())})
    responses = {status: ResponseSpec(data_container=ErrorEnvelope, description=ERROR_DESCRIPTIONS[status],
                                      generate_examples=False) for status in statuses}
    return {"responses": {**(answers or {}), **responses},
            "opt": {_BODY_KEY: (body, body_required)} if body else {}}


def service_document(app: Litestar) -> dict[str, Any]:
    """One service's schema, public paths only, with the request bodies its handlers documented."""
    document = msgspec.to_builtins(app.openapi_schema.to_schema())  # defaults may be structs
    paths = {path: item for path, item in document.get("paths", {}).items() if route_of(path)}
    bodies: dict[str, type[msgspec.Struct]] = {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path_format not in paths:
            continue
        for handler in route.route_handlers:
            if (documented_body := handler.opt.get(_BODY_KEY)) is None:
                continue
            struct, required = documented_body
            bodies[struct.__name__] = struct
            for method in handler.http_methods:
                operation = paths[route.path_format][method.lower()]
                operation["requestBody"] = {"required": required, "content": {
                    "application/json": {"schema": {"$ref": REF_PREFIX + struct.__name__}}}}
    schemas = document.get("components", {}).get("schemas", {})
    if bodies:
        _, components = msgspec.json.schema_components(bodies.values(), ref_template=REF_PREFIX + "{name}")
        for name, schema in components.items():
            schemas.setdefault(name, schema)  # a struct Litestar rendered already keeps its rendering
    return {"paths": paths, "schemas": schemas}


def public_document(apps: Mapping[str, Litestar], *, title: str = "dualgate", version: str = "1") -> dict[str, Any]:
    """The services' public routes as one OpenAPI 3.1 document. `apps` maps a service name to its app;
    a schema name two services use for different things is qualified by the later one's name."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for service, app in sorted(apps.items()):
        part = service_document(app)
        for name in sorted(part["schemas"]):
            if name in schemas and schemas[name] != part["schemas"][name]:
                part = _renamed(part, name, service.title() + name)
        schemas.update(part["schemas"])
        for path, item in part["paths"].items():
            paths.setdefault(path, {}).update(item)
    schemas = {name: schemas[name] for name in _referenced(paths, schemas)}  # the internal routes' go
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version,
                 "description": "The dualgate API at the edge. Every error is an OpenAI-style body: "
                                "{\"error\": {\"message\", \"type\", \"param\", \"code\"}}."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(schemas.items())),
                       "securitySchemes": {"bearer": {
                           "type": "http", "scheme": "bearer",
                           "description": "An API key (dg-...) or a JWT from /v1/auth/token."}}},
        "security": [{"bearer": []}],
    }


def _referenced(paths: dict[str, Any], schemas: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    todo = [paths]
    while todo:
        text = json.dumps(todo.pop())
        for name in schemas:
            if name not in found and json.dumps(REF_PREFIX + name) in text:
                found.add(name)
                todo.append(schemas[name])
    return found


def _renamed(part: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    text = json.dumps(part).replace(json.dumps(REF_PREFIX + old), json.dumps(REF_PREFIX + new))
    renamed = json.loads(text)
    renamed["schemas"][new] = renamed["schemas"].pop(old)
    return renamed


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=1, sort_keys=False).encode() + b"\n"


def load_public_document() -> bytes:
    """The merged document as built (PUBLIC_DOCUMENT), for the router to serve as it is."""
    return PUBLIC_DOCUMENT.read_bytes()
