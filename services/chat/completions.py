"""One chat completion: context, model (with its fallback), the stream, the turn.

1. A repeated `Idempotency-Key` returns the stored answer, never a second generation; so does the same
   request again (a router failover or a gateway retry: same edge request id, same body), whose turn id
   is derived from both (common.contracts.turn_id_for), so it is spooled and stored once whatever hop
   answered it. An answer a gateway's fallback layer gave a key first is replayed too (common.idempotency).
2. The model resolves through the models service (cached); a conversation adds its system prompt and
   the newest turns that fit the window (counted with the model's tokenizer).
3. The inference service streams the answer. If the deployment fails before the first token, the
   registry's fallback model answers instead, flagged `x-dualgate-degraded: model-fallback`.
4. The finished turn is spooled durably (outbox) before the answer ends; Kafka and the writer take it
   from there. A turn is stored exactly when its answer was generated to the end: a stream whose client
   left is cut, not stored, and frees its key; an answer that ran to its end is stored even if its
   client has gone (a router that gave up on it), and its Idempotency-Key replays it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import msgspec
from litestar import Request, Response
from litestar.response import Stream

from common.contracts import (
    CONVERSATION_HEADER, DEGRADED_HEADER, REQUEST_HASH_HEADER, TURN_HEADER, ModelRecord, TurnEvent, UsageEvent,
    turn_id_for,
)
from common.errors import ApiError, ErrorBody, ErrorEnvelope, decode_body, unavailable
from common.http import finish
from common.idempotency import idempotency_key, replay, reused_key
from common.logging import request_id_var
from common.metrics import FALLBACKS, stage_done
from common.openai_schema import (
    ChatCompletion, ChatCompletionRequest, ChatMessage, Choice, InferenceRequest, ResponseMessage, StreamOptions,
    Usage, completion_id, now, request_hash,
)
from common.security import Principal
from common.sse import DONE, SSE_HEADERS, error_frame, iter_data
from services.chat.context import build_context
from services.chat.outbox import OutboxFull
from services.chat.schemas import Conversation, HistoryTurn, StreamPeek

log = logging.getLogger(__name__)

AUDIENCE = "chat"
MODEL_FALLBACK = "model-fallback"
DEFAULT_MAX_TOKENS = 256

_peek = msgspec.json.Decoder(StreamPeek)
_error = msgspec.json.Decoder(ErrorEnvelope)


class _FallbackWorthy(Exception):
    """The deployment failed before the first token (unreachable, timeout, 5xx, overloaded)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(str(error))
        self.error = error


# ---- the request -----------------------------------------------------------------------------

