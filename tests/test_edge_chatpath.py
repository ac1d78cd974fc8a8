"""The gateways' chat path as a client sees it: limits, cache, breaker, fallback chain, cut streams.

The chat path runs in process against scripted HTTP upstreams (httpx MockTransport stands in for
the chat and inference services) and a real Valkey; clients are the openai SDK and httpx.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
from aiokafka.errors import KafkaConnectionError
from edge_support import sse_body, valkey_server
from litestar import Litestar, Request, post
from litestar.datastructures import State
from redis.asyncio import Redis
from support import eventually

from common.app import ObservabilityMiddleware
from common.breaker import AsyncBreaker
from common.contracts import PlanLimits, TurnEvent, turn_id_for
from common.errors import EXCEPTION_HANDLERS
from common.idempotency import AnswerBook
from common.limits import RequestRateLimiter, TokenBudget
from common.openai_schema import ChatCompletionRequest, Usage, request_hash
from common.security import InternalTokens, Principal
from common.sse import StreamTap
from fallback.chain import CachedAnswer, ChainRequest, FallbackChain, LocalModel, SimplifiedModel
from fallback.turns import TurnLog
from gateway.authn import Identity
from gateway.cache import CacheEntry, ResponseCache, cache_key
from gateway.chatpath import ChatPath
from gateway.forward import key_rate
from gateway.proxy import Hop, RetryBudget, UpstreamUnavailable
from services.chat.claims import IdempotencyClaims

MODEL = "synthetic"


@pytest.fixture(scope="module")
def valkey_port():
    with valkey_server() as port:
        yield port


def chunk(cid: str, **fields) -> bytes:
    payload = {"id": cid, "object": "chat.completion.chunk", "created": 1, "model": MODEL, **fields}
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class ScriptedModel:
    """An OpenAI-compatible upstream: answers each request with words derived from its prompt,
    a fresh completion id per generation, or with the scripted failure queued next."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.bodies: list[dict] = []
        self.script: list[object] = []  # a status code, an exception, or "cut" (cut after two events)
        self.hang = None  # an async handler that takes every call instead (a service that hangs)
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self._handle), base_url=f"http://{name}")

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        if self.hang is not None:
            return await self.hang(request)
        self.calls += 1
        body = json.loads(request.content)
        self.bodies.append(body)
        outcome = self.script.pop(0) if self.script else 200
        if isinstance(outcome, Exception):
            raise outcome
        if isinstance(outcome, int) and outcome != 200:
            return httpx.Response(outcome, json={"error": {"message": f"scripted {outcome}", "type": "x"}})
        cid = f"chatcmpl-{self.name}-{self.calls}"
        words = [w for m in body["messages"] for w in m["content"].split()][:body.get("max_tokens") or 64]
        usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
        if not body.get("stream"):
            return httpx.Response(200, json={
                "id": cid, "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                             "finish_reason": "stop"}], "usage": usage})
        events = [chunk(cid, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
        events += [chunk(cid, choices=[{"index": 0, "delta": {"content": w}}]) for w in words]
        events.append(chunk(cid, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(chunk(cid, choices=[], usage=usage))
        events.append(b"data: [DONE]\n\n")
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=sse_body(events, cut_after=2 if outcome == "cut" else None))


class RecordedTurns:
    """Stands in for the gateway's TurnLog: the turns its fallback layers would publish."""

    def __init__(self) -> None:
        self.recorded: list[TurnEvent] = []

    def record(self, turn: TurnEvent) -> None:
        self.recorded.append(turn)


class Gateway:
    """The chat path behind a tiny app; the bearer key names the user."""

    def __init__(self, redis: Redis, *, tokens_per_day: int = 1_000_000, requests_per_min: int = 10_000,
                 chain: bool = True, first_byte: float = 0.5, local: LocalModel | None = None,
                 cache_ttl: float = 60) -> None:
        self.chat = ScriptedModel("chat")
        self.inference = ScriptedModel("inference")
        self.redis = redis
        self.plan = PlanLimits(tokens_per_day=tokens_per_day, requests_per_min=requests_per_min)
        self.requests = RequestRateLimiter(redis, f"key-{uuid.uuid4().hex[:8]}")
        self.tokens = tokens = InternalTokens(issuer_service="test", keys={"v1": b"k" * 32}, current="v1")
        self.turns = RecordedTurns()
        suffix = uuid.uuid4().hex[:8]
        self.breaker = AsyncBreaker(f"chat-{suffix}", None, fail_max=3, reset_timeout=0.3)
        chat = Hop("chat", self.chat.client, self.breaker, first_byte_timeout=first_byte, total_timeout=5.0,
                   attempts=1)
        inference = Hop("inference", self.inference.client, AsyncBreaker(f"inference-{suffix}", None),
                        first_byte_timeout=first_byte, total_timeout=5.0, attempts=1)
        self.cache = ResponseCache(redis, ttl=cache_ttl, stale_ttl=600)
        self.simplified = SimplifiedModel(inference, tokens, "smollm2-135m-instruct", 16, "gateway-test", local)
        layers = [CachedAnswer(self.cache), self.simplified]
        self.budget = TokenBudget(redis)
        self.path = ChatPath(service="gateway-test", tokens=tokens, chat=chat,
                             chain=FallbackChain(layers if chain else []), cache=self.cache, budget=self.budget,
                             initial_hold=16, answers=AnswerBook(redis, tokens), turns=self.turns)

        @post("/v1/chat/completions")
        async def completions(request: Request, state: State) -> object:
            user = request.headers["authorization"].split()[-1]
            identity = Identity(Principal(user, ("user",), key_id=f"key-{user}"), plan=self.plan)
            return await self.path.handle(request, identity, key_rate(self.requests, identity, requests_per_min))

        self.app = Litestar(route_handlers=[completions], exception_handlers=EXCEPTION_HANDLERS,
                            middleware=[lambda app: ObservabilityMiddleware(app, "gateway-test")])

    def http(self, user: str = "alice") -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gateway",
                                 headers={"authorization": f"Bearer {user}"})

    def sdk(self, user: str = "alice") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=user, max_retries=0,
                                  http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app)))


@pytest.fixture
async def redis(valkey_port) -> AsyncIterator[Redis]:
    client = Redis(port=valkey_port, socket_timeout=1)
    yield client
    await client.aclose()


@pytest.fixture
async def gateway(redis) -> AsyncIterator[Gateway]:
    gw = Gateway(redis)
    yield gw
    await gw.path.cache.drain()


def ask(content: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


async def seen_before(gateway: Gateway) -> None:
    """The chat service has answered for the model once: the chain may stand in for it."""
    response = await gateway.http().post("/v1/chat/completions", json=ask("warm up", temperature=0.5))
    assert response.status_code == 200 and "x-dualgate-degraded" not in response.headers


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


async def stream(http: httpx.AsyncClient, body: dict) -> httpx.Response:
    response = await http.post("/v1/chat/completions", json={**body, "stream": True})
    await response.aread()
    return response


# ---- streams that break --------------------------------------------------------------------

async def test_a_stream_cut_after_the_first_byte_ends_with_an_error_event_the_openai_sdk_raises_on(gateway):
    gateway.chat.script.append("cut")
    client = gateway.sdk()
    received = []
    with pytest.raises(openai.APIError) as raised:
        async for part in await client.chat.completions.create(**ask("one two three four"), stream=True):
            received.append(part)
    assert "cut" in str(raised.value)
    assert len(received) >= 1  # the answer had begun: no silent retry, no silent end
    raw = (await stream(gateway.http(), ask("five six seven eight"))).content  # the next one is whole
    assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw


async def test_a_stream_cut_ends_with_an_error_event_then_done_never_a_bare_end(gateway):
    gateway.chat.script.append("cut")
    response = await stream(gateway.http(), ask("one two three four"))
    last = events(response.content)[-2:]
    assert response.status_code == 200
    assert json.loads(last[0][6:])["error"]["code"] == "stream_interrupted"
    assert last[1] == b"data: [DONE]"


async def test_failure_before_the_first_byte_is_answered_by_the_fallback_chain_and_flagged(gateway):
    await seen_before(gateway)
    gateway.chat.script.append(503)
    response = await stream(gateway.http(), ask("hello there", temperature=0.7))
    assert response.status_code == 200
    assert response.headers["x-dualgate-degraded"] == "simplified"
    # the simplified model is asked by its own name: nothing pretends to be the model asked for
    assert gateway.inference.bodies[-1]["model"] == "smollm2-135m-instruct"
    assert gateway.inference.bodies[-1]["deployment"] == {"engine": "cpu"}
    assert response.content.endswith(b"data: [DONE]\n\n")


async def test_the_chain_prefers_this_tenants_cached_answer_and_ends_in_a_flagged_503(gateway):
    http = gateway.http()
    original = await http.post("/v1/chat/completions", json=ask("cache me", temperature=0))
    assert original.headers["x-cache"] == "miss"
    key = cache_key("alice", msgspec.convert(ask("cache me", temperature=0), ChatCompletionRequest))
    stale = gateway.cache.get_local(key)
    # older than its fresh life, still inside its stale life: only the chain may use it
    gateway.cache.put(key, msgspec.structs.replace(stale, stored_at=stale.stored_at - 120))
    gateway.chat.script.append(503)
    cached = await http.post("/v1/chat/completions", json=ask("cache me", temperature=0))
    assert cached.status_code == 200 and cached.headers["x-dualgate-degraded"] == "cache"
    assert cached.json()["id"] == original.json()["id"]

    gateway.chat.script.append(503)
    gateway.inference.script.append(httpx.ConnectError("inference down"))
    last = await http.post("/v1/chat/completions", json=ask("never seen", temperature=0.7))
    assert last.status_code == 503
    assert last.headers["x-dualgate-degraded"] == "degraded" and int(last.headers["retry-after"]) >= 1
    assert last.json()["error"]["type"] == "service_unavailable"


async def test_the_chain_never_stands_in_for_a_model_the_chat_service_never_answered_for(gateway):
    gateway.chat.script.append(503)  # say, the registry is down and this model was never resolved
    response = await gateway.http().post("/v1/chat/completions", json=ask("x", model="never-seen"))
    assert response.status_code == 503 and response.headers["x-dualgate-degraded"] == "degraded"
    assert gateway.inference.calls == 0


# ---- the simplified model in the gateway's own process -------------------------------------

@pytest.fixture(scope="module")
def local_model() -> LocalModel:
    """The real CPU engine (SmolLM2 from the model cache), loaded the way a gateway loads it."""
    cache = Path(os.environ.get("DUALGATE_MODEL_CACHE") or Path(__file__).resolve().parents[1] / ".dualgate" / "models")
    local = LocalModel(cache_dir=cache, threads=1, max_batch=2, max_queue=4)

    async def load() -> None:
        await local.start()
        await local._loading  # this test needs it loaded; a gateway serves while it loads

    asyncio.run(load())
    assert local.ready, local.error
    yield local
    asyncio.run(local.engine.stop())


@pytest.fixture
async def degraded_gateway(redis, local_model) -> AsyncIterator[Gateway]:
    """Chat fails before the first byte and the inference service is down: only this process can answer."""
    gw = Gateway(redis, local=local_model)
    await seen_before(gw)
    gw.chat.script.extend([503] * 10)
    gw.inference.script.extend([httpx.ConnectError("inference down")] * 10)
    yield gw
    await gw.path.cache.drain()


async def test_with_inference_down_the_in_process_model_answers_a_stream_flagged_under_its_own_name(
        degraded_gateway):
    client = degraded_gateway.sdk()
    raw = await client.chat.completions.with_raw_response.create(**ask("Say hello.", temperature=0), stream=True)
    parts = [part async for part in raw.parse()]
    assert raw.headers["x-dualgate-degraded"] == "simplified"
    assert {part.model for part in parts} == {"smollm2-135m-instruct"}  # never passed off as the model asked for
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices).strip()
    assert parts[-1].choices[0].finish_reason in ("stop", "length")
    assert degraded_gateway.inference.calls == 0  # nothing was asked of the (down) inference service


async def test_with_inference_down_the_in_process_model_answers_whole_with_real_usage(degraded_gateway):
    response = await degraded_gateway.http().post("/v1/chat/completions", json=ask("Say hello.", temperature=0))
    answer = response.json()
    assert response.status_code == 200 and response.headers["x-dualgate-degraded"] == "simplified"
    assert answer["object"] == "chat.completion" and answer["model"] == "smollm2-135m-instruct"
    assert answer["choices"][0]["message"]["content"].strip()
    assert answer["usage"]["completion_tokens"] >= 1
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]


