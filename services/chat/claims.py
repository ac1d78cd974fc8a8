"""Idempotency-Key claims that every chat replica sees (Redis).

While a replica answers a key, the key is claimed there; once answered, it holds the turn for
ANSWERED_TTL, longer than the writer needs to persist it (the database is the record after that).
A request with the same key that lands on another replica meanwhile (a gateway retry, a client
retry through the Service) gets the 409 while the key is being answered and the replayed answer
once there is one, never a second generation. Redis away or slow: the claim is this process's alone,
as it would be with one replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.contracts import TurnEvent
from common.errors import ApiError

log = logging.getLogger(__name__)

CLAIM_TTL = 600.0  # a claim whose request vanished without releasing it frees itself
ANSWERED_TTL = 3600.0
REDIS_TIMEOUT = 0.25  # a stalled Redis costs a keyed request this much, then the claim is local
ANSWERING = b"answering:"
# delete the claim only while it is still this request's: not once answered, not another's after expiry
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_turn = msgspec.json.Decoder(TurnEvent)


def key_in_use() -> ApiError:
    return ApiError(409, "A request with this Idempotency-Key is still being answered; retry shortly.",
                    param="Idempotency-Key", code="idempotency_key_in_use", headers={"Retry-After": "1"})


def redis_key(user_id: str, key: str) -> str:
    return f"dualgate:chat:idempotency:{user_id}:{hashlib.sha256(key.encode()).hexdigest()}"


class IdempotencyClaims:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._local: dict[tuple[str, str], tuple[float, bytes]] = {}  # (user, key) -> (claimed at, token)

    async def claim(self, user_id: str, key: str) -> TurnEvent | None:
        """Claim the key for this request, or return the turn another replica answered it with.
        Raises the 409 while another request answers it."""
        slot = (user_id, key)
        held = self._local.get(slot)
        if held is not None and time.monotonic() - held[0] < CLAIM_TTL:
            raise key_in_use()
        token = ANSWERING + uuid.uuid4().hex.encode()
        self._local[slot] = (time.monotonic(), token)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                found = await self.redis.set(redis_key(user_id, key), token, nx=True, get=True,
                                             px=int(CLAIM_TTL * 1000))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("idempotency claim is local only", extra={"error": f"{type(exc).__name__}: {exc}"})
            return None
        if found is None:
            return None
        del self._local[slot]
        if found.startswith(ANSWERING):
            raise key_in_use()
        return _turn.decode(found)

    async def answered(self, turn: TurnEvent) -> None:
        """The key's answer is spooled here: other replicas replay it from now on."""
        self._local.pop((turn.user_id, turn.idempotency_key), None)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.set(redis_key(turn.user_id, turn.idempotency_key), msgspec.json.encode(turn),
                                     px=int(ANSWERED_TTL * 1000))
        except (RedisError, OSError, TimeoutError) as exc:
            # the claim expires by itself; until the database has the turn another replica may answer again
            log.debug("answered idempotency key not shared", extra={"error": f"{type(exc).__name__}: {exc}"})

    async def release(self, user_id: str, key: str) -> None:
        """The request ended without an answer (or after `answered`): the key is free to try again."""
        held = self._local.pop((user_id, key), None)
        if held is None:
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.eval(_RELEASE, 1, redis_key(user_id, key), held[1])
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("idempotency claim not released; it expires", extra={"error": f"{type(exc).__name__}: {exc}"})
