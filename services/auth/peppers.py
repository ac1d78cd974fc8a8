"""The API-key pepper ring: every version Vault holds verifies, `current` hashes new secrets.

A key row names the version its hash was made with. A version this process has not seen yet
(another replica picked up a rotation first) makes it re-read Vault once before deciding.
"""

from __future__ import annotations

import asyncio
import logging
import time

from common.metrics import VAULT_ROTATIONS
from common.vault import PEPPER_PATH, Vault, VaultUnavailable, parse_versioned

log = logging.getLogger(__name__)

MIN_REFETCH = 1.0


class Peppers:
    def __init__(self, vault: Vault, keys: dict[str, bytes], current: str) -> None:
        self.vault = vault
        self.keys = keys
        self.current = current
        self._fetched = time.monotonic()
        self._refreshing: asyncio.Task | None = None

    def apply(self, data: dict[str, str]) -> None:
        """SecretsRefresher callback: the pepper secret in Vault changed."""
        keys, current = parse_versioned(data)
        if current != self.current or keys.keys() != self.keys.keys():
            log.info("pepper versions changed", extra={"current": current, "versions": sorted(keys)})
            VAULT_ROTATIONS.labels(self.vault.settings.service, "pepper").inc()
        self.keys, self.current = keys, current

    @property
    def current_key(self) -> bytes:
        return self.keys[self.current]

    async def get(self, version: str) -> bytes | None:
        if version not in self.keys and time.monotonic() - self._fetched > MIN_REFETCH:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(self._refresh())
            try:
                await asyncio.shield(self._refreshing)
            except VaultUnavailable:
                pass
        return self.keys.get(version)

    async def _refresh(self) -> None:
        self._fetched = time.monotonic()
        self.apply(await self.vault.read_kv(PEPPER_PATH))
