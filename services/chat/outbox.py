"""The turn outbox: a durable local spool between an answered turn and the database.

Every completed turn (with its usage event) is appended to a segment file and fsynced BEFORE the
answer ends, so an answered turn survives a crash of this process, the broker or the database. A
publisher sends spooled turns to Kafka (`chat.turns.v1` by conversation, `usage.events.v1` by user);
while the broker is unreachable they simply wait here and go out when it returns. A record leaves
the spool only when the database shows its turn (the writer consumer persisted it) — so even a broker
that loses what it held (the embedded Tansu keeps messages in memory only) loses no turn: after
`republish_after` without a row, the turn is published again. Duplicates are harmless: the writer
inserts by turn id.

Writes are group-committed on one thread (one fsync per batch of concurrent appends); the event loop
never blocks on the disk. The in-memory view (pending turns by conversation, by idempotency key) is
bounded by `max_pending`: beyond it the chat service answers 503 instead of growing without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from common.contracts import TURNS_TOPIC, USAGE_TOPIC, TurnEvent, UsageEvent
from common.events import EventPublisher
from common.metrics import OUTBOX_PENDING

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "turns-"
SEGMENT_SUFFIX = ".jsonl"


class SpoolRecord(msgspec.Struct):
    turn: TurnEvent
    usage: UsageEvent


class OutboxFull(Exception):
    """Too many turns wait for the broker or the database: refuse new work rather than grow without bound."""


Settled = Callable[[list[TurnEvent]], Awaitable[set[str]]]  # of these turns, the ids needing no more delivery

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SpoolRecord)


@dataclass(eq=False)
class _Entry:
    record: SpoolRecord
    segment: int
    published_at: float | None = None  # monotonic; None while (again) waiting to be published


class TurnOutbox:
    def __init__(self, directory: Path, publisher: EventPublisher, settled: Settled, *, service: str = "chat",
                 max_pending: int = 20_000, segment_bytes: int = 4 << 20, batch: int = 64,
                 confirm_after: float = 0.3, republish_after: float = 10.0) -> None:
        self.directory = Path(directory)
        self.publisher = publisher
        self.settled = settled
        self.service = service
        self.max_pending = max_pending
        self.segment_bytes = segment_bytes
        self.batch = batch
        self.confirm_after = confirm_after
        self.republish_after = republish_after
        self._entries: dict[str, _Entry] = {}  # turn id -> entry, in append order
        self._by_conversation: dict[str, list[_Entry]] = {}
        self._by_idempotency: dict[tuple[str, str], _Entry] = {}
        self._recently_settled: OrderedDict[tuple[str, str], TurnEvent] = OrderedDict()
        self._unpublished: deque[_Entry] = deque()
        self._published: OrderedDict[str, _Entry] = OrderedDict()  # in publish order
        self._segment_live: dict[int, int] = {}
        self._active = 0  # the segment appends go to
        self._active_size = 0
        self._file = None  # the active segment's file object; only the I/O thread touches it
        self._lock_file = None
        self._queue: list[tuple[SpoolRecord, asyncio.Future]] = []
        self._background: set[asyncio.Task] = set()
        self._flushing: asyncio.Task | None = None
        self._io_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        OUTBOX_PENDING.labels(service, "unpublished").set_function(lambda: len(self._unpublished))
        OUTBOX_PENDING.labels(service, "unconfirmed").set_function(lambda: len(self._published))

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._open_directory)
        records = await asyncio.to_thread(self._recover)
        for segment, record in records:
            self._track(_Entry(record, segment))
        if records:
            log.warning("outbox recovered spooled turns", extra={"turns": len(records)})
        self._tasks = [asyncio.create_task(self._publish_forever(), name="outbox-publish"),
                       asyncio.create_task(self._confirm_forever(), name="outbox-confirm")]
        self._wake.set()

    async def stop(self, timeout: float = 5.0) -> None:
        """Give the publisher a moment to send what is waiting; what is left stays spooled for next start."""
        deadline = time.monotonic() + timeout
        while self._unpublished and self.publisher.connected and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.05)
        # a flag as well as cancel(): on 3.11 a cancel landing as wait_for times out can be swallowed
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        if self._flushing:
            with contextlib.suppress(Exception):
                await self._flushing
        await asyncio.to_thread(self._close_files)

    # ---- the request path -------------------------------------------------------------------------

    def check_capacity(self) -> None:
        if len(self._entries) >= self.max_pending:
            raise OutboxFull(f"{len(self._entries)} turns wait for the broker or the database")

    async def append(self, turn: TurnEvent, usage: UsageEvent) -> None:
        """Durably spool one turn; returns once it is on disk (fsynced). Never refuses a finished turn."""
        record = SpoolRecord(turn=turn, usage=usage)
        future = asyncio.get_running_loop().create_future()
        self._queue.append((record, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        await future

    def pending_turns(self, conversation_id: str) -> list[TurnEvent]:
        """Turns of this conversation answered but not yet seen in the database, oldest first."""
        return [e.record.turn for e in self._by_conversation.get(conversation_id, ())]

    def find_turn(self, turn_id: str) -> TurnEvent | None:
        """The turn with this id if it waits here (a request answered again: a failover's duplicate)."""
        entry = self._entries.get(turn_id)
        return entry.record.turn if entry is not None else None

    def find_idempotent(self, user_id: str, key: str) -> TurnEvent | None:
        entry = self._by_idempotency.get((user_id, key))
        if entry is not None:
            return entry.record.turn
        return self._recently_settled.get((user_id, key))

    @property
    def pending(self) -> int:
        return len(self._entries)

    # ---- bookkeeping (event loop only) ------------------------------------------------------------

    def _track(self, entry: _Entry) -> None:
        turn = entry.record.turn
        if turn.turn_id in self._entries:
            return
        self._entries[turn.turn_id] = entry
        self._by_conversation.setdefault(turn.conversation_id, []).append(entry)
        if turn.idempotency_key:
            self._by_idempotency[(turn.user_id, turn.idempotency_key)] = entry
        self._segment_live[entry.segment] = self._segment_live.get(entry.segment, 0) + 1
        self._unpublished.append(entry)

    def _settle(self, entry: _Entry) -> None:
        turn = entry.record.turn
        if self._entries.pop(turn.turn_id, None) is None:
            return
        self._published.pop(turn.turn_id, None)
        siblings = self._by_conversation.get(turn.conversation_id, [])
        with contextlib.suppress(ValueError):
            siblings.remove(entry)
        if not siblings:
            self._by_conversation.pop(turn.conversation_id, None)
        if turn.idempotency_key:
            key = (turn.user_id, turn.idempotency_key)
            self._by_idempotency.pop(key, None)
            self._recently_settled[key] = turn  # replays keep working while the database is away
            while len(self._recently_settled) > 10_000:
                self._recently_settled.popitem(last=False)
        self._segment_live[entry.segment] -= 1
        if self._segment_live[entry.segment] == 0:
            del self._segment_live[entry.segment]
            if entry.segment != self._active:
                task = asyncio.create_task(asyncio.to_thread(self._unlink, entry.segment))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    # ---- disk (one thread at a time) ----------------------------------------------------------------

    def _path(self, segment: int) -> Path:
        return self.directory / f"{SEGMENT_PREFIX}{segment:012d}{SEGMENT_SUFFIX}"

    def _open_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.directory / "LOCK", "a+b")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another process uses the spool in {self.directory}") from None

    def _segments(self) -> list[int]:
        found = []
        for path in self.directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"):
            with contextlib.suppress(ValueError):
                found.append(int(path.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)]))
        return sorted(found)

    def _recover(self) -> list[tuple[int, SpoolRecord]]:
        """Every record of every segment a previous run left; appends go to a fresh segment."""
        records: list[tuple[int, SpoolRecord]] = []
        segments = self._segments()
        for segment in segments:
            kept = 0
            with open(self._path(segment), "rb") as fh:
                for line in fh:
                    try:
                        records.append((segment, _decoder.decode(line)))
                        kept += 1
                    except msgspec.MsgspecError:  # a torn last line from a crash mid-write: never acknowledged
                        log.warning("outbox skipped an unreadable spool line", extra={"segment": segment})
            if not kept:
                self._unlink(segment)
        self._active = (segments[-1] + 1) if segments else 0
        return records

    def _write(self, lines: list[bytes], roll: bool) -> None:
        if roll or (self._file is not None and self._active_size >= self.segment_bytes):
            self._roll(unlink=roll)
        if self._file is None:
            self._file = open(self._path(self._active), "ab")
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the new file's name is durable too
            finally:
                os.close(dir_fd)
        data = b"".join(lines)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._active_size += len(data)

    def _roll(self, unlink: bool) -> None:
        """Close the active segment and start the next; `unlink` when nothing in it is still pending."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if unlink:
            self._unlink(self._active)
        self._active += 1
        self._active_size = 0

    def _unlink(self, segment: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(segment).unlink()

    def _close_files(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def _flush(self) -> None:
        """Group commit: everything queued so far goes out in one write and one fsync."""
        async with self._io_lock:
            while self._queue:
                batch, self._queue = self._queue, []
                roll = self._active_size > 0 and self._segment_live.get(self._active, 0) == 0
                try:
                    lines = [_encoder.encode(record) + b"\n" for record, _ in batch]
                    await asyncio.to_thread(self._write, lines, roll)
                except Exception as exc:
                    log.exception("outbox write failed")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                # tracked here, before anything else runs on the loop: the segment counts must include
                # them before the next batch decides whether the active segment may be dropped
                for record, _ in batch:
                    self._track(_Entry(record, self._active))
                self._wake.set()
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _tidy(self) -> None:
        """Drop an active segment whose turns are all settled, when nothing is being written."""
        if self._active_size > 0 and self._segment_live.get(self._active, 0) == 0 and not self._queue:
            async with self._io_lock:
                if self._active_size > 0 and self._segment_live.get(self._active, 0) == 0:
                    await asyncio.to_thread(self._roll, True)

    # ---- publishing and confirming -----------------------------------------------------------------

    async def _publish_forever(self) -> None:
        delay = 0.2
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            while self._unpublished and not self._stopping:
                batch = [self._unpublished.popleft() for _ in range(min(self.batch, len(self._unpublished)))]
                batch = [e for e in batch if e.record.turn.turn_id in self._entries]
                messages = []
                for entry in batch:
                    turn, usage = entry.record.turn, entry.record.usage
                    messages.append((TURNS_TOPIC, turn.conversation_id, _encoder.encode(turn)))
                    messages.append((USAGE_TOPIC, usage.user_id, _encoder.encode(usage)))
                try:
                    if messages:
                        await self.publisher.publish_many(messages)
                except Exception as exc:  # broker away: keep them, in order, and try again later
                    self._unpublished.extendleft(reversed(batch))
                    log.warning("outbox publish failed; turns stay spooled",
                                extra={"pending": len(self._unpublished), "error": f"{type(exc).__name__}: {exc}"})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.2
                now = time.monotonic()
                for entry in batch:
                    entry.published_at = now
                    self._published[entry.record.turn.turn_id] = entry
                    self._published.move_to_end(entry.record.turn.turn_id)

    async def _confirm_forever(self, interval: float = 0.25) -> None:
        while not self._stopping:
            await asyncio.sleep(interval)
            now = time.monotonic()
            due = []
            for entry in self._published.values():
                if entry.published_at is None or now - entry.published_at < self.confirm_after or len(due) >= 1000:
                    break
                due.append(entry)
            if not due:
                await self._tidy()
                continue
            try:
                settled = await self.settled([e.record.turn for e in due])
            except Exception as exc:  # the database is away: turns wait here (and in Kafka) until it returns
                log.debug("outbox cannot confirm yet", extra={"error": f"{type(exc).__name__}: {exc}"})
                await asyncio.sleep(1.0)
                continue
            republish = []
            for entry in due:
                turn_id = entry.record.turn.turn_id
                if turn_id in settled:
                    self._settle(entry)
                elif now - (entry.published_at or now) >= self.republish_after:
                    republish.append(entry)
            for entry in republish:  # the database is up, yet no row: the broker lost it, send it again
                entry.published_at = None
                self._published.pop(entry.record.turn.turn_id, None)
                self._unpublished.append(entry)
            if republish:
                log.warning("outbox republishing turns not persisted in time", extra={"turns": len(republish)})
                self._wake.set()
