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

`KeyAuthenticator` serves the domain gateways; `SnapshotAuthenticator` serves the fallback gateway
from the snapshot mirrored in memory, so it keeps working while Redis or the auth service is down,
and still never admits a revoked key or a disabled user.

Both implement the `Authenticator` protocol, so a gateway is built the same way whichever it holds.
Modules: `identity` (the caller, and judging a cached principal), `changes` (the auth-change feed),
`jwt` (verification and the audit of refused tokens), `keys` and `snapshot` (the two authenticators).
"""

from __future__ import annotations

from typing import Protocol

from litestar import Request

from gateway.authn.changes import AuthChangeFeed, fetch_auth_changes
from gateway.authn.identity import Identity, Verdict, identity_of, judge, jwt_rejected
from gateway.authn.jwt import JwtVerifier, Refused, read_sealed_jwks, unverified_claims, verify_audited
from gateway.authn.keys import KeyAuthenticator, seal_entry, unseal_entry
from gateway.authn.snapshot import SnapshotAuthenticator


class Authenticator(Protocol):
    """Who is calling: an Identity, or an ApiError (401, or a flagged 503) raised for the gateway to answer."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def authenticate(self, request: Request) -> Identity: ...

    async def authenticate_token(self, token: str) -> Identity: ...


__all__ = ["AuthChangeFeed", "Authenticator", "Identity", "JwtVerifier", "KeyAuthenticator", "Refused",
           "SnapshotAuthenticator", "Verdict", "fetch_auth_changes", "identity_of", "judge", "jwt_rejected",
           "read_sealed_jwks", "seal_entry", "unseal_entry", "unverified_claims", "verify_audited"]
