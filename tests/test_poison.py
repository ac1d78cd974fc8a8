"""Poison never blocks the line: a turn Postgres refuses for its content (a NUL in a message), whether it
comes through the topic or from the spool a previous run left, goes to chat.turns.v1.dlq with its reason
and is skipped; the turns behind it are stored at once, and the spool settles it instead of republishing
it for ever."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import asyncpg
import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kafka_support import produce
from support import eventually

from common.contracts import TURNS_TOPIC, TurnEvent, UsageEvent
from common.events import DLQ_REASON_HEADER, EventPublisher
from common.openai_schema import Usage
from services.chat.outbox import SEGMENT_PREFIX, SEGMENT_SUFFIX, SpoolRecord, TurnOutbox
from services.chat.store import TurnStore
from stack.local import LocalStack

STORED_WITHIN = 5.0  # seconds for the 100 turns behind a poison one (issue 23)


def a_turn(user: str, conversation: str, text: str) -> TurnEvent:
    return TurnEvent(turn_id=f"turn_{uuid.uuid4().hex}", conversation_id=conversation, user_id=user,
                     model="synthetic", request_messages=[{"role": "user", "content": text}],
                     assistant=f"answer to {text}", finish_reason="stop", usage=Usage(1, 1, 2), created=time.time())


def stored(stack: LocalStack, turn_ids: list[str]) -> set[str]:
    with psycopg.connect(stack.admin_dsn("chat"), connect_timeout=2) as conn:
        rows = conn.execute("SELECT turn_id FROM turns WHERE turn_id = ANY(%s)", (turn_ids,))
        return {r[0] for r in rows}


def dead_reason(stack: LocalStack, turn_id: str) -> str | None:
    with psycopg.connect(stack.admin_dsn("chat"), connect_timeout=2) as conn:
        row = conn.execute("SELECT reason FROM dead_turns WHERE turn_id = %s", (turn_id,)).fetchone()
        return row[0] if row else None


async def in_dlq(stack: LocalStack, value: bytes, timeout: float = 20) -> dict[str, bytes]:
    """The DLQ copy of the message `value`: its headers."""
    dlq = AIOKafkaConsumer(f"{TURNS_TOPIC}.dlq", bootstrap_servers=f"127.0.0.1:{stack.config.port('kafka')}",
                           group_id=None, auto_offset_reset="earliest")
    await dlq.start()
    found: list[dict[str, bytes]] = []
    try:
        async def arrived() -> bool:
            batches = await dlq.getmany(timeout_ms=500)
            found.extend(dict(r.headers) for records in batches.values() for r in records if r.value == value)
            return bool(found)

        await eventually(arrived, timeout=timeout, what="the poison turn in the DLQ")
    finally:
        await dlq.stop()
    return found[0]


async def test_a_poison_turn_in_the_topic_does_not_stop_storage_for_anyone_else(stack):
    conversation = f"conv_{uuid.uuid4().hex}"
    poison = a_turn(f"usr_poison_{uuid.uuid4().hex[:8]}", conversation, "a\u0000b")
    poison_value = msgspec.json.encode(poison)
    # the same key as the poison: the same partition, queued right behind it
    behind = [a_turn(f"usr_other_{n}_{uuid.uuid4().hex[:6]}", conversation, f"question {n}") for n in range(100)]
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{stack.config.port('kafka')}", acks="all",
                                enable_idempotence=False)
    await producer.start()
    try:
        await produce(producer, TURNS_TOPIC, conversation, poison_value)
        sends = [await producer.send(TURNS_TOPIC, msgspec.json.encode(t), key=conversation.encode()) for t in behind]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    sent_at = time.monotonic()
    ids = [t.turn_id for t in behind]
    await eventually(lambda: stored(stack, ids) == set(ids), timeout=STORED_WITHIN, interval=0.2,
                     what="the 100 turns behind the poison one stored")
    assert time.monotonic() - sent_at <= STORED_WITHIN

    headers = await in_dlq(stack, poison_value)
    reason = headers[DLQ_REASON_HEADER].decode()
    assert "UntranslatableCharacterError" in reason or "CharacterNotInRepertoireError" in reason, reason
    assert stored(stack, [poison.turn_id]) == set()
    assert dead_reason(stack, poison.turn_id) == reason


async def test_a_poison_turn_the_spool_replays_is_dead_lettered_and_settled_not_republished(stack, tmp_path: Path):
    """A spool a previous run left holds a poison turn between two good ones (as before the API refused
    a NUL): on start it publishes them, the good ones are stored, the poison one goes to the DLQ, and
    the spool settles all three and drops its segment instead of republishing the poison for ever."""
    user = f"usr_spool_{uuid.uuid4().hex[:8]}"
    conversation = f"conv_{uuid.uuid4().hex}"
    turns = [a_turn(user, conversation, "first"), a_turn(user, conversation, "a\u0000b"),
             a_turn(user, conversation, "last")]
    segment = tmp_path / f"{SEGMENT_PREFIX}{7:012d}{SEGMENT_SUFFIX}"
    segment.write_bytes(b"".join(msgspec.json.encode(SpoolRecord(turn=t, usage=UsageEvent(
        event_id=t.turn_id, user_id=user, key_id=None, model="synthetic", prompt_tokens=1, completion_tokens=1,
        created=t.created))) + b"\n" for t in turns))

    pool = await asyncpg.create_pool(stack.admin_dsn("chat"), min_size=1, max_size=2, command_timeout=5)
    publisher = EventPublisher(f"127.0.0.1:{stack.config.port('kafka')}", client_id="poison-test")
    await publisher.start()
    outbox = TurnOutbox(tmp_path, publisher, TurnStore(pool).settled, service="poison-test",
                        confirm_after=0.2, republish_after=2.0)
    await outbox.start()
    try:
        assert outbox.pending == 3
        await eventually(lambda: outbox.pending == 0, timeout=30, what="every spooled turn settled")
        assert stored(stack, [t.turn_id for t in turns]) == {turns[0].turn_id, turns[2].turn_id}
        await eventually(lambda: not segment.exists(), timeout=10, what="the settled segment dropped")
    finally:
        await outbox.stop(timeout=0)
        await publisher.stop()
        await pool.close()
    assert dead_reason(stack, turns[1].turn_id)
    headers = await in_dlq(stack, msgspec.json.encode(turns[1]))
    assert headers[DLQ_REASON_HEADER].decode() == dead_reason(stack, turns[1].turn_id)
