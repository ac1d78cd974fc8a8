"""Models service: the registry of models and the deployment that serves each."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from litestar import Litestar

from common.app import create_service_app
from common.db import ping
from common.lifespan import service_basics
from common.security import InternalTokens
from common.settings import Settings
from services.models.routes import route_handlers
from services.models.store import ModelStore

MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass
class ModelsDeps:
    tokens: InternalTokens
    store: ModelStore


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="models")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with service_basics(settings, MIGRATIONS) as basics:
            app.state.deps = ModelsDeps(tokens=basics.tokens, store=ModelStore(basics.pool))
            yield

    def readiness(state):
        return {"postgres": lambda: ping(state.deps.store.pool)}

    return create_service_app(settings, route_handlers=route_handlers, readiness=readiness, lifespan=lifespan)
