"""Users service: users, plans, today's usage, and the usage ledger fed by usage.events.v1."""

from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from litestar import Litestar

from common.app import create_service_app
from common.audit import AuditLog
from common.contracts import USAGE_TOPIC
from common.db import ping
from common.events import EventPublisher, run_consumer
from common.http import upstream_client
from common.lifespan import service_basics
from common.security import InternalTokens
from common.settings import Settings
from common.vault import Vault
from services.users.auth_client import AuthClient
from services.users.events import LEDGER_GROUP, ledger_writer
from services.users.routes import route_handlers
from services.users.store import LedgerStore, UserStore

MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass
class UsersDeps:
    vault: Vault
    tokens: InternalTokens
    store: UserStore
    ledger: LedgerStore
    auth: AuthClient
    audit: AuditLog


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="users")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with contextlib.AsyncExitStack() as stack:
            basics = await stack.enter_async_context(service_basics(settings, MIGRATIONS))
            auth_http = await stack.enter_async_context(upstream_client(settings, settings.auth_url, read_timeout=2.0))
            publisher = EventPublisher(settings.kafka_bootstrap, client_id="users")
            await publisher.start()
            stack.push_async_callback(publisher.stop)
            audit = AuditLog(publisher, settings.service)
            await audit.start()
            stack.push_async_callback(audit.stop)
            ledger = LedgerStore(basics.pool)
            # the usage ledger: one long-lived consumer group; poison goes to usage.events.v1.dlq
            run_consumer(stack, settings.kafka_bootstrap, USAGE_TOPIC, LEDGER_GROUP, ledger_writer(ledger), publisher)
            app.state.deps = UsersDeps(vault=basics.vault, tokens=basics.tokens, store=UserStore(basics.pool),
                                       ledger=ledger, auth=AuthClient(auth_http, basics.tokens), audit=audit)
            yield

    def readiness(state):
        return {"postgres": lambda: ping(state.deps.store.pool), "vault": state.deps.vault.health}

    return create_service_app(settings, route_handlers=route_handlers, readiness=readiness, lifespan=lifespan)
