"""The chat service's turn spool on its own: what survives a crash while the broker is unreachable.

No stack needed: the broker address points at a port nothing listens on (a real, unreachable broker),
and the database is unreachable too, so every turn stays spooled."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from common.contracts import TurnEvent, UsageEvent
from common.events import EventPublisher
from common.openai_schema import Usage
from services.chat.outbox import OutboxFull, TurnOutbox
from stack.servers import free_port


def unreachable_broker() -> str:
    return f"127.0.0.1:{free_port()}"


async def database_down(turns: list[TurnEvent]) -> set[str]:
    raise ConnectionRefusedError("postgres is down")


def turn(i: int, conversation: str = "conv-a", key: str = "") -> tuple[TurnEvent, UsageEvent]:
    now = time.time()
    event = TurnEvent(turn_id=f"turn-{i}", conversation_id=conversation, user_id="usr-1", model="synthetic",
                      request_messages=[{"role": "user", "content": f"question {i}"}], assistant=f"answer {i}",
                      finish_reason="stop", usage=Usage(3, 2, 5), created=now + i * 1e-3, idempotency_key=key)
    return event, UsageEvent(event_id=event.turn_id, user_id="usr-1", key_id=None, model="synthetic",
                             prompt_tokens=3, completion_tokens=2, created=now)


async def open_outbox(directory: Path, **options) -> tuple[TurnOutbox, EventPublisher]:
    publisher = EventPublisher(unreachable_broker(), client_id="outbox-test")
    await publisher.start()
    outbox = TurnOutbox(directory, publisher, database_down, **options)
    try:
        await outbox.start()
    except BaseException:
        await publisher.stop()
        raise
    return outbox, publisher


async def close(outbox: TurnOutbox, publisher: EventPublisher) -> None:
    await outbox.stop(timeout=0)
    await publisher.stop()


async def test_turns_spooled_while_the_broker_is_away_survive_a_restart(tmp_path: Path):
    outbox, publisher = await open_outbox(tmp_path)
    await asyncio.gather(*(outbox.append(*turn(i, key="k-7" if i == 7 else "")) for i in range(50)))
    assert outbox.pending == 50
    await close(outbox, publisher)  # as if the process stopped before the broker came back

    again, publisher = await open_outbox(tmp_path)
    try:
        assert again.pending == 50
        assert [t.turn_id for t in again.pending_turns("conv-a")] == [f"turn-{i}" for i in range(50)]
        assert again.find_idempotent("usr-1", "k-7").assistant == "answer 7"
    finally:
        await close(again, publisher)


async def test_a_torn_last_line_from_a_crash_is_skipped(tmp_path: Path):
    outbox, publisher = await open_outbox(tmp_path)
    for i in range(3):
        await outbox.append(*turn(i))
    await close(outbox, publisher)
    segment = sorted(tmp_path.glob("turns-*.jsonl"))[-1]
    with segment.open("ab") as fh:
        fh.write(b'{"turn": {"turn_id": "turn-9", "conv')  # the crash hit mid-write: never acknowledged

    again, publisher = await open_outbox(tmp_path)
    try:
        assert again.pending == 3
    finally:
        await close(again, publisher)


async def test_a_full_spool_refuses_new_work_instead_of_growing(tmp_path: Path):
    outbox, publisher = await open_outbox(tmp_path, max_pending=5)
    try:
        for i in range(5):
            outbox.check_capacity()
            await outbox.append(*turn(i))
        with pytest.raises(OutboxFull):
            outbox.check_capacity()
        await outbox.append(*turn(5))  # an answered turn is never refused, only new work is
        assert outbox.pending == 6
    finally:
        await close(outbox, publisher)


async def test_two_processes_cannot_share_one_spool(tmp_path: Path):
    outbox, publisher = await open_outbox(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="another process"):
            await open_outbox(tmp_path)
    finally:
        await close(outbox, publisher)
