"""Turns and usage leave the request path through Kafka; the writer consumer persists turns."""

from __future__ import annotations

import asyncio
import logging

import msgspec
from aiokafka import ConsumerRecord

from common.events import EventPublisher, PoisonMessage
from common.contracts import TURNS_TOPIC, USAGE_TOPIC, TurnEvent, UsageEvent
from services.chat.store import TurnStore

log = logging.getLogger(__name__)

_turn_decoder = msgspec.json.Decoder(TurnEvent)


class TurnRecorder:
    """Publishes completed turns off the request path; keeps track of in-flight publishes so
    shutdown can wait for them."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher
        self._pending: set[asyncio.Task] = set()

    def record(self, turn: TurnEvent, usage: UsageEvent) -> None:
        task = asyncio.create_task(self._publish(turn, usage))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, turn: TurnEvent, usage: UsageEvent) -> None:
        delay = 0.2
        while True:
            try:
                await self.publisher.publish(TURNS_TOPIC, turn.conversation_id, turn)
                await self.publisher.publish(USAGE_TOPIC, usage.user_id, usage)
                return
            except Exception as exc:
                log.warning("turn publish failed, retrying", extra={"turn_id": turn.turn_id, "error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def drain(self, timeout: float = 10.0) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=timeout)


def turn_writer(store: TurnStore):
    async def handle(record: ConsumerRecord) -> None:
        try:
            turn = _turn_decoder.decode(record.value or b"")
        except msgspec.MsgspecError as exc:
            raise PoisonMessage(str(exc)) from None
        await store.insert_turn(turn)

    return handle
