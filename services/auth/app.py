"""Auth service: API keys (HMAC under a Vault-held pepper) and key introspection for gateways."""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from litestar import Litestar

from common.app import create_service_app
from common.db import ping
from common.lifespan import service_basics
from common.http import upstream_client
from common.security import InternalTokens, hash_secret, parse_api_key
from common.settings import Settings
from common.vault import PEPPER_PATH
from services.auth.routes import route_handlers
from services.auth.store import KeyStore
from services.auth.users_client import UsersClient

MIGRATIONS = Path(__file__).parent / "migrations"
ADMIN_USER_ID = "usr_admin"
log = logging.getLogger(__name__)


@dataclass
class AuthDeps:
    tokens: InternalTokens
    store: KeyStore
    users: UsersClient
    peppers: dict[str, bytes]
    pepper_version: str
    decoy_pepper: bytes = field(default_factory=lambda: secrets.token_bytes(32))


async def bootstrap_admin_key(deps: AuthDeps, key: str) -> None:
    """Make the configured admin key valid (idempotent: the stack passes it on every start)."""
    parsed = parse_api_key(key)
    if parsed is None:
        raise ValueError("DUALGATE_BOOTSTRAP_ADMIN_KEY is not a dg-<key id>-<secret> key")
    key_id, secret = parsed
    await deps.store.upsert_bootstrap(
        key_id=key_id, user_id=ADMIN_USER_ID, secret_hash=hash_secret(deps.peppers[deps.pepper_version], secret),
        pepper_version=deps.pepper_version, scopes=["admin", "user"])


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="auth")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with service_basics(settings, MIGRATIONS) as basics, \
                upstream_client(settings, settings.users_url, read_timeout=2.0) as users_http:
            peppers, pepper_version = await basics.vault.versioned_keys(PEPPER_PATH)
            deps = AuthDeps(tokens=basics.tokens, store=KeyStore(basics.pool),
                            users=UsersClient(users_http, basics.tokens), peppers=peppers,
                            pepper_version=pepper_version)
            if settings.bootstrap_admin_key:
                await bootstrap_admin_key(deps, settings.bootstrap_admin_key)
            app.state.deps = deps
            yield

    def readiness(state):
        return {"postgres": lambda: ping(state.deps.store.pool)}

    return create_service_app(settings, route_handlers=route_handlers, readiness=readiness, lifespan=lifespan)
