from __future__ import annotations

import time

import httpx
import msgspec

from common.contracts import AuthChange
from common.errors import unavailable
from common.security import InternalTokens, service_principal

AUTH_TIMEOUT = 2.0


class AuthClient:
    """Reports user changes to the auth service, which records and broadcasts them to every gateway."""

    def __init__(self, client: httpx.AsyncClient, tokens: InternalTokens) -> None:
        self.client = client
        self.tokens = tokens
        self._principal = service_principal("users")

    async def report(self, kind: str, user_id: str) -> None:
        """503 unless the auth service recorded it: a disable that gateways never hear of must not succeed."""
        try:
            resp = await self.client.post(
                "/internal/auth-changes", timeout=AUTH_TIMEOUT,
                content=msgspec.json.encode(AuthChange(kind=kind, user_id=user_id, at=time.time())),
                headers={**self.tokens.headers("auth", self._principal), "content-type": "application/json"})
        except httpx.HTTPError:
            raise unavailable("The auth service is unreachable; try again.", code="auth_unavailable") from None
        if resp.status_code != 202:
            raise unavailable("The auth service did not record the change; try again.", code="auth_unavailable")
