from __future__ import annotations

import asyncpg

from services.auth.schemas import KeyInfo

_INFO = ("key_id, user_id, name, scopes, extract(epoch from created_at)::bigint AS created, "
         "revoked_at IS NOT NULL AS revoked")


def _info(row: asyncpg.Record) -> KeyInfo:
    return KeyInfo(id=row["key_id"], user_id=row["user_id"], name=row["name"], scopes=list(row["scopes"]),
                   created=row["created"], revoked=row["revoked"])


class KeyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def insert(self, *, key_id: str, user_id: str, name: str, secret_hash: str, pepper_version: str,
                     scopes: list[str]) -> KeyInfo:
        row = await self.pool.fetchrow(
            f"""INSERT INTO api_keys (key_id, user_id, name, secret_hash, pepper_version, scopes)
                VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_INFO}""",
            key_id, user_id, name, secret_hash, pepper_version, scopes)
        return _info(row)

    async def upsert_bootstrap(self, *, key_id: str, user_id: str, secret_hash: str, pepper_version: str,
                               scopes: list[str]) -> None:
        await self.pool.execute(
            """INSERT INTO api_keys (key_id, user_id, name, secret_hash, pepper_version, scopes)
               VALUES ($1, $2, 'bootstrap admin', $3, $4, $5)
               ON CONFLICT (key_id) DO UPDATE SET secret_hash = EXCLUDED.secret_hash,
                   pepper_version = EXCLUDED.pepper_version, scopes = EXCLUDED.scopes, revoked_at = NULL""",
            key_id, user_id, secret_hash, pepper_version, scopes)

    async def credentials(self, key_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT key_id, user_id, secret_hash, pepper_version, scopes FROM api_keys "
            "WHERE key_id = $1 AND revoked_at IS NULL", key_id)

    async def list_for(self, user_id: str) -> list[KeyInfo]:
        rows = await self.pool.fetch(f"SELECT {_INFO} FROM api_keys WHERE user_id = $1 ORDER BY created_at",
                                     user_id)
        return [_info(r) for r in rows]

    async def revoke(self, key_id: str, owner: str | None) -> bool:
        """Revoke a key; with `owner`, only that user's key. False when there is no such key."""
        status = await self.pool.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL "
            "AND ($2::text IS NULL OR user_id = $2)", key_id, owner)
        return status.endswith(" 1")
