"""API keys and internal service tokens: what is accepted and what never is."""

from __future__ import annotations

import time

import jwt
import pytest

from common.errors import ApiError
from common.security import InternalTokens, Principal, generate_api_key, hash_secret, parse_api_key, secret_matches

KEYS = {"v1": b"k" * 32, "v2": b"q" * 32}
ALICE = Principal(subject="usr_alice", scopes=("user",), key_id="0123456789abcdef")


def tokens(current: str = "v1", keys: dict[str, bytes] = KEYS) -> InternalTokens:
    return InternalTokens(issuer_service="gateway-ai", keys=dict(keys), current=current)


def test_a_generated_key_parses_back_to_its_id_and_secret():
    full, key_id, secret = generate_api_key()
    assert full.startswith("dg-") and parse_api_key(full) == (key_id, secret)


@pytest.mark.parametrize("bad", ["", "dg-", "sk-0123456789abcdef-secret", "dg-0123456789abcdef-",
                                 "dg-xyz-secret", "dg-0123456789abcdeg-secret", "dg-0123456789abcdef" + "-" + "s" * 200])
def test_malformed_keys_do_not_parse(bad):
    assert parse_api_key(bad) is None


def test_only_the_right_secret_matches_its_hash():
    stored = hash_secret(b"pepper", "s3cret")
    assert secret_matches(b"pepper", "s3cret", stored)
    assert not secret_matches(b"pepper", "s3cret!", stored)
    assert not secret_matches(b"other pepper", "s3cret", stored)


def test_an_internal_token_carries_the_principal_to_its_audience():
    token = tokens().mint("chat", ALICE)
    assert tokens().verify(token, "chat") == ALICE


def _rejected(token: str | None, audience: str = "chat", verifier: InternalTokens | None = None) -> bool:
    try:
        (verifier or tokens()).verify(token, audience)
    except ApiError as err:
        return err.status == 401
    return False


def test_a_token_for_another_audience_is_rejected():
    assert _rejected(tokens().mint("models", ALICE), audience="chat")


def test_missing_expired_unsigned_and_foreign_tokens_are_rejected():
    now = int(time.time())
    claims = {"iss": "dualgate-internal", "aud": "chat", "sub": "usr_x", "iat": now, "exp": now + 60}
    assert _rejected(None)
    assert _rejected("not-a-token")
    assert _rejected(jwt.encode({**claims, "exp": now - 1}, KEYS["v1"], algorithm="HS256", headers={"kid": "v1"}))
    assert _rejected(jwt.encode(claims, None, algorithm="none", headers={"kid": "v1"}))
    assert _rejected(jwt.encode(claims, b"x" * 32, algorithm="HS256", headers={"kid": "v1"}))
    assert _rejected(jwt.encode(claims, KEYS["v1"], algorithm="HS256", headers={"kid": "v9"}))
    assert _rejected(jwt.encode({**claims, "iss": "someone"}, KEYS["v1"], algorithm="HS256", headers={"kid": "v1"}))


def test_tokens_signed_by_the_previous_key_version_verify_during_rotation():
    old = tokens(current="v1").mint("chat", ALICE)
    assert tokens(current="v2").verify(old, "chat") == ALICE
    # once v1 is retired, its tokens stop working
    assert _rejected(old, verifier=tokens(current="v2", keys={"v2": KEYS["v2"]}))


def test_a_verified_token_is_remembered_only_for_its_audience_its_life_and_its_key_set(monkeypatch):
    verifier = tokens()
    token = tokens().mint("chat", ALICE)
    assert verifier.verify(token, "chat") == ALICE
    assert verifier.verify(token, "chat") == ALICE  # from what it remembers
    assert _rejected(token, audience="models", verifier=verifier)
    # past its expiry a remembered token is refused like any other
    import common.security as security
    later = time.time() + verifier.ttl + 1
    monkeypatch.setattr(security.time, "time", lambda: later)
    assert _rejected(token, verifier=verifier)
    monkeypatch.undo()
    # retiring the key version it was signed with refuses it at once, remembered or not
    assert verifier.verify(token, "chat") == ALICE
    verifier.update({"v2": KEYS["v2"]}, "v2")
    assert _rejected(token, verifier=verifier)
