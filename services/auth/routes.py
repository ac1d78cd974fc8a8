"""API keys (create: secret shown once; list; revoke; rotate with a grace window), JWTs bought with a
key, the JWKS, introspection and the auth-change feed for gateways, and the audit log for admins."""

from __future__ import annotations

import time
from typing import Annotated

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import Parameter

from common.contracts import REPLAY_HEADER, AuthChange, IntrospectRequest, KeyPrincipal
from common.errors import ApiError, decode_body, not_found, unauthorized, unavailable
from common.idempotency import idempotency_key
from common.openapi import documented
from common.security import Principal, api_key, generate_api_key, hash_secret, new_secret, parse_api_key, secret_matches
from common.vault import VaultUnavailable
from services.auth.rotations import rotation_request_hash, seal_answer, unseal_answer
from services.auth.schemas import (
    AuditList, CreatedKey, CreateKey, KeyInfo, KeyList, RotateKey, TokenRequest, TokenResponse,
)
from services.auth.store import PreviousSecret, Rotation

AUDIENCE = "auth"
NO_HASH = "0" * 64
# the only service that may report user changes (disable/enable, plan) into the auth-change feed
USER_CHANGE_KINDS = frozenset({"user_disabled", "user_enabled", "plan_changed"})

_created_encoder = msgspec.json.Encoder()
_created_decoder = msgspec.json.Decoder(CreatedKey)


def _caller(request: Request, state: State) -> Principal:
    return state.deps.tokens.principal_from(request, AUDIENCE)


def _deny(deps, key_id: str | None, reason: str) -> ApiError:
    # the audit log says why; the caller only ever hears "invalid credentials"
    deps.audit.record("auth.failed", actor="anonymous", target=key_id, outcome="denied", detail={"reason": reason})
    return unauthorized()


def _key_not_found() -> ApiError:
    return not_found("No such key.", code="key_not_found")


def _valid_key_id(key_id: str) -> bool:
    return len(key_id) == 16 and all(c in "0123456789abcdef" for c in key_id)


# ---- introspection and the auth-change feed (gateways) -----------------------------------------

@post("/internal/introspect", status_code=200)
async def introspect(request: Request, state: State) -> KeyPrincipal:
    deps = state.deps
    deps.tokens.principal_from(request, AUDIENCE).require_scope("service")
    body: IntrospectRequest = decode_body(await request.body(), IntrospectRequest)
    parsed = parse_api_key(body.key)
    if parsed is None:
        raise _deny(deps, None, "malformed key")
    key_id, secret = parsed
    creds = await deps.store.credentials(key_id)
    now = time.time()
    # every comparison always runs, against decoys when there is nothing to compare with, so the time
    # taken does not tell a guesser whether the key exists, is revoked or has previous secrets
    current_pepper = await deps.peppers.get(creds.pepper_version) if creds else None
    current_ok = secret_matches(current_pepper or deps.decoy_pepper, secret, creds.secret_hash if creds else NO_HASH)
    previous = await _matching_previous(deps, secret, [p for p in creds.previous if p.expires_at > now]
                                        if creds else [])
    if creds is None or not (current_ok or previous):
        raise _deny(deps, key_id, "unknown, revoked or wrong secret")
    facts = await deps.users.facts(creds.user_id)
    if facts is None or facts.disabled:
        raise _deny(deps, key_id, "user disabled or gone")
    matched_hash, matched_pepper = (creds.secret_hash, creds.pepper_version) if current_ok else \
        (previous.secret_hash, previous.pepper_version)
    if deps.peppers.current != matched_pepper:
        # re-hash on use: the key moves to the current pepper, so old pepper versions can be retired
        await deps.store.rehash(key_id, previous_generation=None if current_ok else previous.generation,
                                old_hash=matched_hash, new_hash=hash_secret(deps.peppers.current_key, secret),
                                pepper_version=deps.peppers.current)
    return KeyPrincipal(user_id=creds.user_id, key_id=key_id, scopes=creds.scopes, plan=facts.plan,
                        expires_at=None if current_ok else previous.expires_at,
                        generation=creds.generation if current_ok else previous.generation)


async def _matching_previous(deps, secret: str, candidates: list[PreviousSecret]) -> PreviousSecret | None:
    """The rotated-away secret (in its grace window) this one is; each is compared, one decoy when none."""
    found = None
    for candidate in candidates or [None]:
        pepper = await deps.peppers.get(candidate.pepper_version) if candidate else None
        ok = secret_matches(pepper or deps.decoy_pepper, secret, candidate.secret_hash if candidate else NO_HASH)
        if ok and candidate is not None and found is None:
            found = candidate
    return found


@get("/internal/auth-changes")
async def auth_changes(request: Request, state: State) -> Response:
    """Every current marker, from the database: the feed for gateways that cannot reach Redis."""
    state.deps.tokens.principal_from(request, AUDIENCE).require_scope("service")
    markers = await state.deps.changes.current()
    body = b"{" + b",".join(msgspec.json.encode(field) + b":" + change for field, change in markers.items()) + b"}"
    return Response(content=body, media_type="application/json")


