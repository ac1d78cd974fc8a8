"""Chat completions and conversations. Every conversation route is owner-only: another user's
conversation answers exactly like a missing one (404)."""

from __future__ import annotations

from typing import Annotated

from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import Parameter
from litestar.response import Stream

from common.errors import decode_body
from services.chat.completions import AUDIENCE, chat_completion
from services.chat.history import DB_ERRORS, store_unavailable
from services.chat.schemas import (
    Conversation, ConversationDeleted, ConversationList, CreateConversation, Message, MessageList,
)


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request, state: State) -> Response | Stream:
    return await chat_completion(request, state.deps)


@post("/v1/conversations", status_code=201)
async def create_conversation(request: Request, state: State) -> Conversation:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    body: CreateConversation = decode_body(await request.body() or b"{}", CreateConversation)
    try:
        return await state.deps.conversation_store.create(principal.subject, body.title, body.system_prompt,
                                                          body.metadata)
    except DB_ERRORS:
        raise store_unavailable() from None


@get("/v1/conversations")
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


@get("/v1/conversations/{conversation_id:str}")
async def read_conversation(request: Request, state: State, conversation_id: str) -> Conversation:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    return await state.deps.conversations.get(conversation_id, principal.subject)


@delete("/v1/conversations/{conversation_id:str}", status_code=200)
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


@get("/v1/conversations/{conversation_id:str}/messages")
async def list_messages(request: Request, state: State, conversation_id: str) -> MessageList:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    conversations = state.deps.conversations
    await conversations.get(conversation_id, principal.subject)
    messages: list[Message] = []
    for turn in await conversations.history(conversation_id, limit=1000):
        created = int(turn.created)
        for i, m in enumerate(turn.messages):
            messages.append(Message(id=f"{turn.turn_id}.{i}", role=m["role"], content=m["content"],
                                    turn_id=turn.turn_id, created=created))
        messages.append(Message(id=f"{turn.turn_id}.{len(turn.messages)}", role="assistant",
                                content=turn.assistant, turn_id=turn.turn_id, created=created))
    return MessageList(data=messages)


route_handlers = [chat_completions, create_conversation, list_conversations, read_conversation,
                  delete_conversation, list_messages]
