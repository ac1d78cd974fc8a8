"""Conversations on the request path: ownership, and the turns that make their context.

A conversation's history is what the database holds plus what this process answered that the
database does not show yet (the outbox). Small caches stand in while Postgres is down, so a
conversation this replica served keeps its context through the outage.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import OrderedDict

import asyncpg

from common.contracts import TurnEvent
from common.errors import ApiError, not_found, unavailable
from services.chat.outbox import TurnOutbox
from services.chat.schemas import Conversation, HistoryTurn
from services.chat.store import ConversationStore, TurnStore

log = logging.getLogger(__name__)

DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
MAX_CONVERSATIONS = 10_000
MAX_HISTORIES = 1_000


def store_unavailable() -> ApiError:
    return unavailable("Conversations are unavailable right now; retry shortly.", code="conversations_unavailable")


def as_history(turn: TurnEvent) -> HistoryTurn:
    return HistoryTurn(turn_id=turn.turn_id, created=turn.created, messages=turn.request_messages,
                       assistant=turn.assistant, degraded=turn.degraded)


def _created_at(turn: HistoryTurn) -> dt.datetime:
    # the same microsecond rounding as the turn's created_at column (TurnStore.insert_turn)
    return dt.datetime.fromtimestamp(turn.created, dt.timezone.utc)


def _order_key(turn: HistoryTurn) -> tuple[dt.datetime, str]:
    return _created_at(turn), turn.turn_id


class Conversations:
    def __init__(self, store: ConversationStore, turns: TurnStore, outbox: TurnOutbox) -> None:
        self.store = store
        self.turns = turns
        self.outbox = outbox
        self._owners: OrderedDict[str, tuple[str, Conversation]] = OrderedDict()
        self._histories: OrderedDict[str, list[HistoryTurn]] = OrderedDict()

    async def get(self, conversation_id: str, user_id: str) -> Conversation:
        """The caller's conversation; another user's looks exactly like a missing one (404)."""
        try:
            conversation = await self.store.get(conversation_id, user_id)
        except DB_ERRORS:
            cached = self._owners.get(conversation_id)
            if cached is None:
                raise store_unavailable() from None
            if cached[0] != user_id:
                raise self._missing(conversation_id) from None
            return cached[1]
        if conversation is None:
            self.forget(conversation_id)
            raise self._missing(conversation_id)
        self._owners[conversation_id] = (user_id, conversation)
        self._owners.move_to_end(conversation_id)
        while len(self._owners) > MAX_CONVERSATIONS:
            self._owners.popitem(last=False)
        return conversation

    async def history(self, conversation_id: str, limit: int = 200) -> list[HistoryTurn]:
        """Past turns, oldest first: the database's, then this process's not yet persisted."""
        try:
            stored = await self.turns.history(conversation_id, limit)
        except DB_ERRORS:
            cached = self._histories.get(conversation_id)
            if cached is None:
                raise store_unavailable() from None
            stored = list(cached)
        else:
            self._histories[conversation_id] = list(stored)
            self._histories.move_to_end(conversation_id)
            while len(self._histories) > MAX_HISTORIES:
                self._histories.popitem(last=False)
        seen = {t.turn_id for t in stored}
        pending = [as_history(t) for t in self.outbox.pending_turns(conversation_id) if t.turn_id not in seen]
        merged = stored + pending
        merged.sort(key=lambda t: (t.created, t.turn_id))
        return merged[-limit:]

    async def page(self, conversation_id: str, start_turn: str | None, limit: int,
                   descending: bool) -> list[HistoryTurn]:
        """Up to `limit` turns, oldest first (newest first when `descending`), from `start_turn`
        (included) on: the database's merged with this process's not yet persisted. Raises LookupError
        when the conversation has no turn `start_turn`. Unlike `history`, never served from the cache
        while Postgres is down: a listing must be whole or refused, not silently short."""
        pending = [as_history(t) for t in self.outbox.pending_turns(conversation_id)]
        start = None
        if start_turn is not None:
            created = await self.turns.created_at(conversation_id, start_turn)
            if created is None:
                created = next((_created_at(t) for t in pending if t.turn_id == start_turn), None)
            if created is None:
                raise LookupError(start_turn)
            start = (created, start_turn)
        stored = await self.turns.page(conversation_id, start, limit, descending)
        seen = {t.turn_id for t in stored}
        merged = stored + [t for t in pending if t.turn_id not in seen
                           and (start is None or (_order_key(t) <= start if descending else _order_key(t) >= start))]
        merged.sort(key=_order_key, reverse=descending)
        return merged[:limit]

    def remember(self, turn: TurnEvent) -> None:
        """A turn this process just answered: part of the cached history from now on."""
        cached = self._histories.get(turn.conversation_id)
        if cached is not None:
            cached.append(as_history(turn))
            del cached[:-200]

    def forget(self, conversation_id: str) -> None:
        self._owners.pop(conversation_id, None)
        self._histories.pop(conversation_id, None)

    @staticmethod
    def _missing(conversation_id: str) -> ApiError:
        return not_found(f"No conversation '{conversation_id}'.", code="conversation_not_found",
                         param="conversation_id")
