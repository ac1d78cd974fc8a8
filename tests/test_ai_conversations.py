"""Conversations through the whole chain (nginx -> router -> gateway ai -> chat): continue a conversation
with the OpenAI SDK, keep the system prompt and the newest turns when the window is full, owner-only
access, and answers replayed for a repeated Idempotency-Key.

An "echo" synthetic model answers with one word per message of the context it received
(`<role initial>:<first word>`), so a test can read back exactly what the model was given."""

from __future__ import annotations

import time
import uuid

import asyncpg
import httpx
import psycopg
import pytest
from ai_support import register_model
from identity_support import current_creds
from redis.asyncio import Redis
from support import eventually, internal_tokens, user_with_key

from common.contracts import TurnEvent, UsageEvent
from common.events import EventPublisher
from common.openai_schema import Usage
from services.chat.claims import IdempotencyClaims, redis_key
from services.chat.history import DB_ERRORS, Conversations
from services.chat.outbox import TurnOutbox
from services.chat.schemas import HistoryTurn
from services.chat.store import ConversationStore, TurnStore
from stack.servers import free_port

CPU_MODEL = "smollm2-135m-instruct"
SUFFIX = uuid.uuid4().hex[:6]
ECHO = f"echo-{SUFFIX}"
ECHO_SMALL = f"echo-small-{SUFFIX}"
SLOW = f"slow-{SUFFIX}"
LONG = f"long-{SUFFIX}"


@pytest.fixture(scope="module")
async def models(base_url, admin_headers):
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        echo = {"engine": "synthetic", "tokenizer": "words", "params": {"echo": 1, "ttft_ms": 2, "itl_ms": 1}}
        await register_model(http, admin_headers, id=ECHO, context_length=4096, **echo)
        await register_model(http, admin_headers, id=ECHO_SMALL, context_length=80, **echo)
        await register_model(http, admin_headers, id=SLOW, context_length=4096, engine="synthetic",
                             params={"ttft_ms": 300, "itl_ms": 300, "tokens": 4})
        await register_model(http, admin_headers, id=LONG, context_length=4096, engine="synthetic",
                             params={"ttft_ms": 20, "itl_ms": 200, "tokens": 60})
    return {"echo": ECHO, "small": ECHO_SMALL, "slow": SLOW, "long": LONG}


@pytest.fixture(scope="module")
async def other_user(base_url, admin_headers) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        _, key = await user_with_key(http, admin_headers)
    return {"authorization": f"Bearer {key}"}


async def new_conversation(http: httpx.AsyncClient, headers: dict, **fields) -> str:
    resp = await http.post("/v1/conversations", json=fields, headers=headers)
    assert resp.status_code == 201, resp.text
    assert resp.json()["object"] == "conversation"
    return resp.json()["id"]


def streamed_text(stream) -> str:
    return "".join(choice.delta.content or "" for chunk in stream for choice in chunk.choices)


async def test_openai_sdk_continues_a_conversation_with_its_context(openai_client, http, demo_headers, models):
    cid = await new_conversation(http, demo_headers, title="pirates", system_prompt="Pirate talk only.")

    first = openai_client.chat.completions.create(
        model=models["echo"], messages=[{"role": "user", "content": "Alpha one"}],
        extra_body={"conversation_id": cid})
    second = streamed_text(openai_client.chat.completions.create(
        model=models["echo"], messages=[{"role": "user", "content": "Bravo two"}], stream=True,
        extra_body={"conversation_id": cid}))
    third = openai_client.chat.completions.create(
        model=models["echo"], messages=[{"role": "user", "content": "Charlie three"}],
        extra_body={"conversation_id": cid})

    assert first.choices[0].message.content == "s:Pirate u:Alpha"
    assert second == "s:Pirate u:Alpha a:s:Pirate u:Bravo"  # streamed: the first turn is in its context
    assert third.choices[0].message.content == "s:Pirate u:Alpha a:s:Pirate u:Bravo a:s:Pirate u:Charlie"
    messages = (await http.get(f"/v1/conversations/{cid}/messages", headers=demo_headers)).json()["data"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Alpha one"), ("assistant", first.choices[0].message.content),
        ("user", "Bravo two"), ("assistant", second),
        ("user", "Charlie three"), ("assistant", third.choices[0].message.content)]


