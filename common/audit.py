"""Audit events (`audit.events.v1`): who did what, to what, in which request.

Recording never blocks or fails a request: events queue in memory (bounded) and a background task
publishes them, retrying while Kafka is away. Auth failures are rate-limited so that a guesser
cannot flood the log (or this process's memory); what is dropped is counted.
"""

from __future__ import annotations

import logging
import time
import uuid

from prometheus_client import Counter

from common.contracts import AUDIT_TOPIC, AuditEvent
from common.events import EventPublisher, PublishQueue
from common.logging import request_id_var

log = logging.getLogger(__name__)

AUDIT_DROPPED = Counter("dualgate_audit_dropped_total", "Audit events dropped (queue full or rate-limited)",
                        ["service", "action"])


class AuditLog(PublishQueue):
    MAX_PENDING = 10_000
    FAILURES_PER_SECOND = 20.0  # auth.failed events kept per second; the rest are counted only

    def __init__(self, publisher: EventPublisher, service: str) -> None:
        super().__init__(publisher, AUDIT_TOPIC, lambda event: event.actor, name="audit", max_pending=self.MAX_PENDING)
        self.service = service
        self._failure_allowance = self.FAILURES_PER_SECOND
        self._failure_clock = time.monotonic()

    def record(self, action: str, *, actor: str, target: str | None = None, outcome: str = "ok",
               detail: dict[str, str] | None = None) -> None:
        if outcome == "denied" and not self._allow_failure():
            AUDIT_DROPPED.labels(self.service, action).inc()
            return
        event = AuditEvent(event_id=uuid.uuid4().hex, action=action, actor=actor, target=target, outcome=outcome,
                           request_id=request_id_var.get() or "", detail=detail or {}, at=time.time())
        if not self.put(event):
            AUDIT_DROPPED.labels(self.service, action).inc()

    def dropped(self, event: AuditEvent) -> None:
        AUDIT_DROPPED.labels(self.service, event.action).inc()

    def _allow_failure(self) -> bool:
        now = time.monotonic()
        self._failure_allowance = min(self.FAILURES_PER_SECOND,
                                      self._failure_allowance + (now - self._failure_clock) * self.FAILURES_PER_SECOND)
        self._failure_clock = now
        if self._failure_allowance < 1:
            return False
        self._failure_allowance -= 1
        return True
