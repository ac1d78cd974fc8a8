"""What a limit answers: enough for the decision and for the headers the caller is told."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec


class RateDecision(msgspec.Struct, frozen=True, kw_only=True):
    """The answer for one request, with what the `x-ratelimit-*` and Retry-After headers need."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float  # until the full limit is available again
    retry_after: float  # 0 when allowed
    local: bool = False  # decided in process because Redis was unavailable


@dataclass(slots=True, kw_only=True)
class Reservation:
    """One request's hold on its user's daily tokens. Settle or release it once; both are idempotent."""

    id: str
    user_id: str
    day: str  # the UTC day it is charged to (the day the request started), YYYYMMDD
    limit: int
    reserved: int  # tokens held for this request now
    local: bool  # held by the in-process budget; stays there even when Redis comes back
    refresh_at: float = 0.0  # monotonic time after which consume() renews the hold's deadline
    done: bool = False


class BudgetDecision(msgspec.Struct, frozen=True, kw_only=True):
    allowed: bool
    limit: int
    remaining: int  # tokens left today once this request's hold is counted
    reset_seconds: float  # until UTC midnight
    retry_after: float  # 0 when allowed
    reservation: Reservation | None  # None when denied
    local: bool = False


class Admission(msgspec.Struct, frozen=True):
    """TokenBudget.admit's answer: the requests/min decision; then either the token decision, or the
    cached answer found fresh (no tokens held); both None when requests/min refused the request."""

    requests: RateDecision
    tokens: BudgetDecision | None = None
    cached: bytes | None = None
