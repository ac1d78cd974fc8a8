"""PostgreSQL: migrations with yoyo (sync, so in a thread), an asyncpg pool that can change credentials
under its callers, and the lease keeper that renews and rotates Vault-issued credentials."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import hvac.exceptions
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential
from yoyo import get_backend, read_migrations

from common.metrics import VAULT_ROTATIONS
from common.vault import DatabaseLease, Vault, VaultUnavailable, database_role

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 5.0
POOL_DRAIN_TIMEOUT = 30.0  # the longest an old pool may finish in-flight queries before it is cut


def _yoyo_url(dsn: str) -> str:
    scheme, _, rest = dsn.partition("://")
    return f"postgresql+psycopg://{rest}"


def with_credentials(dsn: str, username: str, password: str) -> str:
    """The same database URL, logging in as `username`."""
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def apply_migrations_sync(dsn: str, migrations_dir: Path) -> None:
    backend = get_backend(_yoyo_url(dsn))
    try:
        migrations = read_migrations(str(migrations_dir))
        with backend.lock():  # several replicas may start at once
            backend.apply_migrations(backend.to_apply(migrations))
    finally:
        backend.connection.close()


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release a connection without asyncpg's reset query (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL): no store sets session state, and that query is one more round trip per release.
    asyncpg still rolls back a transaction left open."""


async def create_pool(dsn: str, *, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, command_timeout=QUERY_TIMEOUT,
                                     timeout=QUERY_TIMEOUT, reset=_keep_session)


class Database:
    """An asyncpg pool whose credentials can change under its callers.

    Stores hold this object; `swap()` points every later query at a pool logged in with new
    credentials while queries already running on the old one finish there. It offers the pool
    methods the stores use; anything else is passed to the current pool.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    def acquire(self, *, timeout: float | None = None):
        return self._pool.acquire(timeout=timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:
        return await self._pool.fetch(query, *args, timeout=timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> asyncpg.Record | None:
        return await self._pool.fetchrow(query, *args, timeout=timeout)

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        return await self._pool.fetchval(query, *args, column=column, timeout=timeout)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        return await self._pool.execute(query, *args, timeout=timeout)

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:
        await self._pool.executemany(command, args, timeout=timeout)

    def __getattr__(self, name: str) -> Any:  # rarer pool methods (copy_*, get_size...): the current pool's
        return getattr(self._pool, name)

    async def swap(self, pool: asyncpg.Pool) -> None:
        """Move to `pool`; return once the old pool's in-flight queries have finished and it is closed."""
        old, self._pool = self._pool, pool
        try:
            await asyncio.wait_for(old.close(), POOL_DRAIN_TIMEOUT)
        except TimeoutError:
            log.warning("old database pool did not drain in time; terminating it")
            old.terminate()

    async def close(self) -> None:
        await self._pool.close()


async def open_database(dsn: str, migrations_dir: Path, *, max_size: int = 10,
                        wait_seconds: float = 60.0) -> Database:
    """Migrate, then open a pool. Waits for Postgres to come up (a supervisor starts us in any order)."""
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(wait_seconds),
        wait=wait_exponential(multiplier=0.1, max=2),
        retry=retry_if_exception_type((OSError, asyncpg.PostgresError, Exception)),
        reraise=True,
    ):
        with attempt:
            await asyncio.to_thread(apply_migrations_sync, dsn, migrations_dir)
            return Database(await create_pool(dsn, max_size=max_size))
    raise AssertionError("unreachable")


async def ping(pool: Database | asyncpg.Pool) -> None:
    async with pool.acquire(timeout=QUERY_TIMEOUT) as conn:
        await conn.fetchval("select 1")


