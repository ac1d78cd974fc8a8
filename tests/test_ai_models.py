"""The model registry as its users see it: admins register, update and disable models; everyone lists the
models their plan allows, in OpenAI format; bad registrations are refused naming the parameter."""

from __future__ import annotations

import asyncio
import time
import uuid

import openai
import psycopg
import pytest
from openai import OpenAI
from support import eventually, user_with_key

CPU_MODEL = "smollm2-135m-instruct"


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_an_admin_registers_updates_and_disables_a_model(http, admin_headers, demo_headers, openai_client):
    model_id = _id("tests/registered")  # ids may carry a slash, as hub names do
    created = await http.post("/v1/models", headers=admin_headers, json={
        "id": model_id, "context_length": 2048, "engine": "synthetic", "owned_by": "tests",
        "params": {"ttft_ms": 1, "itl_ms": 1, "tokens": 3}, "fallback_model": "synthetic"})
    assert created.status_code == 201, created.text
    assert created.json() | {"created": 0} == {
        "id": model_id, "object": "model", "created": 0, "owned_by": "tests", "context_length": 2048,
        "engine": "synthetic", "served_model": "", "workers": [], "params": {"ttft_ms": 1, "itl_ms": 1, "tokens": 3},
        "fallback_model": "synthetic", "enabled": True, "tokenizer": ""}

    assert model_id in {m.id for m in openai_client.models.list().data}
    card = (await http.get(f"/v1/models/{model_id}", headers=demo_headers)).json()
    assert card == {"id": model_id, "object": "model", "created": card["created"], "owned_by": "tests"}
    answer = await http.post("/v1/chat/completions", headers=demo_headers, json={
        "model": model_id, "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200 and answer.json()["model"] == model_id

    updated = await http.patch(f"/v1/models/{model_id}", headers=admin_headers,
                               json={"owned_by": "tests-2", "context_length": 1024, "fallback_model": None})
    assert updated.status_code == 200, updated.text
    assert (updated.json()["owned_by"], updated.json()["context_length"], updated.json()["fallback_model"]) == \
        ("tests-2", 1024, None)

    disabled = await http.delete(f"/v1/models/{model_id}", headers=admin_headers)
    assert disabled.status_code == 200 and disabled.json()["enabled"] is False
    assert model_id not in {m.id for m in openai_client.models.list().data}
    assert (await http.get(f"/v1/models/{model_id}", headers=demo_headers)).status_code == 404
    assert (await http.get(f"/v1/models/{model_id}", headers=admin_headers)).json()["enabled"] is False

    async def refused() -> bool:  # once the chat service's short resolution cache has expired
        resp = await http.post("/v1/chat/completions", headers=demo_headers, json={
            "model": model_id, "messages": [{"role": "user", "content": "hi"}]})
        return resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"

    await eventually(refused, timeout=15, interval=0.5, what="a disabled model refused")


async def test_only_admins_change_the_registry(http, admin_headers, demo_headers):
    model_id = _id("guarded")
    body = {"id": model_id, "context_length": 512, "engine": "synthetic"}
    assert (await http.post("/v1/models", json=body, headers=demo_headers)).status_code == 403
    assert (await http.post("/v1/models", json=body, headers=admin_headers)).status_code == 201
    assert (await http.patch(f"/v1/models/{model_id}", json={"owned_by": "me"}, headers=demo_headers)).status_code == 403
    assert (await http.delete(f"/v1/models/{model_id}", headers=demo_headers)).status_code == 403
    assert (await http.post("/v1/models", json=body, headers=admin_headers)).status_code == 409


@pytest.mark.parametrize(("change", "param"), [
    ({"id": "no spaces allowed"}, "id"),
    ({"context_length": 0}, "context_length"),
    ({"engine": "gpt-9"}, "engine"),
    ({"engine": "sglang"}, "workers"),
    ({"workers": ["http://127.0.0.1:30000"]}, "workers"),
    ({"engine": "sglang", "workers": ["ftp://gpu-1"]}, "workers[0]"),
    ({"fallback_model": "no-such-model"}, "fallback_model"),
    ({"params": {"ttft_ms": "fast"}}, "params[...]"),  # msgspec names no dict key
])
async def test_a_bad_registration_is_a_400_naming_the_parameter(http, admin_headers, change, param):
    body = {"id": _id("bad"), "context_length": 512, "engine": "synthetic", **change}
    resp = await http.post("/v1/models", json=body, headers=admin_headers)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


async def test_fallbacks_cannot_loop(http, admin_headers):
    first, second = _id("loop-a"), _id("loop-b")
    assert (await http.post("/v1/models", headers=admin_headers, json={
        "id": first, "context_length": 512, "engine": "synthetic"})).status_code == 201
    assert (await http.post("/v1/models", headers=admin_headers, json={
        "id": second, "context_length": 512, "engine": "synthetic", "fallback_model": first})).status_code == 201

    to_self = await http.patch(f"/v1/models/{first}", json={"fallback_model": first}, headers=admin_headers)
    loop = await http.patch(f"/v1/models/{first}", json={"fallback_model": second}, headers=admin_headers)

    assert to_self.status_code == loop.status_code == 400
    assert loop.json()["error"]["param"] == "fallback_model"


async def test_a_user_lists_only_the_models_their_plan_allows(http, admin_headers, stack, base_url):
    plan = _id("synthetic-only")
    with psycopg.connect(stack.admin_dsn("users"), autocommit=True) as conn:
        conn.execute("INSERT INTO plans (name, requests_per_min, tokens_per_day, max_tokens, allowed_models) "
                     "VALUES (%s, 600, 1000000, 4096, %s)", (plan, ["synthetic"]))
    _, key = await user_with_key(http, admin_headers, plan=plan)
    client = OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=30)

    assert [m.id for m in client.models.list().data] == ["synthetic"]
    assert client.models.retrieve("synthetic").owned_by == "dualgate-synthetic-engine"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(CPU_MODEL)


async def test_with_the_models_service_down_known_models_keep_answering(http, demo_headers, stack):
    body = {"model": "synthetic", "max_tokens": 3, "messages": [{"role": "user", "content": "still there?"}]}
    assert (await http.post("/v1/chat/completions", json=body, headers=demo_headers)).status_code == 200
    stack.supervisor.stop("models")
    try:
        # answers keep coming for longer than the chat service's resolution cache lives (5 s):
        # past it, the last known record answers
        until = time.monotonic() + 6.0
        while time.monotonic() < until:
            resp = await http.post("/v1/chat/completions", json=body, headers=demo_headers)
            assert resp.status_code == 200, resp.text
            await asyncio.sleep(0.5)
        unknown = await http.post("/v1/chat/completions", json={**body, "model": "never-resolved"},
                                  headers=demo_headers)
        assert unknown.status_code == 503  # what was never known cannot be served from memory
    finally:
        stack.supervisor.start("models")
        stack.wait_ready(("models", "chat", "gateway-ai"), timeout=60)
