"""The embedded CPU engine on the real SmolLM2 weights: what a caller of generate() notices.

The first run ever dequantizes the GGUF into the model cache (~25 s); later runs load it in ~2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from support import eventually

from common.engines.cpu import CpuEngine, EngineBusy, EngineStopped, Finished, GenerationRequest, TokenDelta

pytestmark = pytest.mark.asyncio(loop_scope="session")

CACHE = Path(os.environ.get("DUALGATE_MODEL_CACHE") or Path(__file__).resolve().parents[1] / ".dualgate" / "models")


def story(topic: str = "a lighthouse keeper") -> list[dict]:
    return [{"role": "user", "content": f"Write a long story about {topic}."}]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine() -> AsyncIterator[CpuEngine]:
    engine = CpuEngine(cache_dir=CACHE, threads=2, max_batch=8, max_queue=8)
    await engine.start()
    yield engine
    await engine.stop()


async def run(engine: CpuEngine, request: GenerationRequest) -> tuple[list[str], Finished]:
    pieces: list[str] = []
    async for event in engine.generate(request):
        if isinstance(event, Finished):
            return pieces, event
        pieces.append(event.text)
    raise AssertionError("the stream ended without Finished")


async def test_greedy_generation_streams_text_and_counts_real_tokens(engine: CpuEngine) -> None:
    pieces, finished = await run(engine, GenerationRequest(messages=story(), max_tokens=8, temperature=0))

    assert pieces and all(pieces)
    assert "".join(pieces).strip()
    if finished.finish_reason == "length":
        assert finished.completion_tokens == 8
    else:
        assert finished.finish_reason == "stop" and finished.completion_tokens <= 8
    assert finished.prompt_tokens == engine.count_prompt_tokens(story()) > 10
    assert engine.context_length == 8192


async def test_stop_string_ends_text_before_it(engine: CpuEngine) -> None:
    pieces, _ = await run(engine, GenerationRequest(messages=story(), max_tokens=24, temperature=0))
    text = "".join(pieces)
    words = text.split()
    stop = f"{words[len(words) // 2]} {words[len(words) // 2 + 1]}"  # two words: the stop spans tokens

    pieces, finished = await run(engine, GenerationRequest(messages=story(), max_tokens=24, temperature=0,
                                                           stop=[stop]))

    assert "".join(pieces) == text[:text.index(stop)]
    assert finished.finish_reason == "stop"


async def test_same_seed_samples_the_same_text(engine: CpuEngine) -> None:
    request = GenerationRequest(messages=story("a winter market"), max_tokens=16, temperature=0.8, top_p=0.95,
                                seed=1234)

    first, _ = await run(engine, request)
    second, _ = await run(engine, request)

    assert "".join(first) == "".join(second) != ""


async def test_concurrent_requests_are_batched_together(engine: CpuEngine) -> None:
    peak = 0

    async def one(topic: str) -> Finished:
        nonlocal peak
        async for event in engine.generate(GenerationRequest(messages=story(topic), max_tokens=16, temperature=0)):
            peak = max(peak, engine.active_sequences)
            if isinstance(event, Finished):
                return event
        raise AssertionError("the stream ended without Finished")

    results = await asyncio.gather(*(one(t) for t in ("the sea", "a city", "a robot", "a train")))

    assert all(r.completion_tokens > 0 for r in results)
    assert peak > 1
    await eventually(lambda: engine.active_sequences == 0)


async def test_closing_a_stream_frees_its_slot(engine: CpuEngine) -> None:
    events = engine.generate(GenerationRequest(messages=story(), max_tokens=200, temperature=0))
    assert isinstance(await events.__anext__(), TokenDelta)
    assert engine.active_sequences == 1

    await events.aclose()

    await eventually(lambda: engine.active_sequences == 0, timeout=5)


async def test_full_queue_answers_busy_and_stop_ends_streams() -> None:
    small = CpuEngine(cache_dir=CACHE, threads=2, max_batch=1, max_queue=1)
    await small.start()
    long = GenerationRequest(messages=story(), max_tokens=200, temperature=0)
    running = small.generate(long)
    await running.__anext__()
    waiting = small.generate(long)
    waiting_first = asyncio.ensure_future(waiting.__anext__())
    await eventually(lambda: small.queue_depth == 1)

    with pytest.raises(EngineBusy) as busy:
        await small.generate(long).__anext__()
    assert busy.value.retry_after >= 1

    await small.stop()
    with pytest.raises(EngineStopped):
        async for _ in running:
            pass
    with pytest.raises(EngineStopped):
        await waiting_first
    assert not small.ready


@contextlib.asynccontextmanager
async def serve_inference(cpu: CpuEngine):
    """The inference service's routes over real HTTP (uvicorn on a free port) in front of `cpu`."""
    import socket

    import httpx
    import uvicorn

    from common.app import create_service_app
    from common.security import InternalTokens, Principal
    from common.settings import Settings
    from services.inference.app import InferenceDeps
    from services.inference.engines.sglang import WorkerPool
    from services.inference.routes import route_handlers

    settings = Settings(service="inference-under-test")
    tokens = InternalTokens(issuer_service="tests", keys={"v1": b"k" * 32}, current="v1")
    app = create_service_app(settings, route_handlers=route_handlers)
    async with httpx.AsyncClient() as workers_http:
        app.state.deps = InferenceDeps(settings=settings, tokens=tokens, cpu=cpu, sglang=WorkerPool(workers_http))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        await eventually(lambda: server.started)
        headers = tokens.headers("inference", Principal(subject="usr_test", scopes=("user",)))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", headers=headers,
                                         timeout=60) as http:
                yield http
        finally:
            server.should_exit = True
            await task


async def test_over_http_a_full_queue_is_a_429_with_retry_after_and_a_hang_up_gives_the_slot_on() -> None:
    small = CpuEngine(cache_dir=CACHE, threads=2, max_batch=1, max_queue=1)
    await small.start()
    body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 200, "temperature": 0,
            "messages": story(), "deployment": {"engine": "cpu"}}
    try:
        async with serve_inference(small) as http:
            async with http.stream("POST", "/v1/chat/completions", json=body) as running:
                assert running.status_code == 200  # it holds the only slot
                waiting = asyncio.ensure_future(http.post("/v1/chat/completions",
                                                          json={**body, "stream": False, "max_tokens": 2}))
                await eventually(lambda: small.queue_depth == 1)

                refused = await http.post("/v1/chat/completions", json=body)

                assert refused.status_code == 429
                assert int(refused.headers["retry-after"]) >= 1
                assert refused.json()["error"]["code"] == "engine_overloaded"
            # hanging up the running stream cancels its sequence: the queued request gets the slot
            answered = await asyncio.wait_for(waiting, 30)
            assert answered.status_code == 200
            assert answered.json()["usage"]["completion_tokens"] <= 2
            await eventually(lambda: small.active_sequences == 0 and small.queue_depth == 0)
    finally:
        await small.stop()
