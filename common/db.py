"""PostgreSQL: migrations with yoyo (sync, so in a thread) and an asyncpg pool."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential
from yoyo import get_backend, read_migrations

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 5.0


def _yoyo_url(dsn: str) -> str:
    scheme, _, rest = dsn.partition("://")
    return f"postgresql+psycopg://{rest}"


def apply_migrations_sync(dsn: str, migrations_dir: Path) -> None:
    backend = get_backend(_yoyo_url(dsn))
    migrations = read_migrations(str(migrations_dir))
    with backend.lock():  # several replicas may start at once
        backend.apply_migrations(backend.to_apply(migrations))


async def open_database(dsn: str, migrations_dir: Path, *, max_size: int = 10,
                        wait_seconds: float = 60.0) -> asyncpg.Pool:
    """Migrate, then open a pool. Waits for Postgres to come up (a supervisor starts us in any order)."""
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(wait_seconds),
        wait=wait_exponential(multiplier=0.1, max=2),
        retry=retry_if_exception_type((OSError, asyncpg.PostgresError, Exception)),
        reraise=True,
    ):
        with attempt:
            await asyncio.to_thread(apply_migrations_sync, dsn, migrations_dir)
            return await asyncpg.create_pool(
                dsn, min_size=1, max_size=max_size, command_timeout=QUERY_TIMEOUT, timeout=QUERY_TIMEOUT
            )
    raise AssertionError("unreachable")


async def ping(pool: asyncpg.Pool) -> None:
    async with pool.acquire(timeout=QUERY_TIMEOUT) as conn:
        await conn.fetchval("select 1")
