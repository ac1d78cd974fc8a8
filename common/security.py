"""Security primitives: API keys (`dg-<key id>-<secret>`, HMAC under a pepper) and internal tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

import jwt
import msgspec
from litestar import Request

from common.errors import forbidden, unauthorized

API_KEY_PREFIX = "dg-"
INTERNAL_TOKEN_HEADER = "x-dualgate-token"
INTERNAL_ISSUER = "dualgate-internal"
INTERNAL_ALGORITHM = "HS256"  # pinned: tokens with any other alg are rejected
JWT_ALGORITHM = "EdDSA"  # user JWTs: ed25519 via Vault transit; pinned the same way
MAX_CACHED_TOKENS = 10_000  # minted and verified tokens kept, each


# ---- API keys ------------------------------------------------------------------------

def generate_api_key() -> tuple[str, str, str]:
    """Return (full key, key id, secret). The secret is shown once, never stored."""
    key_id = secrets.token_hex(8)
    secret = new_secret()
    return api_key(key_id, secret), key_id, secret


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def api_key(key_id: str, secret: str) -> str:
    return f"{API_KEY_PREFIX}{key_id}-{secret}"


def parse_api_key(key: str) -> tuple[str, str] | None:
    """Split `dg-<key id>-<secret>`; None when malformed. The secret may itself contain '-'."""
    if not key.startswith(API_KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(API_KEY_PREFIX):].partition("-")
    if not sep or len(key_id) != 16 or not secret or len(secret) > 128:
        return None
    try:
        int(key_id, 16)
    except ValueError:
        return None
    return key_id, secret


def hash_secret(pepper: bytes, secret: str) -> str:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def secret_matches(pepper: bytes, secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(pepper, secret), stored_hash)


def looks_like_jwt(token: str) -> bool:
    """A compact JWS (header.payload.signature) rather than a `dg-` API key."""
    return token.count(".") == 2 and not token.startswith(API_KEY_PREFIX)


def bearer_token(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


# ---- internal service tokens --------------------------------------------------------------

class Principal(msgspec.Struct, frozen=True):
    """Who a request acts for. Travels only inside a signed internal token."""

    subject: str  # user id, or "service:<name>" for a service acting for itself
    scopes: tuple[str, ...] = ()
    key_id: str | None = None
    via: str = "key"  # how the caller proved it: key (API key) | jwt | service

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def require_scope(self, scope: str) -> None:
        if scope not in self.scopes:
            raise forbidden()


@dataclass
class InternalTokens:
    """Mints and verifies short-lived service tokens signed with keys held in Vault.

    `keys` maps key version -> secret; all listed versions verify (overlap during rotation),
    only `current` signs.
    """

    issuer_service: str
    keys: dict[str, bytes]
    current: str
    ttl: int = 60
    _cache: dict[tuple, tuple[str, float]] = field(default_factory=dict)
    # token -> (principal, audience, exp): a token is minted once per principal and reused for half its
    # life, so each hop sees the same few strings again and again; decoding one costs ~0.25 ms
    _verified: dict[str, tuple[Principal, str, int]] = field(default_factory=dict)

    def mint(self, audience: str, principal: Principal) -> str:
        # Signing is cheap but not free; reuse a token for half its life.
        cache_key = (audience, principal)
        now = time.time()
        cached = self._cache.get(cache_key)
        if cached and cached[1] > now:
            return cached[0]
        claims = {
            "iss": INTERNAL_ISSUER,
            "src": self.issuer_service,
            "aud": audience,
            "sub": principal.subject,
            "scp": list(principal.scopes),
            "kid": principal.key_id,
            "via": principal.via,
            "iat": int(now),
            "exp": int(now) + self.ttl,
        }
        token = jwt.encode(claims, self.keys[self.current], algorithm=INTERNAL_ALGORITHM,
                           headers={"kid": self.current})
        if len(self._cache) >= MAX_CACHED_TOKENS:  # bounded: principals churn, memory must not
            self._cache.clear()
        self._cache[cache_key] = (token, now + self.ttl / 2)
        return token

    def update(self, keys: dict[str, bytes], current: str) -> None:
        """Take a new key set from Vault (rotation): every listed version verifies, `current` signs."""
        if current not in keys:
            raise ValueError(f"current internal key {current!r} is not among the keys")
        if current != self.current:
            self._cache.clear()  # stop handing out tokens signed with the previous version
        self._verified.clear()  # a retired version's tokens must stop verifying at once
        self.keys = dict(keys)
        self.current = current

    def seal(self, payload: bytes) -> bytes:
        """`payload` with an HMAC under the current key, so a reader can trust data that crossed a
        shared store (Redis): whoever can write there cannot forge what gateways admit."""
        mac = hmac.new(self.keys[self.current], payload, hashlib.sha256).hexdigest()
        return f"{self.current}.{mac}.".encode() + payload

    def unseal(self, blob: bytes) -> bytes | None:
        """The payload of a sealed blob; None when it was not sealed by a known key version."""
        version, _, rest = blob.partition(b".")
        mac, _, payload = rest.partition(b".")
        key = self.keys.get(version.decode(errors="replace"))
        if key is None:
            return None
        expected = hmac.new(key, payload, hashlib.sha256).hexdigest().encode()
        return payload if hmac.compare_digest(mac, expected) else None

    def headers(self, audience: str, principal: Principal) -> dict[str, str]:
        return {INTERNAL_TOKEN_HEADER: self.mint(audience, principal)}

    def verify(self, token: str | None, audience: str) -> Principal:
        if not token:
            raise unauthorized()
        now = time.time()  # one clock for remembered and decoded tokens alike
        known = self._verified.get(token)
        if known is not None and known[1] == audience and now < known[2]:
            return known[0]
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self.keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise unauthorized()
            claims = jwt.decode(
                token, key, algorithms=[INTERNAL_ALGORITHM], audience=audience, issuer=INTERNAL_ISSUER,
                options={"require": ["exp", "iat", "aud", "iss", "sub"], "verify_exp": False},
            )
            expires = int(claims["exp"])
        except (jwt.PyJWTError, TypeError, ValueError):
            raise unauthorized() from None
        if expires <= now:
            raise unauthorized()
        principal = Principal(subject=claims["sub"], scopes=tuple(claims.get("scp") or ()),
                              key_id=claims.get("kid"), via=claims.get("via") or "key")
        if len(self._verified) >= MAX_CACHED_TOKENS:  # bounded: principals churn, memory must not
            self._verified.clear()
        self._verified[token] = (principal, audience, expires)
        return principal

    def principal_from(self, request: Request, audience: str) -> Principal:
        return self.verify(request.headers.get(INTERNAL_TOKEN_HEADER), audience)


SERVICE_SCOPES = ("service",)


def service_principal(name: str) -> Principal:
    return Principal(subject=f"service:{name}", scopes=SERVICE_SCOPES, via="service")
