"""The middleware router: request ids, per-IP limits, body limits, routing by domain, failover."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import msgspec
from litestar import Litestar
from redis.asyncio import Redis

from common.app import create_service_app
from common.breaker import AsyncBreaker
from common.http import upstream_client
from common.limits import SyncedRateLimiter
from common.redis_client import redis_client
from common.settings import Settings
from router.pools import GatewayConnections, GatewayPool, HealthChecker
from router.routes import openapi_document, route_handlers

SERVICES = ("auth", "users", "chat", "models", "inference")
STATUS_TIMEOUT = 0.5
_json = msgspec.json.Decoder()


@dataclass
class RouterDeps:
    pools: dict[str, GatewayPool]
    fallback: GatewayPool
    ip_limiter: SyncedRateLimiter
    ip_limit: int
    max_body_bytes: int
    first_byte_timeout: float
    probe: httpx.AsyncClient
    redis: Redis
    service_urls: dict[str, str]

    async def status(self) -> bytes:
        pools = [*self.pools.values(), self.fallback]
        gateway_urls = [m.url for pool in pools for m in pool.members]

        async def fetch(url: str, path: str) -> tuple[int, dict | None, str]:
            try:
                response = await self.probe.get(url + path, timeout=STATUS_TIMEOUT)
                return response.status_code, _json.decode(response.content), ""
            except (httpx.HTTPError, msgspec.MsgspecError, OSError) as exc:
                return 0, None, type(exc).__name__

        async def redis_ok() -> str:
            try:
                async with asyncio.timeout(STATUS_TIMEOUT):
                    await self.redis.ping()
                return ""
            except Exception as exc:  # any failure: say which
                return type(exc).__name__

        gateway_views, service_views, redis_error = await asyncio.gather(
            asyncio.gather(*(fetch(url, "/internal/status") for url in gateway_urls)),
            asyncio.gather(*(fetch(url, "/readyz") for url in self.service_urls.values())),
            redis_ok())
        hits = misses = 0
        fallbacks: dict[str, int] = {}
        gateways = {}
        for url, (code, view, error) in zip(gateway_urls, gateway_views):
            gateways[url] = view if code == 200 and view else {"unreachable": error or f"status {code}"}
            if code == 200 and view:
                hits += view["cache"]["hits"]
                misses += view["cache"]["misses"]
                for layer, count in view["fallbacks"].items():
                    fallbacks[layer] = fallbacks.get(layer, 0) + count
        components = {"redis": {"ready": not redis_error, "why": redis_error}}
        for name, (code, view, error) in zip(self.service_urls, service_views):
            components[name] = {"ready": code == 200,
                                "why": "" if code == 200 else (view or {}).get("failing") or error or f"status {code}"}
        for pool in pools:
            for member in pool.members:
                components[f"{pool.name}@{member.url}"] = {"ready": member.healthy, "why": member.last_error}
        body = {
            "status": "ok" if all(c["ready"] for c in components.values()) else "degraded",
            "components": components,
            "domains": {name: pool.view() for name, pool in self.pools.items()},
            "fallback_gateway": self.fallback.view(),
            "gateways": gateways,
            "cache": {"hits": hits, "misses": misses,
                      "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None},
            "fallbacks": fallbacks,
            "failovers": {name: pool.failovers for name, pool in self.pools.items()},
        }
        return msgspec.json.encode(body)


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="router")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with contextlib.AsyncExitStack() as stack:
            redis = redis_client(settings)
            stack.push_async_callback(redis.aclose)
            probe = upstream_client(settings, read_timeout=settings.health_timeout)
            stack.push_async_callback(probe.aclose)
            connections = {}
            for name in ("identity", "ai", "fallback"):
                connections[name] = GatewayConnections.from_settings(settings)
                stack.push_async_callback(connections[name].aclose)
            breakers = {}
            for domain in ("identity", "ai"):
                breakers[domain] = AsyncBreaker(f"gateway-{domain}", redis, fail_max=3,
                                                reset_timeout=settings.breaker_reset_timeout)
                await breakers[domain].start()
                stack.push_async_callback(breakers[domain].stop)
            pools = {
                "identity": GatewayPool.of("identity", connections["identity"],
                                           settings.url_list(settings.gateway_identity_urls), breakers["identity"]),
                "ai": GatewayPool.of("ai", connections["ai"], settings.url_list(settings.gateway_ai_urls), breakers["ai"]),
            }
            fallback = GatewayPool.of("fallback", connections["fallback"], settings.url_list(settings.gateway_fallback_url))
            health = HealthChecker(probe, [*pools.values(), fallback], interval=settings.health_interval,
                                   timeout=settings.health_timeout)
            await health.start()
            stack.push_async_callback(health.stop)
            ip_limiter = SyncedRateLimiter(redis, "ip", sync_interval=settings.router_ip_sync_seconds)
            await ip_limiter.start()
            stack.push_async_callback(ip_limiter.stop)
            urls = {"auth": settings.auth_url, "users": settings.users_url, "chat": settings.chat_url,
                    "models": settings.models_url, "inference": settings.inference_url}
            app.state.deps = RouterDeps(
                pools=pools, fallback=fallback,
                ip_limiter=ip_limiter, ip_limit=settings.router_ip_rpm,
                max_body_bytes=settings.max_body_bytes, first_byte_timeout=settings.router_first_byte_timeout,
                probe=probe, redis=redis, service_urls=urls,
            )
            yield

    # no schema of its own (it has no public routes but the relay): it serves the services' merged one
    return create_service_app(settings, route_handlers=[*route_handlers, openapi_document], lifespan=lifespan,
                              openapi_config=None)
