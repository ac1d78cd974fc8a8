"""Wire contracts between deployables: what one service sends and another reads.

Kept in the kit because deployables never import each other.
"""

from __future__ import annotations

import hashlib
import uuid

import msgspec

from common.openai_schema import EngineSpec, Usage

TURNS_TOPIC = "chat.turns.v1"
USAGE_TOPIC = "usage.events.v1"
AUDIT_TOPIC = "audit.events.v1"

# The public API: path prefix -> (domain, service). The router sends a path to its domain's gateway
# pool, the gateway on to the service, and the fallback gateway knows the same paths: one table, so
# no hop can disagree about a route.
API_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("/v1/chat/completions", "ai", "chat"), ("/v1/conversations", "ai", "chat"), ("/v1/models", "ai", "models"),
    ("/v1/keys", "identity", "auth"), ("/v1/auth", "identity", "auth"), ("/.well-known/jwks.json", "identity", "auth"),
    ("/v1/users", "identity", "users"), ("/v1/usage", "identity", "users"), ("/v1/plans", "identity", "users"),
)


def route_of(path: str) -> tuple[str, str] | None:
    """(domain, service) answering `path`, or None for a path outside the API."""
    for prefix, domain, service in API_ROUTES:
        if path == prefix or path.startswith(prefix + "/"):
            return domain, service
    return None


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
    # which secret of the key matched: 0 for the first, +1 per rotation (see AuthChange key_rotated)
    generation: int = 0


# ---- auth changes, broadcast to every gateway (Redis) ---------------------------------------
# Revocation must reach every gateway within 1 s: the auth service (the one writer; its database
# holds the durable copy) records each change in AUTH_REVOKED, a hash of markers
# (`marker_field(change)` -> AuthChange JSON):
#   "key:<key id>"      key_revoked   the key never passes again
#   "user:<user id>"    user_disabled none of the user's keys or tokens pass (removed on user_enabled)
#   "rotated:<key id>"  key_rotated   secrets of `generation` pass; generation - 1 until `grace_until`
#   "plan:<user id>"    plan_changed  cached principals older than `at` carry a stale plan
# and then publishes it on AUTH_CHANNEL. Gateways load the hash whenever they (re)subscribe and
# judge every cached principal against it, so a missed message cannot let a revoked key through.
# AUTH_EPOCH_FIELD marks a complete hash: when Redis loses it (restart), the auth service re-seeds
# every marker from its database and publishes a `resync` change.
AUTH_CHANNEL = "dualgate:auth:changes"
AUTH_REVOKED = "dualgate:auth:revoked"
AUTH_EPOCH_FIELD = "__epoch"
# the fallback gateway's snapshot of valid keys: a hash sha256(full key) hex -> SnapshotEntry JSON,
# written by the gateways after each successful introspection
AUTH_SNAPSHOT = "dualgate:auth:snapshot"
# the auth service's JWKS (JSON), for verifiers that cannot reach the auth service
AUTH_JWKS = "dualgate:auth:jwks"


class AuthChange(msgspec.Struct, kw_only=True):
    kind: str  # key_revoked | key_rotated | user_disabled | user_enabled | plan_changed | resync
    key_id: str | None = None
    user_id: str | None = None
    at: float = 0.0
    generation: int | None = None  # key_rotated: the key's new secret generation
    grace_until: float | None = None  # key_rotated: when the previous secret stops working


def marker_field(change: AuthChange) -> str | None:
    """The AUTH_REVOKED field a change is recorded under (None: it leaves no marker)."""
    if change.kind == "key_revoked" and change.key_id:
        return f"key:{change.key_id}"
    if change.kind in ("user_disabled", "user_enabled") and change.user_id:
        return f"user:{change.user_id}"
    if change.kind == "key_rotated" and change.key_id:
        return f"rotated:{change.key_id}"
    if change.kind == "plan_changed" and change.user_id:
        return f"plan:{change.user_id}"
    return None


class SnapshotEntry(msgspec.Struct, kw_only=True):
    """One AUTH_SNAPSHOT value: a principal as introspection returned it, and when (unix time)."""

    principal: KeyPrincipal
    cached_at: float


class AuditEvent(msgspec.Struct, kw_only=True):
    """One security-relevant action, published to audit.events.v1 keyed by actor."""

    schema_version: int = 1
    event_id: str
    action: str  # key.created | key.rotated | key.revoked | token.issued | auth.failed | user.* | ...
    actor: str  # a user id, "service:<name>", or "anonymous"
    target: str | None = None  # what the action was on (a key id, a user id)
    outcome: str = "ok"  # ok | denied
    request_id: str = ""
    detail: dict[str, str] = {}
    at: float


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
    # additive (issue 23): the fallback layer that answered ("model-fallback", "cache", "simplified"), or ""
    degraded: str = ""


def turn_id_for(user_id: str, request_id: str, request_hash: str) -> str:
    """A request's turn id: the same on every hop, retry and failover of that request (its edge request
    id and what it asks), so whichever hop answers it, the spool and the writer store it once. A
    request id reused for another request names another turn."""
    if not request_id:
        return f"turn_{uuid.uuid4().hex}"
    digest = hashlib.sha256(f"{user_id}\0{request_id}\0{request_hash}".encode()).hexdigest()
    return f"turn_{digest[:32]}"


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
