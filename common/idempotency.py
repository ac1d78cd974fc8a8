"""Idempotency-Key answers every layer shares: the first answer for a (user, key) is the one replayed.

The chat service (services/chat/claims.py: a claim while it answers, then the answer) and the
gateways' fallback layers (cached answer, simplified model) keep a key's answer under one Redis key,
sealed with the internal-token key (whoever can write Redis cannot plant an answer). An answer is
stored only where no other answer is yet (KEEP_FIRST), so the first answer from any layer stands and
every retry replays it, streamed or not, from whichever layer is up by then. A degraded 503 is no
answer and is not kept. Redis away: the answer is kept in this process (bounded) and replayed from
there; the database (the turn the writer stores) is the record after ANSWERED_TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator

import msgspec
from litestar import Response
from litestar.response import Stream
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.contracts import DEGRADED_HEADER, IDEMPOTENCY_HEADER, REPLAY_HEADER, TurnEvent
from common.errors import ApiError
from common.guard import MAX_IDEMPOTENCY_KEY
from common.openai_schema import ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta, ResponseMessage, Usage
from common.security import InternalTokens
from common.sse import DONE, SSE_HEADERS, frame

log = logging.getLogger(__name__)

ANSWERING = b"answering:"  # a claim: the chat service is answering the key now
ANSWERED_TTL = 3600.0
REDIS_TIMEOUT = 0.25
REDIS_ERRORS = (RedisError, OSError)  # builtin TimeoutError (asyncio.timeout) is an OSError
# the answer, unless the key already holds one (a claim in progress is not an answer): returns the one it holds
KEEP_FIRST = """local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, 10) ~= 'answering:' then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false"""
_turn = msgspec.json.Decoder(TurnEvent)


def redis_key(user_id: str, key: str) -> str:
    return f"dualgate:chat:idempotency:{user_id}:{hashlib.sha256(key.encode()).hexdigest()}"


def idempotency_key(headers) -> str | None:
    """The request's Idempotency-Key, or None; a 400 for one no layer could keep (the kit's input guard
    already refused one that is not printable ASCII)."""
    key = headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise ApiError(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters.",
                       param="Idempotency-Key", code="invalid_value")
    return key


def key_in_use() -> ApiError:
    return ApiError(409, "A request with this Idempotency-Key is still being answered; retry shortly.",
                    param="Idempotency-Key", code="idempotency_key_in_use", headers={"Retry-After": "1"})


def reused_key() -> ApiError:
    return ApiError(422, "This Idempotency-Key was already used with a different request.",
                    param="Idempotency-Key", code="idempotency_key_reused")


def unsealed_turn(tokens: InternalTokens, blob: bytes) -> TurnEvent | None:
    """The turn in a sealed answer; None for a claim, or for what no key of ours sealed (never replayed)."""
    if blob.startswith(ANSWERING):
        return None
    payload = tokens.unseal(blob)
    if payload is None:
        log.warning("unsealed idempotency answer in redis ignored")
        return None
    try:
        return _turn.decode(payload)
    except msgspec.MsgspecError:
        return None


class AnswerBook:
    """The gateways' side: find a key's first answer, and keep an answer only if it is the first."""

    MAX_LOCAL = 10_000

    def __init__(self, redis: Redis, tokens: InternalTokens) -> None:
        self.redis = redis
        self.tokens = tokens
        self._local: OrderedDict[tuple[str, str], TurnEvent] = OrderedDict()  # while Redis is away

    async def find(self, user_id: str, key: str) -> TurnEvent | None:
        """The key's first answer; the 409 while the chat service answers it (its claim lives on only
        while that answer goes on: CLAIM_TTL after a crash), so no layer gives the key a second answer."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                blob = await self.redis.get(redis_key(user_id, key))
        except REDIS_ERRORS as exc:
            log.warning("idempotency answers are local only", extra={"error": f"{type(exc).__name__}: {exc}"})
            blob = None
        if blob and blob.startswith(ANSWERING):
            raise key_in_use()
        found = unsealed_turn(self.tokens, blob) if blob else None
        return found or self._local.get((user_id, key))

    async def keep_first(self, turn: TurnEvent) -> TurnEvent:
        """The key's first answer: `turn`, now kept, or the answer another layer or replica kept before."""
        slot = (turn.user_id, turn.idempotency_key)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                held = await self.redis.eval(KEEP_FIRST, 1, redis_key(*slot),
                                             self.tokens.seal(msgspec.json.encode(turn)), int(ANSWERED_TTL * 1000))
        except REDIS_ERRORS as exc:
            log.warning("idempotency answer kept locally", extra={"error": f"{type(exc).__name__}: {exc}"})
            first = self._local.get(slot) or turn
        else:
            first = (unsealed_turn(self.tokens, held) if held else None) or turn
        self._local[slot] = first
        self._local.move_to_end(slot)
        while len(self._local) > self.MAX_LOCAL:
            self._local.popitem(last=False)
        return first


