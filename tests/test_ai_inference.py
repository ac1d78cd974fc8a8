"""Inference as a client of the platform notices it: a hang-up frees the engine's slot, SGLang deployments
answer through the whole chain and survive a dead worker, and a failing deployment falls back to the
registry's fallback model (flagged) or says 503 with Retry-After."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import httpx
import pytest
from ai_support import acting_as, register_model
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from support import eventually

from services.inference.testing.fake_sglang_worker import FakeSglangWorker
from stack.bench.client import SYNTHETIC, TOKEN_STAMP, StreamedAnswer
from stack.bench.layers import layers
from stack.bench.overhead import stage_totals
from stack.config import GATEWAYS, SERVICES
from stack.servers import free_port

CPU_MODEL = "smollm2-135m-instruct"
SUFFIX = uuid.uuid4().hex[:6]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def fake_workers():
    started = [FakeSglangWorker(f"stack-w{i}", ttft_ms=5, itl_ms=2, tokens=8).start() for i in range(3)]
    yield started
    for worker in started:
        worker.kill()


async def test_a_client_hanging_up_mid_stream_frees_its_cpu_engine_slot(http, demo_headers, stack):
    metrics_url = f"{stack.config.url('inference')}/metrics"
    before = metric(httpx.get(metrics_url).text, "dualgate_engine_cancelled_total", engine="cpu")
    body = {"model": CPU_MODEL, "stream": True, "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a very long story about the sea."}]}

    async with http.stream("POST", "/v1/chat/completions", json=body, headers=demo_headers) as resp:
        assert resp.status_code == 200
        tokens = 0
        async for line in resp.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                tokens += 1
                if tokens == 3:
                    break
        busy = metric(httpx.get(metrics_url).text, "dualgate_engine_active_sequences", engine="cpu")
    # leaving the block hangs up mid-stream: nginx, router, gateway and chat each drop the upstream

    assert busy >= 1
    await eventually(lambda: metric(httpx.get(metrics_url).text, "dualgate_engine_active_sequences", engine="cpu")
                     == 0, timeout=10, what="the slot freed")
    assert metric(httpx.get(metrics_url).text, "dualgate_engine_cancelled_total", engine="cpu") > before


async def test_the_inference_service_exports_engine_metrics(http, demo_headers, stack):
    await http.post("/v1/chat/completions", headers=demo_headers, json={
        "model": CPU_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]})
    text = httpx.get(f"{stack.config.url('inference')}/metrics").text

    assert metric(text, "dualgate_ttft_seconds_count", model=CPU_MODEL) >= 1
    assert metric(text, "dualgate_tokens_total", model=CPU_MODEL, kind="completion") >= 1
    assert metric(text, "dualgate_engine_batch_size_count", engine="cpu") >= 1
    assert "dualgate_engine_queue_depth" in text and "dualgate_engine_active_sequences" in text


async def test_an_sglang_deployment_answers_keeps_conversations_on_a_worker_and_survives_a_dead_one(
        http, admin_headers, demo_headers, fake_workers, stack, creds):
    model = f"sglang-{SUFFIX}"
    await register_model(http, admin_headers, id=model, context_length=4096, engine="sglang",
                         served_model="fake-sglang-model", workers=[w.url for w in fake_workers])
    for w in fake_workers:
        httpx.post(f"{w.url}/fake/reset", timeout=5)
    conversations = []
    for _ in range(6):
        created = await http.post("/v1/conversations", json={}, headers=demo_headers)
        conversations.append(created.json()["id"])

    async def turn(cid: str, text: str) -> httpx.Response:
        return await http.post("/v1/chat/completions", headers=demo_headers, json={
            "model": model, "conversation_id": cid, "messages": [{"role": "user", "content": text}]})

    for round_ in range(3):
        answers = await asyncio.gather(*(turn(c, f"round {round_}") for c in conversations))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert all(a.json()["usage"]["completion_tokens"] == 8 for a in answers)

    # every conversation's turns went to exactly one worker (each worker counts requests per route key)
    per_worker = [Counter(httpx.get(f"{w.url}/fake/stats", timeout=5).json()["route_keys"]) for w in fake_workers]
    keys = set().union(*per_worker)
    assert len(keys) == 6 and all(sum(1 for c in per_worker if key in c) == 1 for key in keys)
    assert all(count == 3 for c in per_worker for count in c.values())

    busiest = max(range(3), key=lambda i: sum(per_worker[i].values()))
    fake_workers[busiest].kill()
    try:
        answers = await asyncio.gather(*(turn(c, "after the crash") for c in conversations))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        status = httpx.get(f"{stack.config.url('inference')}/internal/engines",
                           headers=acting_as(creds, "inference", "service:tests", ("service",))).json()
        dead = next(s for s in status["sglang"]["workers"] if s["url"] == fake_workers[busiest].url)
        assert not dead["healthy"] or dead["breaker"] != "closed"
    finally:
        fake_workers[busiest].restart()


async def test_a_deployment_failing_before_the_first_token_falls_back_to_its_fallback_model(
        http, admin_headers, demo_headers, stack):
    model = f"broken-{SUFFIX}"
    await register_model(http, admin_headers, id=model, context_length=4096, engine="sglang",
                         workers=[dead_url()], fallback_model="synthetic")
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "anyone home?"}]}

    plain = await http.post("/v1/chat/completions", json=body, headers=demo_headers)
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                           headers=demo_headers) as streamed:
        lines = [line async for line in streamed.aiter_lines() if line.startswith("data: ")]

    assert plain.status_code == 200, plain.text
    assert plain.headers["x-dualgate-degraded"] == "model-fallback"
    assert plain.json()["model"] == "synthetic"  # the answer says which model really answered
    assert streamed.headers["x-dualgate-degraded"] == "model-fallback"
    assert lines[-1] == "data: [DONE]"
    chat_metrics = httpx.get(f"{stack.config.url('chat')}/metrics").text
    assert metric(chat_metrics, "dualgate_fallback_total", layer="model-fallback") >= 2


async def test_a_failing_deployment_without_a_fallback_is_a_503_with_retry_after(http, admin_headers, demo_headers):
    model = f"broken-alone-{SUFFIX}"
    await register_model(http, admin_headers, id=model, context_length=4096, engine="sglang", workers=[dead_url()])

    resp = await http.post("/v1/chat/completions", headers=demo_headers, json={
        "model": model, "messages": [{"role": "user", "content": "anyone home?"}]})

    assert resp.status_code == 503
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["message"]


async def test_a_stamped_synthetic_model_tells_the_bench_how_long_each_token_took_through_the_chain(
        http, admin_headers, demo_headers):
    model = f"stamped-{SUFFIX}"
    await register_model(http, admin_headers, id=model, context_length=4096, engine="synthetic", tokenizer="words",
                         params={"ttft_ms": 5, "itl_ms": 20, "tokens": 6, "stamp": 1})
    body = {"model": model, "stream": True, "max_tokens": 6, "messages": [{"role": "user", "content": "tick"}]}

    arrivals: list[tuple[int, bytes]] = []
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=demo_headers) as streamed:
        async for piece in streamed.aiter_raw():
            arrivals.append((time.monotonic_ns(), piece))
    raw = b"".join(piece for _, piece in arrivals)
    stamps = [int(s) for s in TOKEN_STAMP.findall(raw)]

    assert streamed.status_code == 200
    assert len(stamps) == 6
    assert all(later - earlier >= 15e6 for earlier, later in zip(stamps, stamps[1:]))  # emitted itl_ms apart
    assert 0 < arrivals[-1][0] - stamps[-1] < 1e9  # a token arrives after it was emitted, from the same clock
    # the bench's parser reads each token exactly once however the stream is cut into reads
    for size in (1, 7, 64, len(raw)):
        answer = StreamedAnswer()
        for start in range(0, len(raw), size):
            answer.on_body(raw[start:start + size])
        assert len(answer.token_ms) == 6 and all(ms >= 0 for ms in answer.token_ms)


async def test_bench_layers_enters_the_chain_at_each_hop_and_reaches_the_engine_from_every_one(stack):
    results = await layers(stack.config, 2, Console(quiet=True))
    rows = results["layers"]
    assert list(rows) == ["inference", "chat", "gateway-ai", "router", "nginx"]
    assert all(row["errors"] == 0 and row["requests"] == 2 for row in rows.values()), rows
    # every entry point's first token came from the engine: never before its 20 ms TTFT
    assert all(row["ttft_p50_ms"] >= SYNTHETIC["ttft_ms"] for row in rows.values()), rows
    assert rows["inference"]["ttft_added_ms"] == 0.0
    assert rows["nginx"]["ttft_added_ms"] == round(rows["nginx"]["ttft_p50_ms"] - rows["router"]["ttft_p50_ms"], 2)


async def test_the_chain_tells_where_each_first_token_waited(stack, http, admin_headers, demo_headers):
    # dualgate_stage_seconds per hop and stage, as `dualgate bench overhead` reads it (stage_totals)
    model = f"staged-{SUFFIX}"
    await register_model(http, admin_headers, id=model, context_length=4096, engine="synthetic", tokenizer="words",
                         params={"ttft_ms": 40, "itl_ms": 1, "tokens": 3})
    body = {"model": model, "stream": True, "max_tokens": 3, "messages": [{"role": "user", "content": "where"}]}
    before = await stage_totals(stack.config)
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=demo_headers) as streamed:
        assert streamed.status_code == 200
        raw = b"".join([piece async for piece in streamed.aiter_raw()])
    assert raw.endswith(b"data: [DONE]\n\n")
    after = await stage_totals(stack.config)
    added = {name: (seconds - before.get(name, (0.0, 0.0))[0], count - before.get(name, (0.0, 0.0))[1])
             for name, (seconds, count) in after.items()}

    for stage in ("gateway-ai auth", "gateway-ai limits", "gateway-ai upstream", "gateway-ai first_event",
                  "chat prepare", "chat inference", "chat first_event"):
        assert added.get(stage, (0.0, 0.0))[1] == 1, stage  # one observation each, for this one answer
    # the chat service's wait for inference holds the engine's first token (40 ms); the gateway's wait
    # for the chat service holds all of chat's own stages before its headers
    assert added["chat inference"][0] >= 0.04
    assert added["gateway-ai upstream"][0] > added["chat prepare"][0] + added["chat inference"][0]


async def test_every_service_keeps_its_long_lived_objects_out_of_the_collectors_sight(stack):
    # a full collection walks every tracked object with the event loop stopped: ~110 ms once torch is loaded
    async with httpx.AsyncClient(timeout=5) as client:
        async def frozen(component: str) -> float:
            return metric((await client.get(f"{stack.config.url(component)}/metrics")).text,
                          "dualgate_gc_frozen_objects")

        for component in (*SERVICES, *GATEWAYS):
            assert await frozen(component) > 10_000, component

        async def model_frozen() -> bool:  # the CPU model and its libraries, once loaded
            return await frozen("inference") > 150_000

        assert await eventually(model_frozen, timeout=120, what="the loaded model frozen")
