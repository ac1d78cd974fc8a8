"""Turns a gateway's fallback layers answered (cached answer, simplified model), on their way to storage.

The chat service, which stores every turn it answers, is usually the reason the chain answered, so
the gateway publishes the turn to `chat.turns.v1` itself, with the gateway's Kafka producer (the one
its audit log uses). The chat writer stores it like any turn: once (its id derives from the request,
common.contracts.turn_id_for), flagged with its layer, and only in the caller's own conversation.
While Kafka is away the turns wait here, in memory and bounded, and go out when it returns; a gateway
stopped or killed meanwhile loses them (a turn dropped is logged and counted), so the history then
misses a degraded answer, while its Idempotency-Key still replays it (common.idempotency).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from common.contracts import TURNS_TOPIC, TurnEvent
from common.events import EventPublisher

log = logging.getLogger(__name__)


class TurnLog:
    MAX_PENDING = 10_000

    def __init__(self, publisher: EventPublisher, service: str) -> None:
        self.publisher = publisher
        self.service = service
        self._pending: deque[TurnEvent] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def record(self, turn: TurnEvent) -> None:
        if len(self._pending) >= self.MAX_PENDING:
            log.error("degraded turn dropped: too many wait for the broker", extra={"turn_id": turn.turn_id})
            return
        self._pending.append(turn)
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _publish_forever(self) -> None:
        delay = 0.2
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            turn = self._pending[0]
            try:
                await self.publisher.publish(TURNS_TOPIC, turn.conversation_id, turn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka away: keep the turn, try again (the writer stores it once)
                log.warning("degraded turn publish failed, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._pending.popleft()
            delay = 0.2

    async def start(self) -> None:
        self._task = asyncio.create_task(self._publish_forever(), name="degraded-turns")

    async def stop(self, drain_seconds: float = 5.0) -> None:
        deadline = time.monotonic() + drain_seconds
        while self._pending and time.monotonic() < deadline and self.publisher.connected:
            await asyncio.sleep(0.05)
        if self._pending:
            log.error("degraded turns not published at stop", extra={"turns": len(self._pending)})
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
