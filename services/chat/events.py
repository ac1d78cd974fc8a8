"""The writer consumer: turns from `chat.turns.v1` into Postgres, once each (turn id unique).

Publishing happens in the outbox (`services/chat/outbox.py`). A message that can never be a turn, or a
turn Postgres refuses for its content (a NUL in a message, say: common.events.refused_permanently), is
poison: it goes to `chat.turns.v1.dlq` with its reason and the line moves on. Its turn id is kept in
`dead_turns`, so the spool that published it settles it instead of republishing it for ever. A database
that is down is not poison: the consumer retries the same message until it lands, so turns wait in Kafka
(and in the spool) and persist on recovery.
"""

from __future__ import annotations

import logging

import msgspec
from aiokafka import ConsumerRecord

from common.contracts import TurnEvent
from common.events import PoisonMessage, decode_event, refusal_reason, refused_permanently
from services.chat.store import TurnStore

log = logging.getLogger(__name__)

_turn_decoder = msgspec.json.Decoder(TurnEvent)


def turn_writer(store: TurnStore):
    async def handle(record: ConsumerRecord) -> None:
        turn = decode_event(_turn_decoder, record)
        if not turn.turn_id or not turn.conversation_id or not turn.user_id:
            raise PoisonMessage("a turn needs turn_id, conversation_id and user_id")
        try:
            await store.insert_turn(turn)
        except Exception as exc:
            if not refused_permanently(exc):
                raise  # the database is away: retry
            reason = refusal_reason(exc)
            try:  # before the DLQ: a crash in between redelivers the record, which comes here again
                await store.record_dead_turn(turn.turn_id, reason, record.value or b"")
            except Exception as again:
                if not refused_permanently(again):
                    raise
                # a turn id Postgres cannot hold was never spooled by chat: nothing waits on it
            raise PoisonMessage(reason) from None

    return handle
