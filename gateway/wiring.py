"""How a gateway assembles its upstream hops, the fallback chain and its status (both gateways)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from redis.asyncio import Redis

from common.audit import AuditLog
from common.breaker import AsyncBreaker
from common.http import upstream_client
from common.idempotency import AnswerBook
from common.metrics import FALLBACKS
from common.security import InternalTokens
from common.settings import Settings
from fallback.chain import CachedAnswer, FallbackChain, LocalModel, ModelFallback, SimplifiedModel
from fallback.turns import TurnLog
from gateway.cache import ResponseCache
from gateway.chatpath import ChatPath
from gateway.proxy import Hop, RetryBudget

# The limits' wait on Redis before the in-process share decides. Wider than the kit's default: the
# wait includes the event loop's own queue, and a burst on a busy loop must not read as Redis being
# away (the in-process share would then admit more than the shared limit). A refused connection
# still fails at once; only a hung Redis costs this, once per cooldown.
LIMITS_REDIS_TIMEOUT = 0.5


def service_urls(settings: Settings) -> dict[str, str]:
    return {"chat": settings.chat_url, "models": settings.models_url, "auth": settings.auth_url,
            "users": settings.users_url, "inference": settings.inference_url}


async def build_hops(settings: Settings, stack: contextlib.AsyncExitStack, redis: Redis, names: set[str], *,
                     first_byte: dict[str, float] | None = None, attempts: int | None = None) -> dict[str, Hop]:
    """One hop per upstream: a long-lived client, a breaker shared through Redis (started here and
    stopped with `stack`), timeouts, and retries drawing on one retry budget."""
    urls = service_urls(settings)
    first_byte = first_byte or {}
    budget = RetryBudget(ratio=settings.retry_budget_ratio)
    hops = {}
    for name in sorted(names):
        client = upstream_client(settings, urls[name])
        stack.push_async_callback(client.aclose)
        breaker = AsyncBreaker(name, redis, fail_max=settings.breaker_fail_max,
                               reset_timeout=settings.breaker_reset_timeout)
        await breaker.start()
        stack.push_async_callback(breaker.stop)
        hops[name] = Hop(name=name, client=client, breaker=breaker,
                         first_byte_timeout=first_byte.get(name, settings.first_byte_timeout),
                         total_timeout=settings.total_timeout,
                         attempts=attempts if attempts is not None else settings.retry_attempts, budget=budget)
    return hops


async def build_chain(settings: Settings, stack: contextlib.AsyncExitStack, hops: dict[str, Hop],
                      tokens: InternalTokens, cache: ResponseCache, service: str) -> FallbackChain:
    """The chain; with `simplified_in_process` its CPU model starts loading now (stopped with `stack`)."""
    local = None
    if settings.simplified_in_process:
        local = LocalModel(cache_dir=Path(settings.model_cache), threads=settings.simplified_threads,
                           max_batch=settings.simplified_max_batch, max_queue=settings.simplified_max_queue)
        await local.start()
        stack.push_async_callback(local.stop)
    return FallbackChain([
        ModelFallback(hops["chat"], hops["models"], tokens, service),
        CachedAnswer(cache),
        SimplifiedModel(hops["inference"], tokens, settings.simplified_model, settings.simplified_max_tokens,
                        service, local),
    ])


async def keeping(chat_path: ChatPath, redis: Redis, tokens: InternalTokens, audit: AuditLog,
                  stack: contextlib.AsyncExitStack) -> ChatPath:
    """The chat path's fallback layers keep their answers: for the Idempotency-Key (Redis, shared with the
    chat service) and as turns, published with the audit log's producer (drained before it stops)."""
    turns = TurnLog(audit.publisher, chat_path.service)
    await turns.start()
    stack.push_async_callback(turns.stop)
    chat_path.answers = AnswerBook(redis, tokens)
    chat_path.turns = turns
    return chat_path


def gateway_status(service: str, hops: dict[str, Hop], cache: ResponseCache,
                   chain: FallbackChain | None = None) -> dict:
    fallbacks: dict[str, int] = {}
    for metric in FALLBACKS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("service") == service:
                fallbacks[sample.labels["layer"]] = int(sample.value)
    status = {"service": service, "breakers": {name: hop.breaker.state for name, hop in hops.items()},
              "cache": {"hits": cache.hits, "misses": cache.misses}, "fallbacks": fallbacks}
    if chain is not None:  # the AI domain's: where its simplified model answers from
        local = chain.local_model
        status["simplified_model"] = local.state if local is not None else "on the inference service"
    return status
