"""Who is calling, as every gateway decides it: `Authorization: Bearer <API key | JWT>`.

API keys (`dg-<key id>-<secret>`): in-process cache -> the shared snapshot in Redis -> the auth
service's introspection, concurrent misses sharing one call. Gateways key every cache by
sha256(full key) and never hold the pepper: a leaked gateway or Redis cannot turn cached data into
keys, and only the auth service can check a secret. What a gateway caches is sealed with the
internal-token key (HMAC) before it goes to Redis, so write access to Redis cannot forge an entry.

JWTs: verified locally against the auth service's JWKS (ed25519; `kid` = transit key version;
several versions valid during rotation; algorithm pinned; iss, aud, exp, nbf checked; an unknown
newer kid refetches the JWKS, at most once a second).

Revocation: every cached answer is judged against the auth-change markers (`AUTH_REVOKED`),
which `AuthChangeFeed` keeps current from Redis pub/sub. While the feed is subscribed, a change
reaches this process in milliseconds; while it is not, cached answers live at most
`UNSUBSCRIBED_TTL` (1 s) and the auth service is asked again, so a revoked key fails everywhere
within a second either way; the markers themselves (which JWTs are checked against) are then
polled from the auth service. On every (re)subscribe the markers are reloaded and caches cleared.

`Authenticator` serves the domain gateways; `SnapshotAuthenticator` serves the fallback gateway
from the snapshot mirrored in memory, so it keeps working while Redis or the auth service is down,
and still never admits a revoked key or a disabled user.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping

import httpx
import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from litestar import Request
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.contracts import (
    AUTH_CHANNEL, AUTH_EPOCH_FIELD, AUTH_JWKS, AUTH_REVOKED, AUTH_SNAPSHOT, DEFAULT_PLAN, AuthChange,
    IntrospectRequest, KeyPrincipal, PlanLimits, SnapshotEntry, marker_field,
)
from common.audit import AuditLog
from common.errors import ApiError, unauthorized, unavailable
from common.metrics import AUTH_FAILURES, AUTH_LOOKUPS
from common.security import (
    JWT_ALGORITHM, InternalTokens, Principal, bearer_token, looks_like_jwt, parse_api_key, service_principal,
)

log = logging.getLogger(__name__)

MAX_CACHED_KEYS = 50_000
UNSUBSCRIBED_TTL = 1.0  # the longest a cached answer lives while auth changes may be missed
REDIS_TIMEOUT = 0.2  # per snapshot read/write; Redis being slow must not slow authentication much
JWT_LEEWAY = 5  # seconds of clock skew tolerated on exp / nbf / iat
INTROSPECT_TIMEOUT = 2.0

_principal_decoder = msgspec.json.Decoder(KeyPrincipal)
_entry_decoder = msgspec.json.Decoder(SnapshotEntry)
_change_decoder = msgspec.json.Decoder(AuthChange)
_encoder = msgspec.json.Encoder()


class Identity(msgspec.Struct, frozen=True):
    """An authenticated caller: who (travels on in the internal token) and what their plan allows."""

    principal: Principal
    plan: PlanLimits = DEFAULT_PLAN


def identity_of(found: KeyPrincipal) -> Identity:
    return Identity(Principal(subject=found.user_id, scopes=tuple(found.scopes), key_id=found.key_id, via="key"),
                    found.plan)


# ---- judging a cached principal against the auth-change markers ------------------------------

class Verdict(enum.Enum):
    ADMIT = "admit"
    STALE = "stale"  # still valid, but its plan changed since it was cached: refresh when possible
    REJECT = "reject"


def judge(principal: KeyPrincipal, cached_at: float, changes: Mapping[str, AuthChange], now: float) -> Verdict:
    """Whether a principal cached at `cached_at` may pass now, given the markers in `changes`."""
    if f"key:{principal.key_id}" in changes or f"user:{principal.user_id}" in changes:
        return Verdict.REJECT
    if principal.expires_at is not None and now >= principal.expires_at:
        return Verdict.REJECT  # a rotated-away secret past its grace window
    rotated = changes.get(f"rotated:{principal.key_id}")
    if rotated is not None and rotated.generation is not None and principal.generation < rotated.generation:
        # cached before the latest rotation: a rotated-away secret lives out the grace its own rotation
        # promised, however many rotations followed; one without a grace is dead
        until = rotated.grace_until if principal.generation == rotated.generation - 1 \
            else rotated.older_grace.get(principal.generation)
        if now >= (until or 0.0):
            return Verdict.REJECT
    plan = changes.get(f"plan:{principal.user_id}")
    if plan is not None and plan.at > cached_at:
        return Verdict.STALE
    return Verdict.ADMIT


def jwt_rejected(principal: Principal, changes: Mapping[str, AuthChange]) -> bool:
    """A JWT stays valid until it expires unless its key was revoked or its user disabled."""
    return f"key:{principal.key_id}" in changes or f"user:{principal.subject}" in changes


# ---- the auth-change feed ---------------------------------------------------------------------

class AuthChangeFeed:
    """Keeps `changes` (the AUTH_REVOKED markers) current and knows whether it is subscribed right now.

    Subscribes to AUTH_CHANNEL, then loads AUTH_REVOKED (so nothing published in between is
    missed), and pings the subscription: no answer within `PONG_DEADLINE` counts as dropped.
    `on_resync` runs after every (re)load and when the subscription drops, so its owner can drop
    what it cached meanwhile.
    While not subscribed, `poll` (when given) fetches the complete marker set another way.
    """

    PING_INTERVAL = 0.2
    PONG_DEADLINE = 0.5  # with the 1 s cache lifetime after it, a silent drop costs well under a second
    RETRY_MAX = 1.0

    def __init__(self, redis: Redis, *, on_resync: Callable[[], None] = lambda: None,
                 poll: Callable[[], Awaitable[dict[str, AuthChange]]] | None = None,
                 poll_interval: float = 0.25, retention: float = 90_000.0) -> None:
        self._redis = redis
        self._on_resync = on_resync
        self._poll = poll
        self._poll_interval = poll_interval
        self._retention = retention
        self.changes: dict[str, AuthChange] = {}
        self.subscribed = False
        self._polled: dict[str, AuthChange] = {}  # the auth service's markers, polled since the last load
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run()))
        if self._poll is not None:
            self._tasks.append(asyncio.create_task(self._poll_while_unsubscribed()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def apply(self, change: AuthChange) -> None:
        if change.kind == "user_enabled":
            self.changes.pop(f"user:{change.user_id}", None)
        elif (field := marker_field(change)) is not None:
            self.changes[field] = change

    async def _load(self) -> None:
        raw = await self._redis.hgetall(AUTH_REVOKED)
        loaded: dict[str, AuthChange] = {}
        oldest = time.time() - self._retention
        complete = False
        for field, value in raw.items():
            name = field.decode() if isinstance(field, bytes) else field
            if name == AUTH_EPOCH_FIELD:
                complete = True
                continue
            try:
                change = _change_decoder.decode(value)
            except msgspec.MsgspecError:
                continue
            if change.at >= oldest:
                loaded[name] = change
        # a hash without its epoch lost data (Redis restarted) and is not re-seeded yet: keep what we knew.
        # Markers polled from the auth service while unsubscribed stay too: Redis may not hold them yet
        # (the auth service's write failed while Redis was away), and dropping one readmits a revoked key
        self.changes = {**self._polled, **(loaded if complete else {**self.changes, **loaded})}
        self._polled = {}
        self._on_resync()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            pubsub = self._redis.pubsub()
            try:
                async with asyncio.timeout(2.0):
                    await pubsub.subscribe(AUTH_CHANNEL)
                    await self._load()
                self.subscribed = True
                delay = 0.1
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, ConnectionError) as exc:  # builtin TimeoutError is an OSError
                if self.subscribed:
                    log.warning("auth-change subscription lost; short cache lifetimes until it is back",
                                extra={"error": repr(exc)})
            finally:
                if self.subscribed:
                    self.subscribed = False
                    self._on_resync()  # what was cached while listening may have missed a change: drop it
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(0.5):
                        await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.RETRY_MAX)

    async def _listen(self, pubsub) -> None:
        last_pong = next_ping = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_ping:
                await pubsub.ping()
                next_ping = now + self.PING_INTERVAL
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                if message["type"] == "pong":
                    last_pong = time.monotonic()
                elif message["type"] == "message":
                    last_pong = time.monotonic()
                    await self._handle(message["data"])
            if time.monotonic() - last_pong > self.PONG_DEADLINE:
                raise ConnectionError("no answer to ping on the auth-change subscription")

    async def _handle(self, data: bytes) -> None:
        try:
            change = _change_decoder.decode(data)
        except msgspec.MsgspecError:
            log.warning("ignoring a malformed auth change")
            return
        if change.kind == "resync":
            async with asyncio.timeout(2.0):
                await self._load()
        else:
            self.apply(change)

    async def _poll_while_unsubscribed(self) -> None:
        assert self._poll is not None
        while True:
            if self.subscribed:
                await asyncio.sleep(0.05)  # poll as soon as the subscription drops
                continue
            try:
                self._polled = await self._poll()
                self.changes = dict(self._polled)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the auth service is away too: keep the last markers
                log.debug("auth-change poll failed", extra={"error": repr(exc)})
            await asyncio.sleep(self._poll_interval)


# ---- JWT verification -------------------------------------------------------------------------

def jwks_keys(document: bytes) -> dict[str, Ed25519PublicKey]:
    """kid -> public key for every ed25519 signing key in a JWKS document; anything else is ignored."""
    keys: dict[str, Ed25519PublicKey] = {}
    for jwk in msgspec.json.decode(document).get("keys", []):
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or jwk.get("alg", JWT_ALGORITHM) != JWT_ALGORITHM:
            continue
        if not isinstance(jwk.get("kid"), str):
            continue
        key = jwt.PyJWK(jwk, algorithm=JWT_ALGORITHM).key
        if isinstance(key, Ed25519PublicKey):
            keys[jwk["kid"]] = key
    return keys


class JwtVerifier:
    """Verifies user JWTs locally against a cached JWKS.

    `fetch` returns the JWKS document (bytes) or raises. Keys refresh every `refresh_seconds`
    and on a kid newer than any known one (single-flight, at most once per `MIN_REFETCH`);
    a kid older than the newest known one that is not in the set is a retired version. A signature
    that fails under a known kid refetches too (same spacing): the key may have been replaced.
    """

    MIN_REFETCH = 1.0

    def __init__(self, fetch: Callable[[], Awaitable[bytes]], *, issuer: str, audience: str,
                 refresh_seconds: float = 60.0) -> None:
        self._fetch = fetch
        self.issuer = issuer
        self.audience = audience
        self.refresh_seconds = refresh_seconds
        self.keys: dict[str, Ed25519PublicKey] = {}
        self._fetched_at = -1e9  # monotonic
        self._refreshing: asyncio.Task | None = None

    async def refresh(self) -> None:
        """Fetch the JWKS now (shared by concurrent callers; spaced by MIN_REFETCH)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        wait = self._fetched_at + self.MIN_REFETCH - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._fetched_at = time.monotonic()
        try:
            keys = jwks_keys(await self._fetch())
        except Exception as exc:  # keep verifying with the keys we have
            log.warning("could not fetch the JWKS; keeping the cached keys", extra={"error": repr(exc)})
            return
        if keys:
            self.keys = keys

    def _newest(self) -> int:
        return max((int(k) for k in self.keys if k.isdigit()), default=0)

    async def _key_for(self, kid: object) -> Ed25519PublicKey | None:
        if not isinstance(kid, str) or not kid.isdigit() or len(kid) > 9:
            return None
        if time.monotonic() - self._fetched_at > self.refresh_seconds:
            await self.refresh()
        key = self.keys.get(kid)
        if key is None and int(kid) > self._newest():
            await self.refresh()  # a version newer than any we know: the key was rotated
            key = self.keys.get(kid)
        return key

    def _decode(self, token: str, key: Ed25519PublicKey) -> dict:
        return jwt.decode(token, key, algorithms=[JWT_ALGORITHM], audience=self.audience, issuer=self.issuer,
                          leeway=JWT_LEEWAY, options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub"]})

    async def verify(self, token: str) -> Identity:
        """The caller a valid token names; 401 (one message for every reason) otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refused("jwt_malformed") from None
        if header.get("alg") != JWT_ALGORITHM:
            raise _refused("jwt_algorithm")
        kid = header.get("kid")
        key = await self._key_for(kid)
        if key is None:
            raise _refused("jwt_unknown_kid")
        try:
            try:
                claims = self._decode(token, key)
            except jwt.InvalidSignatureError:
                # the same kid under another key: a Vault that lost its keys (a dev-mode restart) made a
                # new version 1. Refetched at most once a second, so forged tokens cannot make it fetch more
                await self.refresh()
                fresh = self.keys.get(kid)
                if fresh is None or fresh is key:
                    raise
                claims = self._decode(token, fresh)
            plan = msgspec.convert(claims.get("pln") or {}, PlanLimits)
            scopes = tuple(str(s) for s in claims.get("scp") or ())
        except (jwt.PyJWTError, msgspec.ValidationError, TypeError):
            raise _refused("jwt_invalid") from None
        akid = claims.get("akid")
        return Identity(Principal(subject=str(claims["sub"]), scopes=scopes,
                                  key_id=akid if isinstance(akid, str) else None, via="jwt"), plan)


class Refused(ApiError):
    """A refused credential: the caller sees the one 401; `reason` is for metrics and the audit log."""

    def __init__(self, reason: str) -> None:
        error = unauthorized().body.error
        super().__init__(401, error.message, type=error.type, code=error.code)
        self.reason = reason


def _refused(reason: str, service: str = "") -> ApiError:
    AUTH_FAILURES.labels(service or "gateway", reason).inc()
    return Refused(reason)


async def verify_audited(verifier: JwtVerifier, token: str, changes: Mapping[str, AuthChange], service: str,
                         audit: AuditLog | None) -> Identity:
    """A user JWT verified here, never by the auth service, so its refusals are audited here: the auth
    service only sees (and audits) failed API keys. Rate-limited by the audit log, like those."""
    try:
        identity = await verifier.verify(token)
        if jwt_rejected(identity.principal, changes):
            raise _refused("jwt_revoked", service)
        return identity
    except Refused as refused:
        if audit is not None:
            claimed = unverified_claims(token)
            # the target is what the token claims, unverified (as for a refused API key's id)
            audit.record("auth.failed", actor="anonymous", target=claimed.get("akid") or claimed.get("sub"),
                         outcome="denied", detail={"via": "jwt", "reason": refused.reason, "service": service,
                                                   "kid": claimed.get("kid") or "", "target": "claimed"})
        raise


_CLAIMED = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def unverified_claims(token: str) -> dict[str, str]:
    """What a refused token claims: the attacker's words, so only plain identifiers are kept (a NUL or a
    lone surrogate would stall the audit pipeline), and never trusted."""
    try:
        claims = {**jwt.decode(token, options={"verify_signature": False}), **jwt.get_unverified_header(token)}
    except (jwt.PyJWTError, TypeError, ValueError):
        return {}
    return {k: v if _CLAIMED.fullmatch(v := str(claims[k])) else "<invalid>"
            for k in ("akid", "sub", "kid") if claims.get(k)}


# ---- the domain gateways' authenticator --------------------------------------------------------

class _Cached(msgspec.Struct):
    principal: KeyPrincipal
    cached_at: float  # unix time the auth service gave this answer
    stored: float  # monotonic time it entered this cache


class Authenticator:
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
        token = bearer_token(request)
        if not token:
            raise _refused("missing", self.service)
        return await self.authenticate_token(token)

    async def authenticate_token(self, token: str) -> Identity:
        if looks_like_jwt(token):
            identity = await verify_audited(self.jwt, token, self._changes, self.service, self.audit)
            AUTH_LOOKUPS.labels(self.service, "jwt").inc()
            return identity
        if parse_api_key(token) is None:
            raise _refused("malformed", self.service)
        digest = hashlib.sha256(token.encode()).digest()  # raw keys are never kept in memory
        cached = self._cache.get(digest)
        if cached is not None:
            lifetime = self.cache_seconds if self._subscribed else UNSUBSCRIBED_TTL
            if time.monotonic() - cached.stored < lifetime:
                verdict = judge(cached.principal, cached.cached_at, self._changes, time.time())
                if verdict is Verdict.REJECT:
                    raise _refused("revoked", self.service)
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
                raise _refused("revoked", self.service)
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
                raise _refused("introspection", self.service) from None
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
            raise _refused("revoked", self.service)
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


async def fetch_auth_changes(client: httpx.AsyncClient, tokens: InternalTokens,
                             caller: Principal) -> dict[str, AuthChange]:
    """Every current auth-change marker, from the auth service's database (used while Redis is away)."""
    resp = await client.get("/internal/auth-changes", timeout=1.0, headers=tokens.headers("auth", caller))
    resp.raise_for_status()
    return msgspec.json.decode(resp.content, type=dict[str, AuthChange])


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


