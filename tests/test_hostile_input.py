"""Issue 23: malformed input is the caller's own 4xx at the edge, never a 5xx, and never an outage for
anyone else (no breaker opens, no other user's answer moves onto the degraded path)."""

from __future__ import annotations

import re

import httpx
import pytest
from support import user_with_key

from stack.local import LocalStack

CHAT = "/v1/chat/completions"
GOOD = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
DEEP = b'{"model":"synthetic","messages":[{"role":"user","content":"hi"}],"x":' + b'{"a":' * 5000 + b"1" \
    + b"}" * 5001
NOT_UTF8 = b'{"model":"synthetic","messages":[{"role":"user","content":"caf\xe9 \xff"}]}'


def _json(change: dict) -> bytes:
    return httpx.Request("POST", "http://x", json={**GOOD, **change}).content


# (method, path, body, extra headers, admin?): each was a 5xx somewhere down the chain before issue 23
HOSTILE = {
    "body-not-utf8": ("POST", CHAT, NOT_UTF8, {}, False),
    "body-nested-5000": ("POST", CHAT, DEEP, {}, False),
    "conversation-id-control": ("GET", "/v1/conversations/a%01b", None, {}, False),
    "conversation-messages-control": ("GET", "/v1/conversations/a%01b/messages", None, {}, False),
    "model-path-control": ("GET", "/v1/models/a%01b", None, {}, False),
    "plan-name-control": ("GET", "/v1/plans/a%16b", None, {}, True),
    "model-percent-nul": ("POST", CHAT, _json({"model": "m%00"}), {}, False),
    "model-dot-segments": ("POST", CHAT, _json({"model": "x/../synthetic"}), {}, False),
    "model-query": ("POST", CHAT, _json({"model": "synthetic?x=1"}), {}, False),
    "model-fragment": ("POST", CHAT, _json({"model": "synthetic#"}), {}, False),
    "conversations-before-nul": ("GET", "/v1/conversations?before=%00", None, {}, False),
    "keys-user-id-nul": ("GET", "/v1/keys?user_id=%00", None, {}, True),
    "audit-actor-nul": ("GET", "/v1/auth/audit?actor=%00", None, {}, True),
    "query-not-utf8": ("GET", "/v1/conversations?before=%ff", None, {}, False),
    "idempotency-key-cyrillic": ("POST", CHAT, _json({}), {"idempotency-key": "ключ".encode()}, False),
}


def _openai_error(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


async def _send(http: httpx.AsyncClient, case: str, key_headers: dict[str, str]) -> httpx.Response:
    method, path, body, headers, _ = HOSTILE[case]
    headers = {**key_headers, **headers, **({"content-type": "application/json"} if body else {})}
    return await http.request(method, path, content=body, headers=headers)


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_each_hostile_input_is_a_json_4xx_at_the_edge(http, demo_headers, admin_headers, case):
    response = await _send(http, case, admin_headers if HOSTILE[case][4] else demo_headers)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = _openai_error(response)
    if case.startswith("model-") and HOSTILE[case][0] == "POST":  # an id that names no model, as OpenAI
        assert response.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    if case == "idempotency-key-cyrillic":
        assert response.status_code == 400 and error["param"] == "Idempotency-Key"


async def test_a_request_id_that_is_no_plain_token_is_replaced_at_the_edge(http, demo_headers):
    """The edge keeps a client's X-Request-ID only when it is a plain token; any other gets a fresh id that
    every hop then uses, so a hostile id never reaches a log or an upstream, and the request is answered."""
    response = await http.get("/v1/models", headers={**demo_headers, "x-request-id": "é".encode()})
    assert response.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


@pytest.mark.parametrize("case", ["body-not-utf8", "body-nested-5000", "model-dot-segments"])
async def test_the_fallback_gateway_refuses_the_same_bodies(stack: LocalStack, demo_headers, case):
    async with httpx.AsyncClient(base_url=stack.config.url("gateway-fallback"), timeout=30) as http:
        response = await _send(http, case, demo_headers)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    _openai_error(response)


async def test_a_latin1_user_agent_is_relayed_not_a_500(http, demo_headers):
    response = await http.post(CHAT, json=GOOD, headers={**demo_headers, "user-agent": "é".encode()})
    assert response.status_code == 200, response.text


async def _breakers(stack: LocalStack, http: httpx.AsyncClient) -> dict[str, str]:
    """Every breaker the router and the gateways hold, by name: 'closed', 'half-open' or 'open'."""
    status = (await http.get(f"{stack.config.url('router')}/status")).json()
    states = {f"router:{domain}": view["breaker"] for domain, view in status["domains"].items()}
    for name in ("gateway-ai", "gateway-ai-2", "gateway-identity", "gateway-fallback"):
        metrics = (await http.get(f"{stack.config.url(name)}/metrics")).text
        for upstream, value in re.findall(r'^dualgate_breaker_state\{upstream="([^"]+)"\} (\S+)$', metrics, re.M):
            states[f"{name}:{upstream}"] = {0.0: "closed", 1.0: "half-open", 2.0: "open"}[float(value)]
    return states


async def test_one_users_100_malformed_requests_leave_others_unflagged_and_every_breaker_closed(
        stack: LocalStack, http, admin_headers, demo_headers):
    _, attacker_key = await user_with_key(http, admin_headers)
    attacker = {"authorization": f"Bearer {attacker_key}"}
    user_cases = [case for case, spec in HOSTILE.items() if not spec[4]]
    async with httpx.AsyncClient(timeout=10) as probe:
        failovers_before = (await probe.get(f"{stack.config.url('router')}/status")).json()["failovers"]
        for batch in range(10):
            attacks = [await _send(http, user_cases[(batch * 10 + i) % len(user_cases)], attacker) for i in range(10)]
            # the other user, right after each burst: a real answer, on the primary path, and a listing
            answer = await http.post(CHAT, json=GOOD, headers=demo_headers)
            assert answer.status_code == 200, answer.text
            assert "x-dualgate-degraded" not in answer.headers
            assert answer.headers["x-dualgate-route"] == "ai"
            listing = await http.get("/v1/conversations", headers=demo_headers)
            assert listing.status_code == 200 and listing.headers["x-dualgate-route"] == "ai", listing.text
            breakers = await _breakers(stack, probe)
            assert set(breakers.values()) == {"closed"}, breakers
            assert all(r.status_code < 500 for r in attacks), [r.status_code for r in attacks]
        assert (await probe.get(f"{stack.config.url('router')}/status")).json()["failovers"] == failovers_before
