"""The auth-change feed: revocations, disabled users, rotations and plan changes, as markers
kept current from Redis pub/sub (or polled from the auth service while unsubscribed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import httpx
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.contracts import AUTH_CHANNEL, AUTH_EPOCH_FIELD, AUTH_REVOKED, AuthChange, marker_field
from common.security import InternalTokens, Principal

log = logging.getLogger(__name__)


_change_decoder = msgspec.json.Decoder(AuthChange)



# ---- the auth-change feed ---------------------------------------------------------------------

class AuthChangeFeed:
    """Keeps `changes` (the AUTH_REVOKED markers) current and knows whether it is subscribed right now.

    Subscribes to AUTH_CHANNEL, then loads AUTH_REVOKED (so nothing published in between is
    missed), and pings the subscription: no answer within `PONG_DEADLINE` counts as dropped.
    `on_resync` runs after every (re)load and when the subscription drops, so its owner can drop
    what it cached meanwhile.
    While not subscribed, `poll` (when given) fetches the complete marker set another way.
    """

    PING_INTERVAL = 0.2
    PONG_DEADLINE = 0.5  # with the 1 s cache lifetime after it, a silent drop costs well under a second
    RETRY_MAX = 1.0

    def __init__(self, redis: Redis, *, on_resync: Callable[[], None] = lambda: None,
                 poll: Callable[[], Awaitable[dict[str, AuthChange]]] | None = None,
                 poll_interval: float = 0.25, retention: float = 90_000.0) -> None:
        self._redis = redis
        self._on_resync = on_resync
        self._poll = poll
        self._poll_interval = poll_interval
        self._retention = retention
        self.changes: dict[str, AuthChange] = {}
        self.subscribed = False
        self._polled: dict[str, AuthChange] = {}  # the auth service's markers, polled since the last load
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run()))
        if self._poll is not None:
            self._tasks.append(asyncio.create_task(self._poll_while_unsubscribed()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def apply(self, change: AuthChange) -> None:
        if change.kind == "user_enabled":
            self.changes.pop(f"user:{change.user_id}", None)
        elif (field := marker_field(change)) is not None:
            self.changes[field] = change

    async def _load(self) -> None:
        raw = await self._redis.hgetall(AUTH_REVOKED)
        loaded: dict[str, AuthChange] = {}
        oldest = time.time() - self._retention
        complete = False
        for field, value in raw.items():
            name = field.decode() if isinstance(field, bytes) else field
            if name == AUTH_EPOCH_FIELD:
                complete = True
                continue
            try:
                change = _change_decoder.decode(value)
            except msgspec.MsgspecError:
                continue
            if change.at >= oldest:
                loaded[name] = change
        # a hash without its epoch lost data (Redis restarted) and is not re-seeded yet: keep what we knew.
        # Markers polled from the auth service while unsubscribed stay too: Redis may not hold them yet
        # (the auth service's write failed while Redis was away), and dropping one readmits a revoked key
        self.changes = {**self._polled, **(loaded if complete else {**self.changes, **loaded})}
        self._polled = {}
        self._on_resync()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            pubsub = self._redis.pubsub()
            try:
                async with asyncio.timeout(2.0):
                    await pubsub.subscribe(AUTH_CHANNEL)
                    await self._load()
                self.subscribed = True
                delay = 0.1
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, ConnectionError) as exc:  # builtin TimeoutError is an OSError
                if self.subscribed:
                    log.warning("auth-change subscription lost; short cache lifetimes until it is back",
                                extra={"error": repr(exc)})
            finally:
                if self.subscribed:
                    self.subscribed = False
                    self._on_resync()  # what was cached while listening may have missed a change: drop it
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(0.5):
                        await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.RETRY_MAX)

    async def _listen(self, pubsub) -> None:
        last_pong = next_ping = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_ping:
                await pubsub.ping()
                next_ping = now + self.PING_INTERVAL
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                if message["type"] == "pong":
                    last_pong = time.monotonic()
                elif message["type"] == "message":
                    last_pong = time.monotonic()
                    await self._handle(message["data"])
            if time.monotonic() - last_pong > self.PONG_DEADLINE:
                raise ConnectionError("no answer to ping on the auth-change subscription")

    async def _handle(self, data: bytes) -> None:
        try:
            change = _change_decoder.decode(data)
        except msgspec.MsgspecError:
            log.warning("ignoring a malformed auth change")
            return
        if change.kind == "resync":
            async with asyncio.timeout(2.0):
                await self._load()
        else:
            self.apply(change)

    async def _poll_while_unsubscribed(self) -> None:
        assert self._poll is not None
        while True:
            if self.subscribed:
                await asyncio.sleep(0.05)  # poll as soon as the subscription drops
                continue
            try:
                self._polled = await self._poll()
                self.changes = dict(self._polled)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the auth service is away too: keep the last markers
                log.debug("auth-change poll failed", extra={"error": repr(exc)})
            await asyncio.sleep(self._poll_interval)




async def fetch_auth_changes(client: httpx.AsyncClient, tokens: InternalTokens,
                             caller: Principal) -> dict[str, AuthChange]:
    """Every current auth-change marker, from the auth service's database (used while Redis is away)."""
    resp = await client.get("/internal/auth-changes", timeout=1.0, headers=tokens.headers("auth", caller))
    resp.raise_for_status()
    return msgspec.json.decode(resp.content, type=dict[str, AuthChange])


