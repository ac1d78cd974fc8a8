"""What the chat database holds after a drill: every answered turn stored, and none stored twice."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass

from stack.drill.load import Sample


@dataclass
class TurnCheck:
    checked: int = 0  # answered turns that must be stored
    lost: int = 0  # of those, not in the database after the wait
    stored_twice: int = 0  # request ids (one request, any retries and failovers) with more than one turn
    stored_after_error: int = 0  # unkeyed requests whose client saw a failure, yet a turn was stored


def admin_dsn(stack, database: str) -> str:
    """The stack's own superuser URL for `database` (with its password where the stack has one)."""
    dsn = getattr(stack, "admin_dsn", None)
    return dsn(database) if dsn is not None else stack.config.database_url(database)


def _must_be_stored(s: Sample) -> bool:
    """An answer the platform owes the history: a clean answer the chat service gave, and in a
    conversation any answer with content, a fallback layer's flagged one too (never a cache replay)."""
    if not s.kind.startswith("chat") or s.cache == "hit":
        return False
    if "conv" in s.kind:
        return s.outcome in ("ok", "degraded")
    return s.outcome == "ok" and not s.layer


def wanted(samples: list[Sample]) -> tuple[set[str], set[tuple[str, str]]]:
    """Request ids (unkeyed requests) and (user, Idempotency-Key) pairs whose turn must be stored."""
    by_key: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    ids = set()
    for s in samples:
        if s.idempotency_key:
            by_key[(s.user, s.idempotency_key)].append(s)
        elif _must_be_stored(s):
            ids.add(s.request_id)
    keys = {pair for pair, tries in by_key.items() if any(_must_be_stored(s) for s in tries)}
    return ids, keys


async def check_turns(stack, samples: list[Sample], wait: float) -> TurnCheck:
    """Waits up to `wait` seconds for every owed turn (Kafka and the writer are asynchronous), then
    counts what is missing and what is doubled among the drill users' turns."""
    import asyncpg

    ids, keys = wanted(samples)
    users = sorted({s.user for s in samples})
    failed = {s.request_id for s in samples if s.kind.startswith("chat") and not s.idempotency_key
              and s.outcome in ("failed", "flagged")}
    check = TurnCheck(checked=len(ids) + len(keys))
    deadline = time.monotonic() + wait
    while True:
        try:
            conn = await asyncpg.connect(admin_dsn(stack, "chat"), timeout=5)
            try:
                rows = await conn.fetch("SELECT request_id, user_id, idempotency_key FROM turns "
                                        "WHERE user_id = ANY($1::text[])", users)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            rows = None
        if rows is not None:
            per_request: dict[str, int] = defaultdict(int)
            for r in rows:
                per_request[r["request_id"]] += 1
            stored_keys = {(r["user_id"], r["idempotency_key"]) for r in rows if r["idempotency_key"]}
            check.lost = len(ids - per_request.keys()) + len(keys - stored_keys)
            check.stored_twice = sum(1 for rid, n in per_request.items() if rid and n > 1)
            check.stored_after_error = len(failed & per_request.keys())
        if (rows is not None and not check.lost) or time.monotonic() > deadline:
            if rows is None:
                check.lost = check.checked
            return check
        await asyncio.sleep(0.5)
