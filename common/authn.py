"""Who is calling, as both gateways decide it: an API key (checked by the auth service, cached)
or, later, a JWT verified locally against the auth service's JWKS.

Today the in-process cache lifetime (1 s) is what bounds how long a revoked key can still pass.
Concurrent misses for one key share a single introspection call.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import httpx
import msgspec
from litestar import Request

from common.contracts import DEFAULT_PLAN, IntrospectRequest, KeyPrincipal, PlanLimits
from common.errors import unauthorized, unavailable
from common.security import InternalTokens, Principal, bearer_token, parse_api_key, service_principal

_decoder = msgspec.json.Decoder(KeyPrincipal)
MAX_CACHED_KEYS = 50_000


class Identity(msgspec.Struct, frozen=True):
    """An authenticated caller: who (travels on in the internal token) and what their plan allows."""

    principal: Principal
    plan: PlanLimits = DEFAULT_PLAN


class Authenticator:
    def __init__(self, client: httpx.AsyncClient, tokens: InternalTokens, service: str, ttl: float = 1.0) -> None:
        self.client = client
        self.tokens = tokens
        self.ttl = ttl
        self._self = service_principal(service)
        self._cache: dict[bytes, tuple[Identity, float]] = {}
        self._inflight: dict[bytes, asyncio.Future[Identity]] = {}

    async def authenticate(self, request: Request) -> Identity:
        key = bearer_token(request)
        if not key or parse_api_key(key) is None:
            raise unauthorized()
        digest = hashlib.sha256(key.encode()).digest()  # raw keys are never kept in memory
        cached = self._cache.get(digest)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        if (pending := self._inflight.get(digest)) is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Identity] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            identity = await self._introspect(key)
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[digest] = (identity, time.monotonic() + self.ttl)
            future.set_result(identity)
            return identity
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters may be none
            raise
        finally:
            del self._inflight[digest]

    async def _introspect(self, key: str) -> Identity:
        try:
            resp = await self.client.post(
                "/internal/introspect", content=msgspec.json.encode(IntrospectRequest(key)),
                headers={**self.tokens.headers("auth", self._self), "content-type": "application/json"})
        except httpx.HTTPError:
            raise unavailable("Authentication is temporarily unavailable.", code="auth_unavailable") from None
        if resp.status_code == 401:
            raise unauthorized()
        if resp.status_code != 200:
            raise unavailable("Authentication is temporarily unavailable.", code="auth_unavailable")
        found = _decoder.decode(resp.content)
        return Identity(Principal(subject=found.user_id, scopes=tuple(found.scopes), key_id=found.key_id),
                        found.plan)