async def test_the_cpu_model_sees_earlier_turns_of_the_conversation(openai_client, http, demo_headers):
    cid = await new_conversation(http, demo_headers)

    first = openai_client.chat.completions.create(
        model=CPU_MODEL, max_tokens=4, temperature=0, messages=[{"role": "user", "content": "Say hello."}],
        extra_body={"conversation_id": cid})
    second = openai_client.chat.completions.create(
        model=CPU_MODEL, max_tokens=4, temperature=0, messages=[{"role": "user", "content": "Say hello."}],
        extra_body={"conversation_id": cid})

    # the same question costs more prompt tokens the second time: the first turn came along
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


async def test_a_full_window_keeps_the_system_prompt_and_the_newest_turns(openai_client, http, demo_headers, models):
    cid = await new_conversation(http, demo_headers, system_prompt="Pirate talk only.")
    answers = []
    for i in range(1, 5):
        completion = openai_client.chat.completions.create(
            model=models["small"], max_tokens=16, extra_body={"conversation_id": cid},
            messages=[{"role": "user", "content": f"T{i} " + "pad " * 9}])
        answers.append(completion.choices[0].message.content.split())

    assert answers[1] == ["s:Pirate", "u:T1", "a:s:Pirate", "u:T2"]  # everything still fits
    last = answers[3]
    assert last[0] == "s:Pirate" and last[-1] == "u:T4"  # the system prompt and the question stay
    assert "u:T3" in last  # the newest earlier turn stays
    assert "u:T1" not in last  # the oldest went to make room


async def test_a_request_too_long_for_the_window_is_a_400_naming_messages(http, demo_headers, models):
    resp = await http.post("/v1/chat/completions", headers=demo_headers, json={
        "model": models["small"], "max_tokens": 8, "messages": [{"role": "user", "content": "word " * 100}]})

    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "messages"
    assert resp.json()["error"]["code"] == "context_length_exceeded"


async def test_another_users_conversation_is_a_404_everywhere(http, demo_headers, other_user, models):
    cid = await new_conversation(http, demo_headers, title="mine")
    turn = {"model": models["echo"], "conversation_id": cid, "messages": [{"role": "user", "content": "secret"}]}
    assert (await http.post("/v1/chat/completions", json=turn, headers=demo_headers)).status_code == 200

    for resp in (
        await http.get(f"/v1/conversations/{cid}", headers=other_user),
        await http.get(f"/v1/conversations/{cid}/messages", headers=other_user),
        await http.post("/v1/chat/completions", json=turn, headers=other_user),
        await http.delete(f"/v1/conversations/{cid}", headers=other_user),
    ):
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == "conversation_not_found"
    listed = (await http.get("/v1/conversations", headers=other_user)).json()["data"]
    assert cid not in {c["id"] for c in listed}
    # and it is still there for its owner
    assert (await http.get(f"/v1/conversations/{cid}", headers=demo_headers)).json()["title"] == "mine"


async def read_all_pages(http: httpx.AsyncClient, headers: dict, cid: str, **params) -> list[list[dict]]:
    pages, after = [], None
    while True:
        query = {**params, **({"after": after} if after else {})}
        resp = await http.get(f"/v1/conversations/{cid}/messages", params=query, headers=headers)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert (page["first_id"], page["last_id"]) == ((page["data"][0]["id"], page["data"][-1]["id"])
                                                       if page["data"] else (None, None))
        pages.append(page["data"])
        if not page["has_more"]:
            return pages
        after = page["last_id"]


async def test_messages_are_read_in_pages_forwards_and_backwards(http, demo_headers, models):
    cid = await new_conversation(http, demo_headers)
    words = ("Alpha", "Bravo", "Charlie", "Delta", "Echo")
    expected = []
    for word in words:
        resp = await http.post("/v1/chat/completions", headers=demo_headers, json={
            "model": models["echo"], "conversation_id": cid, "messages": [{"role": "user", "content": word}]})
        assert resp.status_code == 200, resp.text
        expected += [("user", word), ("assistant", resp.json()["choices"][0]["message"]["content"])]

    whole = (await http.get(f"/v1/conversations/{cid}/messages", params={"limit": 100},
                            headers=demo_headers)).json()
    assert whole["has_more"] is False
    assert [(m["role"], m["content"]) for m in whole["data"]] == expected

    forwards = await read_all_pages(http, demo_headers, cid, limit=3)  # pages end inside a turn too
    assert [len(page) for page in forwards] == [3, 3, 3, 1]
    assert [m for page in forwards for m in page] == whole["data"]
    backwards = await read_all_pages(http, demo_headers, cid, limit=4, order="desc")
    assert [len(page) for page in backwards] == [4, 4, 2]
    assert [m for page in backwards for m in page] == whole["data"][::-1]


