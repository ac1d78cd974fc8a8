"""Vault (OpenBao) access by AppRole. hvac is synchronous, so every call runs in a thread."""

from __future__ import annotations

import asyncio
import binascii
import logging

import hvac

from common.security import InternalTokens
from common.settings import Settings

log = logging.getLogger(__name__)

KV_MOUNT = "secret"
INTERNAL_KEYS_PATH = "dualgate/internal"
PEPPER_PATH = "dualgate/pepper"
VAULT_TIMEOUT = 3.0


class Vault:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client = hvac.Client(url=settings.vault_addr, timeout=VAULT_TIMEOUT)

    async def login(self) -> None:
        def _login() -> None:
            self._client.auth.approle.login(
                role_id=self.settings.vault_role_id, secret_id=self.settings.vault_secret_id
            )
        await asyncio.to_thread(_login)

    async def read_kv(self, path: str) -> dict[str, str]:
        def _read() -> dict[str, str]:
            resp = self._client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=KV_MOUNT, raise_on_deleted_version=True
            )
            return resp["data"]["data"]
        return await asyncio.to_thread(_read)

    async def versioned_keys(self, path: str) -> tuple[dict[str, bytes], str]:
        """A versioned secret: {"current": "v2", "v1": hex, "v2": hex} -> ({v: bytes}, current)."""
        data = await self.read_kv(path)
        current = data["current"]
        keys = {name: binascii.unhexlify(value) for name, value in data.items() if name != "current"}
        return keys, current

    async def internal_tokens(self) -> InternalTokens:
        keys, current = await self.versioned_keys(INTERNAL_KEYS_PATH)
        return InternalTokens(issuer_service=self.settings.service, keys=keys, current=current)

    async def health(self) -> None:
        def _health() -> None:
            if not self._client.sys.is_initialized():
                raise RuntimeError("vault not initialized")
        await asyncio.to_thread(_health)