class DatabaseCredentials:
    """Keeps a service's Vault-issued Postgres credentials alive, and moves to new ones without a failed query.

    The lease is renewed once two thirds of it are gone. When it can no longer be extended (the
    role's max TTL) or the operator asks (`dualgate secrets rotate db`), new credentials are
    fetched, the pool is swapped to them, and only after the old pool drained is the old lease
    revoked (Vault then drops that Postgres role). While Vault is unreachable the current
    credentials stay in use until their lease ends; renewal resumes when Vault returns.
    """

    RETRY_SECONDS = 2.0

    def __init__(self, vault: Vault, database: Database, service: str, dsn: str, lease: DatabaseLease,
                 *, max_size: int = 10) -> None:
        self.vault = vault
        self.database = database
        self.role = database_role(service)
        self.dsn = dsn  # without credentials
        self.lease = lease
        self.max_size = max_size
        self._renew_at = time.monotonic() + lease.duration * 2 / 3
        self._expires_at = time.monotonic() + lease.duration
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._request_field = f"db:{service}"
        self._seen_request: str | None = None
        self._rotating: asyncio.Task | None = None
        self._rescheduled = asyncio.Event()
        self._again = False
        self.rotations = 0

    async def rotate(self, reason: str) -> None:
        async with self._lock:
            new = await self.vault.database_credentials(self.role)
            pool = await create_pool(with_credentials(self.dsn, new.username, new.password), max_size=self.max_size)
            old = self.lease
            await self.database.swap(pool)
            self.lease = new
            now = time.monotonic()
            self._renew_at, self._expires_at = now + new.duration * 2 / 3, now + new.duration
            self._rescheduled.set()
            self.rotations += 1
            VAULT_ROTATIONS.labels(self.vault.settings.service, "db").inc()
            log.info("database credentials rotated", extra={"role": self.role, "reason": reason})
            await self._revoke(old)

    async def _revoke(self, old: DatabaseLease) -> None:
        for _ in range(30):
            try:
                await self.vault.revoke_lease(old.lease_id)
                return
            except VaultUnavailable:
                await asyncio.sleep(self.RETRY_SECONDS)
        log.warning("could not revoke the previous database lease; it ends with its TTL",
                    extra={"role": self.role})

    async def _renew(self) -> None:
        increment = int(self.lease.duration)
        left = await self.vault.renew_lease(self.lease.lease_id, increment)
        now = time.monotonic()
        self._expires_at = now + left
        if left < self.lease.duration / 3:
            # capped by the role's max TTL: move to new credentials while the old ones still work
            await self.rotate("lease reaches its max TTL")
        else:
            self._renew_at = now + left * 2 / 3

    async def _renew_or_rotate(self) -> None:
        if not self.lease.renewable or time.monotonic() >= self._expires_at:
            await self.rotate("lease ended or is not renewable")
            return
        try:
            await self._renew()
        except VaultUnavailable:
            raise
        except hvac.exceptions.VaultError:  # the lease is gone (revoked, or expired while Vault was away)
            await self.rotate("lease can no longer be renewed")

    async def _loop(self) -> None:
        while True:
            self._rescheduled.clear()
            with contextlib.suppress(TimeoutError):  # woken early when a rotation set a new schedule
                await asyncio.wait_for(self._rescheduled.wait(), max(0.2, self._renew_at - time.monotonic()))
            if time.monotonic() < self._renew_at:
                continue
            try:
                await self._renew_or_rotate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Vault or Postgres away: keep the current credentials, try again soon
                log.warning("database lease renewal failed; retrying", extra={"role": self.role, "error": repr(exc)})
                self._renew_at = time.monotonic() + self.RETRY_SECONDS

    async def on_rotation_request(self, data: dict[str, str]) -> None:
        """SecretsRefresher callback for the operator's rotation requests (`db:<service>` -> generation).

        The rotation runs on its own task: the refresher must keep picking up other secrets meanwhile."""
        requested = data.get(self._request_field)
        if requested is None or requested == self._seen_request:
            return
        self._seen_request = requested
        self._again = True
        if self._rotating is None or self._rotating.done():
            self._rotating = asyncio.create_task(self._rotate_on_request())

    async def _rotate_on_request(self) -> None:
        while self._again:  # a request that arrived during a rotation gets one of its own
            self._again = False
            try:
                await self.rotate("operator request")
            except Exception as exc:  # Vault or Postgres away: forget the request so the next refresh retries
                log.warning("database credential rotation failed; will retry", extra={"error": repr(exc)})
                self._seen_request = None
                return

    def start(self, rotation_requests: dict[str, str]) -> None:
        # a request older than this process is satisfied by the credentials it started with
        self._seen_request = rotation_requests.get(self._request_field)
        self._task = asyncio.create_task(self._loop())

    async def release(self) -> None:
        """On shutdown, after the pool closed: give the lease back rather than leave a role behind."""
        try:
            await self.vault.revoke_lease(self.lease.lease_id)
        except Exception as exc:  # best effort: the lease ends with its TTL anyway
            log.warning("could not revoke the database lease on shutdown", extra={"error": repr(exc)})

    async def stop(self) -> None:
        for task in (self._task, self._rotating):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

