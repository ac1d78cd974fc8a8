"""Wire contracts between deployables: what one service sends and another reads.

Kept in the kit because deployables never import each other.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from urllib.parse import quote

import msgspec

from common.errors import ApiError, not_found
from common.openai_schema import EngineSpec, Usage

# Wire headers every hop agrees on: one spelling, here.
REQUEST_ID_HEADER = "x-request-id"
TRACEPARENT_HEADER = "traceparent"
IDEMPOTENCY_HEADER = "idempotency-key"
DEGRADED_HEADER = "x-dualgate-degraded"  # a fallback layer's answer (or flagged refusal): which layer
ROUTE_HEADER = "x-dualgate-route"  # which gateway pool answered: ai, identity or fallback
UPSTREAM_HEADER = "x-dualgate-upstream"  # on an upstream's own error answer a gateway passes on
CACHE_HEADER = "x-cache"  # hit | miss, on cacheable chat answers
REPLAY_HEADER = "x-dualgate-idempotent-replay"  # an answer replayed for its Idempotency-Key
TURN_HEADER = "x-dualgate-turn-id"
CONVERSATION_HEADER = "x-dualgate-conversation-id"
# from a gateway's model-fallback layer to the chat service: the hash of what the client asked (its model,
# not the fallback's), so the turn's identity and the key's check agree with every other layer's
REQUEST_HASH_HEADER = "x-dualgate-request-hash"

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


# ---- ids that go into URLs ---------------------------------------------------------------------
# Every id a hop puts into an upstream URL is checked against its kind's pattern and percent-encoded
# (`url_id`), so "x/../m", "m?x=1" or a control character can never reach another resource than the
# one named, nor fail the URL on the way out (an outage the caller could cause at will).
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._:-]*"
ID_PATTERNS: dict[str, str] = {
    # "org/name" ids are fine; an empty, "." or ".." segment is not
    "model": rf"^(?=.{{1,128}}$){_SEGMENT}(?:/{_SEGMENT})*$",
    "conversation": r"^[A-Za-z0-9_-]{1,64}$",
    "user": r"^[A-Za-z0-9_-]{1,64}$",
    "key": r"^[0-9a-f]{16}$",
    "plan": r"^[a-z0-9][a-z0-9._-]{0,63}$",
}
_ID_RES = {kind: re.compile(pattern) for kind, pattern in ID_PATTERNS.items()}


def valid_id(kind: str, value: object) -> bool:
    return isinstance(value, str) and _ID_RES[kind].fullmatch(value) is not None


def invalid_id(kind: str, value: str, param: str | None = None) -> ApiError:
    """An id that cannot name anything: answered like an unknown one, as OpenAI does (404)."""
    shown = value if value.isprintable() and len(value) <= 128 else repr(value[:128])
    return not_found(f"The {kind} '{shown}' does not exist.", code=f"{kind}_not_found", param=param or kind)


def url_id(kind: str, value: str, param: str | None = None) -> str:
    """`value` as one percent-encoded URL path segment, once it matches its kind's pattern; else the 404."""
    if not valid_id(kind, value):
        raise invalid_id(kind, value, param)
    return quote(value, safe="")


# the public routes whose path names an id (decoded path -> the id's kind): a gateway checks it before
# passing the path on, so an id no resource can have is refused where it arrives
PATH_IDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"/v1/conversations/([^/]+)(?:/messages)?"), "conversation"),
    (re.compile(r"/v1/models/(.+)"), "model"),
    (re.compile(r"/v1/keys/([^/]+)(?:/rotate)?"), "key"),
    (re.compile(r"/v1/users/([^/]+)(?:/disable|/enable)?"), "user"),
    (re.compile(r"/v1/plans/([^/]+)"), "plan"),
)


def check_path_ids(path: str) -> None:
    """The 404 for a public path whose id does not match its kind's pattern (see PATH_IDS)."""
    for route, kind in PATH_IDS:
        if (found := route.fullmatch(path)) and not valid_id(kind, found.group(1)):
            raise invalid_id(kind, found.group(1))


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
#   "rotated:<key id>"  key_rotated   secrets of `generation` pass; generation - 1 until `grace_until`,
#                                     older ones until their `older_grace`
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
    # key_rotated: generation -> when it stops, for each secret older than the previous one still in its
    # grace window (a rotation never shortens a grace an earlier one promised)
    older_grace: dict[int, float] = {}


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
