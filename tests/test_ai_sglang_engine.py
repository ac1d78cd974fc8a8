"""The sglang engine against worker processes that speak SGLang's HTTP wire format (fake workers driven
by the synthetic engine: no GPU here). What a caller of the engine notices: answers with usage, the
same worker for every turn of a conversation, and a dead or sick worker taken out and brought back."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest
from support import eventually

from common.engines.base import EngineRejected, EngineUnavailable, Finished, GenerationRequest
from services.inference.engines.sglang import WorkerOptions, WorkerPool, WorkerStreamError, route_key
from services.inference.engines.synthetic import SyntheticEngine
from services.inference.testing.fake_sglang_worker import FakeSglangWorker


@pytest.fixture(scope="module")
def workers():
    started = [FakeSglangWorker(f"w{i}", ttft_ms=5, itl_ms=1, tokens=6, context_length=512).start() for i in range(3)]
    yield started
    for worker in started:
        worker.kill()


@pytest.fixture
async def pool():
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=1.0)) as client:
        pool = WorkerPool(client, WorkerOptions(health_interval=0.2, health_timeout=1.0, reset_timeout=1.0))
        yield pool
        await pool.close()


def ask(conversation: str | None = None, text: str = "hello there", history: list[dict] | None = None,
        max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(messages=[*(history or []), {"role": "user", "content": text}], max_tokens=max_tokens,
                             temperature=0, affinity_key=conversation)


async def run(engine, request: GenerationRequest) -> tuple[str, Finished]:
    text = ""
    async for event in engine.generate(request):
        if isinstance(event, Finished):
            return text, event
        text += event.text
    raise AssertionError("the stream ended without Finished")


def stats(worker: FakeSglangWorker) -> dict:
    return httpx.get(f"{worker.url}/fake/stats", timeout=5).json()


async def test_answers_stream_with_the_usage_the_worker_reports(workers, pool):
    engine = pool.engine([w.url for w in workers])
    request = ask("conv-usage", "tell me something")

    text, finished = await run(engine, request)

    assert len(text.split()) == 6
    assert finished.finish_reason == "stop"
    assert finished.completion_tokens == 6
    assert finished.prompt_tokens == SyntheticEngine.count_prompt_tokens(request.messages)
    assert finished.worker in {w.url for w in workers}
    # what each worker serves is read from /get_model_info and /v1/models
    described = await eventually(lambda: all(s["served_model"] == "fake-sglang-model" and s["max_model_len"] == 512
                                             for s in pool.status()), what="workers described")
    assert described


async def test_every_turn_of_a_conversation_goes_to_the_same_worker(workers, pool):
    engine = pool.engine([w.url for w in workers])
    served: dict[str, set[str]] = {}
    for turn in range(4):
        results = await asyncio.gather(*(run(engine, ask(f"conv-{i}", f"turn {turn}")) for i in range(24)))
        for i, (_, finished) in enumerate(results):
            served.setdefault(f"conv-{i}", set()).add(finished.worker)

    assert all(len(w) == 1 for w in served.values()), served
    assert len({next(iter(w)) for w in served.values()}) == 3  # and the conversations spread over all workers


async def test_without_a_conversation_id_the_shared_prompt_prefix_keeps_the_worker(workers, pool):
    engine = pool.engine([w.url for w in workers])
    history: list[dict] = []
    served = set()
    for turn in range(4):
        question = {"role": "user", "content": "My name is Ada." if turn == 0 else f"Question {turn}?"}
        text, finished = await run(engine, GenerationRequest(messages=[*history, question], max_tokens=8))
        served.add(finished.worker)
        history += [question, {"role": "assistant", "content": text}]

    assert len(served) == 1


async def test_a_busy_worker_sheds_requests_to_the_least_loaded(workers, pool):
    engine = pool.engine([w.url for w in workers], params={"max_outstanding": 1})

    results = await asyncio.gather(*(run(engine, ask("conv-busy", f"q{i}")) for i in range(6)))
    _, alone = await run(engine, ask("conv-busy", "one at a time"))

    used = Counter(finished.worker for _, finished in results)
    assert len(used) == 3 and max(used.values()) == 2  # spread evenly while the preferred one was busy
    assert alone.worker == engine.choose(route_key(ask("conv-busy"))).url  # back home once it is free


async def test_a_failure_before_the_first_token_is_retried_on_another_worker(workers, pool):
    engine = pool.engine([w.url for w in workers])
    _, first = await run(engine, ask("conv-retry"))
    preferred = next(w for w in workers if w.url == first.worker)
    before = stats(preferred)["requests"]
    httpx.post(f"{preferred.url}/fake/fail", json={"status": 500, "count": 1}, timeout=5)

    text, finished = await run(engine, ask("conv-retry", "again"))

    assert text and finished.worker != preferred.url
    assert stats(preferred)["requests"] == before + 1  # it was asked, failed, and another answered


async def test_a_request_the_runtime_refuses_is_the_callers_error_and_is_not_retried(workers, pool):
    engine = pool.engine([w.url for w in workers])
    before = sum(stats(w)["requests"] for w in workers)

    for _ in range(4):  # more than the breaker's fail_max: refusals must not open it
        with pytest.raises(EngineRejected, match="context length"):
            await run(engine, ask("conv-long", "word " * 600))

    assert sum(stats(w)["requests"] for w in workers) == before + 4
    assert all(s["breaker"] == "closed" and s["in_rotation"] for s in pool.status())


async def test_a_worker_failing_its_health_check_leaves_the_rotation_and_returns(workers, pool):
    engine = pool.engine([w.url for w in workers])
    _, first = await run(engine, ask("conv-health"))
    sick = next(w for w in workers if w.url == first.worker)
    httpx.post(f"{sick.url}/fake/health", json={"healthy": False}, timeout=5)
    try:
        await eventually(lambda: not next(s for s in pool.status() if s["url"] == sick.url)["in_rotation"],
                         timeout=10, what="sick worker out of rotation")
        _, moved = await run(engine, ask("conv-health", "while sick"))
        assert moved.worker != sick.url
    finally:
        httpx.post(f"{sick.url}/fake/health", json={"healthy": True}, timeout=5)
    await eventually(lambda: next(s for s in pool.status() if s["url"] == sick.url)["in_rotation"],
                     timeout=10, what="worker back in rotation")
    _, back = await run(engine, ask("conv-health", "healthy again"))
    assert back.worker == sick.url


async def test_a_worker_killed_mid_run_is_taken_out_and_its_conversations_move(pool):
    crew = [FakeSglangWorker(f"k{i}", ttft_ms=5, itl_ms=5, tokens=120).start() for i in range(3)]
    try:
        engine = pool.engine([w.url for w in crew])
        conversations = [f"kill-{i}" for i in range(18)]
        first = await asyncio.gather(*(run(engine, ask(c, max_tokens=4)) for c in conversations))
        home = {c: f.worker for c, (_, f) in zip(conversations, first)}
        victim_url = Counter(home.values()).most_common(1)[0][0]
        victim = next(w for w in crew if w.url == victim_url)
        on_victim = [c for c in conversations if home[c] == victim_url]

        # a round of long answers; the victim dies while they stream
        streams = [asyncio.ensure_future(run(engine, ask(c, "a long one", max_tokens=120))) for c in conversations]
        await eventually(lambda: stats(victim)["in_flight"] == len(on_victim), timeout=10,
                         what="every stream of the victim started")
        victim.kill()
        outcomes = await asyncio.gather(*streams, return_exceptions=True)

        cut = [c for c, o in zip(conversations, outcomes) if isinstance(o, BaseException)]
        assert sorted(cut) == sorted(on_victim)  # only its own streams broke...
        assert all(isinstance(o, WorkerStreamError) for o in outcomes if isinstance(o, BaseException))
        await eventually(lambda: not next(s for s in pool.status() if s["url"] == victim_url)["in_rotation"],
                         timeout=10, what="the killed worker out of rotation")

        # ...its conversations move, each to one surviving worker, and stay there; the others never move
        for _ in range(2):
            again = await asyncio.gather(*(run(engine, ask(c, "next turn", max_tokens=4)) for c in conversations))
            for c, (_, finished) in zip(conversations, again):
                if c in on_victim:
                    assert finished.worker != victim_url
                    home.setdefault(f"moved:{c}", finished.worker)
                    assert finished.worker == home[f"moved:{c}"]
                else:
                    assert finished.worker == home[c]

        victim.restart()  # same port: the registry's URL is valid again
        await eventually(lambda: next(s for s in pool.status() if s["url"] == victim_url)["healthy"],
                         timeout=10, what="the restarted worker healthy")

        async def back_home() -> bool:
            _, finished = await run(engine, ask(on_victim[0], "are you back", max_tokens=4))
            return finished.worker == victim_url

        await eventually(back_home, timeout=10, interval=0.3, what="conversations back on the restarted worker")
    finally:
        for worker in crew:
            worker.kill()


async def test_with_every_worker_gone_the_engine_says_unavailable(pool):
    lonely = FakeSglangWorker("gone").start()
    engine = pool.engine([lonely.url])
    await run(engine, ask("conv-gone"))
    lonely.kill()

    with pytest.raises(EngineUnavailable):
        await run(engine, ask("conv-gone", "anyone?"))