@pytest.mark.parametrize(("params", "status", "param", "code"), [
    ({"after": "not-a-message-id"}, 400, "after", "invalid_cursor"),
    ({"after": "turn_nobody_has.0"}, 409, "after", "cursor_not_found"),  # maybe not stored yet: retryable
    ({"limit": 0}, 400, "limit", "invalid_value"),
    ({"limit": 101}, 400, "limit", "invalid_value"),
    ({"order": "sideways"}, 400, "order", "invalid_value"),
])
async def test_a_bad_messages_query_is_refused_naming_the_parameter(http, demo_headers, models, params, status, param,
                                                                   code):
    cid = await new_conversation(http, demo_headers)
    resp = await http.get(f"/v1/conversations/{cid}/messages", params=params, headers=demo_headers)
    assert resp.status_code == status, resp.text
    assert (resp.json()["error"]["param"], resp.json()["error"]["code"]) == (param, code)


def turn_event(turn_id: str, conversation_id: str, *, created: float, key: str = "") -> TurnEvent:
    return TurnEvent(turn_id=turn_id, conversation_id=conversation_id, user_id="usr-store", model="synthetic",
                     request_messages=[{"role": "user", "content": f"question {turn_id}"}],
                     assistant=f"answer {turn_id}", finish_reason="stop", usage=Usage(3, 2, 5), created=created,
                     idempotency_key=key)


async def test_a_page_holds_the_turns_not_yet_in_the_database_in_their_place(stack, tmp_path):
    """The turns a chat replica answered are listed before its writer has persisted them: merged in
    order with the database's, and a page may start at one of them."""
    async def nothing_settles(turns: list[TurnEvent]) -> set[str]:
        return set()

    cid = f"conv_{uuid.uuid4().hex}"
    now = time.time()
    turns = [turn_event(f"turn-{i}", cid, created=now + i) for i in range(6)]
    pool = await asyncpg.create_pool(stack.admin_dsn("chat"), min_size=1, max_size=2)
    publisher = EventPublisher(f"127.0.0.1:{free_port()}", client_id="page-test")  # nothing listens: all stay spooled
    await publisher.start()
    outbox = TurnOutbox(tmp_path, publisher, nothing_settles)
    await outbox.start()
    try:
        store = TurnStore(pool)
        for turn in turns[0::2]:
            assert await store.insert_turn(turn)
        for turn in turns[1::2]:
            await outbox.append(turn, UsageEvent(event_id=turn.turn_id, user_id=turn.user_id, key_id=None,
                                                 model=turn.model, prompt_tokens=3, completion_tokens=2, created=now))
        conversations = Conversations(ConversationStore(pool), store, outbox)

        async def page(start: str | None, limit: int, descending: bool = False) -> list[str]:
            return [t.turn_id for t in await conversations.page(cid, start, limit, descending)]

        assert await page(None, 10) == [f"turn-{i}" for i in range(6)]
        assert await page(None, 3) == ["turn-0", "turn-1", "turn-2"]
        assert await page("turn-3", 2) == ["turn-3", "turn-4"]  # a pending turn as the cursor
        assert await page("turn-4", 3, descending=True) == ["turn-4", "turn-3", "turn-2"]
        assert await page(None, 2, descending=True) == ["turn-5", "turn-4"]
        with pytest.raises(LookupError):
            await page("turn-9", 2)
    finally:
        await outbox.stop(timeout=0)
        await publisher.stop()
        await pool.execute("DELETE FROM turns WHERE conversation_id = $1", cid)
        await pool.close()


