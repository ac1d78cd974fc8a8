"""Vault (OpenBao) access by AppRole. hvac is synchronous, so every call runs in a thread, bounded.

A process logs in once, renews its token before it expires (logging in again when it cannot), and
keeps the secrets it fetched while Vault is unreachable: `health()` then reports degraded, and
`SecretsRefresher` resumes picking up rotations when Vault returns.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

import hvac
import hvac.exceptions
import requests

from common.app import Degraded
from common.metrics import VAULT_ROTATIONS
from common.security import InternalTokens
from common.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

KV_MOUNT = "secret"
INTERNAL_KEYS_PATH = "dualgate/internal"
PEPPER_PATH = "dualgate/pepper"
# operator requests that services act on (today: `db` -> {service: generation} to move to new credentials)
ROTATION_PATH = "dualgate/rotation"
TRANSIT_MOUNT = "transit"
JWT_TRANSIT_KEY = "dualgate-jwt"
DATABASE_MOUNT = "database"
VAULT_TIMEOUT = 3.0
_VERSION = re.compile(r"v\d+")


def database_role(service: str) -> str:
    """The database-engine role (and connection) that issues a service's credentials."""
    return f"dualgate-{service}"


class VaultUnavailable(Exception):
    """Vault did not answer, or refused: callers keep what they already have."""


class VaultDegraded(Degraded):
    """Raised by `Vault.health()`: the service runs on the secrets it already fetched."""


@dataclass(frozen=True)
class DatabaseLease:
    lease_id: str
    username: str
    password: str
    duration: float  # seconds the lease was granted for
    renewable: bool


@dataclass(frozen=True)
class TransitKeyVersion:
    version: int
    public_key: bytes  # raw ed25519 public key
    created: float  # unix time


def unix_time(rfc3339: str) -> float:
    """Vault's timestamps carry nanoseconds; datetime takes at most microseconds."""
    stamp = rfc3339.rstrip("Z")
    if "." in stamp:
        whole, fraction = stamp.split(".", 1)
        stamp = f"{whole}.{fraction[:6]}"
    return datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc).timestamp()


def parse_versioned(data: dict[str, str]) -> tuple[dict[str, bytes], str]:
    """A versioned secret: {"current": "v2", "v1": hex, "v2": hex} -> ({v: bytes}, current)."""
    keys = {name: binascii.unhexlify(value) for name, value in data.items() if _VERSION.fullmatch(name)}
    current = data["current"]
    if current not in keys:
        raise ValueError(f"current version {current!r} is missing from the secret")
    return keys, current