async def test_a_caller_leaving_an_in_process_answer_frees_the_engine_slot_at_once(degraded_gateway, local_model):
    request = ChainRequest(identity=Identity(Principal("alice", ("user",), key_id="key-alice"),
                                             plan=PlanLimits()),
                           body=msgspec.convert({**ask("Write a long story about the sea."), "stream": True,
                                                 "max_tokens": 512}, ChatCompletionRequest),
                           cache_key=None, reason="test", extra_headers={})
    # room for ~30 s of tokens: only the caller leaving can end it within the wait below
    layer = SimplifiedModel(degraded_gateway.simplified.inference, degraded_gateway.simplified.tokens,
                            "smollm2-135m-instruct", 512, "gateway-test", local_model)
    answer = await layer.answer(request)
    chunks = answer.response.aiter_raw()
    assert b'"role":"assistant"' in await chunks.__anext__()
    assert local_model.engine.active_sequences + local_model.engine.queue_depth == 1
    await answer.response.aclose()  # the client went away
    await eventually(lambda: local_model.engine.active_sequences + local_model.engine.queue_depth == 0)


# ---- token budget --------------------------------------------------------------------------

async def test_usage_is_charged_for_a_stream_even_when_the_caller_did_not_ask_for_it(gateway, redis):
    user = f"u-{uuid.uuid4().hex[:6]}"
    response = await stream(gateway.http(user), ask("alpha beta gamma"))
    assert b'"usage"' not in response.content  # the caller did not ask for the usage chunk
    assert gateway.chat.bodies[-1]["stream_options"] == {"include_usage": True}  # the gateway did

    async def charged() -> int:
        keys = await redis.keys(f"dualgate:tok:{{{user}}}:*")
        values = [int(await redis.hget(k, "used") or 0) for k in keys if not k.endswith(b":holds")]
        return sum(values)

    await eventually(lambda: gateway.path._background == set())
    assert await charged() == 5 + 3  # the real usage from the final chunk