async def test_a_second_answer_to_a_stored_idempotency_key_is_settled_not_redelivered_forever(stack):
    """Two chat replicas may answer one Idempotency-Key: the database keeps one answer, and the other
    replica's spool must count its own as done rather than republish it every few seconds for ever."""
    pool = await asyncpg.create_pool(stack.admin_dsn("chat"), min_size=1, max_size=2)
    cid, key = f"conv_{uuid.uuid4().hex}", f"idem-{uuid.uuid4().hex}"
    now = time.time()
    first, second = turn_event(f"turn-{uuid.uuid4().hex}", cid, created=now, key=key), \
        turn_event(f"turn-{uuid.uuid4().hex}", cid, created=now + 1, key=key)
    unrelated = turn_event(f"turn-{uuid.uuid4().hex}", cid, created=now + 2, key=f"idem-{uuid.uuid4().hex}")
    try:
        store = TurnStore(pool)
        assert await store.insert_turn(first)
        assert not await store.insert_turn(second)  # one answer per key is stored
        assert await store.settled([first, second, unrelated]) == {first.turn_id, second.turn_id}
    finally:
        await pool.execute("DELETE FROM turns WHERE conversation_id = $1", cid)
        await pool.close()


async def test_while_the_database_is_down_a_listing_is_refused_not_served_short(tmp_path):
    """The chat path keeps a conversation's context from its cache through an outage; the listing
    must not pass that cache (the newest turns only) off as the whole conversation."""
    async def nothing_settles(turns: list[TurnEvent]) -> set[str]:
        return set()

    down = await asyncpg.create_pool(f"postgresql://chat@127.0.0.1:{free_port()}/chat", min_size=0, timeout=1)
    publisher = EventPublisher(f"127.0.0.1:{free_port()}", client_id="page-test")
    await publisher.start()
    outbox = TurnOutbox(tmp_path, publisher, nothing_settles)
    await outbox.start()
    try:
        conversations = Conversations(ConversationStore(down), TurnStore(down), outbox)
        conversations._histories["conv_cached"] = [HistoryTurn(turn_id="turn-1", created=time.time(),
                                                               messages=[], assistant="cached")]
        assert [t.assistant for t in await conversations.history("conv_cached")] == ["cached"]  # context: served
        with pytest.raises(DB_ERRORS):
            await conversations.page("conv_cached", None, 20, False)  # the route answers 503
    finally:
        await outbox.stop(timeout=0)
        await publisher.stop()
        await down.close()


