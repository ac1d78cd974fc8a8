from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta


class CreateUser(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    plan: Annotated[str, Meta(min_length=1, max_length=64)] = "default"


class Plan(msgspec.Struct, kw_only=True):
    name: str
    requests_per_min: int
    tokens_per_day: int
    max_tokens: int
    allowed_models: list[str]


class User(msgspec.Struct, kw_only=True):
    id: str
    name: str
    plan: Plan
    disabled: bool
    created: int


class UserList(msgspec.Struct):
    data: list[User]
    object: str = "list"
