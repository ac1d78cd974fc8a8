"""The layers tried, in order, when a chat completion's primary path fails before its first byte.

1. model fallback: the registry's fallback model for the requested one, through the chat service;
2. cached response: this tenant's earlier answer to exactly this request (stale allowed);
3. simplified model: the CPU SmolLM2 engine in this gateway's own process (loaded in the
   background at start), or, while that is not loaded or not enabled, on the inference service;
4. (the caller's last resort) a degraded 503 with Retry-After.

A layer answers or passes (None); it never raises for an upstream's failure. Each answer names
its layer, which the caller flags (`x-dualgate-degraded: <layer>`) and counts.

The in-process engine is what keeps answers coming when the inference service itself is down (the
failure matrix's "inference" row); it costs each AI gateway ~0.6 GB and idles unless asked. Its
answer has exactly the wire format of the inference service's (common.engines.render).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx
import msgspec

from common.app import freeze_long_lived_objects
from common.contracts import DEGRADED_HEADER, REQUEST_HASH_HEADER, ModelRecord, url_id, valid_id
from common.engines.base import GenerationRequest
from common.engines.render import completion, sse_chunks
from common.openai_schema import ChatCompletionRequest, EngineSpec, InferenceRequest, StreamOptions
from common.security import InternalTokens, service_principal
from gateway.authn import Identity
from gateway.cache import CacheEntry, ResponseCache
from gateway.proxy import Hop, UpstreamUnavailable

if TYPE_CHECKING:
    from common.engines.cpu import CpuEngine

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
    request_hash: str = ""  # what the client asked (common.openai_schema.request_hash)


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
        if not valid_id("model", model):  # names no model: nothing to fall back to, nothing to ask
            return None
        cached = self._known.get(model)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        try:
            response = await self.models.open("GET", f"/internal/models/{url_id('model', model)}",
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
        # the chat service stores this turn itself: flagged, and under what the client asked
        headers = {**request.extra_headers, **self.tokens.headers("chat", request.identity.principal),
                   "content-type": JSON, DEGRADED_HEADER: self.name, REQUEST_HASH_HEADER: request.request_hash}
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


class LocalModel:
    """The CPU engine in this process, loaded in the background so the gateway is ready at once."""

    def __init__(self, *, cache_dir: Path, threads: int, max_batch: int, max_queue: int) -> None:
        self._options = {"cache_dir": cache_dir, "threads": threads, "max_batch": max_batch, "max_queue": max_queue}
        self.engine: CpuEngine | None = None
        self.error = ""
        self._loading: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready

    @property
    def state(self) -> str:
        return "ready" if self.ready else self.error or "loading"

    async def start(self) -> None:
        self._loading = asyncio.create_task(self._load(), name="simplified-model-load")

    async def _load(self) -> None:
        try:
            from common.engines.cpu import CpuEngine  # torch and transformers: seconds to import

            engine = CpuEngine(**self._options)
            await engine.start()
            self.engine = engine
            freeze_long_lived_objects()  # the model and its libraries: ~180k objects no request frees
            log.info("simplified model loaded in process")
        except Exception as exc:  # the inference service's copy still serves the layer
            self.error = f"{type(exc).__name__}: {exc}"[:200]
            log.exception("simplified model failed to load")

    async def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        if self.engine is not None:
            await self.engine.stop()


class _EngineStream(httpx.AsyncByteStream):
    """An in-process answer as an httpx body, so the gateway relays it like any upstream's; closing
    it (the caller went away) frees the engine's slot at once."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        await self._chunks.aclose()


class SimplifiedModel:
    """The small CPU model, under its own name: in this process when loaded, else on the inference service."""

    name = "simplified"

    def __init__(self, inference: Hop, tokens: InternalTokens, model: str, max_tokens: int, service: str,
                 local: LocalModel | None = None) -> None:
        self.inference = inference
        self.tokens = tokens
        self.model = model
        self.max_tokens = max_tokens
        self.service = service
        self.local = local

    async def answer(self, request: ChainRequest) -> Answer | None:
        if not request.model_known:  # never an answer for a model that may not exist at all
            return None
        body = request.body
        limit = min(body.token_limit() or self.max_tokens, self.max_tokens)
        if self.local is not None and self.local.ready:
            return await self._in_process(body, limit)
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

    async def _in_process(self, body: ChatCompletionRequest, limit: int) -> Answer | None:
        events = self.local.engine.generate(GenerationRequest(
            messages=body.plain_messages(), max_tokens=limit, temperature=body.temperature, top_p=body.top_p,
            stop=body.stop_list(), seed=body.seed))
        try:
            first = await events.__anext__()  # busy, too long a prompt, stopped: the layer passes
        except Exception as exc:
            await events.aclose()
            log.warning("in-process simplified model could not answer", extra={"why": type(exc).__name__})
            return None
        if body.stream:  # usage always: the gateway settles the token budget with it
            chunks = sse_chunks(first, events, self.model, True, self.service)
            return FromUpstream(self.name, httpx.Response(200, headers={"content-type": "text/event-stream"},
                                                          stream=_EngineStream(chunks)))
        answer = await completion(first, events, self.model, self.service)
        return FromUpstream(self.name, httpx.Response(200, headers={"content-type": JSON},
                                                      content=_encoder.encode(answer)))


class FallbackChain:
    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers

    @property
    def local_model(self) -> LocalModel | None:
        return next((layer.local for layer in self.layers if isinstance(layer, SimplifiedModel)), None)

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
