"""A domain gateway (DOMAIN=identity or ai): authentication, limits, cache, resilient upstream calls."""

from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgspec
from litestar import Litestar

from common.app import create_service_app
from gateway.authn import KeyAuthenticator
from common.contracts import API_ROUTES
from common.http import upstream_client
from common.lifespan import audit_log, followed_internal_tokens
from common.limits import RequestRateLimiter, TokenBudget
from gateway.proxy import Hop
from common.redis_client import redis_client
from common.security import InternalTokens
from common.settings import Settings
from gateway.cache import LastKnown, ResponseCache
from gateway.chatpath import ChatPath
from gateway.forward import Upstream
from gateway.wiring import LIMITS_REDIS_TIMEOUT, build_chain, build_hops, gateway_status, keeping
from gateway_primary.routes import route_handlers

AUTH_TIMEOUT = 2.0  # an introspection that takes longer is a failure, not a wait


@dataclass
class GatewayDeps:
    service: str
    domain: str
    tokens: InternalTokens
    auth: KeyAuthenticator
    hops: dict[str, Hop]
    upstreams: dict[str, Upstream]
    requests: RequestRateLimiter
    last_known: LastKnown
    cache: ResponseCache
    chat_path: ChatPath | None
    max_body_bytes: int
    total_timeout: float

    def status(self) -> dict:
        return gateway_status(self.service, self.hops, self.cache, self.chat_path.chain if self.chat_path else None)


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="gateway")
    domains = {domain for _, domain, _ in API_ROUTES}
    if settings.domain not in domains:
        raise ValueError(f"DUALGATE_DOMAIN must be one of {sorted(domains)}, not {settings.domain!r}")
    if settings.service == "gateway":
        settings = msgspec.structs.replace(settings, service=f"gateway-{settings.domain}")
    service_name = settings.service

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with contextlib.AsyncExitStack() as stack:
            tokens = await followed_internal_tokens(settings, stack)
            redis = redis_client(settings)
            stack.push_async_callback(redis.aclose)
            routed = {service for _, domain, service in API_ROUTES if domain == settings.domain}
            chain_needs = {"chat", "models", "inference"} if settings.domain == "ai" else set()
            hops = await build_hops(settings, stack, redis, routed | chain_needs,
                                    first_byte={"inference": settings.fallback_first_byte_timeout,
                                                "models": AUTH_TIMEOUT} if chain_needs else None)
            auth_client = upstream_client(settings, settings.auth_url, read_timeout=AUTH_TIMEOUT)
            stack.push_async_callback(auth_client.aclose)
            cache = ResponseCache(redis, ttl=settings.cache_ttl, stale_ttl=settings.cache_stale_ttl,
                                  local_entries=settings.cache_local_entries)
            stack.push_async_callback(cache.drain)
            audit = await audit_log(settings, stack)
            chat_path = None
            if settings.domain == "ai":
                chat_path = await keeping(ChatPath(
                    service=service_name, tokens=tokens, chat=hops["chat"],
                    chain=await build_chain(settings, stack, hops, tokens, cache, service_name), cache=cache,
                    budget=TokenBudget(redis, replicas=settings.gateway_replicas, timeout=LIMITS_REDIS_TIMEOUT),
                    initial_hold=settings.initial_token_hold, total_timeout=settings.total_timeout),
                    redis, tokens, audit, stack)
            # its own Redis client: the limits' and cache's bounded calls (cancelled on timeout) never
            # share a connection pool with the auth-change subscription and its markers
            auth_redis = redis_client(settings)
            stack.push_async_callback(auth_redis.aclose)
            auth = KeyAuthenticator(auth_client, tokens, service_name, auth_redis, issuer=settings.jwt_issuer,
                                 audience=settings.jwt_audience, cache_seconds=settings.auth_cache_seconds,
                                 snapshot_max_age=settings.auth_snapshot_max_age, audit=audit)
            await auth.start()
            stack.push_async_callback(auth.stop)
            app.state.deps = GatewayDeps(
                service=service_name, domain=settings.domain, tokens=tokens, auth=auth, hops=hops,
                upstreams={name: Upstream(audience=name, hop=hops[name]) for name in routed},
                requests=RequestRateLimiter(redis, "key", replicas=settings.gateway_replicas,
                                            timeout=LIMITS_REDIS_TIMEOUT),
                last_known=LastKnown(redis), cache=cache, chat_path=chat_path,
                max_body_bytes=settings.max_body_bytes, total_timeout=settings.total_timeout,
            )
            yield

    return create_service_app(settings, route_handlers=route_handlers, lifespan=lifespan)