async def test_a_request_the_daily_budget_cannot_hold_is_refused_with_429_and_rate_headers(redis):
    gateway = Gateway(redis, tokens_per_day=30)
    response = await gateway.http(f"u-{uuid.uuid4().hex[:6]}").post(
        "/v1/chat/completions", json=ask("hi", max_tokens=100))
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["x-ratelimit-limit-tokens"] == "30"
    assert int(response.headers["retry-after"]) >= 1
    assert gateway.chat.calls == 0


async def test_requests_over_the_per_minute_limit_are_refused_and_hold_none_of_the_token_budget(redis):
    """The limit, the cache lookup and the token reservation are one Redis script: a request the limit
    refuses holds none of the tokens, and a refused bad request still counts."""
    gateway = Gateway(redis, requests_per_min=3, tokens_per_day=1_000)
    user = f"u-{uuid.uuid4().hex[:6]}"
    http = gateway.http(user)
    answers = await asyncio.gather(*(http.post("/v1/chat/completions", json=ask(f"q{i}", max_tokens=200))
                                     for i in range(8)))
    assert sorted(a.status_code for a in answers) == [200] * 3 + [429] * 5
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["type"] == "requests" and int(refused.headers["retry-after"]) >= 1
    assert gateway.chat.calls == 3

    await eventually(lambda: gateway.path._background == set())
    charged = sum(a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200)
    assert await held_and_used(redis, user) == (0, charged)  # the three answers' usage, no hold left behind
    bad = await http.post("/v1/chat/completions", json={"model": MODEL})
    assert bad.status_code == 429  # over the limit, a malformed request hears the 429 first


