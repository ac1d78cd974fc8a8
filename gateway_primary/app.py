"""A domain gateway (DOMAIN=identity or ai): authentication, then the domain's services."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgspec
from litestar import Litestar

from common.app import create_service_app
from common.authn import Authenticator
from common.http import upstream_client
from common.security import InternalTokens
from common.settings import Settings
from common.vault import Vault
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
        urls = {"chat": settings.chat_url, "models": settings.models_url, "auth": settings.auth_url,
                "users": settings.users_url}
        needed = {service for _, service in ROUTES[settings.domain]} | {"auth"}
        clients = {name: upstream_client(settings, urls[name]) for name in needed}
        app.state.deps = GatewayDeps(
            service=service_name, domain=settings.domain, tokens=tokens,
            auth=Authenticator(clients["auth"], tokens, service_name),
            upstreams={name: Upstream(audience=name, client=client) for name, client in clients.items()},
            max_body_bytes=settings.max_body_bytes,
        )
        try:
            yield
        finally:
            for client in clients.values():
                await client.aclose()

    return create_service_app(settings, route_handlers=route_handlers, lifespan=lifespan)
