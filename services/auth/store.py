from __future__ import annotations

import time
from collections.abc import Callable

import asyncpg
import msgspec

from common.contracts import AuditEvent
from common.db import Database
from services.auth.rotations import REPLAY_SECONDS
from services.auth.schemas import AuditRecord, KeyInfo

# the last moment any rotated-away secret of the key still works
_INFO = ("key_id, user_id, name, scopes, extract(epoch from created_at)::bigint AS created, "
         "revoked_at IS NOT NULL AS revoked, generation, "
         "(SELECT extract(epoch from max(p.expires_at))::float8 FROM previous_secrets p "
         " WHERE p.key_id = api_keys.key_id AND p.expires_at > now()) AS previous_expires_at")
# a key's rotated-away secrets still in their grace window, newest first (JSON, read with the key: one
# query whether or not the key exists, so introspection's timing does not tell)
_PREVIOUS = """COALESCE((SELECT jsonb_agg(jsonb_build_object(
                   'generation', p.generation, 'secret_hash', p.secret_hash, 'pepper_version', p.pepper_version,
                   'expires_at', extract(epoch from p.expires_at)::float8) ORDER BY p.generation DESC)
               FROM previous_secrets p WHERE p.key_id = api_keys.key_id AND p.expires_at > now()), '[]')::text"""


class PreviousSecret(msgspec.Struct, kw_only=True):
    """A secret a rotation moved aside: it keeps working until `expires_at`, whatever rotations follow."""

    generation: int
    secret_hash: str
    pepper_version: str
    expires_at: float


class Credentials(msgspec.Struct, kw_only=True):
    key_id: str
    user_id: str
    scopes: list[str]
    secret_hash: str
    pepper_version: str
    generation: int
    previous: list[PreviousSecret]


class Rotation(msgspec.Struct, kw_only=True):
    """A rotation's outcome. `replayed`: the sealed first answer to this Idempotency-Key (nothing rotated);
    `graces`: generation -> when it stops, for every rotated-away secret still in its window."""

    info: KeyInfo
    graces: dict[int, float]
    replayed: bytes | None = None
    replay_pepper: str = ""
    request_hash: str = ""


_previous_decoder = msgspec.json.Decoder(list[PreviousSecret])


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
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO api_keys (key_id, user_id, name, secret_hash, pepper_version, scopes)
                   VALUES ($1, $2, 'bootstrap admin', $3, $4, $5)
                   ON CONFLICT (key_id) DO UPDATE SET secret_hash = EXCLUDED.secret_hash,
                       pepper_version = EXCLUDED.pepper_version, scopes = EXCLUDED.scopes, revoked_at = NULL""",
                key_id, user_id, secret_hash, pepper_version, scopes)
            await conn.execute("DELETE FROM previous_secrets WHERE key_id = $1", key_id)

    async def credentials(self, key_id: str) -> Credentials | None:
        """What introspection compares against: the current secret and those still in their grace window."""
        row = await self.pool.fetchrow(
            f"""SELECT key_id, user_id, scopes, secret_hash, pepper_version, generation, {_PREVIOUS} AS previous
                FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL""", key_id)
        if row is None:
            return None
        return Credentials(key_id=row["key_id"], user_id=row["user_id"], scopes=list(row["scopes"]),
                           secret_hash=row["secret_hash"], pepper_version=row["pepper_version"],
                           generation=row["generation"], previous=_previous_decoder.decode(row["previous"]))

    async def rehash(self, key_id: str, *, previous_generation: int | None, old_hash: str, new_hash: str,
                     pepper_version: str) -> None:
        """Move a secret's hash to the current pepper (re-hash on use after a pepper rotation)."""
        if previous_generation is not None:
            await self.pool.execute(
                "UPDATE previous_secrets SET secret_hash = $4, pepper_version = $5 "
                "WHERE key_id = $1 AND generation = $2 AND secret_hash = $3",
                key_id, previous_generation, old_hash, new_hash, pepper_version)
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
                     grace_seconds: int, idempotency_key: str | None = None, request_hash: str = "",
                     seal: Callable[[KeyInfo], bytes] | None = None) -> Rotation | None:
        """Give a key a new secret; the current one keeps working for `grace_seconds` (0: not at all), and
        every secret an earlier rotation moved aside keeps the grace it was promised. With an
        `idempotency_key` already used on this key, nothing rotates: the first answer comes back (sealed)
        for the caller to open. `seal(info)` makes the sealed answer of a new rotation. None when there is
        no such live key."""
        async with self.pool.acquire() as conn, conn.transaction():
            # one rotation of a key at a time: the second sees the first's secret as the current one
            current = await conn.fetchrow(
                """SELECT key_id FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL
                   AND ($2::text IS NULL OR user_id = $2) FOR UPDATE""", key_id, owner)
            if current is None:
                return None
            if idempotency_key is not None:
                done = await conn.fetchrow(
                    """SELECT request_hash, pepper_version, sealed_answer FROM key_rotations
                       WHERE key_id = $1 AND idempotency_key = $2 AND created_at > now() - make_interval(secs => $3)""",
                    key_id, idempotency_key, float(REPLAY_SECONDS))
                if done is not None:
                    return Rotation(info=_info(await conn.fetchrow(f"SELECT {_INFO} FROM api_keys WHERE key_id = $1",
                                                                   key_id)),
                                    graces=await self._graces(conn, key_id), replayed=done["sealed_answer"],
                                    replay_pepper=done["pepper_version"], request_hash=done["request_hash"])
            await conn.execute("DELETE FROM previous_secrets WHERE key_id = $1 AND expires_at <= now()", key_id)
            if grace_seconds > 0:
                await conn.execute(
                    """INSERT INTO previous_secrets (key_id, generation, secret_hash, pepper_version, expires_at)
                       SELECT key_id, generation, secret_hash, pepper_version, now() + make_interval(secs => $2)
                       FROM api_keys WHERE key_id = $1""", key_id, float(grace_seconds))
            row = await conn.fetchrow(
                f"""UPDATE api_keys SET secret_hash = $2, pepper_version = $3, generation = generation + 1,
                        rotated_at = now() WHERE key_id = $1 RETURNING {_INFO}""",
                key_id, secret_hash, pepper_version)
            info = _info(row)
            if idempotency_key is not None and seal is not None:
                await conn.execute(
                    "DELETE FROM key_rotations WHERE key_id = $1 AND created_at <= now() - make_interval(secs => $2)",
                    key_id, float(REPLAY_SECONDS))
                await conn.execute(
                    """INSERT INTO key_rotations (key_id, idempotency_key, request_hash, pepper_version, sealed_answer)
                       VALUES ($1, $2, $3, $4, $5)
                       ON CONFLICT (key_id, idempotency_key) DO UPDATE SET request_hash = EXCLUDED.request_hash,
                           pepper_version = EXCLUDED.pepper_version, sealed_answer = EXCLUDED.sealed_answer,
                           created_at = now()""",
                    key_id, idempotency_key, request_hash, pepper_version, seal(info))
            return Rotation(info=info, graces=await self._graces(conn, key_id))

    @staticmethod
    async def _graces(conn: asyncpg.Connection, key_id: str) -> dict[int, float]:
        rows = await conn.fetch(
            """SELECT generation, extract(epoch from expires_at)::float8 AS until FROM previous_secrets
               WHERE key_id = $1 AND expires_at > now()""", key_id)
        return {r["generation"]: r["until"] for r in rows}


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
