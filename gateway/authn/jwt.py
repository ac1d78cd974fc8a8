"""JWT verification: ed25519 against the auth service's JWKS (`kid` = transit key version; several
versions valid during rotation; algorithm pinned; iss, aud, exp, nbf checked; an unknown newer kid
refetches the JWKS, at most once a second), and the audit of refused tokens."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from litestar import Request
from redis.asyncio import Redis

from common.audit import AuditLog
from common.contracts import AUTH_JWKS, AuthChange, PlanLimits
from common.errors import ApiError, unauthorized
from common.metrics import AUTH_FAILURES
from common.security import JWT_ALGORITHM, InternalTokens, Principal, bearer_token
from gateway.authn.identity import REDIS_TIMEOUT, Identity, jwt_rejected

log = logging.getLogger(__name__)

JWT_LEEWAY = 5  # seconds of clock skew tolerated on exp / nbf / iat




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
            raise refused("jwt_malformed") from None
        if header.get("alg") != JWT_ALGORITHM:
            raise refused("jwt_algorithm")
        kid = header.get("kid")
        key = await self._key_for(kid)
        if key is None:
            raise refused("jwt_unknown_kid")
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
            raise refused("jwt_invalid") from None
        akid = claims.get("akid")
        return Identity(Principal(subject=str(claims["sub"]), scopes=scopes,
                                  key_id=akid if isinstance(akid, str) else None, via="jwt"), plan)


class Refused(ApiError):
    """A refused credential: the caller sees the one 401; `reason` is for metrics and the audit log."""

    def __init__(self, reason: str) -> None:
        error = unauthorized().body.error
        super().__init__(401, error.message, type=error.type, code=error.code)
        self.reason = reason


def bearer_or_refuse(request: Request, service: str) -> str:
    """The request's bearer credential; a 401 (audited as `missing`) without one."""
    token = bearer_token(request)
    if not token:
        raise refused("missing", service)
    return token


def refused(reason: str, service: str = "") -> ApiError:
    AUTH_FAILURES.labels(service or "gateway", reason).inc()
    return Refused(reason)


async def verify_audited(verifier: JwtVerifier, token: str, changes: Mapping[str, AuthChange], service: str,
                         audit: AuditLog | None) -> Identity:
    """A user JWT verified here, never by the auth service, so its refusals are audited here: the auth
    service only sees (and audits) failed API keys. Rate-limited by the audit log, like those."""
    try:
        identity = await verifier.verify(token)
        if jwt_rejected(identity.principal, changes):
            raise refused("jwt_revoked", service)
        return identity
    except Refused as refusal:
        if audit is not None:
            claimed = unverified_claims(token)
            # the target is what the token claims, unverified (as for a refused API key's id)
            audit.record("auth.failed", actor="anonymous", target=claimed.get("akid") or claimed.get("sub"),
                         outcome="denied", detail={"via": "jwt", "reason": refusal.reason, "service": service,
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




async def read_sealed_jwks(redis: Redis, tokens: InternalTokens) -> bytes:
    async with asyncio.timeout(REDIS_TIMEOUT):
        raw = await redis.get(AUTH_JWKS)
    payload = tokens.unseal(raw) if raw is not None else None
    if payload is None:
        raise LookupError("no trustworthy JWKS in redis")
    return payload


