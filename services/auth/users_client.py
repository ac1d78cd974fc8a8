from __future__ import annotations

import httpx

from common.errors import unavailable
from common.security import InternalTokens, service_principal


class UsersClient:
    """The few facts the auth service needs from the users service."""

    def __init__(self, client: httpx.AsyncClient, tokens: InternalTokens) -> None:
        self.client = client
        self.tokens = tokens
        self._principal = service_principal("auth")

    async def exists(self, user_id: str) -> bool:
        try:
            resp = await self.client.get(f"/internal/users/{user_id}",
                                         headers=self.tokens.headers("users", self._principal))
        except httpx.HTTPError:
            raise unavailable("The users service is unreachable.", code="users_unavailable") from None
        if resp.status_code >= 500:
            raise unavailable("The users service failed.", code="users_unavailable")
        return resp.status_code == 200
