"""Wire contracts between deployables: what one service sends and another reads.

Kept in the kit because deployables never import each other.
"""

from __future__ import annotations

import msgspec

from common.openai_schema import EngineSpec, Usage

TURNS_TOPIC = "chat.turns.v1"
USAGE_TOPIC = "usage.events.v1"
AUDIT_TOPIC = "audit.events.v1"


class ModelRecord(msgspec.Struct, kw_only=True):
    """A models-registry row as other services see it."""

    id: str
    owned_by: str
    context_length: int
    deployment: EngineSpec
    fallback_model: str | None = None
    enabled: bool = True
    created: int = 0
    # how the chat service counts this model's tokens: "" (by engine), "words", "chars", or the name
    # of a tokenizer folder (tokenizer.json) under the model cache
    tokenizer: str = ""


class PlanLimits(msgspec.Struct, kw_only=True, frozen=True):
    """A user's plan as the gateways enforce it."""

    name: str = "default"
    requests_per_min: int = 600
    tokens_per_day: int = 1_000_000
    max_tokens: int = 4096
    allowed_models: tuple[str, ...] = ()  # empty: every model


DEFAULT_PLAN = PlanLimits()


class IntrospectRequest(msgspec.Struct):
    key: str


class KeyPrincipal(msgspec.Struct, kw_only=True):
    """What the auth service says about a valid API key."""

    user_id: str
    key_id: str
    scopes: list[str]
    plan: PlanLimits = DEFAULT_PLAN
    # set while a rotated-away secret is in its grace window: the key stops working at this unix time
    expires_at: float | None = None


# ---- auth changes, broadcast to every gateway (Redis) ---------------------------------------
# Revocation must reach every gateway within 1 s: the auth service publishes each change on
# AUTH_CHANNEL and records it in AUTH_REVOKED (a hash: "key:<key id>" or "user:<user id>" -> unix
# time), which gateways consult when they (re)subscribe and the fallback gateway's snapshot obeys.
AUTH_CHANNEL = "dualgate:auth:changes"
AUTH_REVOKED = "dualgate:auth:revoked"
# the fallback gateway's snapshot of valid keys: a hash sha256(full key) hex -> KeyPrincipal JSON
AUTH_SNAPSHOT = "dualgate:auth:snapshot"


class AuthChange(msgspec.Struct, kw_only=True):
    kind: str  # key_revoked | key_rotated | user_disabled | user_enabled | plan_changed
    key_id: str | None = None
    user_id: str | None = None
    at: float = 0.0


class TurnEvent(msgspec.Struct, kw_only=True):
    """A completed turn, published to chat.turns.v1 keyed by conversation id."""

    schema_version: int = 1
    turn_id: str
    conversation_id: str
    user_id: str
    model: str
    request_messages: list[dict[str, str]]
    assistant: str
    finish_reason: str
    usage: Usage
    request_id: str = ""
    created: float
    # additive (issue 4): replaying a request with the same Idempotency-Key returns this turn
    idempotency_key: str = ""
    request_hash: str = ""  # sha256 of the request body, so a reused key with another body is refused
    completion_id: str = ""  # the chat.completion id the client saw


class UsageEvent(msgspec.Struct, kw_only=True):
    """Tokens one request used, published to usage.events.v1 keyed by user id."""

    schema_version: int = 1
    event_id: str
    user_id: str
    key_id: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    created: float
