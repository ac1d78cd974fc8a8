"""Every gateway from one factory: the identity and AI domain gateways and the fallback gateway differ
only in their `Role` (what they route to, how long they wait, how they authenticate, how much of a
plan they grant), and each deployable passes its own routes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from litestar import Litestar
from litestar.types import ControllerRouterHandler

from common.app import create_service_app
from common.audit import AuditLog
from common.contracts import API_ROUTES
from common.http import upstream_client
from common.lifespan import audit_log, followed_internal_tokens
from common.limits import RequestRateLimiter, TokenBudget
from common.redis_client import redis_client
from common.security import InternalTokens
from common.settings import Settings
from gateway.authn import Authenticator, KeyAuthenticator, SnapshotAuthenticator
from gateway.cache import LastKnown, ResponseCache
from gateway.chatpath import ChatPath
from gateway.forward import Upstream
from gateway.proxy import Hop
from gateway.wiring import LIMITS_REDIS_TIMEOUT, build_chain, build_hops, gateway_status, keeping

AUTH_TIMEOUT = 2.0  # an introspection that takes longer is a failure, not a wait
FALLBACK = "fallback"
CHAIN_NEEDS = frozenset({"chat", "models", "inference"})  # what the chat path and its fallback chain call


@dataclass(frozen=True)
class Role:
    """What makes one gateway differ from another."""

    name: str  # a domain ("identity", "ai") or FALLBACK
    routed: frozenset[str]  # the services its routes forward to
    chat: bool  # answers chat completions through the chat path and the fallback chain
    first_byte: dict[str, float] | None  # per upstream, when it must not wait the default
    attempts: int | None  # tries per upstream call (None: the default budgeted retries)
    limit_scope: str  # keeps its requests/min counters apart from the other roles'
    rate_share: float  # of each plan's requests/min

    @property
    def snapshot_auth(self) -> bool:
        """The fallback gateway authenticates from the auth snapshot, which outlives Redis and auth."""
        return self.name == FALLBACK


def role_of(settings: Settings, name: str) -> Role:
    if name == FALLBACK:
        # one try each, short waits: this gateway is already the second chance
        services = frozenset({"chat", "models", "inference", "users", "auth"})
        return Role(name=FALLBACK, routed=frozenset({"models", "users"}), chat=True,
                    first_byte=dict.fromkeys(services, settings.fallback_first_byte_timeout), attempts=1,
                    limit_scope="fallback-key", rate_share=settings.fallback_rate_share)
    domains = {domain for _, domain, _ in API_ROUTES}
    if name not in domains:
        raise ValueError(f"DUALGATE_DOMAIN must be one of {sorted(domains)}, not {name!r}")
    chat = name == "ai"
    first_byte = {"inference": settings.fallback_first_byte_timeout, "models": AUTH_TIMEOUT} if chat else None
    return Role(name=name, routed=frozenset(service for _, domain, service in API_ROUTES if domain == name),
                chat=chat, first_byte=first_byte, attempts=None, limit_scope="key", rate_share=1.0)


@dataclass
class GatewayDeps:
    service: str
    domain: str  # the role's name: "identity", "ai" or "fallback"
    tokens: InternalTokens
    auth: Authenticator
    hops: dict[str, Hop]
    upstreams: dict[str, Upstream]
    requests: RequestRateLimiter
    rate_share: float
    last_known: LastKnown
    cache: ResponseCache
    chat_path: ChatPath | None
    max_body_bytes: int
    total_timeout: float

    def request_limit(self, plan_limit: int) -> int:
        return max(1, int(plan_limit * self.rate_share))

    def status(self) -> dict:
        return gateway_status(self.service, self.hops, self.cache, self.chat_path.chain if self.chat_path else None)


def build(settings: Settings, role: Role, route_handlers: Sequence[ControllerRouterHandler]) -> Litestar:
    """The gateway app for `role`: its dependencies built and torn down in one lifespan."""
    service_name = settings.service

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with contextlib.AsyncExitStack() as stack:
            tokens = await followed_internal_tokens(settings, stack)
            redis = redis_client(settings)
            stack.push_async_callback(redis.aclose)
            needs = role.routed | (CHAIN_NEEDS if role.chat else set())
            if role.snapshot_auth:
                needs |= {"auth"}
            hops = await build_hops(settings, stack, redis, needs, first_byte=role.first_byte,
                                    **({"attempts": role.attempts} if role.attempts else {}))
            cache = ResponseCache(redis, ttl=settings.cache_ttl, stale_ttl=settings.cache_stale_ttl,
                                  local_entries=settings.cache_local_entries)
            stack.push_async_callback(cache.drain)
            audit = await audit_log(settings, stack)
            chat_path = None
            if role.chat:
                chat_path = await keeping(ChatPath(
                    service=service_name, tokens=tokens, chat=hops["chat"],
                    chain=await build_chain(settings, stack, hops, tokens, cache, service_name), cache=cache,
                    budget=TokenBudget(redis, replicas=settings.gateway_replicas, timeout=LIMITS_REDIS_TIMEOUT),
                    initial_hold=settings.initial_token_hold, total_timeout=settings.total_timeout),
                    redis, tokens, audit, stack)
            auth = await _authenticator(settings, role, stack, tokens, audit)
            app.state.deps = GatewayDeps(
                service=service_name, domain=role.name, tokens=tokens, auth=auth, hops=hops,
                upstreams={name: Upstream(audience=name, hop=hops[name]) for name in role.routed},
                requests=RequestRateLimiter(redis, role.limit_scope, replicas=settings.gateway_replicas,
                                            timeout=LIMITS_REDIS_TIMEOUT),
                rate_share=role.rate_share, last_known=LastKnown(redis), cache=cache, chat_path=chat_path,
                max_body_bytes=settings.max_body_bytes, total_timeout=settings.total_timeout,
            )
            yield

    return create_service_app(settings, route_handlers=list(route_handlers), lifespan=lifespan)


async def _authenticator(settings: Settings, role: Role, stack: contextlib.AsyncExitStack,
                         tokens: InternalTokens, audit: AuditLog) -> Authenticator:
    auth_client = upstream_client(settings, settings.auth_url, read_timeout=AUTH_TIMEOUT)
    stack.push_async_callback(auth_client.aclose)
    # its own Redis client: the limits' and cache's bounded calls (cancelled on timeout) never share a
    # connection pool with the auth-change subscription and its markers
    auth_redis = redis_client(settings)
    stack.push_async_callback(auth_redis.aclose)
    if role.snapshot_auth:  # keeps working while the auth service and Redis are down
        auth: Authenticator = SnapshotAuthenticator(
            auth_redis, tokens, auth_client=auth_client, service=settings.service, issuer=settings.jwt_issuer,
            audience=settings.jwt_audience, max_age=settings.auth_snapshot_max_age, audit=audit)
    else:
        auth = KeyAuthenticator(auth_client, tokens, settings.service, auth_redis, issuer=settings.jwt_issuer,
                                audience=settings.jwt_audience, cache_seconds=settings.auth_cache_seconds,
                                snapshot_max_age=settings.auth_snapshot_max_age, audit=audit)
    await auth.start()
    stack.push_async_callback(auth.stop)
    return auth