class Vault:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client = hvac.Client(url=settings.vault_addr, timeout=VAULT_TIMEOUT)
        self._login_lock = asyncio.Lock()
        self._token_expires = 0.0  # monotonic
        self._token_ttl = 0.0
        self.last_error: str | None = None
        self.last_error_at = 0.0

    # ---- calls -------------------------------------------------------------------------
    async def _run(self, fn: Callable[[], T], *, relogin: bool = True) -> T:
        """Run one hvac call in a thread with a deadline; a rejected token logs in again once."""
        try:
            result = await asyncio.wait_for(asyncio.to_thread(fn), VAULT_TIMEOUT + 1)
        except hvac.exceptions.Forbidden:
            if not relogin:
                raise
            # the token expired or Vault was re-bootstrapped: a fresh login, then one more try
            await self.login()
            return await self._run(fn, relogin=False)
        except (hvac.exceptions.VaultDown, hvac.exceptions.InternalServerError, requests.RequestException,
                TimeoutError, OSError) as exc:
            if self.last_error is None:
                log.warning("vault unreachable; keeping the secrets already fetched", extra={"error": repr(exc)})
            self.last_error = repr(exc)[:200]
            self.last_error_at = time.monotonic()
            raise VaultUnavailable(self.last_error) from exc
        if self.last_error is not None:
            log.info("vault reachable again")
            self.last_error = None
        return result

    async def login(self) -> None:
        async with self._login_lock:
            def _login() -> dict:
                return self._client.auth.approle.login(
                    role_id=self.settings.vault_role_id, secret_id=self.settings.vault_secret_id)
            auth = (await self._run(_login, relogin=False))["auth"]
            self._token_ttl = float(auth.get("lease_duration") or 0)
            self._token_expires = time.monotonic() + self._token_ttl

    async def keep_token_alive(self) -> None:
        """Renew the token once two thirds of its life are gone; log in again when it cannot be renewed."""
        if not self._token_ttl or time.monotonic() < self._token_expires - self._token_ttl / 3:
            return
        try:
            auth = (await self._run(lambda: self._client.auth.token.renew_self(), relogin=False))["auth"]
            ttl = float(auth.get("lease_duration") or 0)
            if ttl < self._token_ttl / 3:  # at its max TTL: renewing no longer helps
                await self.login()
            else:
                self._token_expires = time.monotonic() + ttl
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest):
            await self.login()

    async def health(self) -> None:
        """For /readyz: degraded (not failing) while the last Vault call did not get through."""
        if self.last_error is not None:
            raise VaultDegraded(f"vault unreachable, using cached secrets: {self.last_error}")

    # ---- KV ------------------------------------------------------------------------------
    async def read_kv(self, path: str) -> dict[str, str]:
        def _read() -> dict[str, str]:
            resp = self._client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=KV_MOUNT, raise_on_deleted_version=True)
            return resp["data"]["data"]
        return await self._run(_read)

    async def versioned_keys(self, path: str) -> tuple[dict[str, bytes], str]:
        return parse_versioned(await self.read_kv(path))

    async def internal_tokens(self) -> InternalTokens:
        keys, current = await self.versioned_keys(INTERNAL_KEYS_PATH)
        return InternalTokens(issuer_service=self.settings.service, keys=keys, current=current)

    # ---- transit (JWT signing; the private key never leaves Vault) -----------------------
    async def transit_sign(self, key: str, message: bytes, version: int) -> tuple[int, bytes]:
        def _sign() -> str:
            resp = self._client.secrets.transit.sign_data(
                key, hash_input=base64.b64encode(message).decode(), key_version=version, mount_point=TRANSIT_MOUNT)
            return resp["data"]["signature"]
        signature = await self._run(_sign)
        _, used, encoded = signature.split(":", 2)  # vault:v<N>:<base64>
        return int(used.removeprefix("v")), base64.b64decode(encoded)

    async def transit_public_keys(self, key: str) -> list[TransitKeyVersion]:
        def _read() -> dict:
            return self._client.secrets.transit.read_key(key, mount_point=TRANSIT_MOUNT)["data"]
        data = await self._run(_read)
        versions = []
        for version, info in data["keys"].items():
            versions.append(TransitKeyVersion(int(version), base64.b64decode(info["public_key"]),
                                              unix_time(info["creation_time"])))
        min_version = int(data.get("min_decryption_version") or 1)
        return sorted((v for v in versions if v.version >= min_version), key=lambda v: v.version)

    # ---- database engine (dynamic Postgres credentials) ------------------------------------
    async def database_credentials(self, role: str) -> DatabaseLease:
        resp = await self._run(lambda: self._client.read(f"{DATABASE_MOUNT}/creds/{role}"))
        return DatabaseLease(lease_id=resp["lease_id"], username=resp["data"]["username"],
                             password=resp["data"]["password"], duration=float(resp["lease_duration"]),
                             renewable=bool(resp["renewable"]))

    async def renew_lease(self, lease_id: str, increment: int) -> float:
        """Renew; returns the seconds the lease has left (capped by the role's max TTL)."""
        resp = await self._run(lambda: self._client.sys.renew_lease(lease_id=lease_id, increment=increment))
        return float(resp["lease_duration"])

    async def revoke_lease(self, lease_id: str) -> None:
        await self._run(lambda: self._client.sys.revoke_lease(lease_id=lease_id))


class SecretsRefresher:
    """Re-reads rotating secrets from Vault every `interval` seconds and hands them to whoever uses them.

    Rotation is staged by the operator's command (new version first known, then current), so a
    process that picks a change up one interval late still verifies everything it receives.
    While Vault is unreachable the last values stay in use and the loop keeps trying.
    """

    def __init__(self, vault: Vault, interval: float) -> None:
        self.vault = vault
        self.interval = interval
        self._watches: list[tuple[str, Callable[[dict[str, str]], Awaitable[None] | None]]] = []
        self._seen: dict[str, dict[str, str]] = {}
        self._task: asyncio.Task | None = None

    def watch(self, path: str, on_change: Callable[[dict[str, str]], Awaitable[None] | None],
              initial: dict[str, str] | None = None) -> None:
        """Call `on_change(data)` whenever the KV secret at `path` differs from what was last seen."""
        self._watches.append((path, on_change))
        if initial is not None:
            self._seen[path] = initial

    def watch_internal_tokens(self, tokens: InternalTokens) -> None:
        def apply(data: dict[str, str]) -> None:
            keys, current = parse_versioned(data)
            if keys != tokens.keys or current != tokens.current:
                log.info("internal token keys changed", extra={"current": current, "versions": sorted(keys)})
                VAULT_ROTATIONS.labels(self.vault.settings.service, "internal").inc()
                tokens.update(keys, current)
        self.watch(INTERNAL_KEYS_PATH, apply)

    async def refresh_once(self) -> None:
        await self.vault.keep_token_alive()
        for path, on_change in self._watches:
            try:
                data = await self.vault.read_kv(path)
            except hvac.exceptions.InvalidPath:
                data = {}
            if data == self._seen.get(path):
                continue
            result = on_change(data)
            if asyncio.iscoroutine(result):
                await result
            self._seen[path] = data

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except VaultUnavailable:
                pass  # logged once by Vault; the next round tries again
            except Exception:
                log.exception("refreshing secrets from vault failed")

    async def start(self) -> None:
        try:
            await self.refresh_once()
        except VaultUnavailable:
            pass  # start on what was fetched at login; the loop catches up
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