async def held_and_used(redis: Redis, user: str) -> tuple[int, int]:
    """The user's tokens held by requests in flight, and used, today."""
    held = used = 0
    for key in await redis.keys(f"dualgate:tok:{{{user}}}:*"):
        if not key.endswith(b":holds"):
            held += int(await redis.hget(key, "held") or 0)
            used += int(await redis.hget(key, "used") or 0)
    return held, used


async def test_a_stream_that_would_cross_the_daily_budget_is_stopped_with_an_error_event(redis):
    gateway = Gateway(redis, tokens_per_day=60)  # ~35 prompt + 16 held fit; the 30-word answer does not
    words = " ".join(f"w{i}" for i in range(30))
    response = await stream(gateway.http(f"u-{uuid.uuid4().hex[:6]}"), ask(words, max_tokens=None))
    parts = events(response.content)
    error = json.loads(parts[-2][6:])["error"]
    assert error["code"] == "rate_limit_exceeded" and parts[-1] == b"data: [DONE]"
    relayed = sum(1 for p in parts if b'"content":"w' in p)
    assert 0 < relayed < 30  # stopped mid-way, not after the fact


# ---- response cache ------------------------------------------------------------------------

async def test_a_streamed_cache_hit_replays_the_same_chunks_usage_and_finish_reason(gateway):
    body = ask("red green blue", temperature=0, stream_options={"include_usage": True})
    first = await stream(gateway.http(), body)
    second = await stream(gateway.http(), body)
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert events(second.content) == events(first.content)
    assert gateway.chat.calls == 1
    assert b'"finish_reason":"stop"' in second.content and b'"usage":{' in second.content
    # the stored entry keeps the event groups as they were relayed, replayed one by one
    entry: CacheEntry = gateway.cache.get_local(
        cache_key("alice", msgspec.convert({**body, "stream": True}, ChatCompletionRequest)))
    assert entry.stream and len(entry.parts) == len(events(first.content))


