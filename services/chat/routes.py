"""Chat completions and conversations. Every conversation route is owner-only: another user's
conversation answers exactly like a missing one (404)."""

from __future__ import annotations

from typing import Annotated, Literal

from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import Parameter
from litestar.response import Stream

from common.errors import ApiError, decode_body
from common.openai_schema import ChatCompletionRequest
from common.openapi import CHAT_COMPLETION_ANSWERS, documented
from services.chat.completions import AUDIENCE, chat_completion
from services.chat.history import DB_ERRORS, store_unavailable
from services.chat.schemas import (
    Conversation, ConversationDeleted, ConversationList, CreateConversation, HistoryTurn, Message, MessageList,
)


@post("/v1/chat/completions", status_code=200,
      **documented(ChatCompletionRequest, errors=(403, 404, 409), answers=CHAT_COMPLETION_ANSWERS))
async def chat_completions(request: Request, state: State) -> Response | Stream:
    return await chat_completion(request, state.deps)


@post("/v1/conversations", status_code=201, **documented(CreateConversation, body_required=False))
async def create_conversation(request: Request, state: State) -> Conversation:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    body: CreateConversation = decode_body(await request.body() or b"{}", CreateConversation)
    try:
        return await state.deps.conversation_store.create(principal.subject, body.title, body.system_prompt,
                                                          body.metadata)
    except DB_ERRORS:
        raise store_unavailable() from None


@get("/v1/conversations", **documented())
async def list_conversations(
    request: Request, state: State,
    limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    before: Annotated[str | None, Parameter(max_length=64)] = None,
) -> ConversationList:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    try:
        found, more = await state.deps.conversation_store.list(principal.subject, limit, before)
    except DB_ERRORS:
        raise store_unavailable() from None
    return ConversationList(data=found, has_more=more)


@get("/v1/conversations/{conversation_id:str}", **documented(errors=(404,)))
async def read_conversation(request: Request, state: State, conversation_id: str) -> Conversation:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    return await state.deps.conversations.get(conversation_id, principal.subject)


@delete("/v1/conversations/{conversation_id:str}", status_code=200, **documented(errors=(404,)))
async def delete_conversation(request: Request, state: State, conversation_id: str) -> ConversationDeleted:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    try:
        deleted = await state.deps.conversation_store.delete(conversation_id, principal.subject)
    except DB_ERRORS:
        raise store_unavailable() from None
    state.deps.conversations.forget(conversation_id)
    if not deleted:
        await state.deps.conversations.get(conversation_id, principal.subject)  # raises the 404
    return ConversationDeleted(id=conversation_id)


@get("/v1/conversations/{conversation_id:str}/messages", **documented(errors=(404, 409)))
async def list_messages(
    request: Request, state: State, conversation_id: str,
    limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "asc",
    after: Annotated[str | None, Parameter(max_length=128)] = None,
) -> MessageList:
    """A page of the conversation's messages; `after` is the last message id of the previous page."""
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    conversations = state.deps.conversations
    await conversations.get(conversation_id, principal.subject)
    start_turn, index = _message_cursor(after) if after is not None else (None, 0)
    descending = order == "desc"
    try:
        # every turn holds at least one message, so limit + 1 turns past the cursor's tell whether more follow
        turns = await conversations.page(conversation_id, start_turn, limit + 2, descending)
    except LookupError:
        raise _unknown_cursor(after) from None
    except DB_ERRORS:
        raise store_unavailable() from None
    messages: list[Message] = []
    for turn in turns:
        page = _turn_messages(turn)
        if turn.turn_id == start_turn:  # what follows the cursor within its own turn
            page = page[:index] if descending else page[index + 1:]
        if descending:
            page.reverse()
        messages.extend(page)
        if len(messages) > limit:
            break
    data = messages[:limit]
    return MessageList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                       has_more=len(messages) > limit)


def _turn_messages(turn: HistoryTurn) -> list[Message]:
    """What the client sent in the turn, then the answer; ids are `<turn id>.<position>`."""
    created = int(turn.created)
    said = [(m["role"], m["content"]) for m in turn.messages] + [("assistant", turn.assistant)]
    return [Message(id=f"{turn.turn_id}.{i}", role=role, content=content, turn_id=turn.turn_id, created=created,
                    degraded=turn.degraded if role == "assistant" and i == len(said) - 1 else None)
            for i, (role, content) in enumerate(said)]


def _message_cursor(message_id: str) -> tuple[str, int]:
    turn_id, _, position = message_id.rpartition(".")
    if not turn_id or not position.isdigit():
        raise _bad_cursor(message_id)
    return turn_id, int(position)


def _bad_cursor(message_id: str) -> ApiError:
    return ApiError(400, f"'{message_id}' is not a message id; pass the last_id of a page.",
                    param="after", code="invalid_cursor")


def _unknown_cursor(message_id: str) -> ApiError:
    # a page another chat replica served may end on a turn it answered that is not stored yet
    return ApiError(409, f"No message '{message_id}' in this conversation yet: a message just answered may not be "
                         "stored yet; retry shortly.", param="after", code="cursor_not_found",
                    headers={"Retry-After": "1"})


route_handlers = [chat_completions, create_conversation, list_conversations, read_conversation,
                  delete_conversation, list_messages]
