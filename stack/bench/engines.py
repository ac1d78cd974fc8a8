"""`dualgate bench cpu` and `dualgate bench routing`: the AI domain's engines, measured on their own.

cpu      The embedded CPU engine (SmolLM2-135M, continuous batching) in process: aggregate completion
         tokens/s and time to first token at several concurrency levels. Goal: at 8 concurrent at least
         4x the aggregate tokens/s of 1.
routing  The sglang engine in process, in front of several FAKE SGLang worker processes (synthetic
         tokens, SGLang's wire format): users hold conversations of several turns each; reports how
         many of a conversation's turns met the same worker (goal >= 95 %) and how evenly the
         requests spread over the workers (goal: every worker within 20 % of the mean).

Heavy imports (torch, the engines) happen inside the commands, so `dualgate --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections import Counter

from rich.console import Console
from rich.table import Table

from stack.report import percentile, percentiles, write

TOPICS = ("the sea", "a lighthouse keeper", "a city at night", "a long train journey", "an old library",
          "a mountain village", "a robot gardener", "a winter market")


# ---- cpu ----------------------------------------------------------------------------------------

async def _cpu_level(engine, concurrency: int, max_tokens: int, rounds: int) -> dict:
    from common.engines.base import Finished, GenerationRequest, TokenDelta

    ttfts: list[float] = []
    tokens = 0
    elapsed = 0.0

    async def one(i: int) -> int:
        request = GenerationRequest(
            messages=[{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}],
            max_tokens=max_tokens, temperature=0.0)
        started = time.perf_counter()
        first = None
        async for event in engine.generate(request):
            if isinstance(event, TokenDelta) and first is None:
                first = time.perf_counter() - started
            elif isinstance(event, Finished):
                if first is not None:
                    ttfts.append(first)
                return event.completion_tokens
        raise RuntimeError("generation ended without Finished")

    for round_ in range(rounds):
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(round_ * concurrency + i) for i in range(concurrency)))
        elapsed += time.perf_counter() - started
        tokens += sum(counts)
    return {"concurrency": concurrency, "rounds": rounds, "completion_tokens": tokens, "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 2), "ttft_p50_s": round(percentile(ttfts, 50), 4),
            "ttft_p95_s": round(percentile(ttfts, 95), 4), "ttft_samples": len(ttfts)}


async def cpu_bench(levels: list[int], max_tokens: int, rounds: int, threads: int, max_batch: int) -> dict:
    from common.engines.cpu import CpuEngine
    from stack.config import StackConfig

    engine = CpuEngine(cache_dir=StackConfig().model_cache, threads=threads, max_batch=max_batch,
                       max_queue=max(64, max(levels)))
    await engine.start()
    try:
        await _cpu_level(engine, 2, 8, 1)  # warm-up: first-call allocations are not what we measure
        results = [await _cpu_level(engine, level, max_tokens, rounds) for level in levels]
    finally:
        await engine.stop()
    base = results[0]["tokens_per_s"]
    for r in results:
        r["speedup_vs_first"] = round(r["tokens_per_s"] / base, 2)
    return {"engine": "cpu", "model": "SmolLM2-135M-Instruct (float32, dequantized from Q4_1 GGUF)",
            "max_tokens": max_tokens, "threads": threads, "max_batch": max_batch, "levels": results}


def cpu_main(args: argparse.Namespace) -> int:
    console = Console()
    levels = [int(x) for x in args.concurrency.split(",")]
    results = asyncio.run(cpu_bench(levels, args.max_tokens, args.rounds, args.threads, args.max_batch))
    table = Table("concurrency", "tokens", "seconds", "tokens/s", "x first", "TTFT p50 ms", "TTFT p95 ms")
    for r in results["levels"]:
        table.add_row(str(r["concurrency"]), str(r["completion_tokens"]), f"{r['elapsed_s']:.2f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_first']:.2f}", f"{r['ttft_p50_s'] * 1000:.0f}",
                      f"{r['ttft_p95_s'] * 1000:.0f}")
    console.print(table)
    by_level = {r["concurrency"]: r for r in results["levels"]}
    if 1 in by_level and 8 in by_level:
        ratio = by_level[8]["tokens_per_s"] / by_level[1]["tokens_per_s"]
        results["goal"] = {"want": ">= 4x tokens/s at 8 vs 1", "got": round(ratio, 2), "met": ratio >= 4}
        console.print(f"8 vs 1: {ratio:.2f}x aggregate tokens/s (goal >= 4x): "
                      f"{'[green]met[/green]' if ratio >= 4 else '[red]not met[/red]'}")
    write(results, args.output, console)
    return 0


# ---- routing ------------------------------------------------------------------------------------

async def routing_bench(workers: int, conversations: int, turns: int, concurrency: int, ttft_ms: float,
                        itl_ms: float, tokens: int) -> dict:
    import httpx

    from common.engines.base import Finished, GenerationRequest
    from services.inference.engines.sglang import WorkerOptions, WorkerPool
    from services.inference.testing.fake_sglang_worker import FakeSglangWorker

    fleet = [FakeSglangWorker(f"bench-{i}", ttft_ms=ttft_ms, itl_ms=itl_ms, tokens=tokens) for i in range(workers)]
    for worker in fleet:
        worker.start()
    served: dict[str, list[str]] = {}
    latencies: list[float] = []
    try:
        limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=1.0), limits=limits) as client:
            pool = WorkerPool(client, WorkerOptions(health_interval=1.0))
            engine = pool.engine([w.url for w in fleet])
            queue = iter(range(conversations))

            async def user() -> None:
                for n in queue:
                    conversation = f"bench-conv-{n}"
                    history: list[dict] = []
                    for t in range(turns):
                        question = {"role": "user", "content": f"turn {t} of conversation {n}"}
                        request = GenerationRequest(messages=[*history, question], max_tokens=tokens,
                                                    temperature=0.0, affinity_key=conversation)
                        started = time.perf_counter()
                        text = ""
                        async for event in engine.generate(request):
                            if isinstance(event, Finished):
                                served.setdefault(conversation, []).append(event.worker or "")
                            else:
                                text += event.text
                        latencies.append(time.perf_counter() - started)
                        history += [question, {"role": "assistant", "content": text}]

            started = time.perf_counter()
            await asyncio.gather(*(user() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            await pool.close()
    finally:
        for worker in fleet:
            worker.kill()
    total = sum(len(v) for v in served.values())
    on_home = sum(Counter(v).most_common(1)[0][1] for v in served.values())
    sticky = sum(1 for v in served.values() if len(set(v)) == 1)
    load = Counter(w for v in served.values() for w in v)
    mean = total / workers
    per_worker = [load.get(w.url, 0) for w in fleet]
    deviation = max(abs(c - mean) for c in per_worker) / mean
    return {
        "engine": "sglang (in process) -> fake SGLang workers (synthetic tokens, SGLang wire format)",
        "workers": workers, "conversations": conversations, "turns_per_conversation": turns,
        "concurrent_users": concurrency, "worker_timing": {"ttft_ms": ttft_ms, "itl_ms": itl_ms, "tokens": tokens},
        "requests": total, "elapsed_s": round(elapsed, 2), "requests_per_s": round(total / elapsed, 1),
        "latency_ms": percentiles(latencies, (50, 95), scale=1000),
        "affinity": {"turns_on_home_worker": round(on_home / total, 4),
                     "conversations_on_one_worker": round(sticky / len(served), 4)},
        "load": {"requests_per_worker": per_worker, "max_deviation_from_mean": round(deviation, 4),
                 "stdev_over_mean": round(statistics.pstdev(per_worker) / mean, 4)},
        "goals": {"affinity >= 0.95": on_home / total >= 0.95, "load within 20%": deviation <= 0.20},
    }


def routing_main(args: argparse.Namespace) -> int:
    console = Console()
    results = asyncio.run(routing_bench(args.workers, args.conversations, args.turns, args.concurrency,
                                        args.ttft_ms, args.itl_ms, args.tokens))
    table = Table("metric", "value", "goal")
    table.add_row("requests", f"{results['requests']} in {results['elapsed_s']} s ({results['requests_per_s']}/s)", "")
    table.add_row("latency p50 / p95 ms", f"{results['latency_ms']['p50']} / {results['latency_ms']['p95']}", "")
    table.add_row("turns on the conversation's worker", f"{results['affinity']['turns_on_home_worker']:.2%}", ">= 95 %")
    table.add_row("conversations on one worker", f"{results['affinity']['conversations_on_one_worker']:.2%}", "")
    table.add_row("requests per worker", " ".join(map(str, results["load"]["requests_per_worker"])), "")
    table.add_row("max deviation from the mean", f"{results['load']['max_deviation_from_mean']:.2%}", "<= 20 %")
    console.print(table)
    met = all(results["goals"].values())
    console.print(f"goals: {'[green]met[/green]' if met else '[red]not met[/red]'} {results['goals']}")
    write(results, args.output, console)
    return 0


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    cpu = bench_sub.add_parser("cpu", help="CPU engine: aggregate tokens/s and TTFT at several concurrency levels")
    cpu.add_argument("--concurrency", default="1,4,8", help="comma-separated levels")
    cpu.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    cpu.add_argument("--rounds", type=int, default=3, help="rounds per level (TTFT samples = rounds x level)")
    cpu.add_argument("--threads", type=int, default=int(os.environ.get("DUALGATE_CPU_THREADS", "2")))
    cpu.add_argument("--max-batch", type=int, default=8)
    cpu.add_argument("--output", default="bench-results/cpu.json")
    cpu.set_defaults(func=cpu_main)

    routing = bench_sub.add_parser("routing", help="sglang engine: conversation affinity and load spread over "
                                                   "fake SGLang worker processes")
    routing.add_argument("--workers", type=int, default=4)
    routing.add_argument("--conversations", type=int, default=800)
    routing.add_argument("--turns", type=int, default=5)
    routing.add_argument("--concurrency", type=int, default=32, help="users chatting at once")
    routing.add_argument("--ttft-ms", type=float, default=5.0)
    routing.add_argument("--itl-ms", type=float, default=1.0)
    routing.add_argument("--tokens", type=int, default=8)
    routing.add_argument("--output", default="bench-results/routing.json")
    routing.set_defaults(func=routing_main)
