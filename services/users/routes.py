"""Users and plans. Admins manage users; a user reads only themself."""

from __future__ import annotations

from litestar import Request, get, post
from litestar.datastructures import State

from common.errors import ApiError, decode_body, not_found
from services.users.schemas import CreateUser, User, UserList

AUDIENCE = "users"


@post("/v1/users", status_code=201)
async def create_user(request: Request, state: State) -> User:
    state.deps.tokens.principal_from(request, AUDIENCE).require_scope("admin")
    body: CreateUser = decode_body(await request.body(), CreateUser)
    if not await state.deps.store.plan_exists(body.plan):
        raise ApiError(400, f"No plan named '{body.plan}'.", param="plan", code="invalid_value")
    return await state.deps.store.create(body.name, body.plan)


@get("/v1/users")
async def list_users(request: Request, state: State) -> UserList:
    state.deps.tokens.principal_from(request, AUDIENCE).require_scope("admin")
    return UserList(data=await state.deps.store.list())


@get("/v1/users/me")
async def read_me(request: Request, state: State) -> User:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    user = await state.deps.store.get(principal.subject)
    if user is None:
        raise not_found("No such user.", code="user_not_found")
    return user


@get("/v1/users/{user_id:str}")
async def read_user(request: Request, state: State, user_id: str) -> User:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    user = await state.deps.store.get(user_id) if (principal.is_admin or principal.subject == user_id) else None
    if user is None:  # another user's id looks exactly like a missing one
        raise not_found("No such user.", code="user_not_found")
    return user


@get("/internal/users/{user_id:str}")
async def internal_user(request: Request, state: State, user_id: str) -> User:
    state.deps.tokens.principal_from(request, AUDIENCE).require_scope("service")
    user = await state.deps.store.get(user_id)
    if user is None:
        raise not_found("No such user.", code="user_not_found")
    return user


route_handlers = [create_user, list_users, read_me, read_user, internal_user]
