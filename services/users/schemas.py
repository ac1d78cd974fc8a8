from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

PlanName = Annotated[str, Meta(min_length=1, max_length=64)]


class CreateUser(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    plan: PlanName = "default"


class UpdateUser(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)] | None = None
    plan: PlanName | None = None


class Plan(msgspec.Struct, kw_only=True):
    name: str
    requests_per_min: int
    tokens_per_day: int
    max_tokens: int
    allowed_models: list[str]


class CreatePlan(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    requests_per_min: Annotated[int, Meta(ge=1, le=10_000_000)]
    tokens_per_day: Annotated[int, Meta(ge=1, le=10**15)]
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)]
    # empty: every model
    allowed_models: Annotated[list[Annotated[str, Meta(min_length=1, max_length=200)]], Meta(max_length=200)] = []


class PlanList(msgspec.Struct):
    data: list[Plan]
    object: str = "list"


class User(msgspec.Struct, kw_only=True):
    id: str
    name: str
    plan: Plan
    disabled: bool
    created: int
    object: str = "user"


class UserList(msgspec.Struct):
    data: list[User]
    object: str = "list"


class Usage(msgspec.Struct, kw_only=True):
    """A user's usage today (UTC), from the ledger."""

    user_id: str
    date: str  # YYYY-MM-DD, UTC
    plan: str
    tokens_per_day: int
    used_tokens: int
    remaining_tokens: int
    prompt_tokens: int
    completion_tokens: int
    requests: int
    resets_at: int  # unix time of the next UTC midnight
    object: str = "usage"
