"""`dualgate bench cache`: one deterministic request answered from the response cache, as fast as a raw
keep-alive client can ask it, through router + gateway (or the whole edge)."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import httpx
import msgspec
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from stack.bench.accounts import bench_keys
from stack.bench.client import RawConnection, process_cpu, raw_request
from stack.config import StackConfig
from stack.report import percentiles, write

CACHE_BODY = {"model": "synthetic", "temperature": 0, "max_tokens": 16,
              "messages": [{"role": "user", "content": "a cached benchmark answer"}]}


async def _cache_worker(host: str, port: int, requests: list[bytes], until: float, latencies: list[float],
                        outcomes: Counter) -> None:
    connection = RawConnection(host, port)
    i = 0
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            status = await connection.exchange(requests[i % len(requests)])
            i += 1
            latencies.append((time.perf_counter() - started) * 1000)
            hit = connection.answer.hit
            outcomes["hit" if status == 200 and hit else f"status {status}" if status != 200 else "miss"] += 1
    finally:
        connection.close()


async def cache_bench(config: StackConfig, seconds: float, concurrency: int, via: str, console: Console) -> dict:
    keys = bench_keys(config, max(1, int(seconds * 3000 / 500) + 1))  # requests/min per key never refuses
    body = msgspec.json.encode(CACHE_BODY)
    component = "router" if via == "router" else "nginx"
    host, port = "127.0.0.1", config.port(component)
    # the first answer is generated and stored; every later one is a hit
    with httpx.Client(timeout=30) as http:
        for key in keys:
            http.post(f"http://{host}:{port}/v1/chat/completions", content=body,
                      headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    requests = [raw_request(host, port, "/v1/chat/completions",
                            {"authorization": f"Bearer {key}", "content-type": "application/json"}, body)
                for key in keys]
    warm: list[float] = []
    await asyncio.gather(*(_cache_worker(host, port, requests, time.perf_counter() + 1.0, warm, Counter())
                           for _ in range(concurrency)))
    latencies: list[float] = []
    outcomes: Counter = Counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"cache hits via {via}", total=seconds)
        started = time.perf_counter()

        async def tick() -> None:
            while (elapsed := time.perf_counter() - started) < seconds:
                progress.update(task, completed=elapsed)
                await asyncio.sleep(0.25)

        cpu_before = process_cpu(config)
        await asyncio.gather(tick(), *(_cache_worker(host, port, requests, started + seconds, latencies, outcomes)
                                       for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu_after = process_cpu(config)
    count = max(1, len(latencies))
    return {"via": via, "seconds": round(elapsed, 2), "concurrency": concurrency, "requests": len(latencies),
            "requests_per_second": round(len(latencies) / elapsed, 1), "outcomes": dict(outcomes),
            "latency_ms": percentiles(latencies),
            "cpu_ms_per_request": {name: round((cpu_after[name] - cpu_before[name]) * 1000 / count, 3)
                                   for name in cpu_after if name in cpu_before
                                   and cpu_after[name] - cpu_before[name] > 0.001}}


def cache_main(args: argparse.Namespace) -> int:
    console = Console()
    config = StackConfig()
    results = asyncio.run(cache_bench(config, args.seconds, args.concurrency, args.via, console))
    table = Table("via", "concurrency", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "outcomes")
    lat = results["latency_ms"]
    table.add_row(results["via"], str(results["concurrency"]), str(results["requests"]),
                  str(results["requests_per_second"]), str(lat["p50"]), str(lat["p95"]), str(lat["p99"]),
                  str(results["outcomes"]))
    console.print(table)
    console.print("CPU ms per request: " + ", ".join(f"{k} {v}" for k, v in results["cpu_ms_per_request"].items()))
    write(results, args.output, console)
    return 0 if set(results["outcomes"]) == {"hit"} else 1