# ---- what an answer said, and the answer again ------------------------------------------------------

class AnswerText(msgspec.Struct):
    assistant: str
    finish_reason: str
    usage: Usage
    completion_id: str
    model: str


class _Peek(msgspec.Struct):
    id: str = ""
    model: str = ""
    choices: list[dict] = []
    usage: Usage | None = None


_peek = msgspec.json.Decoder(_Peek)


def answer_text(parts: list[bytes], stream: bool) -> AnswerText | None:
    """The assistant's text, finish reason and usage of a whole answer (a JSON body, or an SSE stream's
    event groups); None for anything that is not one."""
    events = [parts[0]] if not stream and parts else []
    if stream:
        for event in b"".join(parts).split(b"\n\n"):
            for line in event.split(b"\n"):
                if line.startswith(b"data:") and (data := line[5:].strip()) != b"[DONE]":
                    events.append(data)
    text: list[str] = []
    finish = ""
    found = _Peek()
    try:
        for event in events:
            chunk = _peek.decode(event)
            found = msgspec.structs.replace(found, id=chunk.id or found.id, model=chunk.model or found.model,
                                            usage=chunk.usage or found.usage)
            for choice in chunk.choices:
                part = choice.get("message") or choice.get("delta") or {}
                text.append(part.get("content") or "")
                finish = choice.get("finish_reason") or finish
    except (msgspec.MsgspecError, AttributeError):
        return None
    if not finish or found.usage is None:
        return None
    return AnswerText("".join(text), finish, found.usage, found.id, found.model)


def replay(turn: TurnEvent, stream: bool, include_usage: bool, headers: dict[str, str]) -> Response | Stream:
    """A kept answer as the first one was given: flagged as a replay, and with its layer when degraded."""
    headers = {**headers, REPLAY_HEADER: "true"}
    if turn.degraded:
        headers[DEGRADED_HEADER] = turn.degraded
    cid = turn.completion_id or f"chatcmpl-{turn.turn_id}"
    created = int(turn.created)
    if not stream:
        completion = ChatCompletion(
            id=cid, created=created, model=turn.model,
            choices=[Choice(index=0, message=ResponseMessage("assistant", turn.assistant),
                            finish_reason=turn.finish_reason)],
            usage=turn.usage)
        return Response(content=msgspec.json.encode(completion), status_code=200, media_type="application/json",
                        headers=headers)

    async def frames() -> AsyncIterator[bytes]:
        def chunk(delta: Delta, finish: str | None = None) -> bytes:
            return frame(ChatCompletionChunk(id=cid, created=created, model=turn.model,
                                             choices=[ChunkChoice(0, delta, finish)]))

        yield chunk(Delta(role="assistant", content=""))
        for piece in _pieces(turn.assistant):
            yield chunk(Delta(content=piece))
        yield chunk(Delta(), turn.finish_reason)
        if include_usage:
            yield frame(ChatCompletionChunk(id=cid, created=created, model=turn.model, choices=[], usage=turn.usage))
        yield DONE

    return Stream(frames(), status_code=200, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


def _pieces(text: str, size: int = 64) -> list[str]:
    """Split a stored answer into chunks at word boundaries, as a stream would have carried it."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            space = text.rfind(" ", start + 1, end)
            end = space if space > start else end
        pieces.append(text[start:end])
        start = end
    return pieces
