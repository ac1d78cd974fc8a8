"""The fallback gateway's authenticator: the auth snapshot mirrored in process memory, so it keeps
working while Redis or the auth service is down, and still never admits a revoked key or a disabled user."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict

import httpx
import msgspec
from litestar import Request
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.audit import AuditLog
from common.contracts import AUTH_SNAPSHOT, DEGRADED_HEADER, IntrospectRequest, KeyPrincipal, SnapshotEntry
from common.errors import ApiError, unavailable
from common.security import InternalTokens, looks_like_jwt, parse_api_key, service_principal
from gateway.authn.changes import AuthChangeFeed, fetch_auth_changes
from gateway.authn.identity import REDIS_TIMEOUT, Identity, Verdict, identity_of, judge
from gateway.authn.jwt import JwtVerifier, bearer_or_refuse, read_sealed_jwks, refused, verify_audited
from gateway.authn.keys import seal_entry, unseal_entry

log = logging.getLogger(__name__)


_principal_decoder = msgspec.json.Decoder(KeyPrincipal)
_encoder = msgspec.json.Encoder()



# ---- the fallback gateway's authenticator ------------------------------------------------------

def _cannot_verify() -> ApiError:
    """A key nobody here knows while the auth service cannot be asked: never admitted, and never
    called invalid either (it may be a good key this gateway has not seen): a flagged, retryable 503."""
    error = unavailable("Authentication is temporarily unavailable for this key; retry shortly.",
                        code="auth_unavailable")
    error.headers[DEGRADED_HEADER] = "degraded"
    return error


class SnapshotAuthenticator:
    """Authenticates at the fallback gateway from the auth snapshot, mirrored in process memory.

    Args:
        redis: the shared Redis holding AUTH_SNAPSHOT / AUTH_REVOKED / AUTH_JWKS.
        tokens: this process's internal tokens (snapshot entries are sealed with them).
        auth_client: optional httpx client for the auth service: used for keys not in the snapshot,
            for the JWKS, and for the auth-change markers while Redis is unreachable.
        service: this process's name.
        issuer, audience: what user JWTs must carry.
        max_age: the oldest snapshot entry admitted.
        sync_seconds: how often the whole snapshot is copied into memory.
        audit: where refused JWTs are recorded (API keys are audited by the auth service).

    Call `start()` once the event loop runs and `stop()` on shutdown. A key passes only if its
    entry is sealed by a known internal key, younger than `max_age`, and not contradicted by any
    auth-change marker (revoked key, disabled user, secret past its grace window).
    """

    MAX_ENTRIES = 200_000

    def __init__(self, redis: Redis, tokens: InternalTokens, *, auth_client: httpx.AsyncClient | None = None,
                 service: str = "gateway-fallback", issuer: str = "dualgate-auth", audience: str = "dualgate-api",
                 max_age: float = 86_400.0, sync_seconds: float = 15.0, audit: AuditLog | None = None) -> None:
        self.redis = redis
        self.audit = audit
        self.tokens = tokens
        self.auth_client = auth_client
        self.service = service
        self.max_age = max_age
        self.sync_seconds = sync_seconds
        self._self = service_principal(service)
        self._mirror: OrderedDict[str, SnapshotEntry] = OrderedDict()
        poll = (lambda: fetch_auth_changes(auth_client, tokens, self._self)) if auth_client is not None else None
        self.feed = AuthChangeFeed(redis, poll=poll, retention=max_age + 3_600)
        self.jwt = JwtVerifier(self._fetch_jwks, issuer=issuer, audience=audience)
        self._sync_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.feed.start()
        self._sync_task = asyncio.create_task(self._sync_forever())

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
        await self.feed.stop()

    async def authenticate(self, request: Request) -> Identity:
        return await self.authenticate_token(bearer_or_refuse(request, self.service))

    async def authenticate_token(self, token: str) -> Identity:
        if looks_like_jwt(token):
            return await verify_audited(self.jwt, token, self.feed.changes, self.service, self.audit)
        if parse_api_key(token) is None:
            raise refused("malformed", self.service)
        digest = hashlib.sha256(token.encode()).hexdigest()
        entry = self._mirror.get(digest)
        if entry is None and self.feed.subscribed:
            entry = await self._read_one(digest)
        now = time.time()
        if entry is None or now - entry.cached_at >= self.max_age:
            return await self._introspect_or_refuse(token, digest)
        if judge(entry.principal, entry.cached_at, self.feed.changes, now) is Verdict.REJECT:
            raise refused("revoked", self.service)
        return identity_of(entry.principal)

    async def _read_one(self, digest: str) -> SnapshotEntry | None:
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                raw = await self.redis.hget(AUTH_SNAPSHOT, digest)
        except (RedisError, OSError):
            return None
        entry = unseal_entry(self.tokens, raw)
        if entry is not None:
            self._keep(digest, entry)
        return entry

    def _keep(self, digest: str, entry: SnapshotEntry) -> None:
        self._mirror.pop(digest, None)
        if len(self._mirror) >= self.MAX_ENTRIES:
            self._mirror.popitem(last=False)
        self._mirror[digest] = entry

    async def _introspect_or_refuse(self, token: str, digest: str) -> Identity:
        """A key the snapshot does not know: ask the auth service if we can, else refuse."""
        if self.auth_client is None:
            raise refused("not_in_snapshot", self.service)
        try:
            resp = await self.auth_client.post(
                "/internal/introspect", content=_encoder.encode(IntrospectRequest(token)), timeout=1.0,
                headers={**self.tokens.headers("auth", self._self), "content-type": "application/json"})
        except httpx.HTTPError:
            raise _cannot_verify() from None
        if resp.status_code >= 500:
            raise _cannot_verify()
        if resp.status_code != 200:
            raise refused("introspection", self.service)
        principal = _principal_decoder.decode(resp.content)
        now = time.time()
        if judge(principal, now, self.feed.changes, now) is Verdict.REJECT:
            raise refused("revoked", self.service)
        entry = SnapshotEntry(principal=principal, cached_at=now)
        self._keep(digest, entry)
        with contextlib.suppress(RedisError, OSError):
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.hset(AUTH_SNAPSHOT, digest, seal_entry(self.tokens, entry))
        return identity_of(principal)

    async def sync(self) -> None:
        """Copy the whole snapshot from Redis into memory (entries that fail their seal are skipped)."""
        fresh: dict[str, SnapshotEntry] = {}
        oldest = time.time() - self.max_age
        async with asyncio.timeout(10.0):
            async for field, raw in self.redis.hscan_iter(AUTH_SNAPSHOT, count=1000):
                entry = unseal_entry(self.tokens, raw)
                if entry is not None and entry.cached_at >= oldest:
                    fresh[field.decode() if isinstance(field, bytes) else field] = entry
                    if len(fresh) >= self.MAX_ENTRIES:
                        break
        # entries only this process introspected meanwhile stay; Redis wins where both have one
        kept = OrderedDict((d, e) for d, e in self._mirror.items() if e.cached_at >= oldest and d not in fresh)
        kept.update(fresh)
        while len(kept) > self.MAX_ENTRIES:
            kept.popitem(last=False)
        self._mirror = kept
        with contextlib.suppress(Exception):
            await self.jwt.refresh()

    async def _sync_forever(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: the mirror keeps serving
                log.debug("snapshot sync failed", extra={"error": repr(exc)})
            await asyncio.sleep(self.sync_seconds)

    async def _fetch_jwks(self) -> bytes:
        try:
            return await read_sealed_jwks(self.redis, self.tokens)
        except (LookupError, RedisError, OSError):
            if self.auth_client is None:
                raise
        resp = await self.auth_client.get("/.well-known/jwks.json", timeout=2.0)
        resp.raise_for_status()
        return resp.content
