"""The start-up every database-backed service shares: Vault login, internal-token keys, migrated pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from common.db import open_database
from common.security import InternalTokens
from common.settings import Settings
from common.vault import Vault


@dataclass
class ServiceBasics:
    vault: Vault
    tokens: InternalTokens
    pool: asyncpg.Pool


@asynccontextmanager
async def service_basics(settings: Settings, migrations: Path) -> AsyncIterator[ServiceBasics]:
    vault = Vault(settings)
    await vault.login()
    tokens = await vault.internal_tokens()
    pool = await open_database(settings.database_url, migrations)
    try:
        yield ServiceBasics(vault=vault, tokens=tokens, pool=pool)
    finally:
        await pool.close()
