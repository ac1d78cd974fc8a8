"""Which models a caller's plan allows, from the users service, cached briefly.

An empty list in the plan means every model. When the users service cannot answer, the last
known answer stands; with none, the listing is not narrowed (listing is not access control: the
gateway enforces the plan on each request).
"""

from __future__ import annotations

import logging
import time

import httpx
import msgspec

from common.contracts import url_id, valid_id
from common.security import InternalTokens, Principal, service_principal

log = logging.getLogger(__name__)
MAX_ENTRIES = 10_000


class _Plan(msgspec.Struct):
    allowed_models: list[str] = []


class _User(msgspec.Struct):
    plan: _Plan


_decoder = msgspec.json.Decoder(_User)


class AllowedModels:
    def __init__(self, client: httpx.AsyncClient, tokens: InternalTokens, ttl: float = 10.0) -> None:
        self.client = client
        self.tokens = tokens
        self.ttl = ttl
        self._cache: dict[str, tuple[frozenset[str] | None, float]] = {}
        self._self = service_principal("models")

    async def for_principal(self, principal: Principal) -> frozenset[str] | None:
        """The model ids this caller may use; None means all of them."""
        if principal.is_admin or principal.subject.startswith("service:"):
            return None
        if not valid_id("user", principal.subject):  # no such user: no plan, no models
            return frozenset()
        cached = self._cache.get(principal.subject)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        try:
            resp = await self.client.get(f"/internal/users/{url_id('user', principal.subject)}",
                                         headers=self.tokens.headers("users", self._self))
            if resp.status_code != 200:
                raise httpx.HTTPStatusError(f"users answered {resp.status_code}", request=resp.request,
                                            response=resp)
            allowed = _decoder.decode(resp.content).plan.allowed_models
        except (httpx.HTTPError, msgspec.MsgspecError) as exc:
            log.warning("plan lookup failed", extra={"user_id": principal.subject, "error": str(exc)})
            return cached[0] if cached else None
        value = frozenset(allowed) or None
        if len(self._cache) >= MAX_ENTRIES:
            self._cache.clear()
        self._cache[principal.subject] = (value, time.monotonic() + self.ttl)
        return value
