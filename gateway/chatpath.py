"""The chat-completion path both gateways run: plan checks, cache, token budget, the upstream call,
the fallback chain, and a relay that reads only what it must.

    cache hit            -> replayed (`x-cache: hit`), same event groups, no tokens charged
    reserve tokens       -> 429 when today's budget cannot hold the request's maximum cost
    chat service         -> relayed as it arrives; usage read from the final chunk; settled after
    failure before byte  -> the fallback chain, flagged `x-dualgate-degraded: <layer>`; else a degraded 503;
                            an Idempotency-Key's first answer (any layer's) is replayed instead, and a
                            layer's answer is kept for the key and published as the request's turn
                            (flagged with its layer) for the chat writer (fallback/turns.py)
    failure after byte   -> a terminal error event, then [DONE]: never a silent cut
    budget crossed       -> the stream is stopped with a terminal error event
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import msgspec
from litestar import Request, Response
from litestar.response import Stream

from common.contracts import DEGRADED_HEADER, TurnEvent, invalid_id, turn_id_for, valid_id
from common.errors import ApiError, decode_body
from common.http import finish
from common.idempotency import AnswerBook, AnswerText, answer_text, idempotency_key, reused_key
from common.idempotency import replay as replay_answer
from common.limits import BudgetDecision, KeyRate, Reservation, TokenBudget, rate_headers, retry_after
from common.logging import request_id_var
from common.metrics import CACHE_HITS, CACHE_MISSES, FALLBACKS, RATE_LIMITED, stage_done
from common.openai_schema import ChatCompletionRequest, Usage, request_hash
from common.sse import SSE_HEADERS, StreamTap, error_event
from fallback.chain import ChainRequest, FallbackChain, FromCache, ModelFallback, upstream_body
from fallback.degraded import degraded_response
from fallback.turns import TurnLog
from gateway.authn import Identity
from gateway.cache import CacheEntry, ResponseCache, cache_key
from gateway.forward import admit, read_body, refused
from gateway.proxy import Hop, UpstreamUnavailable, response_headers

log = logging.getLogger(__name__)

SSE = "text/event-stream"
JSON = "application/json"
_encoder = msgspec.json.Encoder()
_PASS_HEADERS = ("idempotency-key",)
MAX_KNOWN_MODELS = 1024


class _UsageOnly(msgspec.Struct):
    usage: Usage | None = None


_usage_decoder = msgspec.json.Decoder(_UsageOnly)


def estimate_prompt_tokens(body: ChatCompletionRequest) -> int:
    """An upper-leaning guess (4 characters a token, plus framing) until the real usage settles it."""
    return sum(len(m.text()) // 4 + 4 for m in body.messages) + 2


@dataclass
class _Keep:
    """A fallback layer's answer to keep: as the request's turn, and as its Idempotency-Key's answer."""

    user_id: str
    key: str  # "" without an Idempotency-Key
    asked: str  # the request's hash
    layer: str
    body: ChatCompletionRequest
    request_id: str = field(default_factory=request_id_var.get)

    def turn(self, text: AnswerText) -> TurnEvent:
        return TurnEvent(
            turn_id=turn_id_for(self.user_id, self.request_id, self.asked),
            conversation_id=self.body.conversation_id or f"conv_{uuid.uuid4().hex}", user_id=self.user_id,
            model=text.model or self.body.model, request_messages=self.body.plain_messages(),
            assistant=text.assistant, finish_reason=text.finish_reason, usage=text.usage,
            request_id=self.request_id, created=time.time(), idempotency_key=self.key, request_hash=self.asked,
            completion_id=text.completion_id, degraded=self.layer)


def _unflagged(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name != DEGRADED_HEADER}


def check_plan(body: ChatCompletionRequest, identity: Identity) -> None:
    if not valid_id("model", body.model):  # before any I/O: it would name another URL on the way
        raise invalid_id("model", body.model)
    plan = identity.plan
    if plan.allowed_models and body.model not in plan.allowed_models:
        raise ApiError(404, f"The model '{body.model}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    limit = body.token_limit()
    if limit is not None and limit > plan.max_tokens:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param} may be at most {plan.max_tokens} on your plan.", param=param,
                       code="invalid_value")


