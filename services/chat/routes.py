"""Chat completions: resolve the model, stream from inference, persist the turn through Kafka."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import httpx
import msgspec
from httpx_sse import EventSource
from litestar import Request, Response, post
from litestar.datastructures import State
from litestar.response import Stream

from common.contracts import ModelRecord, TurnEvent, UsageEvent
from common.errors import ApiError, ErrorBody, ErrorEnvelope, decode_body, unavailable
from common.logging import request_id_var
from common.openai_schema import (
    ChatCompletion, ChatCompletionRequest, Choice, InferenceRequest, ResponseMessage, StreamOptions, Usage,
    completion_id, now,
)
from common.security import Principal
from common.sse import DONE, SSE_HEADERS, error_frame
from services.chat.schemas import StreamPeek

AUDIENCE = "chat"
_peek = msgspec.json.Decoder(StreamPeek)
_error = msgspec.json.Decoder(ErrorEnvelope)


def _validate_against_model(body: ChatCompletionRequest, model: ModelRecord) -> None:
    limit = body.token_limit()
    if limit is not None and limit >= model.context_length:
        raise ApiError(400, f"max_tokens must be below the model's context length ({model.context_length}).",
                       param="max_tokens", code="invalid_value")


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request, state: State) -> Response | Stream:
    deps = state.deps
    principal = deps.tokens.principal_from(request, AUDIENCE)
    body: ChatCompletionRequest = decode_body(await request.body(), ChatCompletionRequest)
    model = await deps.models.resolve(body.model)
    _validate_against_model(body, model)

    fields = msgspec.structs.asdict(body)
    fields.update(stream=True, stream_options=StreamOptions(include_usage=True), conversation_id=None)
    upstream_body = InferenceRequest(**fields, deployment=model.deployment)
    upstream = await _open_inference_stream(deps, principal, upstream_body)

    turn = _TurnDraft(body, principal)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Stream(_relay(upstream, turn, deps, include_usage), media_type="text/event-stream",
                      headers=SSE_HEADERS)
    return await _aggregate(upstream, turn, deps)


async def _open_inference_stream(deps, principal: Principal, body: InferenceRequest) -> httpx.Response:
    request = deps.inference.build_request(
        "POST", "/v1/chat/completions", content=msgspec.json.encode(body),
        headers={**deps.tokens.headers("inference", principal), "content-type": "application/json"},
    )
    try:
        response = await deps.inference.send(request, stream=True)
    except httpx.TimeoutException:
        raise ApiError(504, "The inference service did not answer in time.", type="server_error",
                       code="upstream_timeout") from None
    except httpx.HTTPError:
        raise unavailable("The inference service is unreachable.", code="inference_unavailable") from None
    if response.status_code != 200:
        content = await response.aread()
        await response.aclose()
        try:
            envelope = _error.decode(content)
        except msgspec.MsgspecError:
            envelope = ErrorEnvelope(ErrorBody(message="The inference service failed.", type="server_error"))
        # caller errors pass through; upstream failures are the platform's (502), overload keeps its status
        status = response.status_code if response.status_code < 500 or response.status_code == 503 else 502
        headers = {"Retry-After": response.headers["retry-after"]} if "retry-after" in response.headers else None
        raise ApiError(status, envelope.error.message, type=envelope.error.type, param=envelope.error.param,
                       code=envelope.error.code, headers=headers)
    return response


class _TurnDraft:
    """Collects what the assistant said while the answer streams by."""

    def __init__(self, body: ChatCompletionRequest, principal: Principal) -> None:
        self.body = body
        self.principal = principal
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.id = completion_id()

    def read(self, data: str) -> StreamPeek:
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

    def complete(self, deps) -> None:
        if self.usage is None or self.finish_reason is None:
            return
        created = time.time()
        conversation_id = self.body.conversation_id or f"conv_{uuid.uuid4().hex}"
        turn = TurnEvent(
            turn_id=f"turn_{uuid.uuid4().hex}", conversation_id=conversation_id,
            user_id=self.principal.subject, model=self.body.model,
            request_messages=self.body.plain_messages(), assistant="".join(self.parts),
            finish_reason=self.finish_reason, usage=self.usage, request_id=request_id_var.get(), created=created,
        )
        usage = UsageEvent(
            event_id=turn.turn_id, user_id=self.principal.subject, key_id=self.principal.key_id,
            model=self.body.model, prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens, created=created,
        )
        deps.turns.record(turn, usage)


async def _relay(upstream: httpx.Response, turn: _TurnDraft, deps, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        async for event in EventSource(upstream).aiter_sse():
            if event.data == "[DONE]":
                turn.complete(deps)
                yield DONE
                return
            chunk = turn.read(event.data)
            if chunk.error is not None:
                yield b"data: " + event.data.encode() + b"\n\n" + DONE
                return
            if chunk.usage is not None and not chunk.choices and not include_usage:
                continue  # we asked for usage for ourselves; the caller did not
            yield b"data: " + event.data.encode() + b"\n\n"
        yield error_frame(_cut_error())
    except httpx.HTTPError:
        yield error_frame(_cut_error())
    finally:
        await upstream.aclose()


def _cut_error() -> ErrorEnvelope:
    return ErrorEnvelope(ErrorBody(message="The model stream was cut before it finished.",
                                   type="server_error", code="stream_interrupted"))


async def _aggregate(upstream: httpx.Response, turn: _TurnDraft, deps) -> Response:
    try:
        async for event in EventSource(upstream).aiter_sse():
            if event.data == "[DONE]":
                break
            chunk = turn.read(event.data)
            if chunk.error is not None:
                raise ApiError(502, chunk.error.get("message", "Generation failed."), type="server_error",
                               code=chunk.error.get("code"))
    except httpx.HTTPError:
        raise ApiError(502, _cut_error().error.message, type="server_error", code="stream_interrupted") from None
    finally:
        await upstream.aclose()
    if turn.usage is None or turn.finish_reason is None:
        raise ApiError(502, _cut_error().error.message, type="server_error", code="stream_interrupted")
    turn.complete(deps)
    completion = ChatCompletion(
        id=turn.id, created=now(), model=turn.body.model,
        choices=[Choice(index=0, message=ResponseMessage("assistant", "".join(turn.parts)),
                        finish_reason=turn.finish_reason)],
        usage=turn.usage,
    )
    return Response(content=msgspec.json.encode(completion), media_type="application/json")


route_handlers = [chat_completions]
