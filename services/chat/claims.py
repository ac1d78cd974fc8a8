"""Idempotency-Key claims that every chat replica sees (Redis).

While a replica answers a key, the key is claimed there for CLAIM_TTL, renewed as the answer goes on,
so a crashed replica or a request that vanished frees the key within CLAIM_TTL. Once answered, the key
holds the turn (sealed with the internal-token key: whoever can write Redis cannot plant an answer)
for ANSWERED_TTL, longer than the writer needs to persist it; the database is the record after that.
A request with the same key that lands on another replica meanwhile (a gateway retry, a client retry
through the Service) gets the 409 while the key is being answered and the replayed answer once there
is one, never a second generation. Redis away or slow: the claim is this process's alone, as it would
be with one replica. The answer's Redis key is shared with the gateways' fallback layers
(common.idempotency): whichever layer answers a key first, its answer is the one kept and replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import msgspec
from redis.asyncio import Redis

from common.contracts import TurnEvent
from common.idempotency import (
    ANSWERED_TTL, ANSWERING, KEEP_FIRST, REDIS_ERRORS, REDIS_TIMEOUT, key_in_use, redis_key, unsealed_turn,
)
from common.security import InternalTokens

log = logging.getLogger(__name__)

CLAIM_TTL = 30.0
RENEW_AFTER = 10.0  # an answer still going renews its claim this often
# only while the claim is still this request's: not once answered, not another's after it expired
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


class IdempotencyClaims:
    def __init__(self, redis: Redis, tokens: InternalTokens) -> None:
        self.redis = redis
        self.tokens = tokens
        self._local: dict[tuple[str, str], tuple[float, bytes]] = {}  # (user, key) -> (renewed at, token)
        self._background: set[asyncio.Task] = set()

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
        except REDIS_ERRORS as exc:
            log.warning("idempotency claim is local only", extra={"error": f"{type(exc).__name__}: {exc}"})
            return None
        if found is None:
            return None
        if found.startswith(ANSWERING):
            del self._local[slot]
            raise key_in_use()
        turn = unsealed_turn(self.tokens, found)
        if turn is None:  # not sealed by a key we know: never replayed; this request answers it
            return None
        del self._local[slot]
        return turn

    def keep(self, user_id: str, key: str) -> None:
        """The answer is still going: renew the claim (at most every RENEW_AFTER; never waits)."""
        slot = (user_id, key)
        held = self._local.get(slot)
        if held is None or time.monotonic() - held[0] < RENEW_AFTER:
            return
        self._local[slot] = (time.monotonic(), held[1])
        self._in_background(self.redis.eval(_RENEW, 1, redis_key(user_id, key), held[1], int(CLAIM_TTL * 1000)))

    async def answered(self, turn: TurnEvent) -> None:
        """The key's answer is spooled here: other replicas replay it from now on, unless a gateway's
        fallback layer answered the key first (its answer stands: the first answer is the one replayed)."""
        self._local.pop((turn.user_id, turn.idempotency_key), None)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.eval(KEEP_FIRST, 1, redis_key(turn.user_id, turn.idempotency_key),
                                      self.tokens.seal(msgspec.json.encode(turn)), int(ANSWERED_TTL * 1000))
        except REDIS_ERRORS as exc:
            # the claim expires by itself; until the database has the turn another replica may answer again
            log.debug("answered idempotency key not shared", extra={"error": f"{type(exc).__name__}: {exc}"})

    def release(self, user_id: str, key: str) -> None:
        """The request ended without an answer: the key may be tried again. Never waits, so it runs in
        the `finally` of a cancelled stream too (an await there would be cancelled again)."""
        held = self._local.pop((user_id, key), None)
        if held is not None:
            self._in_background(self.redis.eval(_RELEASE, 1, redis_key(user_id, key), held[1]))

    async def release_now(self, user_id: str, key: str) -> None:
        """`release`, awaited: the request ended in an error answer, and the caller (a gateway whose fallback
        layer asks for the key next) must find the key free when that answer reaches it."""
        held = self._local.pop((user_id, key), None)
        if held is None:
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.eval(_RELEASE, 1, redis_key(user_id, key), held[1])
        except REDIS_ERRORS as exc:  # the claim expires by itself
            log.debug("idempotency claim not released", extra={"error": f"{type(exc).__name__}: {exc}"})

    def _in_background(self, call) -> None:
        async def bounded() -> None:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT * 4):
                    await call
            except REDIS_ERRORS as exc:  # the claim expires by itself
                log.debug("idempotency claim not updated", extra={"error": f"{type(exc).__name__}: {exc}"})

        task = asyncio.get_running_loop().create_task(bounded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
