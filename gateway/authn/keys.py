"""The domain gateways' authenticator: API keys through an in-process cache, the sealed snapshot in
Redis and the auth service's introspection; JWTs verified locally."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping

import httpx
import msgspec
from litestar import Request
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.audit import AuditLog
from common.contracts import AUTH_SNAPSHOT, AuthChange, IntrospectRequest, KeyPrincipal, SnapshotEntry
from common.errors import ApiError, unauthorized, unavailable
from common.metrics import AUTH_LOOKUPS
from common.security import InternalTokens, looks_like_jwt, parse_api_key, service_principal
from gateway.authn.changes import AuthChangeFeed, fetch_auth_changes
from gateway.authn.identity import REDIS_TIMEOUT, Identity, Verdict, identity_of, judge
from gateway.authn.jwt import JwtVerifier, bearer_or_refuse, read_sealed_jwks, refused, verify_audited

log = logging.getLogger(__name__)

MAX_CACHED_KEYS = 50_000
UNSUBSCRIBED_TTL = 1.0  # the longest a cached answer lives while auth changes may be missed
INTROSPECT_TIMEOUT = 2.0

_principal_decoder = msgspec.json.Decoder(KeyPrincipal)
_entry_decoder = msgspec.json.Decoder(SnapshotEntry)
_encoder = msgspec.json.Encoder()



# ---- the domain gateways' authenticator --------------------------------------------------------

class _Cached(msgspec.Struct):
    principal: KeyPrincipal
    cached_at: float  # unix time the auth service gave this answer
    stored: float  # monotonic time it entered this cache


class KeyAuthenticator:
    """Authenticates requests at a domain gateway.

    Args:
        client: httpx client whose base URL is the auth service.
        tokens: this process's internal tokens (introspection calls; sealing snapshot entries).
        service: this process's name (the internal token's subject, metric labels).
        redis: the shared Redis, for the auth-change feed and the snapshot; None: introspection
            only, with the 1 s cache lifetime.
        issuer, audience: what user JWTs must carry.
        cache_seconds: in-process cache lifetime while subscribed to auth changes.
        snapshot_max_age: the oldest snapshot entry used while the auth service is unreachable.

    Call `start()` once the event loop runs and `stop()` on shutdown.
    """

    def __init__(self, client: httpx.AsyncClient, tokens: InternalTokens, service: str,
                 redis: Redis | None = None, *, issuer: str = "dualgate-auth", audience: str = "dualgate-api",
                 cache_seconds: float = 10.0, snapshot_max_age: float = 86_400.0,
                 audit: AuditLog | None = None) -> None:
        self.client = client
        self.audit = audit
        self.tokens = tokens
        self.service = service
        self.redis = redis
        self.cache_seconds = cache_seconds
        self.snapshot_max_age = snapshot_max_age
        self._self = service_principal(service)
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[Identity]] = {}
        # while Redis is unreachable the markers come from the auth service, so that tokens (verified
        # here, never introspected) of a key revoked meanwhile stop too
        self.feed = AuthChangeFeed(redis, on_resync=self._cache.clear,
                                   poll=lambda: fetch_auth_changes(client, tokens, self._self),
                                   retention=snapshot_max_age + 3_600) if redis is not None else None
        self.jwt = JwtVerifier(self._fetch_jwks, issuer=issuer, audience=audience)

    async def start(self) -> None:
        if self.feed is not None:
            await self.feed.start()
        with contextlib.suppress(Exception):
            await self.jwt.refresh()

    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.stop()

    @property
    def _changes(self) -> Mapping[str, AuthChange]:
        return self.feed.changes if self.feed is not None else {}

    @property
    def _subscribed(self) -> bool:
        return self.feed is not None and self.feed.subscribed

    async def authenticate(self, request: Request) -> Identity:
        return await self.authenticate_token(bearer_or_refuse(request, self.service))

    async def authenticate_token(self, token: str) -> Identity:
        if looks_like_jwt(token):
            identity = await verify_audited(self.jwt, token, self._changes, self.service, self.audit)
            AUTH_LOOKUPS.labels(self.service, "jwt").inc()
            return identity
        if parse_api_key(token) is None:
            raise refused("malformed", self.service)
        digest = hashlib.sha256(token.encode()).digest()  # raw keys are never kept in memory
        cached = self._cache.get(digest)
        if cached is not None:
            lifetime = self.cache_seconds if self._subscribed else UNSUBSCRIBED_TTL
            if time.monotonic() - cached.stored < lifetime:
                verdict = judge(cached.principal, cached.cached_at, self._changes, time.time())
                if verdict is Verdict.REJECT:
                    raise refused("revoked", self.service)
                if verdict is Verdict.ADMIT:
                    AUTH_LOOKUPS.labels(self.service, "memory").inc()
                    return identity_of(cached.principal)
        if (pending := self._inflight.get(digest)) is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Identity] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            identity = await self._lookup(token, digest)
            future.set_result(identity)
            return identity
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters may be none
            raise
        finally:
            del self._inflight[digest]

    def _remember(self, digest: bytes, principal: KeyPrincipal, cached_at: float) -> None:
        self._cache.pop(digest, None)
        if len(self._cache) >= MAX_CACHED_KEYS:
            self._cache.popitem(last=False)  # oldest first: bounded, whatever the key churn
        self._cache[digest] = _Cached(principal, cached_at, time.monotonic())

    async def _lookup(self, token: str, digest: bytes) -> Identity:
        now = time.time()
        snapshot = await self._read_snapshot(digest) if self._subscribed else None
        if snapshot is not None and now - snapshot.cached_at < self.cache_seconds:
            verdict = judge(snapshot.principal, snapshot.cached_at, self._changes, now)
            if verdict is Verdict.REJECT:
                raise refused("revoked", self.service)
            if verdict is Verdict.ADMIT:
                self._remember(digest, snapshot.principal, snapshot.cached_at)
                AUTH_LOOKUPS.labels(self.service, "snapshot").inc()
                return identity_of(snapshot.principal)
        try:
            principal = await self._introspect(token)
        except ApiError as exc:
            if exc.status == 401:
                self._cache.pop(digest, None)
                await self._forget_snapshot(digest)
                raise refused("introspection", self.service) from None
            # the auth service is unreachable: a cached answer still counts while we hear every change,
            # the shared snapshot's or, when Redis has none (a slow read, an entry never written), this
            # process's own copy past its lifetime
            stale = snapshot
            if stale is None and (mine := self._cache.get(digest)) is not None:
                stale = SnapshotEntry(principal=mine.principal, cached_at=mine.cached_at)
            if (stale is not None and self._subscribed and now - stale.cached_at < self.snapshot_max_age
                    and judge(stale.principal, stale.cached_at, self._changes, now) is not Verdict.REJECT):
                self._remember(digest, stale.principal, stale.cached_at)  # ask again after the cache lifetime
                AUTH_LOOKUPS.labels(self.service, "stale").inc()
                return identity_of(stale.principal)
            raise
        verdict = judge(principal, now, self._changes, time.time())
        if verdict is Verdict.REJECT:  # revoked while the introspection was on its way
            raise refused("revoked", self.service)
        self._remember(digest, principal, now)
        await self._write_snapshot(digest, principal, now)
        AUTH_LOOKUPS.labels(self.service, "introspection").inc()
        return identity_of(principal)

    async def _introspect(self, key: str) -> KeyPrincipal:
        try:
            resp = await self.client.post(
                "/internal/introspect", content=_encoder.encode(IntrospectRequest(key)), timeout=INTROSPECT_TIMEOUT,
                headers={**self.tokens.headers("auth", self._self), "content-type": "application/json"})
        except httpx.HTTPError:
            raise unavailable("Authentication is temporarily unavailable.", code="auth_unavailable") from None
        if resp.status_code == 401:
            raise unauthorized()
        if resp.status_code != 200:
            raise unavailable("Authentication is temporarily unavailable.", code="auth_unavailable")
        return _principal_decoder.decode(resp.content)

    # ---- the snapshot in Redis ------------------------------------------------------------------
    async def _read_snapshot(self, digest: bytes) -> SnapshotEntry | None:
        assert self.redis is not None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                raw = await self.redis.hget(AUTH_SNAPSHOT, digest.hex())
        except (RedisError, OSError):
            return None
        return unseal_entry(self.tokens, raw)

    async def _write_snapshot(self, digest: bytes, principal: KeyPrincipal, cached_at: float) -> None:
        if not self._subscribed:
            return
        assert self.redis is not None
        with contextlib.suppress(RedisError, OSError):
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.hset(AUTH_SNAPSHOT, digest.hex(),
                                      seal_entry(self.tokens, SnapshotEntry(principal=principal, cached_at=cached_at)))

    async def _forget_snapshot(self, digest: bytes) -> None:
        if not self._subscribed:
            return
        assert self.redis is not None
        with contextlib.suppress(RedisError, OSError):
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.hdel(AUTH_SNAPSHOT, digest.hex())

    async def _fetch_jwks(self) -> bytes:
        try:
            resp = await self.client.get("/.well-known/jwks.json", headers=self.tokens.headers("auth", self._self),
                                         timeout=2.0)
            resp.raise_for_status()
            return resp.content
        except httpx.HTTPError:
            if self.redis is None:
                raise
            return await read_sealed_jwks(self.redis, self.tokens)




def seal_entry(tokens: InternalTokens, entry: SnapshotEntry) -> bytes:
    return tokens.seal(_encoder.encode(entry))


def unseal_entry(tokens: InternalTokens, raw: bytes | None) -> SnapshotEntry | None:
    if raw is None:
        return None
    payload = tokens.unseal(raw)
    if payload is None:
        return None  # not sealed by a key we know: never trusted
    try:
        return _entry_decoder.decode(payload)
    except msgspec.MsgspecError:
        return None


