"""Audit events (`audit.events.v1`): who did what, to what, in which request.

Recording never blocks or fails a request: events queue in memory (bounded) and a background task
publishes them, retrying while Kafka is away. Auth failures are rate-limited so that a guesser
cannot flood the log (or this process's memory); what is dropped is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque

import msgspec
from prometheus_client import Counter

from common.contracts import AUDIT_TOPIC, AuditEvent
from common.events import EventPublisher
from common.logging import request_id_var

log = logging.getLogger(__name__)

AUDIT_DROPPED = Counter("dualgate_audit_dropped_total", "Audit events dropped (queue full or rate-limited)",
                        ["service", "action"])


class AuditLog:
    MAX_PENDING = 10_000
    FAILURES_PER_SECOND = 20.0  # auth.failed events kept per second; the rest are counted only

    def __init__(self, publisher: EventPublisher, service: str) -> None:
        self.publisher = publisher
        self.service = service
        self._pending: deque[AuditEvent] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failure_allowance = self.FAILURES_PER_SECOND
        self._failure_clock = time.monotonic()

    def record(self, action: str, *, actor: str, target: str | None = None, outcome: str = "ok",
               detail: dict[str, str] | None = None) -> None:
        if outcome == "denied" and not self._allow_failure():
            AUDIT_DROPPED.labels(self.service, action).inc()
            return
        if len(self._pending) >= self.MAX_PENDING:
            AUDIT_DROPPED.labels(self.service, action).inc()
            return
        self._pending.append(AuditEvent(event_id=uuid.uuid4().hex, action=action, actor=actor, target=target,
                                        outcome=outcome, request_id=request_id_var.get() or "",
                                        detail=detail or {}, at=time.time()))
        self._wakeup.set()

    def _allow_failure(self) -> bool:
        now = time.monotonic()
        self._failure_allowance = min(self.FAILURES_PER_SECOND,
                                      self._failure_allowance + (now - self._failure_clock) * self.FAILURES_PER_SECOND)
        self._failure_clock = now
        if self._failure_allowance < 1:
            return False
        self._failure_allowance -= 1
        return True

    async def _publish_forever(self) -> None:
        delay = 0.2
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            event = self._pending[0]
            try:
                await self.publisher.publish(AUDIT_TOPIC, event.actor, event)
            except asyncio.CancelledError:
                raise
            except (msgspec.EncodeError, UnicodeEncodeError, TypeError) as exc:  # never sendable: never retried
                log.error("audit event cannot be encoded; dropped", extra={"action": event.action, "error": repr(exc)})
                AUDIT_DROPPED.labels(self.service, event.action).inc()
                self._pending.popleft()
                continue
            except Exception as exc:  # Kafka away: keep the event, try again
                log.warning("audit publish failed, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._pending.popleft()
            delay = 0.2

    async def start(self) -> None:
        self._task = asyncio.create_task(self._publish_forever())

    async def stop(self, drain_seconds: float = 5.0) -> None:
        deadline = time.monotonic() + drain_seconds
        while self._pending and time.monotonic() < deadline and self.publisher.connected:
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
