"""Kafka events (aiokafka): a publisher that survives broker outages, and an idempotent-consumer loop.

The embedded broker (Tansu) has no idempotent producer, so producers use acks=all and every
consumer must tolerate redelivery (writes keyed by event id / turn id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from common.metrics import EVENTS_CONSUMED, EVENTS_PUBLISHED

log = logging.getLogger(__name__)

SEND_TIMEOUT = 5.0
COMMIT_TIMEOUT = 5.0
LOG_WENT_BACK_POLLS = 3  # polls (up to 0.5 s each) a partition's log must end before our position to be read again
_encoder = msgspec.json.Encoder()


DLQ_REASON_HEADER = "dualgate-dlq-reason"
DLQ_SOURCE_HEADER = "dualgate-dlq-source"  # <topic>/<partition>/<offset> the message was read at
MAX_REASON_CHARS = 500

# Refusals no retry can get past: SQLSTATE class 22 (data exception: a NUL or a character the encoding
# lacks, a value out of range), class 23 (integrity constraint: check, not-null), and values the driver
# cannot even encode (asyncpg's client-side DataError and a UnicodeEncodeError are ValueErrors). A
# connection error, a timeout, a database shutting down or a permission denied is not among them.
_PERMANENT_REFUSALS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError, OverflowError)


class PoisonMessage(Exception):
    """The message can never be processed (bad schema, bad content): send it to the DLQ."""


def refused_permanently(exc: BaseException) -> bool:
    """Whether a sink refused a record for what it holds (poison), not for being unreachable (retry).
    Every consumer classifies its sink's errors with this one function."""
    return isinstance(exc, (PoisonMessage, *_PERMANENT_REFUSALS))


def refusal_reason(exc: BaseException) -> str:
    """One printable line saying why a record was refused (kept with it in the DLQ)."""
    text = str(exc) if isinstance(exc, PoisonMessage) else f"{type(exc).__name__}: {exc}"
    text = text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")  # storable, printable
    return " ".join(text.split())[:MAX_REASON_CHARS]


