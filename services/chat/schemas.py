from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from common.openai_schema import MAX_CONTENT_CHARS, Usage


class StreamPeek(msgspec.Struct):
    """The few fields of a chunk the chat service reads to persist the turn; the rest is relayed."""

    choices: list[dict] = []
    usage: Usage | None = None
    error: dict | None = None
    id: str = ""


class CreateConversation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    title: Annotated[str, Meta(max_length=256)] = ""
    # kept at the top of every turn's context, whatever else is dropped to fit the window
    system_prompt: Annotated[str, Meta(max_length=MAX_CONTENT_CHARS)] = ""
    metadata: Annotated[dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]],
                        Meta(max_length=16)] = {}


class Conversation(msgspec.Struct, kw_only=True):
    id: str
    created: int
    title: str
    system_prompt: str
    metadata: dict[str, str]
    object: str = "conversation"


class ConversationList(msgspec.Struct):
    data: list[Conversation]
    has_more: bool = False
    object: str = "list"


class ConversationDeleted(msgspec.Struct):
    id: str
    deleted: bool = True
    object: str = "conversation.deleted"


class Message(msgspec.Struct, kw_only=True):
    id: str
    role: str
    content: str
    turn_id: str
    created: int
    # the answer came from a fallback layer ("model-fallback", "cache", "simplified"), as the client saw it
    degraded: str | None = None
    object: str = "conversation.message"


class MessageList(msgspec.Struct, kw_only=True):
    data: list[Message]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: str = "list"


class HistoryTurn(msgspec.Struct, kw_only=True):
    """One past turn as context building and the messages listing see it."""

    turn_id: str
    created: float
    messages: list[dict[str, str]]  # what the client sent in that turn
    assistant: str
    degraded: str = ""  # the fallback layer that answered, if one did
