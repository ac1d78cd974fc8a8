"""`dualgate bench overhead`: what the whole chain adds over the inference service alone.

The same streaming requests (synthetic engine: 20 ms TTFT, 5 ms/token, 32 tokens) go (a) straight
to the inference service and (b) through nginx -> router -> gateway -> chat -> inference, in
alternating blocks so machine noise hits both alike. Reports p50/p95/p99 of total latency and TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.security import InternalTokens, service_principal
from stack.config import StackConfig
from stack.credentials import load_or_create

SYNTHETIC = {"ttft_ms": 20, "itl_ms": 5, "tokens": 32}
MESSAGES = [{"role": "user", "content": "benchmark"}]
BLOCKS = 4  # alternate direct/chain blocks per level
FIRST_TOKEN = re.compile(rb'"content":"[^"]')  # the role chunk carries "content":"" and does not count


@dataclass
class Samples:
    total_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    errors: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, body: bytes, samples: Samples) -> None:
    started = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            if resp.status_code != 200:
                samples.errors += 1
                await resp.aread()
                return
            async for chunk in resp.aiter_raw():
                if first is None and FIRST_TOKEN.search(chunk):
                    first = time.perf_counter()
                if chunk.rstrip().endswith(b"[DONE]"):
                    break
    except httpx.HTTPError:
        samples.errors += 1
        return
    done = time.perf_counter()
    samples.total_ms.append((done - started) * 1000)
    samples.ttft_ms.append(((first or done) - started) * 1000)


async def run_block(client, url, headers, body, count, concurrency, samples, advance) -> None:
    queue = iter(range(count))

    async def worker():
        for _ in queue:
            await one_request(client, url, headers, body, samples)
            advance()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def summarize(samples: Samples) -> dict:
    return {
        "requests": len(samples.total_ms), "errors": samples.errors,
        "total_ms": {f"p{q}": round(percentile(samples.total_ms, q), 2) for q in (50, 95, 99)},
        "ttft_ms": {f"p{q}": round(percentile(samples.ttft_ms, q), 2) for q in (50, 95, 99)},
        "mean_total_ms": round(statistics.fmean(samples.total_ms), 2) if samples.total_ms else None,
    }


async def overhead(config: StackConfig, requests: int, levels: list[int], console: Console) -> dict:
    creds = load_or_create(config)
    tokens = InternalTokens(issuer_service="bench",
                            keys={k: bytes.fromhex(v) for k, v in creds.internal_keys.items() if k != "current"},
                            current=creds.internal_keys["current"], ttl=3600)
    direct_headers = {**tokens.headers("inference", service_principal("bench")), "content-type": "application/json"}
    chain_headers = {"authorization": f"Bearer {creds.demo_key}", "content-type": "application/json"}
    chain_body = msgspec.json.encode({"model": "synthetic", "stream": True, "messages": MESSAGES,
                                      "max_tokens": SYNTHETIC["tokens"]})
    direct_body = msgspec.json.encode({"model": "synthetic", "stream": True, "messages": MESSAGES,
                                       "max_tokens": SYNTHETIC["tokens"],
                                       "deployment": {"engine": "synthetic", "params": SYNTHETIC}})
    direct_url = f"{config.url('inference')}/v1/chat/completions"
    chain_url = f"{config.base_url}/v1/chat/completions"
    results: dict = {"levels": {}}
    limits = httpx.Limits(max_connections=max(levels) * 2, max_keepalive_connections=max(levels) * 2)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        # warm every pool and cache on both paths
        warm = Samples()
        for _ in range(10):
            await one_request(client, direct_url, direct_headers, direct_body, warm)
            await one_request(client, chain_url, chain_headers, chain_body, warm)
        with Progress(console=console, transient=True) as progress:
            for level in levels:
                task = progress.add_task(f"concurrency {level}", total=requests * 2)
                direct, chain = Samples(), Samples()
                per_block = max(1, requests // BLOCKS)
                for _ in range(BLOCKS):
                    await run_block(client, direct_url, direct_headers, direct_body, per_block, level, direct,
                                    lambda: progress.advance(task))
                    await run_block(client, chain_url, chain_headers, chain_body, per_block, level, chain,
                                    lambda: progress.advance(task))
                d, c = summarize(direct), summarize(chain)
                added = {kind: {q: round(c[kind][q] - d[kind][q], 2) for q in d[kind]} for kind in ("total_ms", "ttft_ms")}
                results["levels"][str(level)] = {"direct": d, "chain": c, "added": added}
    return results


def print_table(results: dict, console: Console) -> None:
    table = Table("concurrency", "path", "total p50", "p95", "p99", "TTFT p50", "p95", "p99", "errors")
    for level, r in results["levels"].items():
        for path in ("direct", "chain", "added"):
            row = r[path]
            total, ttft = row["total_ms"], row["ttft_ms"]
            table.add_row(level, path, *(f"{total[q]:.2f}" for q in ("p50", "p95", "p99")),
                          *(f"{ttft[q]:.2f}" for q in ("p50", "p95", "p99")), str(row.get("errors", "")))
    console.print(table)
    console.print("times in ms; 'added' = chain minus direct at the same percentile")


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks against a running stack")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    overhead_cmd = bench_sub.add_parser("overhead", help="latency the full chain adds over the inference service")
    overhead_cmd.add_argument("--requests", type=int, default=200, help="requests per concurrency level and path")
    overhead_cmd.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    overhead_cmd.add_argument("--output", default="bench-results/overhead.json")
    overhead_cmd.set_defaults(func=main)
    from stack.bench_engines import register_bench  # the AI domain's engine benchmarks (cpu, routing)
    register_bench(bench_sub)


def main(args: argparse.Namespace) -> int:
    console = Console()
    config = StackConfig()
    levels = [int(x) for x in args.concurrency.split(",")]
    results = asyncio.run(overhead(config, args.requests, levels, console))
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}
    results["workload"] = {"engine": "synthetic", **SYNTHETIC, "stream": True, "requests_per_path": args.requests}
    print_table(results, console)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")
    return 0
