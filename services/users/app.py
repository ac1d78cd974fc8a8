"""Users service: users, plans and (later) the usage ledger."""

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
from services.users.routes import route_handlers
from services.users.store import UserStore

MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass
class UsersDeps:
    tokens: InternalTokens
    store: UserStore


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="users")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with service_basics(settings, MIGRATIONS) as basics:
            app.state.deps = UsersDeps(tokens=basics.tokens, store=UserStore(basics.pool))
            yield

    def readiness(state):
        return {"postgres": lambda: ping(state.deps.store.pool)}

    return create_service_app(settings, route_handlers=route_handlers, readiness=readiness, lifespan=lifespan)
