from __future__ import annotations

import datetime as dt

import asyncpg
import msgspec

from common.contracts import TurnEvent


class TurnStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def insert_turn(self, turn: TurnEvent) -> bool:
        """Persist a turn once; returns False when it was already there (redelivery)."""
        status = await self.pool.execute(
            """INSERT INTO turns (turn_id, conversation_id, user_id, model, request_messages, assistant,
                                  finish_reason, prompt_tokens, completion_tokens, request_id, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
               ON CONFLICT (turn_id) DO NOTHING""",
            turn.turn_id, turn.conversation_id, turn.user_id, turn.model,
            msgspec.json.encode(turn.request_messages).decode(), turn.assistant, turn.finish_reason,
            turn.usage.prompt_tokens, turn.usage.completion_tokens, turn.request_id,
            dt.datetime.fromtimestamp(turn.created, dt.timezone.utc),
        )
        return status.endswith(" 1")

    async def turns_of_user(self, user_id: str) -> list[asyncpg.Record]:
        return await self.pool.fetch("SELECT * FROM turns WHERE user_id = $1 ORDER BY created_at", user_id)
