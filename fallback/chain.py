"""The layers tried, in order, when a chat completion's primary path fails before its first byte.

1. model fallback: the registry's fallback model for the requested one, through the chat service;
2. cached response: this tenant's earlier answer to exactly this request (stale allowed);
3. simplified model: the CPU SmolLM2 engine, asked directly on the inference service;
4. (the caller's last resort) a degraded 503 with Retry-After.

A layer answers or passes (None); it never raises for an upstream's failure. Each answer names
its layer, which the caller flags (`x-dualgate-degraded: <layer>`) and counts.

The simplified model runs in the inference service's process, not in the gateway's: the gateways
stay small (no 1.5 GB torch model per gateway replica), never compete with the inference engine
for the same CPU cores from a second copy, and need no code from a deployable they must not import.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import httpx
import msgspec

from common.authn import Identity
from common.contracts import ModelRecord
from common.openai_schema import ChatCompletionRequest, EngineSpec, InferenceRequest, StreamOptions
from common.proxy import Hop, UpstreamUnavailable
from common.security import InternalTokens, service_principal
from fallback.cache import CacheEntry, ResponseCache

log = logging.getLogger(__name__)

_record_decoder = msgspec.json.Decoder(ModelRecord)
_encoder = msgspec.json.Encoder()
JSON = "application/json"


@dataclass
class ChainRequest:
    identity: Identity
    body: ChatCompletionRequest
    cache_key: str | None
    reason: str
    extra_headers: dict[str, str]  # request headers to pass on (idempotency key)
    model_known: bool = True  # the chat service has answered for this model before


@dataclass
class FromUpstream:
    layer: str
    response: httpx.Response  # 200, body unread


@dataclass
class FromCache:
    layer: str
    entry: CacheEntry


Answer = FromUpstream | FromCache


class Layer(Protocol):
    name: str

    async def answer(self, request: ChainRequest) -> Answer | None: ...


def upstream_body(body: ChatCompletionRequest, **changes: object) -> ChatCompletionRequest:
    """The request as sent upstream: a stream always asks for usage (the gateway settles with it)."""
    if body.stream:
        changes.setdefault("stream_options", StreamOptions(include_usage=True))
    return msgspec.structs.replace(body, **changes) if changes else body


async def _ok(response: httpx.Response) -> httpx.Response | None:
    if response.status_code == 200:
        return response
    await response.aclose()
    return None


class ModelFallback:
    """The registry names a fallback model per model: ask the chat service for that one instead."""

    name = "model-fallback"

    def __init__(self, chat: Hop, models: Hop, tokens: InternalTokens, service: str, ttl: float = 30.0) -> None:
        self.chat = chat
        self.models = models
        self.tokens = tokens
        self.ttl = ttl
        self._self = service_principal(service)
        self._known: dict[str, tuple[str | None, float]] = {}

    async def _fallback_of(self, model: str) -> str | None:
        cached = self._known.get(model)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        try:
            response = await self.models.open("GET", f"/internal/models/{model}",
                                              headers=self.tokens.headers("models", self._self), retry_ok=True)
        except UpstreamUnavailable:
            return cached[0] if cached else None  # the last known registry
        try:
            found = _record_decoder.decode(await response.aread()).fallback_model if response.status_code == 200 else None
        except (httpx.HTTPError, msgspec.MsgspecError):
            found = None
        finally:
            await response.aclose()
        if len(self._known) > 1024:
            self._known.clear()
        self._known[model] = (found, time.monotonic() + self.ttl)
        return found

    async def answer(self, request: ChainRequest) -> Answer | None:
        fallback_model = await self._fallback_of(request.body.model)
        if not fallback_model or fallback_model == request.body.model:
            return None
        content = _encoder.encode(upstream_body(request.body, model=fallback_model))
        headers = {**request.extra_headers, **self.tokens.headers("chat", request.identity.principal),
                   "content-type": JSON}
        try:
            response = await self.chat.open("POST", "/v1/chat/completions", content=content, headers=headers)
        except UpstreamUnavailable:
            return None
        ok = await _ok(response)
        return FromUpstream(self.name, ok) if ok else None


class CachedAnswer:
    """This tenant's earlier answer to exactly this request, even one past its fresh life."""

    name = "cache"

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    async def answer(self, request: ChainRequest) -> Answer | None:
        if request.cache_key is None:
            return None
        entry = await self.cache.get(request.cache_key, max_age=self.cache.stale_ttl)
        return FromCache(self.name, entry) if entry else None


class SimplifiedModel:
    """The small CPU model on the inference service, asked directly (no chat, no models service)."""

    name = "simplified"

    def __init__(self, inference: Hop, tokens: InternalTokens, model: str, max_tokens: int) -> None:
        self.inference = inference
        self.tokens = tokens
        self.model = model
        self.max_tokens = max_tokens

    async def answer(self, request: ChainRequest) -> Answer | None:
        if not request.model_known:  # never an answer for a model that may not exist at all
            return None
        body = request.body
        limit = min(body.token_limit() or self.max_tokens, self.max_tokens)
        fields = msgspec.structs.asdict(upstream_body(body, model=self.model, max_tokens=limit,
                                                      max_completion_tokens=None, conversation_id=None))
        content = _encoder.encode(InferenceRequest(**fields, deployment=EngineSpec(engine="cpu")))
        headers = {**self.tokens.headers("inference", request.identity.principal), "content-type": JSON}
        try:
            response = await self.inference.open("POST", "/v1/chat/completions", content=content, headers=headers)
        except UpstreamUnavailable:
            return None
        ok = await _ok(response)
        return FromUpstream(self.name, ok) if ok else None


class FallbackChain:
    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers

    async def answer(self, request: ChainRequest) -> Answer | None:
        for layer in self.layers:
            try:
                found = await layer.answer(request)
            except Exception:  # a broken layer must not hide the ones after it
                log.exception("fallback layer failed", extra={"layer": layer.name})
                found = None
            if found is not None:
                return found
        return None
