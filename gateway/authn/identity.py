"""An authenticated caller, and how a cached principal is judged against the auth-change markers."""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping

import msgspec

from common.contracts import DEFAULT_PLAN, AuthChange, KeyPrincipal, PlanLimits
from common.security import Principal

log = logging.getLogger(__name__)




REDIS_TIMEOUT = 0.2  # per snapshot read/write; Redis being slow must not slow authentication much


class Identity(msgspec.Struct, frozen=True):
    """An authenticated caller: who (travels on in the internal token) and what their plan allows."""

    principal: Principal
    plan: PlanLimits = DEFAULT_PLAN


def identity_of(found: KeyPrincipal) -> Identity:
    return Identity(Principal(subject=found.user_id, scopes=tuple(found.scopes), key_id=found.key_id, via="key"),
                    found.plan)


# ---- judging a cached principal against the auth-change markers ------------------------------

class Verdict(enum.Enum):
    ADMIT = "admit"
    STALE = "stale"  # still valid, but its plan changed since it was cached: refresh when possible
    REJECT = "reject"


def judge(principal: KeyPrincipal, cached_at: float, changes: Mapping[str, AuthChange], now: float) -> Verdict:
    """Whether a principal cached at `cached_at` may pass now, given the markers in `changes`."""
    if f"key:{principal.key_id}" in changes or f"user:{principal.user_id}" in changes:
        return Verdict.REJECT
    if principal.expires_at is not None and now >= principal.expires_at:
        return Verdict.REJECT  # a rotated-away secret past its grace window
    rotated = changes.get(f"rotated:{principal.key_id}")
    if rotated is not None and rotated.generation is not None and principal.generation < rotated.generation:
        # cached before the latest rotation: a rotated-away secret lives out the grace its own rotation
        # promised, however many rotations followed; one without a grace is dead
        until = rotated.grace_until if principal.generation == rotated.generation - 1 \
            else rotated.older_grace.get(principal.generation)
        if now >= (until or 0.0):
            return Verdict.REJECT
    plan = changes.get(f"plan:{principal.user_id}")
    if plan is not None and plan.at > cached_at:
        return Verdict.STALE
    return Verdict.ADMIT


def jwt_rejected(principal: Principal, changes: Mapping[str, AuthChange]) -> bool:
    """A JWT stays valid until it expires unless its key was revoked or its user disabled."""
    return f"key:{principal.key_id}" in changes or f"user:{principal.subject}" in changes


