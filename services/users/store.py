from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from common.contracts import UsageEvent
from common.db import Database
from services.users.schemas import Plan, User

_SELECT = """SELECT u.id, u.name, u.disabled, extract(epoch from u.created_at)::bigint AS created,
                    p.name AS plan_name, p.requests_per_min, p.tokens_per_day, p.max_tokens, p.allowed_models
             FROM users u JOIN plans p ON p.name = u.plan"""


def _user(row: asyncpg.Record) -> User:
    return User(id=row["id"], name=row["name"], disabled=row["disabled"], created=row["created"],
                plan=Plan(name=row["plan_name"], requests_per_min=row["requests_per_min"],
                          tokens_per_day=row["tokens_per_day"], max_tokens=row["max_tokens"],
                          allowed_models=list(row["allowed_models"])))


class UserStore:
    def __init__(self, db: Database) -> None:
        self.pool = db

    async def plan_exists(self, name: str) -> bool:
        return bool(await self.pool.fetchval("SELECT 1 FROM plans WHERE name = $1", name))

    async def create_plan(self, plan: Plan) -> bool:
        """False when a plan of that name exists (it is left as it is)."""
        status = await self.pool.execute(
            """INSERT INTO plans (name, requests_per_min, tokens_per_day, max_tokens, allowed_models)
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING""",
            plan.name, plan.requests_per_min, plan.tokens_per_day, plan.max_tokens, plan.allowed_models)
        return status.endswith(" 1")

    async def plans(self, name: str | None = None) -> list[Plan]:
        rows = await self.pool.fetch(
            """SELECT name, requests_per_min, tokens_per_day, max_tokens, allowed_models FROM plans
               WHERE $1::text IS NULL OR name = $1 ORDER BY name""", name)
        return [Plan(name=r["name"], requests_per_min=r["requests_per_min"], tokens_per_day=r["tokens_per_day"],
                     max_tokens=r["max_tokens"], allowed_models=list(r["allowed_models"])) for r in rows]

    async def create(self, name: str, plan: str) -> User:
        user_id = f"usr_{uuid.uuid4().hex[:16]}"
        await self.pool.execute("INSERT INTO users (id, name, plan) VALUES ($1, $2, $3)", user_id, name, plan)
        user = await self.get(user_id)
        assert user is not None
        return user

    async def get(self, user_id: str, conn: asyncpg.Connection | None = None) -> User | None:
        row = await (conn or self.pool).fetchrow(f"{_SELECT} WHERE u.id = $1", user_id)
        return _user(row) if row else None

    async def list(self) -> list[User]:
        return [_user(r) for r in await self.pool.fetch(f"{_SELECT} ORDER BY u.created_at")]

    async def update(self, conn: asyncpg.Connection, user_id: str, *, name: str | None = None,
                     plan: str | None = None, disabled: bool | None = None) -> bool:
        status = await conn.execute(
            "UPDATE users SET name = coalesce($2, name), plan = coalesce($3, plan), "
            "disabled = coalesce($4, disabled) WHERE id = $1", user_id, name, plan, disabled)
        return status.endswith(" 1")


class LedgerStore:
    """The usage ledger: what each user used, per UTC day."""

    def __init__(self, db: Database) -> None:
        self.pool = db

    async def record(self, event: UsageEvent) -> bool:
        """Add one usage event; False when it was already there (redelivery)."""
        created = dt.datetime.fromtimestamp(event.created, dt.timezone.utc)
        status = await self.pool.execute(
            """INSERT INTO usage_ledger (event_id, user_id, key_id, model, prompt_tokens, completion_tokens, day,
                                         created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING""",
            event.event_id, event.user_id, event.key_id, event.model, event.prompt_tokens,
            event.completion_tokens, created.date(), created)
        return status.endswith(" 1")

    async def day(self, user_id: str, day: dt.date) -> asyncpg.Record:
        return await self.pool.fetchrow(
            """SELECT coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
                      coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
                      count(*)::bigint AS requests
               FROM usage_ledger WHERE user_id = $1 AND day = $2""", user_id, day)
