from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Scope = Literal["user", "admin"]


class CreateKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    user_id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    scopes: Annotated[list[Scope], Meta(min_length=1, max_length=2)] | None = None


class KeyInfo(msgspec.Struct, kw_only=True):
    id: str
    user_id: str
    name: str
    scopes: list[str]
    created: int
    revoked: bool


class CreatedKey(KeyInfo, kw_only=True):
    key: str  # shown once


class KeyList(msgspec.Struct):
    data: list[KeyInfo]
    object: str = "list"
