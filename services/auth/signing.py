"""User JWTs, signed by Vault transit (ed25519): the private key never leaves Vault; `kid` = key version.

The JWKS serves every version that may still have unexpired tokens: the latest, and each older
one until the tokens it signed have expired (the next version's creation + the token lifetime).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.contracts import AUTH_JWKS, PlanLimits
from common.security import JWT_ALGORITHM, InternalTokens, Principal
from common.vault import JWT_TRANSIT_KEY, TransitKeyVersion, Vault, VaultUnavailable

log = logging.getLogger(__name__)

KEYS_TTL = 1.0  # how stale the known transit versions may be: a rotation shows within a second
LIVE_MARGIN = 120.0  # retired versions stay published this much longer than their last token could live
JWKS_REDIS_SECONDS = 30.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class JwtSigner:
    def __init__(self, vault: Vault, tokens: InternalTokens, redis: Redis, *, issuer: str, audience: str,
                 max_ttl: int) -> None:
        self.vault = vault
        self.tokens = tokens
        self.redis = redis
        self.issuer = issuer
        self.audience = audience
        self.max_ttl = max_ttl
        self._versions: list[TransitKeyVersion] = []
        self._fetched = -1e9
        self._refreshing: asyncio.Task | None = None
        self._published: tuple[bytes, float] = (b"", 0.0)

    async def versions(self) -> list[TransitKeyVersion]:
        if time.monotonic() - self._fetched > KEYS_TTL:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(self._refresh())
            try:
                await asyncio.shield(self._refreshing)
            except VaultUnavailable:
                if not self._versions:
                    raise
        return self._versions

    async def _refresh(self) -> None:
        self._versions = await self.vault.transit_public_keys(JWT_TRANSIT_KEY)
        self._fetched = time.monotonic()
        await self._publish()

    def _live(self, versions: list[TransitKeyVersion], now: float) -> list[TransitKeyVersion]:
        live = []
        for older, newer in zip(versions, versions[1:]):
            if newer.created > now - (self.max_ttl + LIVE_MARGIN):
                live.append(older)
        return live + versions[-1:]

    async def jwks(self) -> bytes:
        versions = self._live(await self.versions(), time.time())
        return msgspec.json.encode({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": b64url(v.public_key), "kid": str(v.version),
             "alg": JWT_ALGORITHM, "use": "sig"} for v in versions]})

    async def _publish(self) -> None:
        """Keep a sealed copy in Redis for verifiers that cannot reach this service (the fallback gateway)."""
        document = await self.jwks()
        if document == self._published[0] and time.monotonic() - self._published[1] < JWKS_REDIS_SECONDS:
            return
        with contextlib.suppress(RedisError, OSError):
            async with asyncio.timeout(0.5):
                await self.redis.set(AUTH_JWKS, self.tokens.seal(document))
            self._published = (document, time.monotonic())

    async def sign(self, principal: Principal, plan: PlanLimits, ttl: int) -> tuple[str, int]:
        """A JWT for `principal`, valid `ttl` seconds; returns (token, expiry unix time)."""
        latest = (await self.versions())[-1].version
        now = int(time.time())
        header = {"alg": JWT_ALGORITHM, "typ": "JWT", "kid": str(latest)}
        claims = {"iss": self.issuer, "aud": self.audience, "sub": principal.subject, "akid": principal.key_id,
                  "scp": list(principal.scopes), "pln": msgspec.to_builtins(plan), "iat": now, "nbf": now,
                  "exp": now + ttl, "jti": uuid.uuid4().hex}
        signing_input = f"{b64url(msgspec.json.encode(header))}.{b64url(msgspec.json.encode(claims))}".encode()
        used, signature = await self.vault.transit_sign(JWT_TRANSIT_KEY, signing_input, latest)
        if used != latest:  # cannot happen with key_version pinned; never publish a kid that lies
            raise VaultUnavailable(f"transit signed with v{used}, asked for v{latest}")
        if not self._verifies(latest, signing_input, signature):
            # Vault holds another key under this version than the JWKS shows: a dev-mode Vault restarted
            # and made its keys anew. Learn (and publish) the new key before the token leaves, so every
            # gateway that refetches the JWKS on this token's failed signature finds the key.
            self._fetched = -1e9  # stale now: the next versions() refreshes, once for every concurrent signer
            await self.versions()
            if not self._verifies(latest, signing_input, signature):
                raise VaultUnavailable(f"transit key v{latest} does not verify its own signature")
        return f"{signing_input.decode()}.{b64url(signature)}", now + ttl

    def _verifies(self, version: int, signed: bytes, signature: bytes) -> bool:
        for v in self._versions:
            if v.version == version:
                try:
                    Ed25519PublicKey.from_public_bytes(v.public_key).verify(signature, signed)
                    return True
                except (InvalidSignature, ValueError):
                    return False
        return False

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            with contextlib.suppress(VaultUnavailable):
                await self.versions()

    async def start(self) -> None:
        with contextlib.suppress(VaultUnavailable):
            await self.versions()
        self._task = asyncio.create_task(self._keep_fresh())

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
