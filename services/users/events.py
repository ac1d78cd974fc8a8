"""The usage ledger's consumer: usage.events.v1 -> usage_ledger, idempotent on event id.

A message that cannot be read goes to usage.events.v1.dlq at once. One the database rejects for
its content (not for being unreachable) is retried a few times, then goes to the DLQ too, so one
bad event never stops the ledger. Database outages are retried until it is back: nothing is lost,
the ledger catches up.
"""

from __future__ import annotations

import logging

import asyncpg
import msgspec
from aiokafka import ConsumerRecord

from common.contracts import UsageEvent
from common.events import PoisonMessage
from services.users.store import LedgerStore

log = logging.getLogger(__name__)

LEDGER_GROUP = "users-usage-ledger"
MAX_ATTEMPTS = 3  # for events the database rejects for their content
_decoder = msgspec.json.Decoder(UsageEvent)
_CONTENT_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


def _check(event: UsageEvent) -> None:
    if not event.event_id or not event.user_id:
        raise PoisonMessage("usage event without event_id or user_id")
    if event.prompt_tokens < 0 or event.completion_tokens < 0:
        raise PoisonMessage("usage event with negative token counts")
    if event.schema_version != 1:
        raise PoisonMessage(f"unknown usage event schema_version {event.schema_version}")


def ledger_writer(store: LedgerStore, max_attempts: int = MAX_ATTEMPTS):
    failures: dict[tuple[int, int], int] = {}  # (partition, offset) -> attempts; one record at a time

    async def handle(record: ConsumerRecord) -> None:
        try:
            event = _decoder.decode(record.value or b"")
        except msgspec.MsgspecError as exc:
            raise PoisonMessage(str(exc)) from None
        _check(event)
        where = (record.partition, record.offset)
        try:
            await store.record(event)
        except _CONTENT_ERRORS as exc:
            attempts = failures.get(where, 0) + 1
            if attempts >= max_attempts:
                failures.pop(where, None)
                raise PoisonMessage(f"rejected by the ledger {attempts} times: {exc}") from None
            failures[where] = attempts
            raise
        failures.pop(where, None)

    return handle
