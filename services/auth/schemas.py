from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Scope = Literal["user", "admin"]
MAX_GRACE_SECONDS = 30 * 86_400


class CreateKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    user_id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    scopes: Annotated[list[Scope], Meta(min_length=1, max_length=2)] | None = None


class RotateKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # how long the previous secret keeps working; 0 stops it at once
    grace_seconds: Annotated[int, Meta(ge=0, le=MAX_GRACE_SECONDS)] | None = None


class KeyInfo(msgspec.Struct, kw_only=True):
    id: str
    user_id: str
    name: str
    scopes: list[str]
    created: int
    revoked: bool
    rotations: int = 0
    previous_secret_expires_at: int | None = None  # the last grace end of its rotated-away secrets, while one is on


class CreatedKey(KeyInfo, kw_only=True):
    key: str  # shown once


class KeyList(msgspec.Struct):
    data: list[KeyInfo]
    object: str = "list"


class TokenRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    expires_in: Annotated[int, Meta(ge=30, le=86_400)] | None = None  # capped by the configured maximum


class TokenResponse(msgspec.Struct, kw_only=True):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int
    expires_at: int


class AuditRecord(msgspec.Struct, kw_only=True):
    event_id: str
    action: str
    actor: str
    target: str | None
    outcome: str
    request_id: str
    detail: dict[str, str]
    at: float


class AuditList(msgspec.Struct):
    data: list[AuditRecord]
    object: str = "list"
