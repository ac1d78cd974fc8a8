"""A domain gateway (DOMAIN=identity or ai): authentication, then the domain's services."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgspec
from litestar import Litestar
from redis.asyncio import Redis

from common.app import create_service_app
from common.authn import Authenticator
from common.http import upstream_client
from common.security import InternalTokens
from common.settings import Settings
from common.vault import SecretsRefresher, Vault
from gateway_primary.routes import ROUTES, Upstream, route_handlers


@dataclass
class GatewayDeps:
    service: str
    domain: str
    tokens: InternalTokens
    auth: Authenticator
    upstreams: dict[str, Upstream]
    max_body_bytes: int


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="gateway")
    if settings.domain not in ROUTES:
        raise ValueError(f"DUALGATE_DOMAIN must be one of {sorted(ROUTES)}, not {settings.domain!r}")
    if settings.service == "gateway":
        settings = msgspec.structs.replace(settings, service=f"gateway-{settings.domain}")
    service_name = settings.service

    @asynccontextmanager
    async def lifespan(app: Litestar):
        vault = Vault(settings)
        await vault.login()
        tokens = await vault.internal_tokens()
        secrets = SecretsRefresher(vault, settings.secrets_refresh_seconds)  # follows internal-key rotation
        secrets.watch_internal_tokens(tokens)
        await secrets.start()
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=0.5, socket_timeout=1.0)
        urls = {"chat": settings.chat_url, "models": settings.models_url, "auth": settings.auth_url,
                "users": settings.users_url}
        needed = {service for _, service in ROUTES[settings.domain]} | {"auth"}
        clients = {name: upstream_client(settings, urls[name]) for name in needed}
        app.state.deps = GatewayDeps(
            service=service_name, domain=settings.domain, tokens=tokens,
            auth=Authenticator(clients["auth"], tokens, service_name, redis, issuer=settings.jwt_issuer,
                               audience=settings.jwt_audience, cache_seconds=settings.auth_cache_seconds,
                               snapshot_max_age=settings.auth_snapshot_max_age),
            upstreams={name: Upstream(audience=name, client=client) for name, client in clients.items()},
            max_body_bytes=settings.max_body_bytes,
        )
        await app.state.deps.auth.start()
        try:
            yield
        finally:
            await app.state.deps.auth.stop()
            await secrets.stop()
            for client in clients.values():
                await client.aclose()
            await redis.aclose()

    return create_service_app(settings, route_handlers=route_handlers, lifespan=lifespan)