async def test_user_b_never_receives_user_a_cached_answer(gateway):
    body = ask("shared prompt", temperature=0)
    a = await gateway.http("alice").post("/v1/chat/completions", json=body)
    b = await gateway.http("bob").post("/v1/chat/completions", json=body)
    assert b.headers["x-cache"] == "miss" and a.json()["id"] != b.json()["id"]
    assert gateway.chat.calls == 2


async def test_an_answer_another_replica_cached_is_a_hit_here_and_costs_no_tokens(redis):
    """The limit, the cache lookup and the token reservation are one Redis script: a fresh answer that
    another replica stored comes back with the limit's decision, and nothing is held or charged for it."""
    a, b = Gateway(redis), Gateway(redis)  # one Redis, an in-process cache each
    user, body = f"u-{uuid.uuid4().hex[:6]}", ask("asked on two replicas", temperature=0)
    first = await a.http(user).post("/v1/chat/completions", json=body)
    await a.cache.drain()
    await eventually(lambda: a.path._background == set())
    charged = await held_and_used(redis, user)
    second = await b.http(user).post("/v1/chat/completions", json=body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.json() == first.json() and b.chat.calls == 0
    assert second.headers["x-ratelimit-remaining-requests"]  # the limit counted it all the same
    await eventually(lambda: b.path._background == set())
    assert await held_and_used(redis, user) == charged == (0, first.json()["usage"]["total_tokens"])


async def test_an_answer_past_its_ttl_is_asked_again_and_charged(redis):
    a, b = Gateway(redis, cache_ttl=0.2), Gateway(redis, cache_ttl=0.2)
    user, body = f"u-{uuid.uuid4().hex[:6]}", ask("asked twice, later", temperature=0)
    first = await a.http(user).post("/v1/chat/completions", json=body)
    await a.cache.drain()

    async def stale() -> bool:  # written to live stale_ttl; fresh while more than stale_ttl - ttl is left
        [key] = await redis.keys(f"dualgate:cache:{{{user}}}:*")  # the tenant's entries share its hash tag
        return 0 < await redis.pttl(key) < a.cache.fresh_pttl_ms

    await eventually(stale)
    second = await b.http(user).post("/v1/chat/completions", json=body)
    assert second.headers["x-cache"] == "miss" and b.chat.calls == 1
    await eventually(lambda: b.path._background == set())
    used = first.json()["usage"]["total_tokens"] + second.json()["usage"]["total_tokens"]
    assert await held_and_used(redis, user) == (0, used)


async def test_nondeterministic_requests_are_never_cached(gateway):
    for _ in range(3):
        response = await gateway.http().post("/v1/chat/completions", json=ask("roll the dice", temperature=0.9))
        assert response.headers["x-cache"] == "miss"
    seeded = [await gateway.http().post("/v1/chat/completions", json=ask("roll", temperature=0.9, seed=7))
              for _ in range(2)]
    assert [r.headers["x-cache"] for r in seeded] == ["miss", "hit"]  # a seed makes it deterministic
    assert gateway.chat.calls == 4


async def test_a_whole_answer_is_never_replayed_for_a_streamed_request(gateway):
    body = ask("one answer", temperature=0)
    whole = await gateway.http().post("/v1/chat/completions", json=body)
    streamed = await stream(gateway.http(), body)
    assert whole.headers["content-type"].startswith("application/json")
    assert streamed.headers["x-cache"] == "miss"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert events(streamed.content)[-1] == b"data: [DONE]"


async def test_the_in_process_cache_stays_bounded(redis):
    cache = ResponseCache(redis, ttl=60, stale_ttl=60, local_entries=10)
    for i in range(100):
        cache.put(f"k{i}", CacheEntry(stored_at=0, stream=False, content_type="x", parts=[b"x" * 100]))
    await cache.drain()
    assert len(cache._local) == 10


# ---- breaker ------------------------------------------------------------------------------

async def test_a_burst_of_caller_400s_does_not_open_the_chat_breaker(gateway):
    gateway.chat.script.extend([400] * 20)
    for _ in range(20):
        response = await gateway.http().post("/v1/chat/completions", json=ask("bad"))
        assert response.status_code == 400 and "x-dualgate-degraded" not in response.headers
    assert gateway.breaker.state == "closed"


async def test_5xx_and_timeouts_open_the_breaker_then_the_chain_answers_without_calling_chat(gateway):
    await seen_before(gateway)
    gateway.chat.script.extend([502, httpx.ReadTimeout("slow"), 503])
    for _ in range(3):
        response = await gateway.http().post("/v1/chat/completions", json=ask("x y", temperature=0.5))
        assert response.headers["x-dualgate-degraded"] == "simplified"
    assert gateway.breaker.state == "open"
    calls = gateway.chat.calls
    response = await gateway.http().post("/v1/chat/completions", json=ask("x y", temperature=0.5))
    assert response.headers["x-dualgate-degraded"] == "simplified" and gateway.chat.calls == calls


async def test_half_open_recovery_closes_the_breaker_when_chat_answers_again(gateway):
    gateway.chat.script.extend([500, 500, 500])
    for _ in range(3):
        await gateway.http().post("/v1/chat/completions", json=ask("x", temperature=0.5))
    assert gateway.breaker.state == "open"
    await eventually(lambda: gateway.breaker.reopens_in() <= 0, what="the breaker's reset timeout")
    response = await gateway.http().post("/v1/chat/completions", json=ask("x", temperature=0.5))
    assert response.status_code == 200 and "x-dualgate-degraded" not in response.headers
    assert gateway.breaker.state == "closed"


async def test_a_hung_chat_service_costs_one_first_byte_timeout_then_the_chain_answers(redis):
    gateway = Gateway(redis, first_byte=0.2)

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    await seen_before(gateway)
    gateway.chat.hang = hang  # from now on every call to the chat service hangs
    started = asyncio.get_running_loop().time()
    response = await gateway.http().post("/v1/chat/completions", json=ask("x", temperature=0.5))
    assert response.headers["x-dualgate-degraded"] == "simplified"
    assert asyncio.get_running_loop().time() - started < 2.0


# ---- hops: retries -------------------------------------------------------------------------

def scripted_hop(*outcomes, attempts: int = 3, budget: RetryBudget | None = None) -> tuple[Hop, list[str]]:
    seen: list[str] = []
    queue = list(outcomes)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        outcome = queue.pop(0) if queue else 200
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://up")
    hop = Hop("up", client, AsyncBreaker(f"up-{uuid.uuid4().hex[:6]}", None, fail_max=50), first_byte_timeout=1.0,
              total_timeout=5.0, attempts=attempts, budget=budget or RetryBudget())
    return hop, seen


async def test_safe_and_idempotency_keyed_requests_are_retried_before_the_first_byte():
    hop, seen = scripted_hop(503, 502)
    assert (await hop.open("GET", "/v1/models", retry_ok=True)).status_code == 200
    assert seen == ["GET"] * 3


async def test_an_unkeyed_post_is_not_retried_after_it_may_have_reached_the_upstream():
    hop, seen = scripted_hop(503, httpx.ReadTimeout("slow"))
    with pytest.raises(UpstreamUnavailable):
        await hop.open("POST", "/v1/chat/completions", content=b"{}")
    assert seen == ["POST"]
    # a refused connection never reached it: that one is safe to repeat
    hop, seen = scripted_hop(httpx.ConnectError("refused"))
    assert (await hop.open("POST", "/v1/chat/completions", content=b"{}")).status_code == 200
    assert seen == ["POST", "POST"]


async def test_retries_stop_when_the_retry_budget_is_spent():
    budget = RetryBudget(ratio=0.0, per_second=0.0, initial=1.0)
    hop, seen = scripted_hop(*[503] * 10, attempts=5, budget=budget)
    with pytest.raises(UpstreamUnavailable):
        await hop.open("GET", "/x", retry_ok=True)
    assert len(seen) == 2  # one try and the single retry the budget held


# ---- the stream tap ---------------------------------------------------------------------------

def test_the_tap_relays_whole_events_only_and_reads_the_usage_chunk():
    tap = StreamTap(drop_usage=True)
    stream_bytes = (chunk("c", choices=[{"index": 0, "delta": {"content": "hi"}}])
                    + chunk("c", choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
                    + chunk("c", choices=[], usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
                    + b"data: [DONE]\n\n")
    out = b"".join(tap.feed(stream_bytes[i:i + 7]) for i in range(0, len(stream_bytes), 7))
    assert out.endswith(b"data: [DONE]\n\n") and b"usage" not in out
    assert tap.usage.total_tokens == 4 and tap.tokens == 1 and tap.complete


# ---- one answer per Idempotency-Key, whichever layer gave it -----------------------------------

async def test_a_keyed_request_the_chain_answered_is_replayed_streamed_or_not_never_generated_again(gateway):
    await seen_before(gateway)
    gateway.breaker.reset_timeout = 60
    gateway.chat.script += [503] * 3
    body = ask("keep my first answer", temperature=0.7)
    headers = {"idempotency-key": f"k-{uuid.uuid4().hex}"}
    http = gateway.http()
    first = await http.post("/v1/chat/completions", json=body, headers=headers)
    asked = gateway.inference.calls
    again = await http.post("/v1/chat/completions", json=body, headers=headers)
    streamed = await http.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers)
    assert [r.status_code for r in (first, again, streamed)] == [200] * 3
    assert {r.headers["x-dualgate-degraded"] for r in (first, again, streamed)} == {"simplified"}
    assert gateway.inference.calls == asked  # replayed, never generated again
    assert again.headers["x-dualgate-idempotent-replay"] == "true"
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert again.json()["id"] == first.json()["id"]
    said = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                   for e in events(streamed.content) if e.startswith(b"data: {") and b'"choices":[{' in e)
    assert said == first.json()["choices"][0]["message"]["content"]
    other = await http.post("/v1/chat/completions", json=ask("another question"), headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


async def test_the_chat_service_replays_the_answer_a_fallback_layer_gave_its_key_first(gateway, redis):
    await seen_before(gateway)
    gateway.chat.script.append(503)
    body = ask("who answers first", temperature=0.7)
    key = f"k-{uuid.uuid4().hex}"
    first = await gateway.http().post("/v1/chat/completions", json=body, headers={"idempotency-key": key})
    assert first.headers["x-dualgate-degraded"] == "simplified"
    # the chat service, back: its claim on the key finds the gateway's answer, sealed, and replays it
    kept = await IdempotencyClaims(redis, gateway.tokens).claim("alice", key)
    assert kept is not None and kept.degraded == "simplified"
    assert kept.assistant == first.json()["choices"][0]["message"]["content"]
    assert kept.request_hash == request_hash(msgspec.json.decode(json.dumps(body), type=ChatCompletionRequest))


async def test_a_streamed_degraded_answer_becomes_the_requests_turn_flagged_with_its_layer(gateway):
    await seen_before(gateway)
    gateway.chat.script.append(503)
    body = ask("remember this", temperature=0.7, conversation_id="conv_mine")
    response = await gateway.http().post("/v1/chat/completions", json={**body, "stream": True},
                                         headers={"x-request-id": "req-degraded-1"})
    assert response.headers["x-dualgate-degraded"] == "simplified"
    [turn] = gateway.turns.recorded
    said = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                   for e in events(response.content) if e.startswith(b"data: {") and b'"choices":[{' in e)
    asked = request_hash(msgspec.json.decode(json.dumps(body), type=ChatCompletionRequest))
    assert (turn.conversation_id, turn.degraded, turn.assistant) == ("conv_mine", "simplified", said)
    assert turn.usage.completion_tokens > 0 and turn.finish_reason == "stop"
    # the same id the chat service would give this request's turn: stored once, whoever answered
    assert turn.turn_id == turn_id_for("alice", "req-degraded-1", asked)


async def test_while_the_chat_service_answers_a_key_the_chain_gives_it_no_second_answer(gateway, redis):
    await seen_before(gateway)
    key = f"k-{uuid.uuid4().hex}"
    assert await IdempotencyClaims(redis, gateway.tokens).claim("alice", key) is None  # chat answers it now
    gateway.chat.script.append(503)
    asked = gateway.inference.calls
    busy = await gateway.http().post("/v1/chat/completions", json=ask("still going", temperature=0.7),
                                     headers={"idempotency-key": key})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "idempotency_key_in_use"
    assert busy.headers["retry-after"] == "1" and gateway.inference.calls == asked


async def test_degraded_turns_wait_while_the_broker_is_away_and_go_out_once_it_returns():
    class FlakyBroker:
        connected = True

        def __init__(self) -> None:
            self.refusals = 2
            self.sent: list[tuple[str, str, str]] = []

        async def publish(self, topic: str, key: str, event: TurnEvent) -> None:
            if self.refusals:
                self.refusals -= 1
                raise KafkaConnectionError("broker away")
            self.sent.append((topic, key, event.turn_id))

    broker = FlakyBroker()
    turns = TurnLog(broker, "gateway-test")
    await turns.start()
    turn = TurnEvent(turn_id="turn_x", conversation_id="conv_x", user_id="alice", model="m", request_messages=[],
                     assistant="hi", finish_reason="stop", usage=Usage(1, 1, 2), created=1.0, degraded="simplified")
    turns.record(turn)
    await eventually(lambda: broker.sent, timeout=5)
    await turns.stop()
    assert broker.sent == [("chat.turns.v1", "conv_x", "turn_x")] and turns.pending == 0
