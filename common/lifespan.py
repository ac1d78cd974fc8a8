"""The start-up every service shares: Vault login, internal-token keys that follow rotation, and for
database-backed services a migrated pool on dynamic credentials from Vault's database engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import hvac.exceptions

from common.audit import AuditLog
from common.db import Database, DatabaseCredentials, open_database, with_credentials
from common.events import EventPublisher
from common.security import InternalTokens
from common.settings import Settings
from common.vault import ROTATION_PATH, SecretsRefresher, Vault, database_role


@dataclass
class ServiceBasics:
    vault: Vault
    tokens: InternalTokens
    pool: Database
    secrets: SecretsRefresher  # running; add watches for further rotating secrets (the auth pepper)
    credentials: DatabaseCredentials | None  # None when DUALGATE_DB_CREDENTIALS=url


async def _rotation_requests(vault: Vault) -> dict[str, str]:
    try:
        return await vault.read_kv(ROTATION_PATH)
    except hvac.exceptions.InvalidPath:
        return {}


async def followed_internal_tokens(settings: Settings, stack: AsyncExitStack) -> InternalTokens:
    """Vault login and this process's internal-token keys, kept current through rotations by a
    refresher that `stack` stops (the start-up of a process without a database: the gateways, inference)."""
    vault = Vault(settings)
    await vault.login()
    tokens = await vault.internal_tokens()
    secrets = SecretsRefresher(vault, settings.secrets_refresh_seconds)
    secrets.watch_internal_tokens(tokens)
    await secrets.start()
    stack.push_async_callback(secrets.stop)
    return tokens


async def audit_log(settings: Settings, stack: AsyncExitStack) -> AuditLog:
    """An audit log with a Kafka producer of its own, both stopped by `stack` (the log drains first):
    for the gateways, which publish no other events."""
    publisher = EventPublisher(settings.kafka_bootstrap, client_id=settings.service)
    await publisher.start()
    stack.push_async_callback(publisher.stop)
    audit = AuditLog(publisher, settings.service)
    await audit.start()
    stack.push_async_callback(audit.stop)
    return audit


@asynccontextmanager
async def service_basics(settings: Settings, migrations: Path) -> AsyncIterator[ServiceBasics]:
    vault = Vault(settings)
    await vault.login()
    tokens = await vault.internal_tokens()
    secrets = SecretsRefresher(vault, settings.secrets_refresh_seconds)
    secrets.watch_internal_tokens(tokens)
    async with AsyncExitStack() as stack:
        # unwound in reverse: stop renewing, close the pool, then give the credentials back
        credentials = None
        if settings.db_credentials == "vault":
            lease = await vault.database_credentials(database_role(settings.service))
            database = await open_database(with_credentials(settings.database_url, lease.username, lease.password),
                                           migrations)
            credentials = DatabaseCredentials(vault, database, settings.service, settings.database_url, lease)
            stack.push_async_callback(credentials.release)
            stack.push_async_callback(database.close)
            requests = await _rotation_requests(vault)
            credentials.start(requests)
            stack.push_async_callback(credentials.stop)
            secrets.watch(ROTATION_PATH, credentials.on_rotation_request, initial=requests)
        else:
            database = await open_database(settings.database_url, migrations)
            stack.push_async_callback(database.close)
        await secrets.start()
        stack.push_async_callback(secrets.stop)
        yield ServiceBasics(vault=vault, tokens=tokens, pool=database, secrets=secrets, credentials=credentials)
