"""Auth changes (revocation, rotation, disabled users, plan changes): recorded durably, then broadcast.

The database holds every current marker; Redis holds the copy gateways read (AUTH_REVOKED) and the
channel they listen on (AUTH_CHANNEL). When Redis misses a write, or loses the hash (restart),
the reconcile loop re-seeds it from the database and publishes `resync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.contracts import AUTH_CHANNEL, AUTH_EPOCH_FIELD, AUTH_REVOKED, AuthChange, marker_field
from services.auth.store import MarkerStore

log = logging.getLogger(__name__)

REDIS_TIMEOUT = 0.5
STALE_MARGIN = 5.0
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AuthChange)


class AuthChanges:
    RECONCILE_SECONDS = 1.0
    PRUNE_SECONDS = 300.0

    def __init__(self, markers: MarkerStore, redis: Redis, *, retention: float) -> None:
        self.markers = markers
        self.redis = redis
        self.retention = retention  # markers older than any cache a gateway may still trust
        self._dirty = True  # seed Redis on start
        self._pruned_at = 0.0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    async def record(self, change: AuthChange) -> None:
        """Durable first (the change is in force for introspection at once), then broadcast."""
        async with self._lock:  # never interleaved with a re-seed, which could drop it from Redis
            await self._record(change)

    async def _record(self, change: AuthChange) -> None:
        field = marker_field(change)
        if field is None:
            raise ValueError(f"auth change {change.kind!r} leaves no marker")
        payload = _encoder.encode(change)
        removing = change.kind == "user_enabled"
        if removing:
            await self.markers.delete(field)
        else:
            await self.markers.put(field, payload, change.at)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                pipe = self.redis.pipeline(transaction=True)
                if removing:
                    pipe.hdel(AUTH_REVOKED, field)
                else:
                    pipe.hset(AUTH_REVOKED, field, payload)
                pipe.publish(AUTH_CHANNEL, payload)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # gateways that cannot hear us cache for at most 1 s and introspect: the change holds there;
            # the reconcile loop re-seeds Redis as soon as it answers
            self._dirty = True
            log.warning("auth change not broadcast yet; will re-seed redis", extra={"kind": change.kind,
                                                                                    "error": repr(exc)})

    async def current(self) -> dict[str, bytes]:
        return await self.markers.all()

    async def reconcile(self) -> None:
        now = time.time()
        if now - self._pruned_at > self.PRUNE_SECONDS:
            pruned = await self.markers.prune(now - self.retention)
            self._pruned_at = now
            if pruned:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await self.redis.hdel(AUTH_REVOKED, *pruned)
        async with asyncio.timeout(REDIS_TIMEOUT):
            complete = await self.redis.hexists(AUTH_REVOKED, AUTH_EPOCH_FIELD)
        if complete and not self._dirty:
            return
        async with self._lock:
            await self._reseed(now)

    async def _reseed(self, now: float) -> None:
        """Write every marker the database holds (adding, never clearing first: another replica may be
        recording a change right now), then drop markers the database no longer has."""
        markers = await self.markers.all()
        async with asyncio.timeout(REDIS_TIMEOUT * 4):
            pipe = self.redis.pipeline(transaction=True)
            if markers:
                pipe.hset(AUTH_REVOKED, mapping=markers)
            pipe.hset(AUTH_REVOKED, AUTH_EPOCH_FIELD, uuid.uuid4().hex)
            pipe.publish(AUTH_CHANNEL, _encoder.encode(AuthChange(kind="resync", at=now)))
            await pipe.execute()
            held = await self.redis.hgetall(AUTH_REVOKED)
        stale = []
        for raw_field, value in held.items():
            field = raw_field.decode()
            if field == AUTH_EPOCH_FIELD or field in markers:
                continue
            try:
                at = _decoder.decode(value).at
            except msgspec.MsgspecError:
                at = 0.0
            if at < now - STALE_MARGIN:  # a newer one may be another replica's change in flight
                stale.append(field)
        if stale:  # e.g. a user enabled while Redis missed it
            async with asyncio.timeout(REDIS_TIMEOUT):
                pipe = self.redis.pipeline(transaction=True)
                pipe.hdel(AUTH_REVOKED, *stale)
                pipe.publish(AUTH_CHANNEL, _encoder.encode(AuthChange(kind="resync", at=now)))
                await pipe.execute()
        self._dirty = False
        log.info("auth-change markers seeded into redis", extra={"markers": len(markers), "dropped": len(stale)})

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):  # Redis away (builtin TimeoutError is an OSError): next round
                pass
            except Exception:
                log.exception("auth-change reconcile failed")
            await asyncio.sleep(self.RECONCILE_SECONDS)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