@post("/internal/auth-changes", status_code=202)
async def report_user_change(request: Request, state: State) -> dict[str, str]:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    if principal.subject != "service:users":
        raise ApiError(403, "Only the users service reports user changes.", type="permission_error",
                       code="insufficient_scope")
    change: AuthChange = decode_body(await request.body(), AuthChange)
    if change.kind not in USER_CHANGE_KINDS or not change.user_id:
        raise ApiError(400, f"kind must be one of {sorted(USER_CHANGE_KINDS)}, with a user_id.", param="kind",
                       code="invalid_value")
    await state.deps.changes.record(msgspec.structs.replace(change, at=time.time()))
    return {"status": "recorded"}


# ---- API keys ----------------------------------------------------------------------------------

@post("/v1/keys", status_code=201, **documented(CreateKey, errors=(403, 404)))
async def create_key(request: Request, state: State) -> CreatedKey:
    deps = state.deps
    principal = _caller(request, state)
    body: CreateKey = decode_body(await request.body(), CreateKey)
    user_id = body.user_id or principal.subject
    scopes = body.scopes or ["user"]
    if not principal.is_admin:
        if user_id != principal.subject:
            raise not_found("No such user.", code="user_not_found", param="user_id")
        if not set(scopes) <= set(principal.scopes):
            raise ApiError(403, "A key cannot carry scopes its creator lacks.", type="permission_error",
                           param="scopes", code="insufficient_scope")
    elif user_id != principal.subject and not await deps.users.exists(user_id):
        raise not_found(f"No user '{user_id}'.", code="user_not_found", param="user_id")
    full_key, key_id, secret = generate_api_key()
    info = await deps.store.insert(key_id=key_id, user_id=user_id, name=body.name,
                                   secret_hash=hash_secret(deps.peppers.current_key, secret),
                                   pepper_version=deps.peppers.current, scopes=scopes)
    deps.audit.record("key.created", actor=principal.subject, target=key_id,
                      detail={"user_id": user_id, "name": body.name, "scopes": ",".join(scopes)})
    return CreatedKey(**msgspec.structs.asdict(info), key=full_key)


@get("/v1/keys", **documented(errors=(403, 404)))
async def list_keys(request: Request, state: State, user_id: str | None = None) -> KeyList:
    principal = _caller(request, state)
    if user_id and user_id != principal.subject and not principal.is_admin:
        raise not_found("No such user.", code="user_not_found", param="user_id")
    return KeyList(data=await state.deps.store.list_for(user_id or principal.subject))


@get("/v1/keys/{key_id:str}", **documented(errors=(403, 404)))
async def read_key(request: Request, state: State, key_id: str) -> KeyInfo:
    principal = _caller(request, state)
    info = await state.deps.store.get(key_id, None if principal.is_admin else principal.subject) \
        if _valid_key_id(key_id) else None
    if info is None:  # another user's key looks exactly like a missing one
        raise _key_not_found()
    return info


@delete("/v1/keys/{key_id:str}", status_code=200, **documented(errors=(403, 404)))
async def revoke_key(request: Request, state: State, key_id: str) -> dict[str, object]:
    deps = state.deps
    principal = _caller(request, state)
    owner = None if principal.is_admin else principal.subject
    user_id = await deps.store.revoke(key_id, owner) if _valid_key_id(key_id) else None
    if user_id is None:
        raise _key_not_found()
    await deps.changes.record(AuthChange(kind="key_revoked", key_id=key_id, user_id=user_id, at=time.time()))
    deps.audit.record("key.revoked", actor=principal.subject, target=key_id, detail={"user_id": user_id})
    return {"id": key_id, "object": "key", "revoked": True}


@post("/v1/keys/{key_id:str}/rotate", status_code=200,
      **documented(RotateKey, body_required=False, errors=(403, 404, 422)))
async def rotate_key(request: Request, state: State, key_id: str) -> Response[CreatedKey]:
    """A new secret for the key. Every secret moved aside keeps the grace its rotation promised, whatever
    rotations follow; a retry with the same Idempotency-Key gets the first answer and rotates nothing."""
    deps = state.deps
    principal = _caller(request, state)
    retry_key = idempotency_key(request.headers)
    raw = await request.body()
    body: RotateKey = decode_body(raw, RotateKey) if raw.strip() else RotateKey()
    grace = deps.settings.key_grace_seconds if body.grace_seconds is None else body.grace_seconds
    request_hash = rotation_request_hash(grace)
    secret = new_secret()  # same key id: only the secret changes
    pepper_version, pepper = deps.peppers.current, deps.peppers.current_key

    def seal(info: KeyInfo) -> bytes:
        answer = _created_encoder.encode(CreatedKey(**msgspec.structs.asdict(info), key=api_key(key_id, secret)))
        return seal_answer(pepper, key_id, retry_key or "", answer)

    rotation = None
    if _valid_key_id(key_id):
        rotation = await deps.store.rotate(key_id, None if principal.is_admin else principal.subject,
                                           secret_hash=hash_secret(pepper, secret), pepper_version=pepper_version,
                                           grace_seconds=grace, idempotency_key=retry_key, request_hash=request_hash,
                                           seal=seal)
    if rotation is None:
        raise _key_not_found()
    if rotation.replayed is not None:
        return await _replay_rotation(deps, key_id, retry_key or "", request_hash, rotation)
    info = rotation.info
    await deps.changes.record(_rotated(key_id, info, rotation.graces))
    deps.audit.record("key.rotated", actor=principal.subject, target=key_id,
                      detail={"user_id": info.user_id, "grace_seconds": str(grace)})
    answer = CreatedKey(**msgspec.structs.asdict(info), key=api_key(key_id, secret))
    return Response(content=_created_encoder.encode(answer), media_type="application/json")


