"""The identity rules that need no servers: who a cached principal admits, which JWTs verify, what a
sealed snapshot entry proves. The same rules run inside every gateway."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import jwt
import msgspec
import pytest
from prometheus_client import REGISTRY
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from common.audit import AuditLog
from common.contracts import AUTH_EPOCH_FIELD, AuthChange, KeyPrincipal, PlanLimits, SnapshotEntry
from common.errors import ApiError
from common.security import InternalTokens
from gateway.authn import AuthChangeFeed, JwtVerifier, Verdict, judge, unverified_claims

NOW = 1_800_000_000.0
ALICE = KeyPrincipal(user_id="usr_alice", key_id="00000000000000aa", scopes=["user"])


def changes(*items: AuthChange) -> dict[str, AuthChange]:
    from common.contracts import marker_field

    return {marker_field(c): c for c in items}


# ---- judging cached principals ----------------------------------------------------------------

def test_a_cached_principal_passes_when_nothing_changed():
    assert judge(ALICE, NOW - 5, {}, NOW) is Verdict.ADMIT


def test_a_revoked_key_or_a_disabled_user_never_passes_from_a_cache():
    assert judge(ALICE, NOW, changes(AuthChange(kind="key_revoked", key_id=ALICE.key_id, at=NOW)), NOW) \
        is Verdict.REJECT
    assert judge(ALICE, NOW, changes(AuthChange(kind="user_disabled", user_id="usr_alice", at=NOW)), NOW) \
        is Verdict.REJECT


def test_the_previous_secret_passes_until_its_grace_ends_and_older_secrets_never():
    rotated = changes(AuthChange(kind="key_rotated", key_id=ALICE.key_id, generation=1, grace_until=NOW + 60))
    # cached before the rotation: it is the previous secret now
    assert judge(ALICE, NOW - 1, rotated, NOW) is Verdict.ADMIT
    assert judge(ALICE, NOW - 1, rotated, NOW + 60) is Verdict.REJECT
    # a second rotation: generation 0 is two behind and stops at once, whatever its grace said
    again = changes(AuthChange(kind="key_rotated", key_id=ALICE.key_id, generation=2, grace_until=NOW + 60))
    assert judge(ALICE, NOW - 1, again, NOW) is Verdict.REJECT
    assert judge(msgspec.structs.replace(ALICE, generation=1), NOW - 1, again, NOW) is Verdict.ADMIT


def test_a_principal_with_an_expiry_stops_at_it():
    graced = msgspec.structs.replace(ALICE, expires_at=NOW + 1)
    assert judge(graced, NOW, {}, NOW) is Verdict.ADMIT
    assert judge(graced, NOW, {}, NOW + 1) is Verdict.REJECT


def test_a_plan_change_makes_older_cached_principals_stale():
    plan = changes(AuthChange(kind="plan_changed", user_id="usr_alice", at=NOW))
    assert judge(ALICE, NOW - 1, plan, NOW) is Verdict.STALE
    assert judge(ALICE, NOW + 1, plan, NOW + 2) is Verdict.ADMIT


# ---- sealed snapshot entries -------------------------------------------------------------------

def test_only_entries_sealed_with_a_known_internal_key_are_trusted():
    tokens = InternalTokens(issuer_service="t", keys={"v1": b"a" * 32}, current="v1")
    payload = msgspec.json.encode(SnapshotEntry(principal=ALICE, cached_at=NOW))
    sealed = tokens.seal(payload)
    assert tokens.unseal(sealed) == payload
    forged = sealed.replace(b'"user"', b'"admin"')
    assert tokens.unseal(forged) is None
    assert tokens.unseal(payload) is None  # unsealed data written straight into Redis
    other = InternalTokens(issuer_service="t", keys={"v1": b"b" * 32}, current="v1")
    assert other.unseal(sealed) is None
    # after a rotation the previous version still unseals; once dropped, it does not
    tokens.update({"v1": b"a" * 32, "v2": b"c" * 32}, "v2")
    assert tokens.unseal(sealed) == payload
    tokens.update({"v2": b"c" * 32}, "v2")
    assert tokens.unseal(sealed) is None


# ---- JWT verification --------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwk(key: Ed25519PrivateKey, kid: str) -> dict:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw), "kid": kid, "alg": "EdDSA", "use": "sig"}


class FakeJwks:
    """What the auth service would serve; counts fetches."""

    def __init__(self, **keys: Ed25519PrivateKey) -> None:
        self.keys = dict(keys)
        self.fetches = 0

    async def fetch(self) -> bytes:
        self.fetches += 1
        return json.dumps({"keys": [_jwk(k, kid) for kid, k in self.keys.items()]}).encode()


def _claims(**override) -> dict:
    now = int(time.time())
    claims = {"iss": "dualgate-auth", "aud": "dualgate-api", "sub": "usr_alice", "akid": ALICE.key_id,
              "scp": ["user"], "pln": {"name": "gold", "max_tokens": 77}, "iat": now, "nbf": now, "exp": now + 60}
    claims.update(override)
    return claims


def _signed(key: Ed25519PrivateKey, kid: str, **override) -> str:
    return jwt.encode(_claims(**override), key, algorithm="EdDSA", headers={"kid": kid})


def _hand_made(header: dict, claims: dict, sign) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


async def _rejected(verifier: JwtVerifier, token: str) -> bool:
    try:
        await verifier.verify(token)
    except ApiError as err:
        return err.status == 401 and err.body.error.message == "Invalid or missing credentials."
    return False


@pytest.fixture
def signing():
    key = Ed25519PrivateKey.generate()
    jwks = FakeJwks(**{"1": key})
    verifier = JwtVerifier(jwks.fetch, issuer="dualgate-auth", audience="dualgate-api")
    return key, jwks, verifier


async def test_a_valid_token_names_its_user_scopes_key_and_plan(signing):
    key, _, verifier = signing
    identity = await verifier.verify(_signed(key, "1"))
    assert identity.principal.subject == "usr_alice" and identity.principal.scopes == ("user",)
    assert identity.principal.key_id == ALICE.key_id and identity.principal.via == "jwt"
    assert identity.plan == PlanLimits(name="gold", max_tokens=77)


async def test_every_jwt_attack_is_refused(signing):
    key, _, verifier = signing
    public_x = _jwk(key, "1")["x"]
    attacks = {
        "alg none": _hand_made({"alg": "none", "kid": "1"}, _claims(), lambda _: b""),
        "HS256 signed with the public key": _hand_made(
            {"alg": "HS256", "kid": "1"}, _claims(), lambda data: hmac.new(public_x.encode(), data, hashlib.sha256).digest()),
        "a foreign key under a known kid": _signed(Ed25519PrivateKey.generate(), "1"),
        "a foreign kid": _signed(Ed25519PrivateKey.generate(), "attacker"),
        "no kid": jwt.encode(_claims(), key, algorithm="EdDSA"),
        "expired": _signed(key, "1", exp=int(time.time()) - 60, iat=int(time.time()) - 120),
        "not valid yet": _signed(key, "1", nbf=int(time.time()) + 300),
        "another audience": _signed(key, "1", aud="someone-else"),
        "another issuer": _signed(key, "1", iss="evil-auth"),
        "no expiry": jwt.encode({k: v for k, v in _claims().items() if k != "exp"}, key, algorithm="EdDSA",
                                headers={"kid": "1"}),
        "garbage": "abc.def.ghi",
    }
    refused = {name: await _rejected(verifier, token) for name, token in attacks.items()}
    assert refused == {name: True for name in attacks}


async def test_a_newer_key_version_is_fetched_once_and_older_tokens_keep_verifying(signing):
    key, jwks, verifier = signing
    await verifier.verify(_signed(key, "1"))
    fetches = jwks.fetches
    jwks.keys["2"] = Ed25519PrivateKey.generate()  # the auth service rotated its transit key
    new_token = _signed(jwks.keys["2"], "2")
    results = await asyncio.gather(*(verifier.verify(new_token) for _ in range(20)))
    assert all(r.principal.subject == "usr_alice" for r in results)
    assert jwks.fetches == fetches + 1  # concurrent unknown kids share one fetch
    assert (await verifier.verify(_signed(key, "1"))).principal.subject == "usr_alice"


async def test_unknown_kids_cannot_make_the_verifier_fetch_more_than_once_a_second(signing):
    key, jwks, verifier = signing
    await verifier.verify(_signed(key, "1"))
    fetches = jwks.fetches
    started = time.monotonic()
    for kid in ("50", "51", "52"):
        assert await _rejected(verifier, _signed(Ed25519PrivateKey.generate(), kid))
    elapsed = time.monotonic() - started
    # three refetches, each at least MIN_REFETCH after the previous one
    assert jwks.fetches - fetches == 3 and elapsed >= 2 * JwtVerifier.MIN_REFETCH
    # an older kid that is simply not (or no longer) published costs no fetch at all
    assert await _rejected(verifier, _signed(Ed25519PrivateKey.generate(), "0"))
    assert jwks.fetches - fetches == 3


async def test_a_revocation_polled_while_unsubscribed_survives_a_resubscribe_to_a_redis_without_it():
    """Redis frozen: the auth service could not write the marker there, the gateway polled it. When
    the subscription returns before the auth service has re-written Redis, the key stays refused."""
    revoked = AuthChange(kind="key_revoked", key_id=ALICE.key_id, at=NOW)

    class RedisWithoutTheMarker:
        async def hgetall(self, name):
            return {AUTH_EPOCH_FIELD.encode(): b"1"}  # a complete hash, written before the revocation

    async def poll():
        return changes(revoked)

    feed = AuthChangeFeed(RedisWithoutTheMarker(), poll=poll, poll_interval=0.01)
    polling = asyncio.create_task(feed._poll_while_unsubscribed())  # the feed's own loop, Redis unreachable
    try:
        deadline = time.monotonic() + 2
        while not feed.changes:
            assert time.monotonic() < deadline, "poll did not run"
            await asyncio.sleep(0.01)
    finally:
        polling.cancel()
    await feed._load()  # what the feed does on resubscribing
    assert judge(ALICE, NOW, feed.changes, NOW) is Verdict.REJECT


async def test_a_kid_whose_key_was_replaced_verifies_with_the_new_key_after_one_fetch(signing):
    """A dev-mode Vault that restarts makes a new transit key that is again version 1: tokens it signs
    must verify at once, not after the next periodic refresh; the old key's tokens stop verifying."""
    key, jwks, verifier = signing
    old_token = _signed(key, "1")
    await verifier.verify(old_token)
    fetches = jwks.fetches
    jwks.keys["1"] = Ed25519PrivateKey.generate()
    assert (await verifier.verify(_signed(jwks.keys["1"], "1"))).principal.subject == "usr_alice"
    assert jwks.fetches == fetches + 1
    assert await _rejected(verifier, old_token)


