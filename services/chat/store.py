"""The chat database: conversations and the turns the writer consumer persists."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg
import msgspec

from common.contracts import TurnEvent
from common.openai_schema import Usage
from services.chat.schemas import Conversation, HistoryTurn

_messages = msgspec.json.Decoder(list[dict[str, str]])
_metadata = msgspec.json.Decoder(dict[str, str])
HISTORY_LIMIT = 200  # newest turns read for context; a window never holds more


def _conversation(row: asyncpg.Record) -> Conversation:
    return Conversation(id=row["id"], created=int(row["created_at"].timestamp()), title=row["title"],
                        system_prompt=row["system_prompt"], metadata=_metadata.decode(row["metadata"]))


class TurnStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def insert_turn(self, turn: TurnEvent) -> bool:
        """Persist a turn once; False when it was already there (redelivery, the same request answered by
        another hop, or its Idempotency-Key answered already), or its conversation is deleted or another
        user's (a gateway's fallback layer publishes turns without the conversation check chat makes)."""
        status = await self.pool.execute(
            """INSERT INTO turns (turn_id, conversation_id, user_id, model, request_messages, assistant,
                                  finish_reason, prompt_tokens, completion_tokens, request_id, created_at,
                                  idempotency_key, request_hash, completion_id, degraded)
               SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15
               WHERE NOT EXISTS (SELECT 1 FROM conversations
                                 WHERE id = $2 AND (deleted_at IS NOT NULL OR user_id <> $3))
               ON CONFLICT DO NOTHING""",
            turn.turn_id, turn.conversation_id, turn.user_id, turn.model,
            msgspec.json.encode(turn.request_messages).decode(), turn.assistant, turn.finish_reason,
            turn.usage.prompt_tokens, turn.usage.completion_tokens, turn.request_id,
            dt.datetime.fromtimestamp(turn.created, dt.timezone.utc),
            turn.idempotency_key, turn.request_hash, turn.completion_id, turn.degraded,
        )
        return status.endswith(" 1")

    async def record_dead_turn(self, turn_id: str, reason: str, payload: bytes) -> None:
        """A turn Postgres refused for its content: settled for the spool, kept for an operator."""
        await self.pool.execute(
            "INSERT INTO dead_turns (turn_id, reason, payload) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            turn_id, reason, payload)

    async def settled(self, turns: list[TurnEvent]) -> set[str]:
        """Of these turns, the ids that need no more delivery: persisted; refused for their content (in
        the DLQ); belonging to a conversation deleted meanwhile; or answering an Idempotency-Key another
        stored turn already answers (two replicas answered the same key: the stored answer stands, the
        other is never stored)."""
        rows = await self.pool.fetch(
            """SELECT turn_id FROM turns WHERE turn_id = ANY($1::text[])
               UNION
               SELECT turn_id FROM dead_turns WHERE turn_id = ANY($1::text[])
               UNION
               SELECT t.turn_id FROM unnest($1::text[], $2::text[]) AS t(turn_id, conversation_id)
               JOIN conversations c ON c.id = t.conversation_id WHERE c.deleted_at IS NOT NULL
               UNION
               SELECT t.turn_id FROM unnest($1::text[], $3::text[], $4::text[]) AS t(turn_id, user_id, key)
               JOIN turns s ON s.user_id = t.user_id AND s.idempotency_key = t.key
               WHERE t.key <> '' AND s.idempotency_key <> ''""",  # the second lets turns_idempotency serve it
            [t.turn_id for t in turns], [t.conversation_id for t in turns], [t.user_id for t in turns],
            [t.idempotency_key for t in turns])
        return {r["turn_id"] for r in rows}

    async def by_idempotency_key(self, user_id: str, key: str) -> TurnEvent | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM turns WHERE user_id = $1 AND idempotency_key = $2", user_id, key)
        if row is None:
            return None
        return TurnEvent(
            turn_id=row["turn_id"], conversation_id=row["conversation_id"], user_id=row["user_id"],
            model=row["model"], request_messages=_messages.decode(row["request_messages"]),
            assistant=row["assistant"], finish_reason=row["finish_reason"],
            usage=Usage(row["prompt_tokens"], row["completion_tokens"], row["prompt_tokens"] + row["completion_tokens"]),
            request_id=row["request_id"], created=row["created_at"].timestamp(),
            idempotency_key=row["idempotency_key"], request_hash=row["request_hash"],
            completion_id=row["completion_id"], degraded=row["degraded"])

    async def history(self, conversation_id: str, limit: int = HISTORY_LIMIT) -> list[HistoryTurn]:
        """The newest `limit` turns of a conversation, oldest first."""
        rows = await self.pool.fetch(
            """SELECT turn_id, extract(epoch from created_at)::float8 AS created, request_messages, assistant,
                      degraded FROM turns WHERE conversation_id = $1 ORDER BY created_at DESC, turn_id DESC LIMIT $2""",
            conversation_id, limit)
        return [HistoryTurn(turn_id=r["turn_id"], created=r["created"],
                            messages=_messages.decode(r["request_messages"]), assistant=r["assistant"],
                            degraded=r["degraded"])
                for r in reversed(rows)]

    async def page(self, conversation_id: str, start: tuple[dt.datetime, str] | None, limit: int,
                   descending: bool) -> list[HistoryTurn]:
        """Up to `limit` turns in (created_at, turn_id) order, from `start` on (that turn included)."""
        op, order = ("<=", "DESC") if descending else (">=", "ASC")
        # two statements rather than `$2 IS NULL OR ...`: a prepared statement's generic plan could not
        # use the cursor as an index bound and would read every page from the conversation's start
        select = ("SELECT turn_id, created_at, request_messages, assistant, degraded FROM turns"
                  " WHERE conversation_id = $1")
        ordered = f"ORDER BY created_at {order}, turn_id {order}"
        if start is None:
            rows = await self.pool.fetch(f"{select} {ordered} LIMIT $2", conversation_id, limit)
        else:
            rows = await self.pool.fetch(f"{select} AND (created_at, turn_id) {op} ($2, $3) {ordered} LIMIT $4",
                                         conversation_id, start[0], start[1], limit)
        return [HistoryTurn(turn_id=r["turn_id"], created=r["created_at"].timestamp(),
                            messages=_messages.decode(r["request_messages"]), assistant=r["assistant"],
                            degraded=r["degraded"])
                for r in rows]

    async def created_at(self, conversation_id: str, turn_id: str) -> dt.datetime | None:
        return await self.pool.fetchval(
            "SELECT created_at FROM turns WHERE conversation_id = $1 AND turn_id = $2", conversation_id, turn_id)

    async def turns_of_user(self, user_id: str) -> list[asyncpg.Record]:
        return await self.pool.fetch("SELECT * FROM turns WHERE user_id = $1 ORDER BY created_at", user_id)


class ConversationStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(self, user_id: str, title: str, system_prompt: str, metadata: dict[str, str]) -> Conversation:
        row = await self.pool.fetchrow(
            """INSERT INTO conversations (id, user_id, title, system_prompt, metadata) VALUES ($1, $2, $3, $4, $5)
               RETURNING *""",
            f"conv_{uuid.uuid4().hex}", user_id, title, system_prompt, msgspec.json.encode(metadata).decode())
        return _conversation(row)

    async def get(self, conversation_id: str, user_id: str) -> Conversation | None:
        """The conversation if it exists, is not deleted and belongs to user_id; None otherwise (all alike)."""
        row = await self.pool.fetchrow(
            "SELECT * FROM conversations WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL",
            conversation_id, user_id)
        return _conversation(row) if row else None

    async def list(self, user_id: str, limit: int, before: str | None = None) -> tuple[list[Conversation], bool]:
        rows = await self.pool.fetch(
            """SELECT * FROM conversations c WHERE user_id = $1 AND deleted_at IS NULL
                 AND ($2::text IS NULL OR (created_at, id) < (SELECT created_at, id FROM conversations WHERE id = $2))
               ORDER BY created_at DESC, id DESC LIMIT $3""", user_id, before, limit + 1)
        return [_conversation(r) for r in rows[:limit]], len(rows) > limit

    async def delete(self, conversation_id: str, user_id: str) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "UPDATE conversations SET deleted_at = now() WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL",
                conversation_id, user_id)
            if not status.endswith(" 1"):
                return False
            await conn.execute("DELETE FROM turns WHERE conversation_id = $1", conversation_id)
            return True
