from __future__ import annotations

import httpx
import msgspec

from common.contracts import PlanLimits, url_id, valid_id
from common.errors import unavailable
from common.security import InternalTokens, service_principal

USERS_TIMEOUT = 2.0


class UserFacts(msgspec.Struct, kw_only=True):
    """The part of a users-service user the auth service needs (unknown fields are ignored)."""

    id: str
    disabled: bool
    plan: PlanLimits


_decoder = msgspec.json.Decoder(UserFacts)


class UsersClient:
    """The few facts the auth service needs from the users service."""

    def __init__(self, client: httpx.AsyncClient, tokens: InternalTokens) -> None:
        self.client = client
        self.tokens = tokens
        self._principal = service_principal("auth")

    async def facts(self, user_id: str) -> UserFacts | None:
        """The user, or None when there is no such user; 503 when the users service cannot say."""
        if not valid_id("user", user_id):  # cannot name a user: none, without asking
            return None
        try:
            resp = await self.client.get(f"/internal/users/{url_id('user', user_id)}", timeout=USERS_TIMEOUT,
                                         headers=self.tokens.headers("users", self._principal))
        except httpx.HTTPError:
            raise unavailable("The users service is unreachable.", code="users_unavailable") from None
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise unavailable("The users service failed.", code="users_unavailable")
        return _decoder.decode(resp.content)

    async def exists(self, user_id: str) -> bool:
        return await self.facts(user_id) is not None