# ---- auditing refused JWTs: what an attacker writes must not stall the audit log -----------------

def test_a_refused_tokens_claims_are_kept_only_as_plain_identifiers():
    hostile = jwt.encode({"sub": "usr\x00evil", "akid": "\ud800"}, "k" * 32, algorithm="HS256", headers={"kid": "1"})
    assert unverified_claims(hostile) == {"akid": "<invalid>", "sub": "<invalid>", "kid": "1"}
    plain = jwt.encode({"sub": "usr_1", "akid": "0123456789abcdef"}, "k" * 32, algorithm="HS256",
                       headers={"kid": "3"})
    assert unverified_claims(plain) == {"akid": "0123456789abcdef", "sub": "usr_1", "kid": "3"}
    assert unverified_claims("not.a.token") == {}


async def test_an_audit_event_that_cannot_be_encoded_is_dropped_and_the_next_goes_out():
    sent: list[bytes] = []

    class Publisher:  # the log's one dependency, standing in for Kafka: encodes as EventPublisher does
        connected = True

        async def publish(self, topic: str, key: str, event: msgspec.Struct) -> None:
            sent.append(msgspec.json.encode(event))

    def dropped() -> float:
        labels = {"service": "units", "action": "key.created"}
        return REGISTRY.get_sample_value("dualgate_audit_dropped_total", labels) or 0.0

    audit = AuditLog(Publisher(), "units")
    before = dropped()
    await audit.start()
    try:
        audit.record("key.created", actor="usr_a", detail={"note": "\ud800"})  # cannot be encoded
        audit.record("key.created", actor="usr_b")
        deadline = time.monotonic() + 5
        while not sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert [msgspec.json.decode(s)["actor"] for s in sent] == ["usr_b"]
        assert dropped() == before + 1  # counted, not only logged
    finally:
        await audit.stop(drain_seconds=0)
