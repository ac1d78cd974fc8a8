"""The OpenAI chat-completions wire format, shared by every hop that must read it."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

MAX_MESSAGES = 512
MAX_CONTENT_CHARS = 200_000
MAX_STOP_SEQUENCES = 4


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: Annotated[str, Meta(max_length=MAX_CONTENT_CHARS)]


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, Meta(max_length=MAX_CONTENT_CHARS)] | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    stream: bool = False
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    stop: Annotated[str, Meta(max_length=256)] | Annotated[list[Annotated[str, Meta(max_length=256)]], Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    stream_options: StreamOptions | None = None
    user: str | None = None
    # dualgate extension: continue a stored conversation
    conversation_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def plain_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class EngineSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Which engine serves a request, as the models registry resolved it."""

    engine: Literal["cpu", "synthetic", "sglang"]
    served_model: str = ""
    workers: list[str] = []
    params: dict[str, float] = {}


class InferenceRequest(ChatCompletionRequest, kw_only=True):
    """What the chat service sends to the inference service: the request plus its deployment."""

    deployment: EngineSpec | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None


class ResponseMessage(msgspec.Struct):
    role: str
    content: str


class Choice(msgspec.Struct):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    object: str = "chat.completion"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def request_hash(body: ChatCompletionRequest) -> str:
    """What a request asks, whatever its delivery (a stored answer replays streamed or not): the same
    on every hop, so a turn's identity and an Idempotency-Key's check agree across layers."""
    asked = msgspec.structs.replace(body, stream=False, stream_options=None)
    return hashlib.sha256(msgspec.json.encode(asked)).hexdigest()