async def test_conversations_are_listed_newest_first_and_deleted_for_good(http, demo_headers, models):
    older = await new_conversation(http, demo_headers, title="older")
    newer = await new_conversation(http, demo_headers, title="newer", metadata={"topic": "tests"})

    page = (await http.get("/v1/conversations", params={"limit": 2}, headers=demo_headers)).json()
    assert [c["id"] for c in page["data"]] == [newer, older]
    assert page["data"][0]["metadata"] == {"topic": "tests"}

    deleted = await http.delete(f"/v1/conversations/{older}", headers=demo_headers)
    assert deleted.status_code == 200 and deleted.json() == {"id": older, "deleted": True,
                                                             "object": "conversation.deleted"}
    assert (await http.get(f"/v1/conversations/{older}", headers=demo_headers)).status_code == 404
    resp = await http.post("/v1/chat/completions", headers=demo_headers, json={
        "model": models["echo"], "conversation_id": older, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "conversation_id"


async def test_a_repeated_idempotency_key_returns_the_stored_answer_not_a_second_one(
        http, demo_headers, models, stack):
    key = f"idem-{uuid.uuid4().hex}"
    body = {"model": "synthetic", "temperature": 0.7, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Only once, please."}]}
    headers = {**demo_headers, "Idempotency-Key": key}

    first = await http.post("/v1/chat/completions", json=body, headers=headers)
    again = await http.post("/v1/chat/completions", json=body, headers=headers)
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers) as resp:
        streamed = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
    other = await http.post("/v1/chat/completions", json={**body, "max_tokens": 9}, headers=headers)

    assert first.status_code == again.status_code == 200
    assert again.headers["x-dualgate-idempotent-replay"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["choices"] == first.json()["choices"] and again.json()["usage"] == first.json()["usage"]
    assert streamed[-1] == "data: [DONE]" and first.json()["choices"][0]["message"]["content"].split()[0] in streamed[1]
    assert other.status_code == 422 and other.json()["error"]["param"] == "Idempotency-Key"

    def rows() -> int:
        with psycopg.connect(stack.admin_dsn("chat"), connect_timeout=2) as conn:
            return conn.execute("SELECT count(*) FROM turns WHERE idempotency_key = %s", (key,)).fetchone()[0]

    await eventually(lambda: rows() == 1, timeout=20, what="the one turn persisted")
    assert rows() == 1  # one generation, one turn


async def test_a_key_another_chat_replica_holds_is_refused_while_answered_and_replayed_once_answered(
        http, admin_headers, stack):
    """A retry that lands on another chat replica never generates a second answer. The other replica
    is played here by the claims it shares through Redis (this stack runs one chat process)."""
    user_id, api_key = await user_with_key(http, admin_headers)
    headers = {"authorization": f"Bearer {api_key}"}
    body = {"model": "synthetic", "temperature": 0.7, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Only once, across replicas."}]}
    redis = Redis(port=stack.config.port("redis"), socket_timeout=2, socket_connect_timeout=2)
    other_replica = IdempotencyClaims(redis, internal_tokens(current_creds(stack), "chat"))
    answering, answered = f"idem-{uuid.uuid4().hex}", f"idem-{uuid.uuid4().hex}"
    try:
        assert await other_replica.claim(user_id, answering) is None
        busy = await http.post("/v1/chat/completions", json=body, headers={**headers, "Idempotency-Key": answering})
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "idempotency_key_in_use"
        assert busy.headers["retry-after"] == "1"
        other_replica.release(user_id, answering)  # it failed there: the key may be answered here

        async def released() -> bool:
            return not await redis.exists(redis_key(user_id, answering))

        await eventually(released, timeout=5, what="the other replica's claim released")
        fresh = await http.post("/v1/chat/completions", json=body, headers={**headers, "Idempotency-Key": answering})
        assert fresh.status_code == 200 and "x-dualgate-idempotent-replay" not in fresh.headers

        assert await other_replica.claim(user_id, answered) is None
        await other_replica.answered(TurnEvent(
            turn_id=f"turn_{uuid.uuid4().hex}", conversation_id=f"conv_{uuid.uuid4().hex}", user_id=user_id,
            model="synthetic", request_messages=body["messages"], assistant="answered on the other replica",
            finish_reason="stop", usage=Usage(5, 4, 9), created=time.time(), idempotency_key=answered,
            completion_id="chatcmpl-other-replica"))
        for stream in (False, True):
            async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": stream},
                                   headers={**headers, "Idempotency-Key": answered}) as resp:
                text = (await resp.aread()).decode()
            assert resp.status_code == 200 and resp.headers["x-dualgate-idempotent-replay"] == "true"
            assert "chatcmpl-other-replica" in text and "answered on the other replica" in text
    finally:
        await redis.aclose()


async def test_a_stream_the_client_leaves_frees_its_idempotency_key_at_once(http, admin_headers, models):
    """A client that gives up on a stream retries with the same key; it must not be told for minutes
    that the abandoned answer is still being answered."""
    _, api_key = await user_with_key(http, admin_headers)
    headers = {"authorization": f"Bearer {api_key}", "Idempotency-Key": f"idem-{uuid.uuid4().hex}"}
    body = {"model": models["long"], "stream": True, "messages": [{"role": "user", "content": "A long one."}]}
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                break  # the first chunk came: leave with the answer ~12 s from done

    async def retry_is_answered() -> bool:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as retry:
            return retry.status_code == 200  # 409 while the abandoned answer held the key

    await eventually(retry_is_answered, timeout=4, interval=0.2, what="the abandoned stream's key freed")


async def test_the_same_idempotency_key_while_the_first_is_answering_is_a_409(http, demo_headers, models):
    headers = {**demo_headers, "Idempotency-Key": f"busy-{uuid.uuid4().hex}"}
    body = {"model": models["slow"], "max_tokens": 4, "stream": True,
            "messages": [{"role": "user", "content": "take your time"}]}
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as first:
        assert first.status_code == 200
        second = await http.post("/v1/chat/completions", json=body, headers=headers)
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "idempotency_key_in_use"
        assert second.headers["retry-after"] == "1"
        await first.aread()
