"""An engine's events (TokenDelta..., Finished) as an OpenAI chat completion: SSE chunks or one object.

Shared by the inference service and the fallback chain's in-process simplified model, so a degraded
answer has exactly the wire format of a real one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from common.engines.base import Finished, TokenDelta
from common.errors import ErrorBody, ErrorEnvelope
from common.metrics import TOKENS
from common.openai_schema import (
    ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta, ResponseMessage, Usage, completion_id, now,
)
from common.sse import DONE, error_frame, frame


def usage_of(finished: Finished, model: str, service: str) -> Usage:
    TOKENS.labels(service, model, "prompt").inc(finished.prompt_tokens)
    TOKENS.labels(service, model, "completion").inc(finished.completion_tokens)
    return Usage(finished.prompt_tokens, finished.completion_tokens,
                 finished.prompt_tokens + finished.completion_tokens)


async def completion(first, events: AsyncIterator, model: str, service: str) -> ChatCompletion:
    """The whole answer as one `chat.completion` object with usage."""
    parts: list[str] = []
    event = first
    try:
        while not isinstance(event, Finished):
            parts.append(event.text)
            event = await events.__anext__()
    finally:
        await events.aclose()
    return ChatCompletion(
        id=completion_id(), created=now(), model=model,
        choices=[Choice(index=0, message=ResponseMessage("assistant", "".join(parts)),
                        finish_reason=event.finish_reason)],
        usage=usage_of(event, model, service))


async def sse_chunks(first, events: AsyncIterator, model: str, include_usage: bool,
                     service: str) -> AsyncIterator[bytes]:
    """`chat.completion.chunk` events as they come, ending in [DONE]; a failure mid-stream ends with an
    error event, never a silent cut."""
    cid, created = completion_id(), now()

    def chunk(delta: Delta, finish: str | None = None) -> bytes:
        return frame(ChatCompletionChunk(id=cid, created=created, model=model,
                                         choices=[ChunkChoice(0, delta, finish)]))

    event = first
    try:
        yield chunk(Delta(role="assistant", content=""))
        while True:
            if isinstance(event, TokenDelta):
                yield chunk(Delta(content=event.text))
            else:
                assert isinstance(event, Finished)
                yield chunk(Delta(), event.finish_reason)
                usage = usage_of(event, model, service)
                if include_usage:
                    yield frame(ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=usage))
                yield DONE
                return
            event = await events.__anext__()
    except Exception as exc:
        yield error_frame(ErrorEnvelope(ErrorBody(message=f"Generation failed: {type(exc).__name__}",
                                                  type="server_error", code="engine_error")))
    finally:
        await events.aclose()
