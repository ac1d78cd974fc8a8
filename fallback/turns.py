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

import logging

from common.contracts import TURNS_TOPIC, TurnEvent
from common.events import EventPublisher, PublishQueue

log = logging.getLogger(__name__)


class TurnLog(PublishQueue):
    MAX_PENDING = 10_000

    def __init__(self, publisher: EventPublisher, service: str) -> None:
        super().__init__(publisher, TURNS_TOPIC, lambda turn: turn.conversation_id, name="degraded-turns",
                         max_pending=self.MAX_PENDING)
        self.service = service

    def record(self, turn: TurnEvent) -> None:
        if not self.put(turn):
            log.error("degraded turn dropped: too many wait for the broker", extra={"turn_id": turn.turn_id})
