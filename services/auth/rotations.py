"""Replaying a rotation: the answer to a rotation with an Idempotency-Key holds the new secret, which is
stored nowhere else (keys are kept as HMACs). It is kept sealed with AES-GCM under a key derived from a
pepper version (itself in Vault, never in the database), bound to its key id and Idempotency-Key, for
REPLAY_SECONDS; a retry within that time gets it back instead of a second rotation."""

from __future__ import annotations

import hashlib
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

REPLAY_SECONDS = 86_400
_NONCE = 12


def _cipher(pepper: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"dualgate key rotation replay").derive(pepper)
    return AESGCM(key)


def _bound_to(key_id: str, idempotency_key: str) -> bytes:
    return f"{key_id}\n{idempotency_key}".encode()


def seal_answer(pepper: bytes, key_id: str, idempotency_key: str, answer: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    return nonce + _cipher(pepper).encrypt(nonce, answer, _bound_to(key_id, idempotency_key))


def unseal_answer(pepper: bytes, key_id: str, idempotency_key: str, sealed: bytes) -> bytes | None:
    try:
        return _cipher(pepper).decrypt(sealed[:_NONCE], sealed[_NONCE:], _bound_to(key_id, idempotency_key))
    except InvalidTag:
        return None


def rotation_request_hash(grace_seconds: int) -> str:
    """What a retry must repeat: the same key with another grace is another request (422)."""
    return hashlib.sha256(f"rotate grace={grace_seconds}".encode()).hexdigest()
