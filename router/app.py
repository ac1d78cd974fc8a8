"""The middleware router: request ids, body limits, routing by domain, failover to the fallback gateway."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from litestar import Litestar

from common.app import create_service_app
from common.http import upstream_client
from common.settings import Settings
from router.routes import GatewayPool, route_handlers


@dataclass
class RouterDeps:
    pools: dict[str, GatewayPool]
    fallback: GatewayPool
    max_body_bytes: int


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="router")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        clients = {name: upstream_client(settings) for name in ("identity", "ai", "fallback")}
        app.state.deps = RouterDeps(
            pools={
                "identity": GatewayPool("identity", clients["identity"], settings.url_list(settings.gateway_identity_urls)),
                "ai": GatewayPool("ai", clients["ai"], settings.url_list(settings.gateway_ai_urls)),
            },
            fallback=GatewayPool("fallback", clients["fallback"], [settings.gateway_fallback_url.rstrip("/")]),
            max_body_bytes=settings.max_body_bytes,
        )
        try:
            yield
        finally:
            for client in clients.values():
                await client.aclose()

    return create_service_app(settings, route_handlers=route_handlers, lifespan=lifespan)