class EventPublisher:
    def __init__(self, bootstrap: str, client_id: str) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._starting: asyncio.Task | None = None

    async def start(self) -> None:
        """Connect in the background: a service must start even while the broker is down."""
        self._starting = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        delay = 0.2
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap, client_id=self._client_id, acks="all",
                enable_idempotence=False, request_timeout_ms=int(SEND_TIMEOUT * 1000), linger_ms=0,
            )
            try:
                await producer.start()
                self._producer = producer
                return
            except KafkaError as exc:
                await producer.stop()
                log.warning("kafka not reachable, retrying", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @property
    def connected(self) -> bool:
        return self._producer is not None

    async def publish(self, topic: str, key: str, event: msgspec.Struct | bytes,
                      headers: list[tuple[str, bytes]] | None = None) -> None:
        if self._producer is None:
            raise KafkaError("producer not connected")
        value = event if isinstance(event, bytes) else _encoder.encode(event)
        await asyncio.wait_for(self._producer.send_and_wait(topic, value, key=key.encode(), headers=headers),
                               SEND_TIMEOUT)
        EVENTS_PUBLISHED.labels(topic).inc()

    async def publish_many(self, messages: list[tuple[str, str, bytes]]) -> None:
        """Send (topic, key, value) messages together and wait until the broker has every one (acks=all).

        All or nothing from the caller's view: on any failure it raises, and the caller sends them all
        again (consumers are idempotent, so a message delivered twice is harmless)."""
        if self._producer is None:
            raise KafkaError("producer not connected")
        producer = self._producer

        async def send_all() -> None:
            futures = [await producer.send(topic, value, key=key.encode()) for topic, key, value in messages]
            await asyncio.gather(*futures)

        await asyncio.wait_for(send_all(), SEND_TIMEOUT)
        for topic, _, _ in messages:
            EVENTS_PUBLISHED.labels(topic).inc()

    async def stop(self) -> None:
        if self._starting and not self._starting.done():
            self._starting.cancel()
        if self._producer is not None:
            await self._producer.stop()


class PublishQueue:
    """Events a request produced, published in order by a background task, never blocking the request.

    Bounded in memory (`put` is False when full: the caller counts what it drops). While Kafka is away
    the head waits and is retried with backoff; an event that can never be encoded is dropped, never
    retried. `stop` drains what it can within `drain_seconds` while the broker answers.
    """

    def __init__(self, publisher: EventPublisher, topic: str, key_of: Callable[[msgspec.Struct], str], *,
                 name: str, max_pending: int = 10_000) -> None:
        self.publisher = publisher
        self.topic = topic
        self._key_of = key_of
        self._name = name
        self._max_pending = max_pending
        self._pending: deque[msgspec.Struct] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def put(self, event: msgspec.Struct) -> bool:
        if len(self._pending) >= self._max_pending:
            return False
        self._pending.append(event)
        self._wakeup.set()
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    def dropped(self, event: msgspec.Struct) -> None:
        """An event that could never be sent was dropped (a subclass counts it)."""

    async def start(self) -> None:
        self._task = asyncio.create_task(self._publish_forever(), name=self._name)

    async def stop(self, drain_seconds: float = 5.0) -> None:
        deadline = time.monotonic() + drain_seconds
        while self._pending and time.monotonic() < deadline and self.publisher.connected:
            await asyncio.sleep(0.05)
        if self._pending:
            log.error("events not published at stop", extra={"queue": self._name, "events": len(self._pending)})
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _publish_forever(self) -> None:
        delay = 0.2
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            event = self._pending[0]
            try:
                await self.publisher.publish(self.topic, self._key_of(event), event)
            except asyncio.CancelledError:
                raise
            except (msgspec.EncodeError, UnicodeEncodeError, TypeError) as exc:  # never sendable: never retried
                log.error("event cannot be encoded; dropped", extra={"queue": self._name, "error": repr(exc)})
                self.dropped(self._pending.popleft())
                continue
            except Exception as exc:  # Kafka away: keep the event, try again
                log.warning("publish failed, retrying", extra={"queue": self._name, "error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._pending.popleft()
            delay = 0.2


MessageHandler = Callable[[ConsumerRecord], Awaitable[None]]


async def consume_forever(
    bootstrap: str,
    topic: str,
    group_id: str,
    handler: MessageHandler,
    publisher: EventPublisher,
    *,
    retry_delay_max: float = 5.0,
) -> None:
    """Process each message until it succeeds (transient errors retry with backoff, the offset
    is committed only after success). Poison goes to `<topic>.dlq` with its reason and is skipped: a
    PoisonMessage, or a record the sink refused for its content (`refused_permanently`), so one bad
    record never stops the line behind it. One long-lived group."""
    dlq = f"{topic}.dlq"
    while True:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", client_id=group_id,
        )
        behind: dict[TopicPartition, int] = {}  # partition -> polls in a row its log ended before us
        try:
            await consumer.start()
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=100)
                for records in batches.values():
                    for record in records:
                        await _handle_until_done(record, handler, publisher, dlq, retry_delay_max)
                if batches:
                    # bounded: after a broker restart aiokafka can retry a commit forever
                    # (UnknownTopicOrPartition); a fresh consumer rejoins instead, and the batch may
                    # come again, which idempotent handlers absorb
                    await asyncio.wait_for(consumer.commit(), COMMIT_TIMEOUT)
                await _rewind_where_the_log_went_back(consumer, topic, behind)
        except asyncio.CancelledError:
            raise
        except (KafkaError, TimeoutError) as exc:
            log.warning("consumer lost the broker, reconnecting",
                        extra={"topic": topic, "error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(1.0)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), COMMIT_TIMEOUT)


def run_consumer(stack: AsyncExitStack, bootstrap: str, topic: str, group_id: str, handler: MessageHandler,
                 publisher: EventPublisher) -> None:
    """consume_forever for as long as `stack` is open: started now, cancelled when it closes."""
    task = asyncio.create_task(consume_forever(bootstrap, topic, group_id, handler, publisher), name=group_id)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(cancel)


def decode_event(decoder: msgspec.json.Decoder, record: ConsumerRecord):
    """The record's event, or PoisonMessage naming why it can never be one."""
    try:
        return decoder.decode(record.value or b"")
    except msgspec.MsgspecError as exc:
        raise PoisonMessage(str(exc)) from None


async def _rewind_where_the_log_went_back(consumer: AIOKafkaConsumer, topic: str,
                                         behind: dict[TopicPartition, int]) -> None:
    """A partition whose log now ends before our position lost what it held: the embedded broker keeps
    messages in memory, so a restart starts offsets again from 0. Kafka would answer OffsetOutOfRange
    and auto_offset_reset would apply; Tansu answers an empty fetch, so the consumer would wait at its
    old position and skip every new message below it. Read such a partition again from its beginning
    (handlers are idempotent).

    A fetch's high watermark alone is not proof: Tansu can report one a record or two behind what the
    same fetch returned (the watermark is written after the record). Only a log end, asked for anew
    (ListOffsets), that stays before our position for polls in a row is taken as a log that went back."""
    suspects = []
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        position = await asyncio.wait_for(consumer.position(tp), COMMIT_TIMEOUT)
        if high is not None and position > high:
            suspects.append((tp, position))
        else:
            behind.pop(tp, None)
    if not suspects:
        return
    ends = await asyncio.wait_for(consumer.end_offsets([tp for tp, _ in suspects]), COMMIT_TIMEOUT)
    for tp, position in suspects:
        if ends.get(tp, position) >= position:
            behind.pop(tp, None)
            continue
        behind[tp] = behind.get(tp, 0) + 1
        if behind[tp] >= LOG_WENT_BACK_POLLS:
            log.warning("partition log ends before our position; reading it again from the start",
                        extra={"topic": topic, "partition": tp.partition, "position": position, "end": ends[tp]})
            await asyncio.wait_for(consumer.seek_to_beginning(tp), COMMIT_TIMEOUT)
            behind.pop(tp, None)


async def _handle_until_done(record: ConsumerRecord, handler: MessageHandler, publisher: EventPublisher,
                             dlq: str, retry_delay_max: float) -> None:
    delay = 0.1
    while True:
        try:
            await handler(record)
            EVENTS_CONSUMED.labels(record.topic, "ok").inc()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if refused_permanently(exc):
                reason = refusal_reason(exc)
                log.error("poison message sent to DLQ", extra={"topic": record.topic, "offset": record.offset,
                                                                "error": reason})
                await _publish_until_done(publisher, dlq, record, reason)
                EVENTS_CONSUMED.labels(record.topic, "dlq").inc()
                return
            # transient (database down...): retry, never skip
            EVENTS_CONSUMED.labels(record.topic, "retry").inc()
            log.warning("event handling failed, retrying", extra={"topic": record.topic, "error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry_delay_max)


async def _publish_until_done(publisher: EventPublisher, topic: str, record: ConsumerRecord, reason: str) -> None:
    """The message as it was read, with why it was refused and where it came from in its headers."""
    key = (record.key or b"").decode(errors="replace")
    headers = [(DLQ_REASON_HEADER, reason.encode()),
               (DLQ_SOURCE_HEADER, f"{record.topic}/{record.partition}/{record.offset}".encode())]
    while True:
        try:
            await publisher.publish(topic, key, record.value or b"", headers)
            return
        except (KafkaError, TimeoutError):
            await asyncio.sleep(0.5)
