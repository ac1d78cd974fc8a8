from __future__ import annotations

import asyncpg
import msgspec

from common.openai_schema import EngineSpec
from common.contracts import ModelRecord

_COLUMNS = ("id, owned_by, context_length, engine, served_model, workers, params, fallback_model, enabled, "
            "extract(epoch from created_at)::bigint AS created")


def _record(row: asyncpg.Record) -> ModelRecord:
    return ModelRecord(
        id=row["id"], owned_by=row["owned_by"], context_length=row["context_length"],
        deployment=EngineSpec(engine=row["engine"], served_model=row["served_model"],
                              workers=msgspec.json.decode(row["workers"]),
                              params=msgspec.json.decode(row["params"])),
        fallback_model=row["fallback_model"], enabled=row["enabled"], created=row["created"],
    )


class ModelStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def enabled_models(self) -> list[ModelRecord]:
        rows = await self.pool.fetch(f"SELECT {_COLUMNS} FROM models WHERE enabled ORDER BY id")
        return [_record(r) for r in rows]

    async def get(self, model_id: str) -> ModelRecord | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM models WHERE id = $1", model_id)
        return _record(row) if row else None
