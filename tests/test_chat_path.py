"""A chat completion through nginx -> router -> gateway ai -> chat -> models -> inference, as a client sees it."""

from __future__ import annotations

import time

import httpx

CPU_MODEL = "smollm2-135m-instruct"


def test_openai_sdk_streams_an_answer_from_the_cpu_model(openai_client):
    stream = openai_client.chat.completions.create(
        model=CPU_MODEL, stream=True, max_tokens=12, temperature=0,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Name a colour."}],
    )
    text, finish_reason, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish_reason = choice.finish_reason or finish_reason
    assert text.strip()
    assert finish_reason in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_sdk_gets_a_whole_completion_from_the_cpu_model(openai_client):
    completion = openai_client.chat.completions.create(
        model=CPU_MODEL, max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}],
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content.strip()
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 8


def test_max_tokens_bounds_the_cpu_answer(openai_client):
    completion = openai_client.chat.completions.create(
        model=CPU_MODEL, max_tokens=3, temperature=0,
        messages=[{"role": "user", "content": "Write a long story about the sea."}],
    )
    assert completion.usage.completion_tokens == 3
    assert completion.choices[0].finish_reason == "length"


async def test_synthetic_stream_arrives_as_chunks_spread_in_time(http: httpx.AsyncClient, demo_headers):
    arrivals: list[float] = []
    body = {"model": "synthetic", "stream": True, "max_tokens": 16,
            "messages": [{"role": "user", "content": "count"}]}
    started = time.perf_counter()
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=demo_headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.perf_counter() - started)
    assert len(arrivals) == 16
    # the synthetic engine spaces tokens 5 ms apart: a buffered relay would deliver them all at once
    assert arrivals[-1] - arrivals[0] >= 15 * 0.005 * 0.8


def test_models_are_listed_in_openai_format(openai_client):
    ids = {m.id for m in openai_client.models.list().data}
    assert {CPU_MODEL, "synthetic"} <= ids


async def test_each_answer_carries_a_request_id(http: httpx.AsyncClient, demo_headers):
    resp = await http.post("/v1/chat/completions", headers={**demo_headers, "x-request-id": "trace-me-1"},
                           json={"model": "synthetic", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "trace-me-1"
