"""The audit log's consumer: audit.events.v1 -> the audit_log table, idempotent on event id."""

from __future__ import annotations

import msgspec
from aiokafka import ConsumerRecord

from common.contracts import AuditEvent
from common.events import decode_event
from services.auth.store import AuditStore

AUDIT_GROUP = "auth-audit-writer"
_decoder = msgspec.json.Decoder(AuditEvent)


def audit_writer(store: AuditStore):
    async def handle(record: ConsumerRecord) -> None:
        event = decode_event(_decoder, record)
        # a value Postgres will never take (a NUL in text) is poison, an outage a retry (consume_forever)
        await store.insert(event)

    return handle
