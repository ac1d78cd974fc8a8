"""The fallback gateway: what answers when a domain gateway cannot."""

from __future__ import annotations

from contextlib import asynccontextmanager

from litestar import Litestar

from common.app import create_service_app
from common.settings import Settings
from gateway_fallback.routes import route_handlers


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="gateway-fallback")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        app.state.service = settings.service
        yield

    return create_service_app(settings, route_handlers=route_handlers, lifespan=lifespan)
