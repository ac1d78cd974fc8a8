"""One turn per request and one answer per Idempotency-Key, through the whole stack, while gateways
hang and the chat service is stopped; degraded answers kept in the conversation, flagged."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from support import wait_for

from stack.config import REPLICA_OF
from stack.drill import admin_dsn
from stack.local import LocalStack

AI_GATEWAYS = ("gateway-ai", *[name for name, of in REPLICA_OF.items() if of == "gateway-ai"])
SLOW_MODEL = "once-slow"  # the synthetic engine, slow to its first token: a request stays in flight


def _sample(stack: LocalStack, component: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{stack.config.url(component)}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _chat_prepared(stack: LocalStack) -> float:
    """Chat completions the chat service has prepared (model and context) and sent to inference."""
    return _sample(stack, "chat", "dualgate_stage_seconds_count", service="chat", stage="prepare")


def _spool_empty(stack: LocalStack) -> bool:
    return all(_sample(stack, "chat", "dualgate_outbox_pending", service="chat", state=state) == 0
               for state in ("unpublished", "unconfirmed"))


def _turns_of_request(stack: LocalStack, request_id: str) -> list[tuple[str, str]]:
    with psycopg.connect(admin_dsn(stack, "chat")) as conn:
        return conn.execute("SELECT turn_id, assistant FROM turns WHERE request_id = %s", (request_id,)).fetchall()


def _primary_again(stack: LocalStack, headers: dict[str, str]) -> None:
    """Until chat answers on the AI domain's own path (pools healthy, breaker closed), three times running."""
    clean = 0

    def answered_cleanly() -> bool:
        nonlocal clean
        response = httpx.post(f"{stack.config.base_url}/v1/chat/completions", headers=headers, timeout=30, json={
            "model": "synthetic", "max_tokens": 2, "temperature": 0.7,
            "messages": [{"role": "user", "content": f"settle {uuid.uuid4().hex}"}]})
        ok = (response.status_code == 200 and "x-dualgate-degraded" not in response.headers
              and response.headers.get("x-dualgate-route") == "ai")
        clean = clean + 1 if ok else 0
        return clean >= 3

    wait_for(answered_cleanly, 60, what="a clean primary path")


def _content(response: httpx.Response) -> str:
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        return response.json()["choices"][0]["message"]["content"]
    parts = []
    for event in response.text.split("\n\n"):
        if event.startswith("data: {"):
            for choice in json.loads(event[6:]).get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def test_a_request_failed_over_while_its_first_gateway_still_runs_it_is_stored_once(
        stack: LocalStack, admin_headers, demo_headers):
    model = {"context_length": 4096, "engine": "synthetic", "tokenizer": "words",
             "params": {"ttft_ms": 2500, "itl_ms": 5, "tokens": 6}}
    with httpx.Client(base_url=stack.config.base_url, timeout=60) as http:
        made = http.post("/v1/models", headers=admin_headers, json={"id": SLOW_MODEL, **model})
        if made.status_code == 409:
            made = http.patch(f"/v1/models/{SLOW_MODEL}", headers=admin_headers, json=model)
        assert made.status_code in (200, 201), made.text
    _primary_again(stack, demo_headers)
    request_id = f"once-{uuid.uuid4().hex}"
    prepared = _chat_prepared(stack)
    with ThreadPoolExecutor(max_workers=1) as pool, \
            httpx.Client(base_url=stack.config.base_url, timeout=90) as http:
        sent = pool.submit(http.post, "/v1/chat/completions", headers={**demo_headers, "x-request-id": request_id},
                           json={"model": SLOW_MODEL, "max_tokens": 6,
                                 "messages": [{"role": "user", "content": "stored once, whoever answers"}]})
        try:
            # the AI gateway has passed it on and the chat service is generating: now the gateway hangs
            wait_for(lambda: _chat_prepared(stack) > prepared, 30, what="the chat service has the request")
            for name in AI_GATEWAYS:
                stack.supervisor.signal(name, "STOP")
            response = sent.result(timeout=90)
        finally:
            for name in AI_GATEWAYS:
                stack.supervisor.signal(name, "CONT")
    assert response.status_code == 200, response.text
    assert response.headers["x-dualgate-route"] == "fallback"  # the router failed it over: asked twice
    stack.wait_ready((*AI_GATEWAYS, "router"), timeout=60)
    # both attempts reached the chat service, and whatever each spooled has reached the database
    wait_for(lambda: _chat_prepared(stack) >= prepared + 2, 30, what="both attempts at the chat service")
    wait_for(lambda: _spool_empty(stack), 60, what="the spool drained")
    stored = _turns_of_request(stack, request_id)
    assert len(stored) == 1, stored
    assert stored[0][1] == response.json()["choices"][0]["message"]["content"]
    _primary_again(stack, demo_headers)


