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


class IntrospectRequest(msgspec.Struct):
    key: str


class KeyPrincipal(msgspec.Struct, kw_only=True):
    """What the auth service says about a valid API key."""

    user_id: str
    key_id: str
    scopes: list[str]


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
