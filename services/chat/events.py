"""The writer consumer: turns from `chat.turns.v1` into Postgres, once each (turn id unique).

Publishing happens in the outbox (`services/chat/outbox.py`). A message that can never be a turn is
poison and goes to `chat.turns.v1.dlq`; a database that is down is not poison: the consumer retries
the same message until it lands, so turns wait in Kafka (and in the spool) and persist on recovery.
"""

from __future__ import annotations

import logging

import msgspec
from aiokafka import ConsumerRecord

from common.contracts import TurnEvent
from common.events import PoisonMessage
from services.chat.store import TurnStore

log = logging.getLogger(__name__)

_turn_decoder = msgspec.json.Decoder(TurnEvent)


def turn_writer(store: TurnStore):
    async def handle(record: ConsumerRecord) -> None:
        try:
            turn = _turn_decoder.decode(record.value or b"")
        except msgspec.MsgspecError as exc:
            raise PoisonMessage(str(exc)) from None
        if not turn.turn_id or not turn.conversation_id or not turn.user_id:
            raise PoisonMessage("a turn needs turn_id, conversation_id and user_id")
        try:
            await store.insert_turn(turn)
        except (ValueError, OverflowError) as exc:  # a value no row can hold (e.g. a timestamp out of range)
            raise PoisonMessage(f"{type(exc).__name__}: {exc}") from None

    return handle
