"""Text Postgres cannot store (a NUL, a lone UTF-16 surrogate) in any JSON body a service stores is a 400
naming the field, before anything is answered or stored: not a 500, not a retryable 503, and never an
answered turn the writer then cannot store (issue 23)."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from support import eventually, user_with_key

from common.errors import ApiError, decode_body
from common.openai_schema import ChatCompletionRequest
from common.storable import unstorable_field
from services.chat.schemas import CreateConversation

NUL, SURROGATE = "a\u0000b", "a\ud800b"
BAD = pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "lone-surrogate"])


def encoded(body: dict) -> bytes:
    """JSON as a client sends it: json.dumps writes "\\u0000" and "\\ud800" escapes (no UTF-8 can hold them)."""
    return json.dumps(body).encode()


def assert_400_naming(resp, param: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_value")
    assert param in error["message"]


def stored_turns(stack, user_id: str) -> list[str]:
    with psycopg.connect(stack.admin_dsn("chat"), connect_timeout=2) as conn:
        return [r[0] for r in conn.execute("SELECT turn_id FROM turns WHERE user_id = %s", (user_id,))]


@BAD
async def test_a_chat_message_postgres_cannot_store_is_a_400_and_no_turn(http, admin_headers, stack, bad):
    user_id, key = await user_with_key(http, admin_headers)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    conversation = (await http.post("/v1/conversations", json={}, headers=headers)).json()["id"]

    def chat(messages: list) -> dict:
        return {"model": "synthetic", "max_tokens": 4, "conversation_id": conversation, "messages": messages}

    forms = {  # every form content takes, and the stream
        "messages[0].content": chat([{"role": "user", "content": bad}]),
        "messages[1].content[1].text": chat([{"role": "system", "content": "fine"}, {"role": "user", "content": [
            {"type": "text", "text": "fine"}, {"type": "text", "text": bad}]}]),
        "messages[0].name": chat([{"role": "user", "content": "fine", "name": bad}]),
        "messages[2].content": {**chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                        {"role": "user", "content": bad}]), "stream": True},
    }
    for param, body in forms.items():
        assert_400_naming(await http.post("/v1/chat/completions", content=encoded(body), headers=headers), param)

    # nothing was answered, so nothing is stored: once a good turn after them is stored, it is the only one
    good = await http.post("/v1/chat/completions", json=chat([{"role": "user", "content": "fine"}]), headers=headers)
    assert good.status_code == 200, good.text
    turn_id = good.headers["x-dualgate-turn-id"]
    await eventually(lambda: stored_turns(stack, user_id), timeout=60, what="the good turn stored")
    assert stored_turns(stack, user_id) == [turn_id]


@BAD
async def test_a_conversation_field_postgres_cannot_store_is_a_400_not_a_503(http, admin_headers, bad):
    _, key = await user_with_key(http, admin_headers)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    for param, body in {"title": {"title": bad}, "system_prompt": {"system_prompt": bad},
                        "metadata.topic": {"metadata": {"topic": bad}}, "metadata": {"metadata": {bad: "x"}}}.items():
        assert_400_naming(await http.post("/v1/conversations", content=encoded(body), headers=headers), param)
    listed = await http.get("/v1/conversations", headers=headers)
    assert listed.status_code == 200 and listed.json()["data"] == []


@BAD
async def test_identity_and_registry_fields_postgres_cannot_store_are_400s(http, admin_headers, bad):
    headers = {**admin_headers, "content-type": "application/json"}
    user_id, key = await user_with_key(http, admin_headers)
    plan = f"plan-{uuid.uuid4().hex[:8]}"
    model = f"unstorable-{uuid.uuid4().hex[:8]}"
    requests = [
        ("POST", "/v1/users", {"name": bad}, "name"),
        ("PATCH", f"/v1/users/{user_id}", {"name": bad}, "name"),
        ("POST", "/v1/keys", {"name": bad, "user_id": user_id}, "name"),
        ("POST", "/v1/plans", {"name": plan, "requests_per_min": 1, "tokens_per_day": 1, "max_tokens": 1,
                               "allowed_models": ["synthetic", bad]}, "allowed_models[1]"),
        ("POST", "/v1/models", {"id": model, "context_length": 64, "engine": "synthetic", "owned_by": bad}, "owned_by"),
        ("PATCH", "/v1/models/synthetic", {"served_model": bad}, "served_model"),
    ]
    for method, path, body, param in requests:
        assert_400_naming(await http.request(method, path, content=encoded(body), headers=headers), param)
    # nothing of it was stored
    assert (await http.get(f"/v1/users/{user_id}", headers=admin_headers)).json()["name"].startswith("user-")
    assert [k["name"] for k in (await http.get(f"/v1/keys?user_id={user_id}", headers=admin_headers)).json()["data"]] \
        == ["test"]
    assert (await http.get(f"/v1/plans/{plan}", headers=admin_headers)).status_code == 404
    assert (await http.get(f"/v1/models/{model}", headers=admin_headers)).status_code == 404
    assert (await http.get("/v1/models/synthetic", headers=admin_headers)).json().get("served_model") != bad


# ---- the kit's check on its own (no stack) -------------------------------------------------------

@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": NUL}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}, "messages[0].content[0].text"),
    ({"metadata": {"k": "\udc00"}}, "metadata.k"),
    ({"metadata": {NUL: "v"}}, "metadata"),
    ({"title": NUL}, "title"),
])
def test_the_first_unstorable_string_is_named_as_msgspec_names_fields(body, param):
    assert unstorable_field(encoded(body))[0] == param


@pytest.mark.parametrize("body", [
    {"title": "\U0001F600 a surrogate pair is one character"},  # json.dumps writes "\ud83d\ude00"
    {"title": "\\u0000 is only text here"},
    {"title": "plain"},
])
def test_storable_text_passes(body):
    assert unstorable_field(encoded(body)) is None
    assert decode_body(encoded(body), CreateConversation).title == body["title"]


def test_deeply_nested_or_broken_json_is_left_to_the_decoder():
    assert unstorable_field(b"[" * 100_000 + b'"\\u0000"' + b"]" * 100_000) is None  # no RecursionError
    assert unstorable_field(b'{"title": "\\u0000') is None
    with pytest.raises(ApiError) as refused:
        decode_body(encoded({"model": "m", "messages": [{"role": "user", "content": NUL}]}), ChatCompletionRequest)
    assert refused.value.status == 400
