"""The edge's one OpenAPI document: every public route, its request body and its error answers."""

from __future__ import annotations

import json

import msgspec
import pytest
from litestar.routes import HTTPRoute

from common.contracts import API_ROUTES, route_of
from common.openapi import COMMON_ERRORS, PUBLIC_DOCUMENT, public_document
from stack.openapi import PUBLIC_SERVICES, build

# POSTs that take no body: the user is named by the path
BODILESS_POSTS = {"/v1/users/{user_id}/disable", "/v1/users/{user_id}/enable"}
ERROR_REF = "#/components/schemas/ErrorEnvelope"


@pytest.fixture(scope="module")
def document() -> dict:
    return json.loads(PUBLIC_DOCUMENT.read_text())


@pytest.fixture(scope="module")
def apps():
    import importlib

    from common.settings import Settings

    return {name: importlib.import_module(f"services.{name}.app").create_app(Settings.from_env(env={}, service=name))
            for name in PUBLIC_SERVICES}


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_the_committed_document_is_the_one_the_services_build():
    assert PUBLIC_DOCUMENT.read_bytes() == build(), "stale: run `./dualgate openapi` and commit common/openapi.json"


def test_every_public_route_appears_with_its_methods(document, apps):
    public = set()
    for app in apps.values():
        for route in app.routes:
            if isinstance(route, HTTPRoute) and route_of(route.path_format):
                public |= {(route.path_format, m.lower()) for h in route.route_handlers for m in h.http_methods
                           if h.resolve_include_in_schema() and m not in ("HEAD", "OPTIONS")}
    documented = {(path, method) for path, method, _ in operations(document)}
    assert public and documented == public
    for prefix, _, _ in API_ROUTES:  # the route table and the services agree: no prefix without a route
        assert any(path == prefix or path.startswith(prefix + "/") for path, _ in documented), prefix
    assert not [path for path, _ in documented if path.startswith("/internal")]


def test_every_post_and_patch_documents_the_body_its_handler_decodes(document):
    schemas = document["components"]["schemas"]
    for path, method, operation in operations(document):
        if method not in ("post", "patch") or path in BODILESS_POSTS:
            assert "requestBody" not in operation, (method, path)
            continue
        body = operation.get("requestBody")
        assert body, f"{method.upper()} {path} has no request body"
        ref = body["content"]["application/json"]["schema"]["$ref"]
        schema = schemas[ref.rsplit("/", 1)[1]]
        assert schema["type"] == "object" and schema["properties"], (path, schema)
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert chat["required"] is True
    properties = schemas["ChatCompletionRequest"]["properties"]
    assert {"model", "messages", "stream", "max_tokens", "conversation_id"} <= set(properties)
    assert schemas["ChatCompletionRequest"]["required"] == ["model", "messages"]
    # optional bodies: an empty body is a valid request
    assert document["paths"]["/v1/keys/{key_id}/rotate"]["post"]["requestBody"]["required"] is False


def test_every_operation_documents_openai_style_errors(document):
    envelope = document["components"]["schemas"]["ErrorEnvelope"]
    assert envelope["required"] == ["error"]
    body = document["components"]["schemas"][envelope["properties"]["error"]["$ref"].rsplit("/", 1)[1]]
    assert set(body["properties"]) == {"message", "type", "param", "code"}
    for path, method, operation in operations(document):
        errors = {int(status): spec for status, spec in operation["responses"].items() if int(status) >= 400}
        expected = set(COMMON_ERRORS) | ({413} if "requestBody" in operation else set())
        assert expected <= set(errors), (method, path, sorted(errors))
        for spec in errors.values():
            assert spec["content"]["application/json"]["schema"]["$ref"] == ERROR_REF
    admin_only = document["paths"]["/v1/plans"]["post"]["responses"]
    assert {"403", "409"} <= set(admin_only)
    assert "404" in document["paths"]["/v1/conversations/{conversation_id}"]["get"]["responses"]


def test_every_reference_resolves_and_no_schema_is_unused(document):
    text = json.dumps(document)
    schemas = document["components"]["schemas"]
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for name in schemas:
        assert f'"#/components/schemas/{name}"' in text, f"{name} is never used"


def test_a_schema_name_two_services_use_differently_is_qualified(apps):
    from litestar import Litestar, post

    from common.openapi import documented

    class Usage(msgspec.Struct):  # another service's Usage, unlike the users service's
        tokens: int

    @post("/v1/chat/completions", **documented(Usage))
    async def answer() -> None:
        return None

    merged = public_document({"users": apps["users"], "zeta": Litestar([answer])})
    schemas = merged["components"]["schemas"]
    assert "Usage" in schemas and "ZetaUsage" in schemas and schemas["ZetaUsage"]["properties"] == {
        "tokens": {"type": "integer"}}
    body = merged["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ZetaUsage"}