def test_one_idempotency_key_gets_one_answer_from_any_layer_also_after_chat_is_back(stack: LocalStack,
                                                                                    demo_headers):
    ask = {"model": "synthetic", "max_tokens": 8, "temperature": 1.0,
           "messages": [{"role": "user", "content": f"one answer per key {uuid.uuid4().hex[:6]}"}]}
    headers = {**demo_headers, "idempotency-key": f"once-{uuid.uuid4().hex}"}
    _primary_again(stack, demo_headers)  # every AI gateway has seen chat answer for the model
    answers: list[httpx.Response] = []
    stack.supervisor.stop("chat")
    try:
        with httpx.Client(base_url=stack.config.base_url, timeout=90) as http:
            for stream in (False, False, True, False):
                answers.append(http.post("/v1/chat/completions", headers=headers, json={**ask, "stream": stream}))
    finally:
        stack.supervisor.start("chat")
        stack.wait_ready(("chat",), timeout=120)
    _primary_again(stack, demo_headers)
    with httpx.Client(base_url=stack.config.base_url, timeout=90) as http:
        answers += [http.post("/v1/chat/completions", headers=headers, json={**ask, "stream": stream})
                    for stream in (False, True)]
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    # the first answer came from a fallback layer, and every later one is that answer, flagged as it was
    assert {a.headers.get("x-dualgate-degraded") for a in answers} == {"simplified"}
    assert all(a.headers.get("x-dualgate-idempotent-replay") == "true" for a in answers[1:])
    first = _content(answers[0])
    assert first and [_content(a) for a in answers] == [first] * 6


def test_a_degraded_answer_in_a_conversation_appears_in_its_history_flagged(stack: LocalStack, demo_headers):
    with httpx.Client(base_url=stack.config.base_url, timeout=90) as http:
        made = http.post("/v1/conversations", headers=demo_headers, json={"title": "degraded history"})
        assert made.status_code in (200, 201), made.text
        conversation = made.json()["id"]
        _primary_again(stack, demo_headers)
        stack.supervisor.stop("chat")
        try:
            answered = http.post("/v1/chat/completions", headers=demo_headers, json={
                "model": "synthetic", "max_tokens": 8, "temperature": 1.0, "conversation_id": conversation,
                "messages": [{"role": "user", "content": "what did you say?"}]})
        finally:
            stack.supervisor.start("chat")
            stack.wait_ready(("chat",), timeout=120)
        assert answered.status_code == 200, answered.text
        assert answered.headers["x-dualgate-degraded"] == "simplified"

        def history() -> list[dict]:
            listed = http.get(f"/v1/conversations/{conversation}/messages", headers=demo_headers)
            return listed.json()["data"] if listed.status_code == 200 else []

        messages = wait_for(lambda: len(history()) == 2 and history(), 30, what="the degraded turn in the history")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == _content(answered)
    assert messages[1]["degraded"] == "simplified" and not messages[0].get("degraded")
    _primary_again(stack, demo_headers)
