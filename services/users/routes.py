"""Users and plans (admins manage users; a user reads only themself) and today's usage."""

from __future__ import annotations

import calendar
import datetime as dt

import msgspec
from litestar import Request, get, patch, post
from litestar.datastructures import State

from common.errors import ApiError, decode_body, not_found
from common.openapi import documented
from common.security import Principal
from services.users.schemas import CreatePlan, CreateUser, Plan, PlanList, UpdateUser, Usage, User, UserList

AUDIENCE = "users"


def _caller(request: Request, state: State) -> Principal:
    return state.deps.tokens.principal_from(request, AUDIENCE)


def _no_user() -> ApiError:
    return not_found("No such user.", code="user_not_found")


@post("/v1/users", status_code=201, **documented(CreateUser, errors=(403,)))
async def create_user(request: Request, state: State) -> User:
    deps = state.deps
    admin = _caller(request, state)
    admin.require_scope("admin")
    body: CreateUser = decode_body(await request.body(), CreateUser)
    if not await deps.store.plan_exists(body.plan):
        raise ApiError(400, f"No plan named '{body.plan}'.", param="plan", code="invalid_value")
    user = await deps.store.create(body.name, body.plan)
    deps.audit.record("user.created", actor=admin.subject, target=user.id, detail={"plan": body.plan})
    return user


@get("/v1/users", **documented(errors=(403,)))
async def list_users(request: Request, state: State) -> UserList:
    _caller(request, state).require_scope("admin")
    return UserList(data=await state.deps.store.list())


@get("/v1/users/me", **documented(errors=(404,)))
async def read_me(request: Request, state: State) -> User:
    principal = _caller(request, state)
    user = await state.deps.store.get(principal.subject)
    if user is None:
        raise _no_user()
    return user


@get("/v1/users/{user_id:str}", **documented(errors=(403, 404)))
async def read_user(request: Request, state: State, user_id: str) -> User:
    principal = _caller(request, state)
    user = await state.deps.store.get(user_id) if (principal.is_admin or principal.subject == user_id) else None
    if user is None:  # another user's id looks exactly like a missing one
        raise _no_user()
    return user


@patch("/v1/users/{user_id:str}", **documented(UpdateUser, errors=(403, 404)))
async def update_user(request: Request, state: State, user_id: str) -> User:
    deps = state.deps
    admin = _caller(request, state)
    admin.require_scope("admin")
    body: UpdateUser = decode_body(await request.body(), UpdateUser)
    if body.plan is not None and not await deps.store.plan_exists(body.plan):
        raise ApiError(400, f"No plan named '{body.plan}'.", param="plan", code="invalid_value")
    async with deps.store.pool.acquire() as conn, conn.transaction():
        if not await deps.store.update(conn, user_id, name=body.name, plan=body.plan):
            raise _no_user()
        if body.plan is not None:  # gateways must stop enforcing the old plan; rolled back if they cannot hear
            await deps.auth.report("plan_changed", user_id)
        user = await deps.store.get(user_id, conn)
    deps.audit.record("user.updated", actor=admin.subject, target=user_id,
                      detail={k: v for k, v in (("plan", body.plan), ("name", body.name)) if v is not None})
    assert user is not None
    return user


async def _set_disabled(request: Request, state: State, user_id: str, disabled: bool) -> User:
    deps = state.deps
    admin = _caller(request, state)
    admin.require_scope("admin")
    if disabled and user_id == admin.subject:
        raise ApiError(400, "An admin cannot disable themself.", param="user_id", code="invalid_value")
    async with deps.store.pool.acquire() as conn, conn.transaction():
        if not await deps.store.update(conn, user_id, disabled=disabled):
            raise _no_user()
        # the auth service records and broadcasts it; if it cannot, the change is rolled back (503)
        await deps.auth.report("user_disabled" if disabled else "user_enabled", user_id)
        user = await deps.store.get(user_id, conn)
    deps.audit.record("user.disabled" if disabled else "user.enabled", actor=admin.subject, target=user_id)
    assert user is not None
    return user


@post("/v1/users/{user_id:str}/disable", status_code=200, **documented(errors=(403, 404)))
async def disable_user(request: Request, state: State, user_id: str) -> User:
    return await _set_disabled(request, state, user_id, True)


@post("/v1/users/{user_id:str}/enable", status_code=200, **documented(errors=(403, 404)))
async def enable_user(request: Request, state: State, user_id: str) -> User:
    return await _set_disabled(request, state, user_id, False)


@get("/v1/usage", **documented(errors=(403, 404)))
async def read_usage(request: Request, state: State, user_id: str | None = None) -> Usage:
    deps = state.deps
    principal = _caller(request, state)
    if user_id and user_id != principal.subject and not principal.is_admin:
        raise _no_user()  # another user's usage looks exactly like a missing user's
    user = await deps.store.get(user_id or principal.subject)
    if user is None:
        raise _no_user()
    today = dt.datetime.now(dt.timezone.utc).date()
    row = await deps.ledger.day(user.id, today)
    used = row["prompt_tokens"] + row["completion_tokens"]
    midnight = calendar.timegm((today + dt.timedelta(days=1)).timetuple())
    return Usage(user_id=user.id, date=today.isoformat(), plan=user.plan.name,
                 tokens_per_day=user.plan.tokens_per_day, used_tokens=used,
                 remaining_tokens=max(0, user.plan.tokens_per_day - used), prompt_tokens=row["prompt_tokens"],
                 completion_tokens=row["completion_tokens"], requests=row["requests"], resets_at=midnight)


@post("/v1/plans", status_code=201, **documented(CreatePlan, errors=(403, 409)))
async def create_plan(request: Request, state: State) -> Plan:
    """A new plan, for users created on it or moved to it. Plans are not edited in place: move users to
    a new plan (PATCH /v1/users/{id}), which every gateway hears of at once."""
    deps = state.deps
    admin = _caller(request, state)
    admin.require_scope("admin")
    plan = Plan(**msgspec.structs.asdict(decode_body(await request.body(), CreatePlan)))
    if not await deps.store.create_plan(plan):
        raise ApiError(409, f"A plan named '{plan.name}' exists; plans are not changed in place.", param="name",
                       code="plan_exists")
    deps.audit.record("plan.created", actor=admin.subject, target=plan.name,
                      detail={"requests_per_min": str(plan.requests_per_min),
                              "tokens_per_day": str(plan.tokens_per_day), "max_tokens": str(plan.max_tokens),
                              "allowed_models": ",".join(plan.allowed_models)})
    return plan


@get("/v1/plans", **documented(errors=(403,)))
async def list_plans(request: Request, state: State) -> PlanList:
    _caller(request, state).require_scope("admin")
    return PlanList(data=await state.deps.store.plans())


@get("/v1/plans/{name:str}", **documented(errors=(403, 404)))
async def read_plan(request: Request, state: State, name: str) -> Plan:
    _caller(request, state).require_scope("admin")
    found = await state.deps.store.plans(name)
    if not found:
        raise not_found(f"No plan named '{name}'.", code="plan_not_found", param="name")
    return found[0]


@get("/internal/users/{user_id:str}")
async def internal_user(request: Request, state: State, user_id: str) -> User:
    _caller(request, state).require_scope("service")
    user = await state.deps.store.get(user_id)
    if user is None:
        raise _no_user()
    return user


route_handlers = [create_user, list_users, read_me, read_user, update_user, disable_user, enable_user, read_usage,
                  create_plan, list_plans, read_plan, internal_user]