async def chat_completion(request: Request, deps) -> Response | Stream:
    started = time.perf_counter()
    principal = deps.tokens.principal_from(request, AUDIENCE)
    body: ChatCompletionRequest = decode_body(await request.body(), ChatCompletionRequest)
    key = idempotency_key(request.headers)
    asked = _asked(request, body)
    turn_id = turn_id_for(principal.subject, request_id_var.get(), asked)
    slot = (principal.subject, key) if key else None
    if slot:
        # Redis first: it holds the key's first answer from any layer (a gateway's fallback layer may have
        # answered it while this service was slow or down); then what outlived it there (spool, database)
        stored = await deps.claims.claim(*slot)  # the key's answer, a 409, or the key is ours
        if stored is None and (stored := await _stored_turn(deps, *slot)) is not None:
            deps.claims.release(*slot)
        if stored is not None:
            if stored.request_hash and stored.request_hash != asked:
                raise reused_key()
            return _replay(stored, body)
    elif (again := deps.outbox.find_turn(turn_id)) is not None:  # this request answered already (failover)
        return _replay(again, body)
    handed_over = False
    try:
        try:
            deps.outbox.check_capacity()
        except OutboxFull:
            raise unavailable("Too many answered turns wait to be stored; retry shortly.",
                              code="turns_backlogged") from None

        model = await deps.models.resolve(body.model)
        _validate_against_model(body, model)
        conversation: Conversation | None = None
        history: list[HistoryTurn] = []
        if body.conversation_id:
            conversation = await deps.conversations.get(body.conversation_id, principal.subject)
            history = await deps.conversations.history(body.conversation_id)

        opening = stage_done("chat", "prepare", started)  # token, body, idempotency, model, conversation
        upstream, served, degraded = await _open_with_fallback(deps, principal, body, model, conversation, history)
        opened = stage_done("chat", "inference", opening)  # the context, and the inference service's headers
        flagged = MODEL_FALLBACK if degraded or request.headers.get(DEGRADED_HEADER) == MODEL_FALLBACK else ""
        draft = _TurnDraft(body, principal, served, key or "", asked, turn_id, flagged)
        headers = {TURN_HEADER: draft.turn_id}
        if body.conversation_id:
            headers[CONVERSATION_HEADER] = body.conversation_id
        if degraded:
            headers[DEGRADED_HEADER] = MODEL_FALLBACK
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            handed_over = True  # the stream releases the key when it ends
            return Stream(_relay(upstream, draft, deps, include_usage, slot, opened),
                          media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        return await _aggregate(upstream, draft, deps, headers)
    except Exception:
        if slot and not handed_over:  # an error answer: the key is free before the answer leaves
            handed_over = True
            await deps.claims.release_now(*slot)
        raise
    finally:
        if slot and not handed_over:  # cancelled (the client left): never waits here
            deps.claims.release(*slot)


def _asked(request: Request, body: ChatCompletionRequest) -> str:
    """The request's hash: a gateway's model-fallback layer names the one its client sent."""
    given = request.headers.get(REQUEST_HASH_HEADER, "")
    if len(given) == 64 and all(c in "0123456789abcdef" for c in given):
        return given
    return request_hash(body)


async def _stored_turn(deps, user_id: str, key: str) -> TurnEvent | None:
    found = deps.outbox.find_idempotent(user_id, key)
    if found is not None:
        return found
    try:
        return await deps.store.by_idempotency_key(user_id, key)
    except Exception as exc:  # database away: what the outbox knows is all we know; answer rather than fail
        log.warning("idempotency lookup failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        return None


def _validate_against_model(body: ChatCompletionRequest, model: ModelRecord) -> None:
    limit = body.token_limit()
    if limit is not None and limit >= model.context_length:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param} must be below the model's context length ({model.context_length}).",
                       param=param, code="invalid_value")


# ---- opening the stream, with the model fallback ----------------------------------------------

async def _open_with_fallback(deps, principal: Principal, body: ChatCompletionRequest, model: ModelRecord,
                              conversation: Conversation | None, history: list[HistoryTurn]
                              ) -> tuple[httpx.Response, ModelRecord, bool]:
    try:
        return await _open(deps, principal, body, model, conversation, history), model, False
    except _FallbackWorthy as failure:
        if not model.fallback_model:
            raise failure.error from None
        try:
            fallback = await deps.models.resolve(model.fallback_model)
            _validate_against_model(body, fallback)
        except ApiError:
            raise failure.error from None
        log.warning("model deployment failed before the first token; using its fallback",
                    extra={"model": model.id, "fallback": fallback.id, "error": str(failure)})
        try:
            upstream = await _open(deps, principal, body, fallback, conversation, history)
        except (_FallbackWorthy, ApiError):  # the fallback cannot help either: say what failed first
            raise failure.error from None
        FALLBACKS.labels("chat", "model-fallback").inc()
        return upstream, fallback, True


