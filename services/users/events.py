"""The usage ledger's consumer: usage.events.v1 -> usage_ledger, idempotent on event id.

A message that cannot be read goes to usage.events.v1.dlq at once, and so does one the database
refuses for its content (not for being unreachable: common.events.refused_permanently decides), so
one bad event never stops the ledger. Database outages are retried until it is back: nothing is lost,
the ledger catches up.
"""

from __future__ import annotations

import logging

import msgspec
from aiokafka import ConsumerRecord

from common.contracts import UsageEvent
from common.events import PoisonMessage, decode_event
from services.users.store import LedgerStore

log = logging.getLogger(__name__)

LEDGER_GROUP = "users-usage-ledger"
_decoder = msgspec.json.Decoder(UsageEvent)


def _check(event: UsageEvent) -> None:
    if not event.event_id or not event.user_id:
        raise PoisonMessage("usage event without event_id or user_id")
    if event.prompt_tokens < 0 or event.completion_tokens < 0:
        raise PoisonMessage("usage event with negative token counts")
    if event.schema_version != 1:
        raise PoisonMessage(f"unknown usage event schema_version {event.schema_version}")


def ledger_writer(store: LedgerStore):
    async def handle(record: ConsumerRecord) -> None:
        event = decode_event(_decoder, record)
        _check(event)
        await store.record(event)  # a content refusal is poison, an outage a retry (consume_forever)

    return handle
