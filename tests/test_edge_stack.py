"""The edge as a client sees it through nginx -> router -> gateways: limits, cache, ids, status, hangs."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import psycopg
from support import wait_for

from stack.drill import admin_dsn
from stack.local import LocalStack


async def new_key(http: httpx.AsyncClient, admin_headers: dict, plan: str = "default") -> tuple[str, str]:
    user = await http.post("/v1/users", json={"name": f"edge-{uuid.uuid4().hex[:6]}", "plan": plan},
                           headers=admin_headers)
    assert user.status_code == 201, user.text
    key = await http.post("/v1/keys", json={"name": "edge", "user_id": user.json()["id"]}, headers=admin_headers)
    assert key.status_code == 201, key.text
    return user.json()["id"], key.json()["key"]


def chat(content: str, **extra) -> dict:
    return {"model": "synthetic", "max_tokens": 4, "messages": [{"role": "user", "content": content}], **extra}


async def test_both_ai_gateway_replicas_count_one_shared_request_limit(stack: LocalStack, admin_headers):
    async with httpx.AsyncClient(base_url=stack.config.base_url, timeout=30) as http:
        _, key = await new_key(http, admin_headers)
    headers = {"authorization": f"Bearer {key}"}
    remaining = []
    async with httpx.AsyncClient(timeout=30) as direct:
        for i in range(10):  # alternate replicas, bypassing the router: one counter or two?
            replica = "gateway-ai" if i % 2 == 0 else "gateway-ai-2"
            response = await direct.get(f"{stack.config.url(replica)}/v1/models", headers=headers)
            assert response.status_code == 200
            remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
    # one shared bucket counts down across both (a refill of one per 100 ms may add one back)
    assert all(later <= earlier for earlier, later in zip(remaining, remaining[1:])), remaining
    assert remaining[0] - remaining[-1] >= 7, remaining


async def test_n_parallel_requests_over_a_limit_of_l_through_two_replicas_admit_exactly_l(stack: LocalStack,
                                                                                         admin_headers):
    with psycopg.connect(admin_dsn(stack, "users"), autocommit=True) as conn:
        conn.execute("INSERT INTO plans (name, requests_per_min, tokens_per_day, max_tokens) "
                     "VALUES ('edge-tiny', 8, 1000000, 4096) ON CONFLICT (name) DO NOTHING")
    async with httpx.AsyncClient(base_url=stack.config.base_url, timeout=30,
                                 limits=httpx.Limits(max_connections=64)) as http:
        _, key = await new_key(http, admin_headers, plan="edge-tiny")
        headers = {"authorization": f"Bearer {key}"}
        probe = await http.get("/v1/models", headers=headers)
        assert probe.headers["x-ratelimit-limit-requests"] == "8"  # the user's plan, not the default
        left = int(probe.headers["x-ratelimit-remaining-requests"])
        answers = await asyncio.gather(*(http.get("/v1/models", headers=headers) for _ in range(left + 40)))
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) == left and statuses.count(429) == 40
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "8"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


async def test_a_deterministic_answer_is_cached_per_tenant_through_the_stack(stack: LocalStack, admin_headers):
    async with httpx.AsyncClient(base_url=stack.config.base_url, timeout=30) as http:
        _, key_a = await new_key(http, admin_headers)
        _, key_b = await new_key(http, admin_headers)
        body = chat(f"edge cache {uuid.uuid4().hex}", temperature=0)
        first = await http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key_a}"})
        again = await http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key_a}"})
        other = await http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key_b}"})
    assert [r.headers["x-cache"] for r in (first, again, other)] == ["miss", "hit", "miss"]
    assert again.json() == first.json()
    assert other.json()["id"] != first.json()["id"]
    for response in (first, again, other):
        assert {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests"} <= set(response.headers)


async def test_request_id_and_trace_travel_to_the_chat_service_and_back(stack: LocalStack, http, demo_headers):
    request_id = f"edge-{uuid.uuid4().hex}"
    trace = uuid.uuid4().hex
    response = await http.post("/v1/chat/completions", json=chat("trace me"),
                               headers={**demo_headers, "x-request-id": request_id,
                                        "traceparent": f"00-{trace}-{'1' * 16}-01"})
    assert response.status_code == 200 and response.headers["x-request-id"] == request_id
    assert response.headers["x-ratelimit-limit-tokens"]
    with psycopg.connect(admin_dsn(stack, "chat"), autocommit=True) as conn:
        wait_for(lambda: conn.execute("SELECT 1 FROM turns WHERE request_id = %s", (request_id,)).fetchone(),
                  timeout=20)


async def test_status_shows_every_component_breaker_cache_and_fallback_count(stack: LocalStack):
    async with httpx.AsyncClient(timeout=10) as http:
        status = (await http.get(f"{stack.config.url('router')}/status")).json()
    components = status["components"]
    assert {"redis", "auth", "users", "chat", "models", "inference"} <= set(components)
    assert sum(1 for name in components if name.startswith("ai@")) == 2
    assert any(name.startswith("identity@") for name in components)
    assert any(name.startswith("fallback@") for name in components)
    assert status["domains"]["ai"]["breaker"] in ("closed", "half-open", "open")
    assert all("breakers" in view for view in status["gateways"].values())
    assert {"hits", "misses", "hit_ratio"} <= set(status["cache"])
    assert isinstance(status["fallbacks"], dict) and "ai" in status["failovers"]


def test_one_hung_ai_gateway_replica_does_not_hang_requests(stack: LocalStack, demo_headers):
    stack.supervisor.signal("gateway-ai-2", "STOP")
    try:
        slowest = 0.0
        with httpx.Client(base_url=stack.config.base_url, timeout=30) as http:
            for _ in range(12):
                started = time.monotonic()
                response = http.get("/v1/models", headers=demo_headers)
                slowest = max(slowest, time.monotonic() - started)
                assert response.status_code == 200
        # at most one request waits for the health check to take the hung replica out
        assert slowest < 2.0, slowest
    finally:
        stack.supervisor.signal("gateway-ai-2", "CONT")
    stack.wait_ready(("gateway-ai-2", "router"), timeout=60)


async def test_the_routers_operator_endpoints_are_not_reachable_through_the_edge(stack: LocalStack):
    async with httpx.AsyncClient(timeout=10) as http:
        for path in ("/status", "/metrics", "/readyz", "/healthz"):
            outside = await http.get(f"{stack.config.base_url}{path}")
            assert outside.status_code == 404, path
            assert outside.json()["error"]["code"] == "unknown_route"
            assert (await http.get(f"{stack.config.url('router')}{path}")).status_code == 200, path