async def _open(deps, principal: Principal, body: ChatCompletionRequest, model: ModelRecord,
                conversation: Conversation | None, history: list[HistoryTurn]) -> httpx.Response:
    counter = await deps.tokenizers.counter(model)
    reserve = body.token_limit() or min(DEFAULT_MAX_TOKENS, max(1, model.context_length // 4))
    context = await build_context(
        counter=counter, window=model.context_length, reserve=reserve,
        system_prompt=conversation.system_prompt if conversation else "", history=history,
        request_messages=body.plain_messages(), counts=deps.turn_counts)
    upstream_body = InferenceRequest(
        model=model.id, messages=[ChatMessage(role=m["role"], content=m["content"]) for m in context.messages],
        stream=True, max_tokens=reserve, temperature=body.temperature, top_p=body.top_p, stop=body.stop,
        seed=body.seed, stream_options=StreamOptions(include_usage=True), conversation_id=body.conversation_id,
        deployment=model.deployment)
    return await _open_inference_stream(deps, principal, upstream_body)


async def _open_inference_stream(deps, principal: Principal, body: InferenceRequest) -> httpx.Response:
    request = deps.inference.build_request(
        "POST", "/v1/chat/completions", content=msgspec.json.encode(body),
        headers={**deps.tokens.headers("inference", principal), "content-type": "application/json"},
    )
    try:
        response = await deps.inference.send(request, stream=True)
    except httpx.TimeoutException:
        raise _FallbackWorthy(ApiError(504, "The inference service did not answer in time.", type="server_error",
                                       code="upstream_timeout")) from None
    except httpx.HTTPError:
        raise _FallbackWorthy(unavailable("The inference service is unreachable.",
                                          code="inference_unavailable")) from None
    if response.status_code == 200:
        return response
    content = await response.aread()
    await response.aclose()
    try:
        envelope = _error.decode(content)
    except msgspec.MsgspecError:
        envelope = ErrorEnvelope(ErrorBody(message="The inference service failed.", type="server_error"))
    # caller errors pass through; upstream failures are the platform's (502), overload keeps its status
    status = response.status_code if response.status_code < 500 or response.status_code == 503 else 502
    headers = {"Retry-After": response.headers["retry-after"]} if "retry-after" in response.headers else None
    error = ApiError(status, envelope.error.message, type=envelope.error.type, param=envelope.error.param,
                     code=envelope.error.code, headers=headers)
    if response.status_code >= 500 or response.status_code == 429:
        raise _FallbackWorthy(error)
    raise error


# ---- the turn --------------------------------------------------------------------------------

class _TurnDraft:
    """Collects what the assistant said while the answer streams by, then spools the turn."""

    def __init__(self, body: ChatCompletionRequest, principal: Principal, model: ModelRecord,
                 idempotency_key: str, request_hash: str, turn_id: str, degraded: str) -> None:
        self.body = body
        self.principal = principal
        self.model = model
        self.idempotency_key = idempotency_key
        self.request_hash = request_hash
        self.turn_id = turn_id
        self.degraded = degraded
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.id = completion_id()

    def read(self, data: bytes) -> StreamPeek:
        chunk = _peek.decode(data)
        for choice in chunk.choices:
            if content := (choice.get("delta") or {}).get("content"):
                self.parts.append(content)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.id:
            self.id = chunk.id
        return chunk

    @property
    def complete_answer(self) -> bool:
        return self.usage is not None and self.finish_reason is not None

    async def record(self, deps) -> None:
        """Spool the finished turn durably; returns once it is on disk."""
        assert self.usage is not None and self.finish_reason is not None
        created = time.time()
        turn = TurnEvent(
            turn_id=self.turn_id, conversation_id=self.body.conversation_id or f"conv_{uuid.uuid4().hex}",
            user_id=self.principal.subject, model=self.model.id, request_messages=self.body.plain_messages(),
            assistant="".join(self.parts), finish_reason=self.finish_reason, usage=self.usage,
            request_id=request_id_var.get(), created=created, idempotency_key=self.idempotency_key,
            request_hash=self.request_hash, completion_id=self.id, degraded=self.degraded,
        )
        usage = UsageEvent(
            event_id=turn.turn_id, user_id=self.principal.subject, key_id=self.principal.key_id,
            model=self.model.id, prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens, created=created,
        )
        await deps.outbox.append(turn, usage)
        if self.body.conversation_id:
            deps.conversations.remember(turn)
        if self.idempotency_key:
            await deps.claims.answered(turn)


async def _relay(upstream: httpx.Response, turn: _TurnDraft, deps, include_usage: bool,
                 slot: tuple[str, str] | None, opened: float | None) -> AsyncIterator[bytes]:
    chunks = upstream.aiter_raw()
    ended = False  # [DONE] came: the rest of the body is its terminator, read so the connection is kept
    try:
        async for data in iter_data(chunks):
            if data == b"[DONE]":
                ended = True
                if not turn.complete_answer:
                    break
                try:
                    await turn.record(deps)
                except Exception:
                    log.exception("answered turn could not be spooled", extra={"turn_id": turn.turn_id})
                    yield error_frame(_not_recorded())
                    return
                yield DONE
                return
            chunk = turn.read(data)
            if slot:
                deps.claims.keep(*slot)
            if chunk.error is not None:
                yield b"data: " + data + b"\n\n" + DONE
                return
            if chunk.usage is not None and not chunk.choices and not include_usage:
                continue  # we asked for usage for ourselves; the caller did not
            if opened is not None:  # once per answer
                stage_done("chat", "first_event", opened)
                opened = None
            yield b"data: " + data + b"\n\n"
        yield error_frame(_cut_error())
    except httpx.HTTPError:
        yield error_frame(_cut_error())
    finally:
        if slot:  # first: a cancelled stream (the client left) cancels every await in here too
            deps.claims.release(*slot)
        await finish(upstream, chunks if ended else None)


def _cut_error() -> ErrorEnvelope:
    return ErrorEnvelope(ErrorBody(message="The model stream was cut before it finished.",
                                   type="server_error", code="stream_interrupted"))


def _not_recorded() -> ErrorEnvelope:
    return ErrorEnvelope(ErrorBody(message="The answer could not be stored; retry with the same Idempotency-Key.",
                                   type="server_error", code="turn_not_recorded"))


async def _aggregate(upstream: httpx.Response, turn: _TurnDraft, deps, headers: dict[str, str]) -> Response:
    chunks = upstream.aiter_raw()
    ended = False
    try:
        async for data in iter_data(chunks):
            if data == b"[DONE]":
                ended = True
                break
            chunk = turn.read(data)
            if turn.idempotency_key:
                deps.claims.keep(turn.principal.subject, turn.idempotency_key)
            if chunk.error is not None:
                raise ApiError(502, chunk.error.get("message", "Generation failed."), type="server_error",
                               code=chunk.error.get("code"))
    except httpx.HTTPError:
        raise ApiError(502, _cut_error().error.message, type="server_error", code="stream_interrupted") from None
    finally:
        await finish(upstream, chunks if ended else None)
    if not turn.complete_answer:
        raise ApiError(502, _cut_error().error.message, type="server_error", code="stream_interrupted")
    try:
        await turn.record(deps)
    except Exception:
        log.exception("answered turn could not be spooled", extra={"turn_id": turn.turn_id})
        raise ApiError(503, _not_recorded().error.message, type="server_error", code="turn_not_recorded") from None
    completion = ChatCompletion(
        id=turn.id, created=now(), model=turn.model.id,
        choices=[Choice(index=0, message=ResponseMessage("assistant", "".join(turn.parts)),
                        finish_reason=turn.finish_reason)],
        usage=turn.usage,
    )
    return Response(content=msgspec.json.encode(completion), media_type="application/json", headers=headers)


# ---- idempotent replay ----------------------------------------------------------------------------

def _replay(turn: TurnEvent, body: ChatCompletionRequest) -> Response | Stream:
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    return replay(turn, body.stream, include_usage, {TURN_HEADER: turn.turn_id})
