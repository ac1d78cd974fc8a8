"""The response cache, per tenant, in Redis with a bounded in-process copy in front of it.

Only deterministic chat completions are cached (temperature 0, or a seed), keyed by the tenant
and every field that shapes the answer, so user B can never receive user A's answer. A streamed
answer is kept as the event groups it was relayed in and replays with the same boundaries, usage
and finish_reason; streamed and whole answers are cached apart, so a whole answer is never
replayed as a stream. Entries are fresh for `ttl`; the fallback chain may use them up to
`stale_ttl` (flagged as degraded). Redis down or slow: the in-process copy answers, else a miss.

`LastKnown` keeps the last good answer to a few per-tenant reads (/v1/users/me, /v1/usage,
/v1/models) for the fallback layers of both gateways.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict

import msgspec
from redis.asyncio import Redis

from common.limits import REDIS_COOLDOWN, REDIS_TIMEOUT, RedisCalls, RedisUnavailable
from common.openai_schema import ChatCompletionRequest

log = logging.getLogger(__name__)

MAX_ENTRY_BYTES = 1_048_576  # larger answers are not cached


class CacheEntry(msgspec.Struct, array_like=True):
    stored_at: float  # unix time
    stream: bool
    content_type: str
    parts: list[bytes]  # stream: the event groups as relayed; whole answer: [body]


class _KeyFields(msgspec.Struct, array_like=True):
    """Everything that shapes a deterministic answer, in a fixed order."""

    tenant: str
    stream: bool
    include_usage: bool
    model: str
    messages: list
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None


_key_encoder = msgspec.msgpack.Encoder()
_entry_encoder = msgspec.msgpack.Encoder()
_entry_decoder = msgspec.msgpack.Decoder(CacheEntry)


def is_deterministic(body: ChatCompletionRequest) -> bool:
    # a conversation's context lives on the server and changes turn by turn: never cached
    return (body.temperature == 0 or body.seed is not None) and body.n == 1 and body.conversation_id is None


def cache_key(tenant: str, body: ChatCompletionRequest) -> str | None:
    """The cache key of a cacheable request, None for one that must never be cached."""
    if not is_deterministic(body):
        return None
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    fields = _KeyFields(tenant=tenant, stream=body.stream, include_usage=include_usage, model=body.model,
                        messages=[msgspec.structs.asdict(m) for m in body.messages],
                        max_tokens=body.token_limit(), temperature=body.temperature, top_p=body.top_p,
                        stop=body.stop_list(), seed=body.seed)
    # the tenant in braces: on a Redis Cluster the entry shares a slot with the tenant's limits, which
    # read it in the same script (TokenBudget.admit)
    return f"{{{tenant}}}:{hashlib.sha256(_key_encoder.encode(fields)).hexdigest()}"


class _LocalLru:
    """Bounded by entry count and bytes; the least recently used goes first."""

    def __init__(self, max_entries: int, max_bytes: int = 64 * 1_048_576) -> None:
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str):
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value: object, size: int) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._items[key] = (value, size)
        self._bytes += size
        while self._items and (len(self._items) > self._max_entries or self._bytes > self._max_bytes):
            _, (_, dropped) = self._items.popitem(last=False)
            self._bytes -= dropped


class ResponseCache:
    def __init__(self, redis: Redis | None, *, ttl: float, stale_ttl: float, local_entries: int = 2048,
                 timeout: float = REDIS_TIMEOUT, cooldown: float = REDIS_COOLDOWN) -> None:
        self.ttl = ttl
        self.stale_ttl = max(stale_ttl, ttl)
        self._redis = redis
        self._calls = RedisCalls("cache", timeout, cooldown)
        self._local = _LocalLru(local_entries)
        self._writes: set[asyncio.Task] = set()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _redis_key(key: str) -> str:
        return f"dualgate:cache:{key}"

    def lookup_key(self, key: str | None) -> str | None:
        """Where `key` lives in Redis, for a lookup made together with the limits; None: nothing to look up."""
        return self._redis_key(key) if key is not None and self._redis is not None else None

    @property
    def fresh_pttl_ms(self) -> int:
        """Entries are written to live `stale_ttl` and are fresh for `ttl`: fresh while more than this is left."""
        return int((self.stale_ttl - self.ttl) * 1000)

    async def get(self, key: str, *, max_age: float | None = None) -> CacheEntry | None:
        """A fresh entry (or one at most `max_age` old), else None. Never raises for Redis."""
        entry = self._local.get(key)
        if entry is None and self._redis is not None:
            try:
                raw = await self._calls.run(lambda: self._redis.get(self._redis_key(key)))
            except RedisUnavailable:
                raw = None
            entry = self._keep(key, raw)
        return self._fresh(entry, max_age)

    def adopt(self, key: str, raw: bytes) -> CacheEntry | None:
        """An entry read from Redis with the limits: kept in process like any other; returned when fresh."""
        return self._fresh(self._keep(key, raw))

    def _keep(self, key: str, raw: bytes | None) -> CacheEntry | None:
        if not raw:
            return None
        try:
            entry = _entry_decoder.decode(raw)
        except msgspec.MsgspecError:
            return None
        self._local.put(key, entry, len(raw))
        return entry

    def get_local(self, key: str) -> CacheEntry | None:
        """A fresh entry from the in-process copy alone: no wait on Redis."""
        return self._fresh(self._local.get(key))

    def _fresh(self, entry: CacheEntry | None, max_age: float | None = None) -> CacheEntry | None:
        max_age = self.ttl if max_age is None else max_age
        return entry if entry is not None and time.time() - entry.stored_at <= max_age else None

    def put(self, key: str, entry: CacheEntry) -> None:
        """Store in process now and in Redis in the background (the answer is not held up)."""
        raw = _entry_encoder.encode(entry)
        if len(raw) > MAX_ENTRY_BYTES:
            return
        self._local.put(key, entry, len(raw))
        if self._redis is not None:
            task = asyncio.ensure_future(self._write(key, raw))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, raw: bytes) -> None:
        try:
            await self._calls.run(lambda: self._redis.set(self._redis_key(key), raw, px=int(self.stale_ttl * 1000)))
        except RedisUnavailable:
            pass  # the in-process copy still answers on this replica

    async def drain(self) -> None:
        if self._writes:
            await asyncio.wait(self._writes, timeout=1.0)


class LastKnown:
    """The last good answer to a per-tenant read, for when its service cannot answer."""

    def __init__(self, redis: Redis | None, *, ttl: float = 86_400.0, local_entries: int = 10_000,
                 timeout: float = REDIS_TIMEOUT, cooldown: float = REDIS_COOLDOWN) -> None:
        self._redis = redis
        self._ttl_ms = int(ttl * 1000)
        self._calls = RedisCalls("last-known", timeout, cooldown)
        self._local = _LocalLru(local_entries)
        self._writes: set[asyncio.Task] = set()

    @staticmethod
    def _key(tenant: str, path: str) -> str:
        digest = hashlib.sha256(f"{tenant}\x00{path}".encode()).hexdigest()
        return f"dualgate:last:{digest}"

    def remember(self, tenant: str, path: str, body: bytes) -> None:
        key = self._key(tenant, path)
        self._local.put(key, body, len(body))
        if self._redis is not None:
            task = asyncio.ensure_future(self._write(key, body))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, body: bytes) -> None:
        try:
            await self._calls.run(lambda: self._redis.set(key, body, px=self._ttl_ms))
        except RedisUnavailable:
            pass

    async def recall(self, tenant: str, path: str) -> bytes | None:
        key = self._key(tenant, path)
        body = self._local.get(key)
        if body is None and self._redis is not None:
            try:
                body = await self._calls.run(lambda: self._redis.get(key))
            except RedisUnavailable:
                body = None
            if body:
                self._local.put(key, body, len(body))
        return body
