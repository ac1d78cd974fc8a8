"""API keys: create (secret shown once), list, revoke; introspection for the gateways."""

from __future__ import annotations

from litestar import Request, delete, get, post
from litestar.datastructures import State

from common.contracts import IntrospectRequest, KeyPrincipal
from common.errors import ApiError, decode_body, not_found, unauthorized
from common.security import generate_api_key, hash_secret, parse_api_key, secret_matches
from services.auth.schemas import CreatedKey, CreateKey, KeyList

AUDIENCE = "auth"


@post("/internal/introspect", status_code=200)
async def introspect(request: Request, state: State) -> KeyPrincipal:
    deps = state.deps
    deps.tokens.principal_from(request, AUDIENCE).require_scope("service")
    body: IntrospectRequest = decode_body(await request.body(), IntrospectRequest)
    parsed = parse_api_key(body.key)
    if parsed is None:
        raise unauthorized()
    key_id, secret = parsed
    row = await deps.store.credentials(key_id)
    pepper = deps.peppers.get(row["pepper_version"]) if row else None
    # compare even for unknown keys so timing does not tell a guesser which part was wrong
    if not secret_matches(pepper or deps.decoy_pepper, secret, row["secret_hash"] if row else "0" * 64) or not row:
        raise unauthorized()
    return KeyPrincipal(user_id=row["user_id"], key_id=row["key_id"], scopes=list(row["scopes"]))


@post("/v1/keys", status_code=201)
async def create_key(request: Request, state: State) -> CreatedKey:
    deps = state.deps
    principal = deps.tokens.principal_from(request, AUDIENCE)
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
    version = deps.pepper_version
    info = await deps.store.insert(key_id=key_id, user_id=user_id, name=body.name,
                                   secret_hash=hash_secret(deps.peppers[version], secret),
                                   pepper_version=version, scopes=scopes)
    return CreatedKey(**{f: getattr(info, f) for f in info.__struct_fields__}, key=full_key)


@get("/v1/keys")
async def list_keys(request: Request, state: State, user_id: str | None = None) -> KeyList:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    owner = user_id if (user_id and principal.is_admin) else principal.subject
    return KeyList(data=await state.deps.store.list_for(owner))


@delete("/v1/keys/{key_id:str}", status_code=200)
async def revoke_key(request: Request, state: State, key_id: str) -> dict[str, object]:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    owner = None if principal.is_admin else principal.subject
    if not await state.deps.store.revoke(key_id, owner):
        # another user's key looks exactly like a missing one
        raise not_found("No such key.", code="key_not_found")
    return {"id": key_id, "revoked": True}


route_handlers = [introspect, create_key, list_keys, revoke_key]