async def read_sealed_jwks(redis: Redis, tokens: InternalTokens) -> bytes:
    async with asyncio.timeout(REDIS_TIMEOUT):
        raw = await redis.get(AUTH_JWKS)
    payload = tokens.unseal(raw) if raw is not None else None
    if payload is None:
        raise LookupError("no trustworthy JWKS in redis")
    return payload


# ---- the fallback gateway's authenticator ------------------------------------------------------

def _cannot_verify() -> ApiError:
    """A key nobody here knows while the auth service cannot be asked: never admitted, and never
    called invalid either (it may be a good key this gateway has not seen): a flagged, retryable 503."""
    error = unavailable("Authentication is temporarily unavailable for this key; retry shortly.",
                        code="auth_unavailable")
    error.headers["x-dualgate-degraded"] = "degraded"
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
        token = bearer_token(request)
        if not token:
            raise _refused("missing", self.service)
        return await self.authenticate_token(token)

    async def authenticate_token(self, token: str) -> Identity:
        if looks_like_jwt(token):
            return await verify_audited(self.jwt, token, self.feed.changes, self.service, self.audit)
        if parse_api_key(token) is None:
            raise _refused("malformed", self.service)
        digest = hashlib.sha256(token.encode()).hexdigest()
        entry = self._mirror.get(digest)
        if entry is None and self.feed.subscribed:
            entry = await self._read_one(digest)
        now = time.time()
        if entry is None or now - entry.cached_at >= self.max_age:
            return await self._introspect_or_refuse(token, digest)
        if judge(entry.principal, entry.cached_at, self.feed.changes, now) is Verdict.REJECT:
            raise _refused("revoked", self.service)
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
            raise _refused("not_in_snapshot", self.service)
        try:
            resp = await self.auth_client.post(
                "/internal/introspect", content=_encoder.encode(IntrospectRequest(token)), timeout=1.0,
                headers={**self.tokens.headers("auth", self._self), "content-type": "application/json"})
        except httpx.HTTPError:
            raise _cannot_verify() from None
        if resp.status_code >= 500:
            raise _cannot_verify()
        if resp.status_code != 200:
            raise _refused("introspection", self.service)
        principal = _principal_decoder.decode(resp.content)
        now = time.time()
        if judge(principal, now, self.feed.changes, now) is Verdict.REJECT:
            raise _refused("revoked", self.service)
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