def _rotated(key_id: str, info: KeyInfo, graces: dict[int, float]) -> AuthChange:
    """The marker gateways judge cached secrets by: the new generation passes, each older one until its
    own grace ends (the previous one's end also in grace_until, which older gateways read)."""
    newest = info.rotations - 1
    return AuthChange(kind="key_rotated", key_id=key_id, user_id=info.user_id, at=time.time(),
                      generation=info.rotations, grace_until=graces.get(newest),
                      older_grace={g: until for g, until in graces.items() if g < newest})


async def _replay_rotation(deps, key_id: str, retry_key: str, request_hash: str,
                           rotation: Rotation) -> Response[CreatedKey]:
    if rotation.request_hash != request_hash:
        raise ApiError(422, "This Idempotency-Key was already used with a different request.",
                       param="Idempotency-Key", code="idempotency_key_reused")
    pepper = await deps.peppers.get(rotation.replay_pepper)
    answer = unseal_answer(pepper, key_id, retry_key, rotation.replayed) if pepper else None
    if answer is None:  # its pepper version was retired meanwhile: the answer cannot be opened again
        raise ApiError(409, "This rotation was done, but its answer can no longer be replayed.",
                       param="Idempotency-Key", code="idempotency_answer_gone")
    replayed = _created_decoder.decode(answer)
    if replayed.rotations == rotation.info.rotations:
        # the first attempt may have stopped before telling the gateways: tell them (idempotent)
        await deps.changes.record(_rotated(key_id, rotation.info, rotation.graces))
    return Response(content=answer, media_type="application/json", headers={REPLAY_HEADER: "true"})


# ---- JWTs --------------------------------------------------------------------------------------

@post("/v1/auth/token", status_code=200, **documented(TokenRequest, body_required=False, errors=(403,)))
async def issue_token(request: Request, state: State) -> TokenResponse:
    deps = state.deps
    principal = _caller(request, state)
    if principal.via != "key":
        raise ApiError(403, "A token can only be bought with an API key.", type="permission_error",
                       code="api_key_required")
    raw = await request.body()
    body: TokenRequest = decode_body(raw, TokenRequest) if raw.strip() else TokenRequest()
    facts = await deps.users.facts(principal.subject)
    if facts is None or facts.disabled:
        raise _deny(deps, principal.key_id, "token for a disabled or missing user")
    ttl = min(body.expires_in or deps.settings.jwt_ttl_seconds, deps.settings.jwt_ttl_seconds)
    try:
        token, expires_at = await deps.signer.sign(principal, facts.plan, ttl)
    except VaultUnavailable:
        raise unavailable("Token signing is temporarily unavailable.", code="signing_unavailable") from None
    deps.audit.record("token.issued", actor=principal.subject, target=principal.key_id,
                      detail={"expires_in": str(ttl)})
    return TokenResponse(access_token=token, expires_in=ttl, expires_at=expires_at)


@get("/.well-known/jwks.json", **documented())
async def jwks(state: State) -> Response:
    try:
        document = await state.deps.signer.jwks()
    except VaultUnavailable:
        raise unavailable("The signing keys are temporarily unavailable.", code="signing_unavailable") from None
    return Response(content=document, media_type="application/json", headers={"cache-control": "max-age=60"})


# ---- the audit log -----------------------------------------------------------------------------

@get("/v1/auth/audit", **documented(errors=(403,)))
async def read_audit(
    request: Request, state: State,
    limit: Annotated[int, Parameter(ge=1, le=500)] = 100,
    action: str | None = None, actor: str | None = None, target: str | None = None,
    request_id: str | None = None,
) -> AuditList:
    _caller(request, state).require_scope("admin")
    return AuditList(data=await state.deps.audit_store.recent(limit=limit, action=action, actor=actor,
                                                              target=target, request_id=request_id))


route_handlers = [introspect, auth_changes, report_user_change, create_key, list_keys, read_key, revoke_key,
                  rotate_key, issue_token, jwks, read_audit]
