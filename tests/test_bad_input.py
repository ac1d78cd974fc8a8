"""Bad input on the chat path gets a clear 4xx with an OpenAI-style error body; a wrong key gets 401."""

from __future__ import annotations

import httpx
import pytest

GOOD = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"model": "no-such-model"}, 404, "model"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, 400, "messages[0]"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": 10_000_000}, 400, "max_tokens"),
        ({"max_tokens": 40_000}, 400, "max_tokens"),  # beyond the synthetic model's 32k window
        ({"temperature": 3}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        # issue 4: roles, content types, message count and size, the other ranges
        ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}] * 513}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 200_001}]}, 400, "messages[0].content"),
        ({"temperature": -0.5}, 400, "temperature"),
        ({"top_p": 1.5}, 400, "top_p"),
        ({"max_completion_tokens": 40_000}, 400, "max_completion_tokens"),  # beyond the window
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"n": 2}, 400, "n"),
        ({"stream": "yes"}, 400, "stream"),
        ({"conversation_id": ""}, 400, "conversation_id"),
        ({"conversation_id": "conv_nobody_has_this"}, 404, "conversation_id"),
    ],
)
async def test_invalid_chat_request_is_rejected_naming_the_parameter(http, demo_headers, change, status, param):
    resp = await http.post("/v1/chat/completions", json={**GOOD, **change}, headers=demo_headers)
    assert resp.status_code == status, resp.text
    assert _error(resp)["param"] == param


async def test_non_json_body_is_a_400(http, demo_headers):
    resp = await http.post("/v1/chat/completions", content=b"{not json", headers={**demo_headers,
                                                                                  "content-type": "application/json"})
    assert resp.status_code == 400
    assert _error(resp)["code"] == "invalid_json"


async def test_oversized_body_is_a_413(http, demo_headers):
    huge = {"model": "synthetic", "messages": [{"role": "user", "content": "x" * 1_200_000}]}
    resp = await http.post("/v1/chat/completions", json=huge, headers=demo_headers)
    assert resp.status_code == 413
    assert _error(resp)["code"] == "request_too_large"


@pytest.mark.parametrize("authorization", [None, "Bearer nonsense", "Bearer dg-0123456789abcdef-wrongsecret",
                                           "Basic dXNlcjpwYXNz"])
async def test_missing_or_wrong_key_is_a_401(http, authorization):
    headers = {"authorization": authorization} if authorization else {}
    resp = await http.post("/v1/chat/completions", json=GOOD, headers=headers)
    assert resp.status_code == 401
    assert _error(resp)["type"] == "authentication_error"


async def test_a_real_key_with_a_wrong_secret_is_a_401(http, creds):
    key_id = creds.demo_key.split("-")[1]
    resp = await http.post("/v1/chat/completions", json=GOOD,
                           headers={"authorization": f"Bearer dg-{key_id}-not-the-secret"})
    assert resp.status_code == 401


async def test_unknown_path_is_a_404_with_an_error_body(http, demo_headers):
    resp = await http.get("/v1/nowhere", headers=demo_headers)
    assert resp.status_code == 404
    _error(resp)


async def test_a_malformed_idempotency_key_is_a_400_naming_it(http, demo_headers):
    resp = await http.post("/v1/chat/completions", json=GOOD, headers={**demo_headers, "Idempotency-Key": "k" * 300})
    assert resp.status_code == 400
    assert _error(resp)["param"] == "Idempotency-Key"


async def test_a_conversation_with_unknown_fields_is_a_400(http, demo_headers):
    resp = await http.post("/v1/conversations", json={"title": "t", "colour": "blue"}, headers=demo_headers)
    assert resp.status_code == 400
    assert "colour" in _error(resp)["message"]
