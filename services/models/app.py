"""Models service: the registry of models, the deployment that serves each, and its fallback."""

from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from litestar import Litestar

from common.app import create_service_app
from common.db import ping
from common.http import upstream_client
from common.lifespan import service_basics
from common.security import InternalTokens
from common.settings import Settings
from services.models.plans import AllowedModels
from services.models.routes import route_handlers
from services.models.store import ModelStore

MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass
class ModelsDeps:
    tokens: InternalTokens
    store: ModelStore
    allowed: AllowedModels


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="models")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with contextlib.AsyncExitStack() as stack:
            basics = await stack.enter_async_context(service_basics(settings, MIGRATIONS))
            users_http = await stack.enter_async_context(upstream_client(settings, settings.users_url, read_timeout=2.0))
            app.state.deps = ModelsDeps(tokens=basics.tokens, store=ModelStore(basics.pool),
                                        allowed=AllowedModels(users_http, basics.tokens))
            yield

    def readiness(state):
        return {"postgres": lambda: ping(state.deps.store.pool)}

    return create_service_app(settings, route_handlers=route_handlers, readiness=readiness, lifespan=lifespan)
