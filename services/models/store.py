from __future__ import annotations

import asyncpg
import msgspec

from common.contracts import ModelRecord
from common.openai_schema import EngineSpec

_COLUMNS = ("id, owned_by, context_length, engine, served_model, workers, params, fallback_model, enabled, "
            "tokenizer, extract(epoch from created_at)::bigint AS created")
# columns an update may set, and how each value is written
_JSON_COLUMNS = {"workers", "params"}
_UPDATABLE = {"owned_by", "context_length", "engine", "served_model", "workers", "params", "fallback_model",
              "enabled", "tokenizer"}


class ModelExists(Exception):
    pass


def _record(row: asyncpg.Record) -> ModelRecord:
    return ModelRecord(
        id=row["id"], owned_by=row["owned_by"], context_length=row["context_length"],
        deployment=EngineSpec(engine=row["engine"], served_model=row["served_model"],
                              workers=msgspec.json.decode(row["workers"]),
                              params=msgspec.json.decode(row["params"])),
        fallback_model=row["fallback_model"], enabled=row["enabled"], created=row["created"],
        tokenizer=row["tokenizer"],
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

    async def fallback_chain(self, model_id: str, limit: int = 32) -> list[str]:
        """The ids reached by following fallback_model from `model_id` (itself excluded), in order."""
        rows = await self.pool.fetch(
            """WITH RECURSIVE chain(id, depth) AS (
                   SELECT fallback_model, 1 FROM models WHERE id = $1 AND fallback_model IS NOT NULL
                   UNION ALL
                   SELECT m.fallback_model, c.depth + 1 FROM models m JOIN chain c ON m.id = c.id
                   WHERE m.fallback_model IS NOT NULL AND c.depth < $2)
               SELECT id FROM chain ORDER BY depth""", model_id, limit)
        return [r["id"] for r in rows]

    async def insert(self, fields: dict[str, object]) -> ModelRecord:
        values = {k: (msgspec.json.encode(v).decode() if k in _JSON_COLUMNS else v) for k, v in fields.items()}
        names = list(values)
        try:
            row = await self.pool.fetchrow(
                f"INSERT INTO models ({', '.join(names)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(names)))}) "
                f"RETURNING {_COLUMNS}", *values.values())
        except asyncpg.UniqueViolationError:
            raise ModelExists(fields["id"]) from None
        return _record(row)

    async def update(self, model_id: str, fields: dict[str, object]) -> ModelRecord | None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        values = {k: (msgspec.json.encode(v).decode() if k in _JSON_COLUMNS else v) for k, v in fields.items()}
        sets = [f"{name} = ${i + 2}" for i, name in enumerate(values)] + ["updated_at = now()"]
        row = await self.pool.fetchrow(
            f"UPDATE models SET {', '.join(sets)} WHERE id = $1 RETURNING {_COLUMNS}", model_id, *values.values())
        return _record(row) if row else None
