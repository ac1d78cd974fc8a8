"""The fallback gateway: what answers, for both domains, when a domain gateway cannot.

Authentication comes from the auth snapshot (`gateway.authn.SnapshotAuthenticator`: Redis mirrored
in process memory, obeying revocations) when the kit provides it; until then from introspection
with the same `authenticate(request) -> Identity` interface. Limits are conservative (a share of
each plan) and still exact across replicas while Redis answers.
"""

from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager
from dataclasses import dataclass

from litestar import Litestar

from common.app import create_service_app
from gateway.authn import SnapshotAuthenticator
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
from gateway_fallback.routes import route_handlers

AUTH_TIMEOUT = 2.0


@dataclass
class FallbackDeps:
    service: str
    tokens: InternalTokens
    auth: SnapshotAuthenticator
    hops: dict[str, Hop]
    upstreams: dict[str, Upstream]
    requests: RequestRateLimiter
    rate_share: float
    last_known: LastKnown
    cache: ResponseCache
    chat_path: ChatPath
    max_body_bytes: int
    total_timeout: float

    def request_limit(self, plan_limit: int) -> int:
        return max(1, int(plan_limit * self.rate_share))

    def status(self) -> dict:
        return gateway_status(self.service, self.hops, self.cache, self.chat_path.chain)


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="gateway-fallback")
    service_name = settings.service

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with contextlib.AsyncExitStack() as stack:
            tokens = await followed_internal_tokens(settings, stack)
            redis = redis_client(settings)
            stack.push_async_callback(redis.aclose)
            short = settings.fallback_first_byte_timeout
            # one try each, short waits: this gateway is already the second chance
            hops = await build_hops(settings, stack, redis, {"chat", "models", "inference", "users", "auth"},
                                    first_byte={name: short for name in ("chat", "models", "inference", "users",
                                                                         "auth")}, attempts=1)
            auth_client = upstream_client(settings, settings.auth_url, read_timeout=AUTH_TIMEOUT)
            stack.push_async_callback(auth_client.aclose)
            auth_redis = redis_client(settings)  # apart from the limits' and cache's pool, as in the primary
            stack.push_async_callback(auth_redis.aclose)
            audit = await audit_log(settings, stack)
            # the snapshot: keeps working while the auth service and Redis are down
            auth = SnapshotAuthenticator(auth_redis, tokens, auth_client=auth_client, service=service_name,
                                         issuer=settings.jwt_issuer, audience=settings.jwt_audience,
                                         max_age=settings.auth_snapshot_max_age, audit=audit)
            await auth.start()
            stack.push_async_callback(auth.stop)
            cache = ResponseCache(redis, ttl=settings.cache_ttl, stale_ttl=settings.cache_stale_ttl,
                                  local_entries=settings.cache_local_entries)
            stack.push_async_callback(cache.drain)
            chat_path = await keeping(ChatPath(
                service=service_name, tokens=tokens, chat=hops["chat"],
                chain=await build_chain(settings, stack, hops, tokens, cache, service_name), cache=cache,
                budget=TokenBudget(redis, replicas=settings.gateway_replicas, timeout=LIMITS_REDIS_TIMEOUT),
                initial_hold=settings.initial_token_hold, total_timeout=settings.total_timeout),
                redis, tokens, audit, stack)
            app.state.deps = FallbackDeps(
                service=service_name, tokens=tokens, auth=auth, hops=hops,
                upstreams={name: Upstream(audience=name, hop=hops[name]) for name in ("models", "users")},
                requests=RequestRateLimiter(redis, "fallback-key", replicas=settings.gateway_replicas,
                                            timeout=LIMITS_REDIS_TIMEOUT),
                rate_share=settings.fallback_rate_share, last_known=LastKnown(redis), cache=cache,
                chat_path=chat_path, max_body_bytes=settings.max_body_bytes, total_timeout=settings.total_timeout,
            )
            yield

    return create_service_app(settings, route_handlers=route_handlers, lifespan=lifespan)
