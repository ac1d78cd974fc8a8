from __future__ import annotations

import uuid

import asyncpg

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
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def plan_exists(self, name: str) -> bool:
        return bool(await self.pool.fetchval("SELECT 1 FROM plans WHERE name = $1", name))

    async def create(self, name: str, plan: str) -> User:
        user_id = f"usr_{uuid.uuid4().hex[:16]}"
        await self.pool.execute("INSERT INTO users (id, name, plan) VALUES ($1, $2, $3)", user_id, name, plan)
        user = await self.get(user_id)
        assert user is not None
        return user

    async def get(self, user_id: str) -> User | None:
        row = await self.pool.fetchrow(f"{_SELECT} WHERE u.id = $1", user_id)
        return _user(row) if row else None

    async def list(self) -> list[User]:
        return [_user(r) for r in await self.pool.fetch(f"{_SELECT} ORDER BY u.created_at")]