@dataclass
class ChatPath:
    service: str
    tokens: object  # InternalTokens: mints the chat service's token
    chat: Hop
    chain: FallbackChain
    cache: ResponseCache
    budget: TokenBudget
    initial_hold: int = 256
    total_timeout: float = 300.0
    answers: AnswerBook | None = None  # each Idempotency-Key's first answer, shared with the chat service
    turns: TurnLog | None = None  # the fallback layers' turns, on their way to the chat writer
    _background: set[asyncio.Task] = field(default_factory=set)
    # models the chat service has answered for: the chain never stands in for a model nobody has seen
    _known_models: set[str] = field(default_factory=set)

    async def handle(self, request: Request, identity: Identity, rate: KeyRate) -> Response | Stream:
        """`rate`: the caller's requests/min, counted here for every request, a bad one too."""
        try:
            body: ChatCompletionRequest = decode_body(await request.body(), ChatCompletionRequest)
            check_plan(body, identity)
        except ApiError:
            await admit(self.service, rate)  # a bad request still counts; over the limit, the caller hears the 429
            raise
        started = time.perf_counter()
        tenant = identity.principal.subject
        key = cache_key(tenant, body)
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        if key is not None and (entry := self.cache.get_local(key)) is not None:
            return self._hit(entry, await admit(self.service, rate))

        # one Redis round trip: requests/min, then this tenant's fresh cached answer (which costs no
        # tokens) or the token reservation; a request the limit refuses holds no budget another could use
        prompt = estimate_prompt_tokens(body)
        cost = prompt + (body.token_limit() or self.initial_hold)
        limit = identity.plan.tokens_per_day
        admission = await self.budget.admit(rate, tenant, cost, limit, cached=self.cache.lookup_key(key),
                                            fresh_pttl_ms=self.cache.fresh_pttl_ms)
        headers = rate_headers(requests=admission.requests)
        if not admission.requests.allowed:
            raise refused(self.service, admission.requests, headers)
        if admission.cached is not None and (entry := self.cache.adopt(key, admission.cached)) is not None:
            return self._hit(entry, headers)
        if key is not None:
            self.cache.misses += 1
            CACHE_MISSES.labels(self.service).inc()
        headers["x-cache"] = "miss"

        # no token decision: Redis held an entry this replica's clock finds stale (rare); reserve now
        decision = admission.tokens or await self.budget.reserve(tenant, cost, limit)
        headers.update(rate_headers(tokens=decision))
        if not decision.allowed:
            raise _over_token_budget(self.service, decision, headers)
        reservation = decision.reservation
        stage_done(self.service, "limits", started)  # requests/min, the cache lookup and the token reservation
        passed = {name: request.headers[name] for name in _PASS_HEADERS if name in request.headers}
        upstream_headers = {**passed, **self.tokens.headers("chat", identity.principal), "content-type": JSON}
        opening = time.perf_counter()
        try:
            response = await self.chat.open("POST", "/v1/chat/completions",
                                            content=_encoder.encode(upstream_body(body)), headers=upstream_headers,
                                            retry_ok="idempotency-key" in passed)
        except UpstreamUnavailable as failure:
            return await self._fall_back(body, identity, key, failure.reason, passed, reservation, prompt,
                                         include_usage, headers)
        opened = stage_done(self.service, "upstream", opening)
        if response.status_code != 200:  # the caller's mistake or a 429: passed on as it is
            content = await read_body(response, self.total_timeout)
            await self._settle(reservation, 0)
            return Response(content, status_code=response.status_code,
                            headers=response_headers(response, headers), media_type=JSON)
        if body.model not in self._known_models and len(self._known_models) < MAX_KNOWN_MODELS:
            self._known_models.add(body.model)
        return await self._render(response, body, key, reservation, prompt, include_usage, headers, opened)

    def _hit(self, entry: CacheEntry, headers: dict[str, str]) -> Response | Stream:
        self.cache.hits += 1
        CACHE_HITS.labels(self.service).inc()
        return replay(entry, {**headers, "x-cache": "hit"})

    async def _fall_back(self, body: ChatCompletionRequest, identity: Identity, key: str | None, reason: str,
                         passed: dict[str, str], reservation: Reservation | None, prompt: int, include_usage: bool,
                         headers: dict[str, str]) -> Response | Stream:
        log.warning("chat failed before the first byte; fallback chain", extra={"reason": reason})
        tenant = identity.principal.subject
        asked = request_hash(body)
        try:
            idempotent = idempotency_key(passed) or ""
            first = await self._first_answer(tenant, idempotent, asked)
        except ApiError:
            await self._settle(reservation, 0)
            raise
        if first is not None:
            await self._settle(reservation, 0)
            return replay_answer(first, body.stream, include_usage, _unflagged(headers))
        answer = await self.chain.answer(ChainRequest(identity=identity, body=body, cache_key=key, reason=reason,
                                                      extra_headers=passed, request_hash=asked,
                                                      model_known=body.model in self._known_models))
        if answer is None:  # a degraded 503 is no answer: nothing to keep or replay
            await self._settle(reservation, 0)
            return degraded_response(self.service, reason, headers)
        FALLBACKS.labels(self.service, answer.layer).inc()
        headers[DEGRADED_HEADER] = answer.layer
        # the chat service keeps a model-fallback answer itself, as it does every answer it gives
        keep = None if answer.layer == ModelFallback.name else _Keep(tenant, idempotent, asked, answer.layer, body)
        if isinstance(answer, FromCache):
            await self._settle(reservation, 0)
            text = answer_text(answer.entry.parts, answer.entry.stream)
            if keep is not None and text is not None:
                first = await self._keep(keep, text)
                if first.request_id != keep.request_id:  # another request's answer to this key came first
                    return replay_answer(first, body.stream, include_usage, _unflagged(headers))
            return replay(answer.entry, headers)
        return await self._render(answer.response, body, None, reservation, prompt, include_usage, headers,
                                  keep=keep)

    async def _first_answer(self, tenant: str, idempotent: str, asked: str) -> TurnEvent | None:
        """The key's first answer from any layer; the 422 for a key used with another request, the 409
        while the chat service answers it."""
        if not idempotent or self.answers is None:
            return None
        first = await self.answers.find(tenant, idempotent)
        if first is not None and first.request_hash and first.request_hash != asked:
            raise reused_key()
        return first

    async def _keep(self, keep: _Keep, text: AnswerText) -> TurnEvent:
        """Keep a layer's answer as its key's first, unless another came first (returned instead);
        the first is the request's turn, published for the chat writer."""
        turn = keep.turn(text)
        first = await self.answers.keep_first(turn) if keep.key and self.answers is not None else turn
        if first is turn and self.turns is not None:
            self.turns.record(turn)
        return first

    async def _render(self, response: httpx.Response, body: ChatCompletionRequest, key: str | None,
                      reservation: Reservation | None, prompt: int, include_usage: bool,
                      headers: dict[str, str], opened: float | None = None,
                      keep: _Keep | None = None) -> Response | Stream:
        if response.headers.get("content-type", "").startswith(SSE):
            return Stream(self._relay(response, key, reservation, prompt, include_usage, opened, keep),
                          status_code=200, media_type=SSE,
                          headers={**SSE_HEADERS, **response_headers(response, headers)})
        try:
            content = await read_body(response, self.total_timeout)
        except ApiError:
            await self._settle(reservation, 0)
            raise
        try:
            usage = _usage_decoder.decode(content).usage
        except msgspec.MsgspecError:
            usage = None
        await self._settle(reservation, usage.total_tokens if usage else prompt)
        if key is not None and usage is not None:
            self.cache.put(key, CacheEntry(stored_at=time.time(), stream=False, content_type=JSON, parts=[content]))
        if keep is not None and (text := answer_text([content], False)) is not None:
            first = await self._keep(keep, text)
            if first.request_id != keep.request_id:  # another request's answer to this key came first
                return replay_answer(first, False, False, _unflagged(headers))
        return Response(content, status_code=200, headers=response_headers(response, headers), media_type=JSON)

    async def _relay(self, response: httpx.Response, key: str | None, reservation: Reservation | None,
                     prompt: int, include_usage: bool, opened: float | None,
                     keep: _Keep | None = None) -> AsyncIterator[bytes]:
        """`opened`: when the chat service's headers came (None for the fallback chain's answers).
        `keep`: a fallback layer's answer, kept (for its key, as its turn) before its end is relayed."""
        tap = StreamTap(drop_usage=not include_usage)
        parts: list[bytes] | None = [] if key is not None else None
        said: list[bytes] | None = [] if keep is not None else None  # as the layer sent it, usage included
        deadline = time.monotonic() + self.total_timeout
        counted = 0
        failure: bytes | None = None
        chunks = response.aiter_raw()
        try:
            try:
                async for chunk in chunks:
                    if said is not None:
                        said.append(chunk)
                    out = tap.feed(chunk)
                    if not out:
                        continue
                    if reservation is not None and tap.tokens != counted:
                        counted = tap.tokens
                        if not await self.budget.consume(reservation, prompt + counted):
                            failure = error_event("Today's token budget is spent; the answer was stopped.",
                                                  type="tokens", code="rate_limit_exceeded")
                            break
                    if parts is not None:
                        parts.append(out)
                    if opened is not None:  # once per answer
                        stage_done(self.service, "first_event", opened)
                        opened = None
                    if said is not None and tap.complete and (text := answer_text(said, True)) is not None:
                        await self._keep(keep, text)  # before the end: a retry after it finds the answer
                    yield out
                    if tap.done:
                        break
                    if time.monotonic() > deadline:
                        failure = error_event("The answer took longer than the gateway allows.",
                                              code="upstream_timeout")
                        break
                else:
                    if not tap.done:
                        failure = error_event("The model stream was cut before it finished.",
                                              code="stream_interrupted")
            except httpx.HTTPError:
                failure = error_event("The model stream was cut before it finished.", code="stream_interrupted")
            if failure is not None:
                yield failure
        finally:
            # ended whole: the rest is the body's terminator, read so the connection is kept
            await finish(response, chunks if tap.done and failure is None else None)
            used = tap.usage.total_tokens if tap.usage is not None else prompt + tap.tokens
            self._after(reservation, used, key if (failure is None and tap.complete) else None, parts)

    def _after(self, reservation: Reservation | None, used: int, key: str | None, parts: list[bytes] | None) -> None:
        """Settle and store off the answer's path (also when the caller went away)."""
        if key is not None and parts:
            self.cache.put(key, CacheEntry(stored_at=time.time(), stream=True, content_type=SSE, parts=parts))
        if reservation is not None:
            task = asyncio.ensure_future(self._settle(reservation, used))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _settle(self, reservation: Reservation | None, used: int) -> None:
        if reservation is not None:
            try:
                await self.budget.settle(reservation, used)
            except Exception:  # never let bookkeeping break an answer
                log.exception("settling tokens failed")


def replay(entry: CacheEntry, headers: dict[str, str]) -> Response | Stream:
    """A cached answer as it was first sent: a stream replays its event groups one by one."""
    if entry.stream:
        return Stream(list(entry.parts), status_code=200, media_type=SSE, headers={**SSE_HEADERS, **headers})
    return Response(entry.parts[0], status_code=200, media_type=JSON, headers=headers)


def _over_token_budget(service: str, decision: BudgetDecision, headers: dict[str, str]) -> ApiError:
    RATE_LIMITED.labels(service, "tokens").inc()
    return ApiError(429, "Today's token budget cannot hold this request; lower max_tokens or retry after the reset.",
                    type="tokens", code="rate_limit_exceeded",
                    headers={**headers, "Retry-After": retry_after(decision.retry_after)})
