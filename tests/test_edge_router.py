"""The router's hot path against real HTTP gateways (small scripted ASGI apps under uvicorn) and a real Valkey.

What a client notices: failover before the first byte (and only then), honest flags passed on,
a stream cut after the first byte ends with an error event, the per-IP bucket, the body limit.
"""

from __future__ import annotations

import asyncio
import json
import socket
from types import SimpleNamespace

import httpx
import msgspec
import pytest
import uvicorn
from edge_support import valkey_server
from redis.asyncio import Redis

from common.app import create_service_app
from common.breaker import AsyncBreaker
from common.limits import SyncedRateLimiter
from common.settings import Settings
from router.app import RouterDeps
from router.pools import GatewayConnections, GatewayPool
from router.routes import route_handlers

EVENTS = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
          b'data: {"id":"c","choices":[{"index":0,"delta":{"content":" there"}}]}\n\n']


@pytest.fixture(scope="module")
def valkey_port():
    with valkey_server() as port:
        yield port


class GatewayDied(Exception):
    """Raised mid-answer: uvicorn then drops the connection with the chunked body unfinished."""


class Gateway:
    """A gateway whose next answers are scripted: ok, cut, 500, upstream, degraded, hang."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.script: list[str] = []
        self.seen: list[dict] = []
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task | None = None
        self.url = ""

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append({"headers": httpx.Headers(scope["headers"]),
                          "body": body, "target": scope["raw_path"] + b"?" + scope["query_string"]})
        mode = self.script.pop(0) if self.script else "ok"

        async def answer(status: int, payload: dict, headers: tuple = ()) -> None:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), *headers]})
            await send({"type": "http.response.body", "body": msgspec.json.encode(payload)})

        if mode == "500":
            return await answer(500, {"error": {"message": "boom"}})
        if mode == "400":
            return await answer(400, {"error": {"message": "bad request", "code": "invalid_value"}})
        if mode == "upstream":
            return await answer(503, {"error": {"message": "signing unavailable", "code": "signing_unavailable"}},
                                ((b"x-dualgate-upstream", b"auth"),))
        if mode == "degraded":
            return await answer(503, {"error": {"message": "chain exhausted", "code": "degraded"}},
                                ((b"x-dualgate-degraded", b"degraded"), (b"retry-after", b"5")))
        if mode == "hang":
            await asyncio.sleep(3)  # far past the router's first-byte timeout (0.5 s)
        if scope["path"].endswith("/models"):
            return await answer(200, {"served_by": self.name})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": EVENTS[0], "more_body": True})
        if mode == "cut":
            await asyncio.sleep(0.1)  # the first event has reached the client
            raise GatewayDied  # then the gateway dies mid-answer
        await send({"type": "http.response.body", "body": EVENTS[1] + b"data: [DONE]\n\n"})

    async def start(self) -> None:
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(64)  # connections queue here until uvicorn accepts: no start-up race
        self.url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self, lifespan="off", log_level="critical",
                                                    timeout_graceful_shutdown=1))
        self.task = asyncio.create_task(self.server.serve(sockets=[listening]))

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


@pytest.fixture
async def edge(valkey_port):
    primary, fallback = Gateway("primary"), Gateway("fallback")
    await primary.start()
    await fallback.start()
    redis = Redis(port=valkey_port, socket_timeout=1)
    settings = Settings(service="router", connect_timeout=1.0, router_first_byte_timeout=5.0)
    clients = [GatewayConnections.from_settings(settings) for _ in range(3)]
    breaker = AsyncBreaker(f"gateway-ai-{id(primary)}", None, fail_max=3, reset_timeout=30)
    deps = RouterDeps(
        pools={"ai": GatewayPool.of("ai", clients[0], [primary.url], breaker),
               "identity": GatewayPool.of("identity", clients[1], [primary.url])},
        fallback=GatewayPool.of("fallback", clients[2], [fallback.url]),
        ip_limiter=SyncedRateLimiter(redis, f"ip-{id(primary)}"), ip_limit=1000, max_body_bytes=1000,
        first_byte_timeout=0.5, probe=None, redis=redis, service_urls={})
    app = create_service_app(settings, route_handlers=route_handlers)
    app.state.deps = deps
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 5000)),
                               base_url="http://router")
    yield SimpleNamespace(primary=primary, fallback=fallback, deps=deps, http=client, breaker=breaker)
    await client.aclose()
    for upstream in clients:
        await upstream.aclose()
    await redis.aclose()
    for gateway in (primary, fallback):
        await gateway.stop()


async def test_a_5xx_before_the_first_byte_is_replayed_to_the_fallback_gateway(edge):
    edge.primary.script.append("500")
    response = await edge.http.post("/v1/chat/completions", content=b'{"stream":true}')
    assert response.status_code == 200 and response.headers["x-dualgate-route"] == "fallback"
    assert edge.fallback.seen[-1]["body"] == b'{"stream":true}'  # the same request, replayed


async def test_a_hung_gateway_costs_one_first_byte_timeout_then_the_fallback_answers(edge):
    edge.primary.script.append("hang")
    started = asyncio.get_running_loop().time()
    response = await edge.http.get("/v1/models")
    assert response.json() == {"served_by": "fallback"}
    assert asyncio.get_running_loop().time() - started < 2.0


async def test_a_flagged_degraded_answer_is_passed_on_not_replayed_and_not_a_breaker_failure(edge):
    edge.primary.script.extend(["degraded"] * 5)
    for _ in range(5):
        response = await edge.http.get("/v1/models")
        assert response.status_code == 503 and response.headers["x-dualgate-degraded"] == "degraded"
        assert response.headers["x-dualgate-route"] == "ai"
    assert edge.fallback.seen == [] and edge.breaker.state == "closed"


async def test_a_service_error_the_gateway_passes_on_reaches_the_client_as_it_is(edge):
    edge.primary.script.append("upstream")
    response = await edge.http.post("/v1/chat/completions", content=b"{}")
    assert response.status_code == 503 and response.json()["error"]["code"] == "signing_unavailable"
    assert edge.fallback.seen == [] and edge.breaker.state == "closed"


async def test_a_stream_cut_after_the_first_byte_ends_with_an_error_event_not_a_replay(edge):
    edge.primary.script.append("cut")
    response = await edge.http.post("/v1/chat/completions", content=b"{}")
    events = [e for e in response.content.split(b"\n\n") if e]
    assert response.status_code == 200 and response.headers["x-dualgate-route"] == "ai"
    assert events[0] + b"\n\n" == EVENTS[0]
    assert json.loads(events[-2][6:])["error"]["code"] == "stream_interrupted"
    assert events[-1] == b"data: [DONE]"
    assert edge.fallback.seen == []  # after the first byte: never replayed


async def test_a_whole_stream_passes_through_unchanged(edge):
    response = await edge.http.post("/v1/chat/completions", content=b"{}")
    assert response.content == EVENTS[0] + EVENTS[1] + b"data: [DONE]\n\n"
    assert response.headers["content-type"] == "text/event-stream"


async def test_each_request_carries_a_request_id_and_traceparent_to_the_gateway(edge):
    response = await edge.http.get("/v1/models")
    sent = edge.primary.seen[-1]["headers"]
    assert sent["X-Request-Id"] == response.headers["x-request-id"]
    assert sent["Traceparent"].startswith("00-") and len(sent["Traceparent"].split("-")[1]) == 32
    await edge.http.get("/v1/models", headers={"x-request-id": "mine-1"})
    assert edge.primary.seen[-1]["headers"]["X-Request-Id"] == "mine-1"


async def test_the_per_ip_bucket_refuses_with_429_and_retry_after(edge):
    edge.deps.ip_limit = 3
    statuses = [(await edge.http.get("/v1/models", headers={"x-forwarded-for": "203.0.113.9"})).status_code
                for _ in range(4)]
    # the peer is loopback (the edge), so its X-Forwarded-For names the client: one bucket for it
    assert statuses == [200, 200, 200, 429]
    refused = await edge.http.get("/v1/models", headers={"x-forwarded-for": "203.0.113.9"})
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    other = await edge.http.get("/v1/models", headers={"x-forwarded-for": "203.0.113.10"})
    assert other.status_code == 200


async def test_a_body_over_the_limit_is_a_413_before_any_gateway_sees_it(edge):
    response = await edge.http.post("/v1/chat/completions", content=b"x" * 2000)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert edge.primary.seen == [] and edge.fallback.seen == []


async def test_repeated_5xx_open_the_domain_breaker_and_the_gateway_is_no_longer_called(edge):
    edge.primary.script.extend(["500"] * 3)
    for _ in range(3):
        assert (await edge.http.get("/v1/models")).headers["x-dualgate-route"] == "fallback"
    assert edge.breaker.state == "open"
    calls = len(edge.primary.seen)
    assert (await edge.http.get("/v1/models")).headers["x-dualgate-route"] == "fallback"
    assert len(edge.primary.seen) == calls


async def test_an_unknown_path_is_a_404_with_an_error_body_and_no_gateway_sees_it(edge):
    response = await edge.http.get("/v2/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_route"
    assert edge.primary.seen == [] and edge.fallback.seen == []


async def test_the_path_and_query_reach_the_gateway_as_the_client_sent_them(edge):
    response = await edge.http.get("/v1/models/a%2Fb?limit=2&after=x")
    assert response.status_code == 200 and response.headers["x-dualgate-route"] == "ai"
    assert edge.primary.seen[-1]["target"] == b"/v1/models/a%2Fb?limit=2&after=x"


# ---- issue 23: a caller's malformed request is its own 400, never an outage for everyone ----------

async def test_a_gateways_4xx_is_relayed_never_a_breaker_failure_nor_a_failover(edge):
    edge.primary.script.extend(["400"] * 10)
    for _ in range(10):
        response = await edge.http.get("/v1/models")
        assert response.status_code == 400 and response.headers["x-dualgate-route"] == "ai"
    assert edge.fallback.seen == [] and edge.breaker.state == "closed"


async def test_non_ascii_header_values_are_relayed_as_the_same_text(edge):
    response = await edge.http.get("/v1/models", headers={"user-agent": "é".encode(), "x-note": b"caf\xe9"})
    assert response.status_code == 200 and response.headers["x-dualgate-route"] == "ai"
    sent = dict(edge.primary.seen[-1]["headers"].raw)
    # UTF-8 passes as it came; latin-1 arrives as the same characters (the hop writes header text as UTF-8)
    assert sent[b"user-agent"] == "é".encode() and sent[b"x-note"] == "café".encode()


@pytest.mark.parametrize(("target", "headers", "param"), [
    ("/v1/conversations/a%01b", {}, None),
    ("/v1/models/a%00b", {}, None),
    ("/v1/models/%2e%2e/keys", {}, None),
    ("/v1/models/%ff", {}, None),
    ("/v1/conversations?before=%00", {}, "before"),
    ("/v1/conversations?before=%ff", {}, None),
    ("/v1/chat/completions", {"idempotency-key": "ключ".encode()}, "Idempotency-Key"),
    ("/v1/chat/completions", {"idempotency-key": b"a\x7fb"}, "Idempotency-Key"),
    ("/v1/chat/completions", {"x-request-id": "é".encode()}, "X-Request-ID"),
    ("/v1/chat/completions", {"user-agent": b"a\x01b"}, "user-agent"),
])
async def test_malformed_requests_are_a_400_at_the_router_and_no_gateway_sees_them(edge, target, headers, param):
    response = await edge.http.post(target, content=b"{}", headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert edge.primary.seen == [] and edge.fallback.seen == [] and edge.breaker.state == "closed"
