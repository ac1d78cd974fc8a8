"""Auth service: API keys (HMAC under a Vault-held pepper), JWTs signed by Vault transit, key
introspection and the auth-change feed for gateways, the audit log."""

from __future__ import annotations

import contextlib
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from litestar import Litestar

from common.app import create_service_app
from common.audit import AuditLog
from common.contracts import AUDIT_TOPIC
from common.db import ping
from common.events import EventPublisher, run_consumer
from common.http import upstream_client
from common.lifespan import service_basics
from common.redis_client import redis_client
from common.security import InternalTokens, hash_secret, parse_api_key
from common.settings import Settings
from common.vault import PEPPER_PATH, Vault, parse_versioned
from services.auth.changes import AuthChanges
from services.auth.events import AUDIT_GROUP, audit_writer
from services.auth.peppers import Peppers
from services.auth.routes import route_handlers
from services.auth.signing import JwtSigner
from services.auth.store import AuditStore, KeyStore, MarkerStore
from services.auth.users_client import UsersClient

MIGRATIONS = Path(__file__).parent / "migrations"
ADMIN_USER_ID = "usr_admin"
log = logging.getLogger(__name__)


@dataclass
class AuthDeps:
    settings: Settings
    vault: Vault
    tokens: InternalTokens
    store: KeyStore
    audit_store: AuditStore
    users: UsersClient
    peppers: Peppers
    changes: AuthChanges
    signer: JwtSigner
    audit: AuditLog
    decoy_pepper: bytes = field(default_factory=lambda: secrets.token_bytes(32))


async def bootstrap_admin_key(deps: AuthDeps, key: str) -> None:
    """Make the configured admin key valid (idempotent: the stack passes it on every start)."""
    parsed = parse_api_key(key)
    if parsed is None:
        raise ValueError("DUALGATE_BOOTSTRAP_ADMIN_KEY is not a dg-<key id>-<secret> key")
    key_id, secret = parsed
    await deps.store.upsert_bootstrap(
        key_id=key_id, user_id=ADMIN_USER_ID, secret_hash=hash_secret(deps.peppers.current_key, secret),
        pepper_version=deps.peppers.current, scopes=["admin", "user"])


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="auth")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with contextlib.AsyncExitStack() as stack:
            basics = await stack.enter_async_context(service_basics(settings, MIGRATIONS))
            users_http = await stack.enter_async_context(
                upstream_client(settings, settings.users_url, read_timeout=2.0))
            redis = redis_client(settings)
            stack.push_async_callback(redis.aclose)
            publisher = EventPublisher(settings.kafka_bootstrap, client_id="auth")
            await publisher.start()
            stack.push_async_callback(publisher.stop)

            pepper_data = await basics.vault.read_kv(PEPPER_PATH)
            peppers = Peppers(basics.vault, *parse_versioned(pepper_data))
            basics.secrets.watch(PEPPER_PATH, peppers.apply, initial=pepper_data)
            changes = AuthChanges(MarkerStore(basics.pool), redis, retention=settings.auth_snapshot_max_age + 3_600)
            signer = JwtSigner(basics.vault, basics.tokens, redis, issuer=settings.jwt_issuer,
                               audience=settings.jwt_audience, max_ttl=settings.jwt_ttl_seconds)
            audit = AuditLog(publisher, settings.service)
            audit_store = AuditStore(basics.pool)
            deps = AuthDeps(settings=settings, vault=basics.vault, tokens=basics.tokens, store=KeyStore(basics.pool),
                            audit_store=audit_store, users=UsersClient(users_http, basics.tokens),
                            peppers=peppers, changes=changes, signer=signer, audit=audit)
            if settings.bootstrap_admin_key:
                await bootstrap_admin_key(deps, settings.bootstrap_admin_key)
            for part in (changes, signer, audit):
                await part.start()
                stack.push_async_callback(part.stop)
            # the audit log's writer: one long-lived consumer group
            run_consumer(stack, settings.kafka_bootstrap, AUDIT_TOPIC, AUDIT_GROUP,
                         audit_writer(audit_store), publisher)
            app.state.deps = deps
            yield

    def readiness(state):
        return {"postgres": lambda: ping(state.deps.store.pool), "vault": state.deps.vault.health}

    return create_service_app(settings, route_handlers=route_handlers, readiness=readiness, lifespan=lifespan)
