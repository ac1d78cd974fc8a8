from __future__ import annotations

import time

import asyncpg
import msgspec

from common.contracts import AuditEvent
from common.db import Database
from services.auth.schemas import AuditRecord, KeyInfo

_INFO = ("key_id, user_id, name, scopes, extract(epoch from created_at)::bigint AS created, "
         "revoked_at IS NOT NULL AS revoked, generation, "
         "extract(epoch from previous_expires_at)::float8 AS previous_expires_at")


def _info(row: asyncpg.Record) -> KeyInfo:
    grace_end = row["previous_expires_at"]
    return KeyInfo(id=row["key_id"], user_id=row["user_id"], name=row["name"], scopes=list(row["scopes"]),
                   created=row["created"], revoked=row["revoked"], rotations=row["generation"],
                   previous_secret_expires_at=int(grace_end) if grace_end and grace_end > time.time() else None)


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.pool = db

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
                   pepper_version = EXCLUDED.pepper_version, scopes = EXCLUDED.scopes, revoked_at = NULL,
                   previous_hash = NULL, previous_expires_at = NULL""",
            key_id, user_id, secret_hash, pepper_version, scopes)

    async def credentials(self, key_id: str) -> asyncpg.Record | None:
        """What introspection compares against: the current secret and, in its grace window, the previous."""
        return await self.pool.fetchrow(
            """SELECT key_id, user_id, scopes, secret_hash, pepper_version, generation, previous_hash,
                      previous_pepper_version, extract(epoch from previous_expires_at)::float8 AS previous_expires_at
               FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL""", key_id)

    async def rehash(self, key_id: str, *, previous: bool, old_hash: str, new_hash: str, pepper_version: str) -> None:
        """Move a secret's hash to the current pepper (re-hash on use after a pepper rotation)."""
        if previous:
            await self.pool.execute(
                "UPDATE api_keys SET previous_hash = $3, previous_pepper_version = $4 "
                "WHERE key_id = $1 AND previous_hash = $2", key_id, old_hash, new_hash, pepper_version)
        else:
            await self.pool.execute(
                "UPDATE api_keys SET secret_hash = $3, pepper_version = $4 WHERE key_id = $1 AND secret_hash = $2",
                key_id, old_hash, new_hash, pepper_version)

    async def get(self, key_id: str, owner: str | None) -> KeyInfo | None:
        row = await self.pool.fetchrow(
            f"SELECT {_INFO} FROM api_keys WHERE key_id = $1 AND ($2::text IS NULL OR user_id = $2)", key_id, owner)
        return _info(row) if row else None

    async def list_for(self, user_id: str) -> list[KeyInfo]:
        rows = await self.pool.fetch(f"SELECT {_INFO} FROM api_keys WHERE user_id = $1 ORDER BY created_at",
                                     user_id)
        return [_info(r) for r in rows]

    async def revoke(self, key_id: str, owner: str | None) -> str | None:
        """Revoke a key; with `owner`, only that user's key. Its user id, or None when there is no such key."""
        return await self.pool.fetchval(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL "
            "AND ($2::text IS NULL OR user_id = $2) RETURNING user_id", key_id, owner)

    async def rotate(self, key_id: str, owner: str | None, *, secret_hash: str, pepper_version: str,
                     grace_seconds: int) -> KeyInfo | None:
        """Give a key a new secret; the current one becomes the previous, valid for `grace_seconds`
        (an older previous secret stops at once). None when there is no such live key."""
        row = await self.pool.fetchrow(
            f"""UPDATE api_keys SET previous_hash = secret_hash, previous_pepper_version = pepper_version,
                    previous_expires_at = now() + make_interval(secs => $5), secret_hash = $3,
                    pepper_version = $4, generation = generation + 1, rotated_at = now()
                WHERE key_id = $1 AND revoked_at IS NULL AND ($2::text IS NULL OR user_id = $2)
                RETURNING {_INFO}""",
            key_id, owner, secret_hash, pepper_version, float(grace_seconds))
        return _info(row) if row else None


class MarkerStore:
    """The durable copy of the auth-change markers (see common/contracts.py)."""

    def __init__(self, db: Database) -> None:
        self.pool = db

    async def put(self, field: str, change: bytes, at: float) -> None:
        await self.pool.execute(
            """INSERT INTO auth_markers (field, change, at) VALUES ($1, $2, to_timestamp($3))
               ON CONFLICT (field) DO UPDATE SET change = EXCLUDED.change, at = EXCLUDED.at""",
            field, change.decode(), at)

    async def delete(self, field: str) -> None:
        await self.pool.execute("DELETE FROM auth_markers WHERE field = $1", field)

    async def all(self) -> dict[str, bytes]:
        rows = await self.pool.fetch("SELECT field, change FROM auth_markers")
        return {r["field"]: r["change"].encode() for r in rows}

    async def prune(self, older_than: float) -> list[str]:
        rows = await self.pool.fetch("DELETE FROM auth_markers WHERE at < to_timestamp($1) RETURNING field",
                                     older_than)
        return [r["field"] for r in rows]


class AuditStore:
    def __init__(self, db: Database) -> None:
        self.pool = db

    async def insert(self, event: AuditEvent) -> None:
        await self.pool.execute(
            """INSERT INTO audit_log (event_id, action, actor, target, outcome, request_id, detail, at)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, to_timestamp($8)) ON CONFLICT (event_id) DO NOTHING""",
            event.event_id, event.action, event.actor, event.target, event.outcome, event.request_id,
            msgspec.json.encode(event.detail).decode(), event.at)

    async def recent(self, *, limit: int, action: str | None, actor: str | None, target: str | None,
                     request_id: str | None) -> list[AuditRecord]:
        rows = await self.pool.fetch(
            """SELECT event_id, action, actor, target, outcome, request_id, detail::text AS detail,
                      extract(epoch from at)::float8 AS at
               FROM audit_log
               WHERE ($2::text IS NULL OR action = $2) AND ($3::text IS NULL OR actor = $3)
                 AND ($4::text IS NULL OR target = $4) AND ($5::text IS NULL OR request_id = $5)
               ORDER BY at DESC LIMIT $1""", limit, action, actor, target, request_id)
        return [AuditRecord(event_id=r["event_id"], action=r["action"], actor=r["actor"], target=r["target"],
                            outcome=r["outcome"], request_id=r["request_id"],
                            detail=msgspec.json.decode(r["detail"], type=dict[str, str]), at=r["at"])
                for r in rows]
