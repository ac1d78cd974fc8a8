"""`dualgate bench overhead`: the same streaming requests straight to the inference service and through
the whole chain, in alternating blocks; what the chain adds at each percentile, where its CPU goes and
where the first token waits."""

from __future__ import annotations

import argparse
import asyncio
import itertools

import httpx
import msgspec
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.security import service_principal
from stack.bench.accounts import bench_keys, internal_tokens, register_stamped_model
from stack.bench.client import (
    BLOCKS, STAMPED, STAMPED_PARAMS, STREAM_SECONDS, SYNTHETIC, Samples, process_cpu, raw_request, run_block,
    summarize,
)
from stack.config import StackConfig
from stack.report import write


async def overhead(config: StackConfig, requests: int, levels: list[int], console: Console,
                   arrivals: str = "spread") -> dict:
    tokens = internal_tokens(config)
    host = "127.0.0.1"
    direct_port, chain_port = config.port("inference"), config.port("nginx")
    direct_headers = {**tokens.headers("inference", service_principal("bench")), "content-type": "application/json"}
    # enough keys that the requests/min limit (checked on every request) never refuses the bench
    keys = itertools.cycle(bench_keys(config, max(1, (requests * len(levels) * 2) // 500 + 1)))
    # deterministic and each one new: every chain request looks up the cache, misses, and is stored
    counter = iter(range(10**9))
    register_stamped_model(config)

    def stream_body(**extra: object) -> bytes:
        return msgspec.json.encode({"model": STAMPED, "stream": True, "temperature": 0,
                                    "messages": [{"role": "user", "content": f"benchmark {next(counter)}"}],
                                    "max_tokens": SYNTHETIC["tokens"], **extra})

    def chain_request() -> bytes:
        headers = {"authorization": f"Bearer {next(keys)}", "content-type": "application/json"}
        return raw_request(host, chain_port, "/v1/chat/completions", headers, stream_body())

    def direct_request() -> bytes:  # the inference service is told the deployment the models service would name
        body = stream_body(deployment={"engine": "synthetic", "params": STAMPED_PARAMS})
        return raw_request(host, direct_port, "/v1/chat/completions", direct_headers, body)

    results: dict = {"levels": {}}
    # warm every pool and cache on both paths
    warm = Samples()
    await run_block(host, direct_port, direct_request, 10, 1, warm, lambda: None)
    await run_block(host, chain_port, chain_request, 10, 1, warm, lambda: None)
    with Progress(console=console, transient=True) as progress:
        for level in levels:
            task = progress.add_task(f"concurrency {level}", total=requests * 2)
            direct, chain = Samples(), Samples()
            per_block = max(1, requests // BLOCKS)
            cpu: dict[str, float] = {}
            stages: dict[str, list[float]] = {}
            # streams that all start at one instant stay in step (each takes ~180 ms) and the chain sees
            # bursts of `level` simultaneous arrivals; spread over one answer's time they are `level`
            # concurrent streams arriving as independent users would
            stagger = STREAM_SECONDS / level if arrivals == "spread" else 0.0
            for _ in range(BLOCKS):
                await run_block(host, direct_port, direct_request, per_block, level, direct,
                                lambda: progress.advance(task), stagger)
                before, stages_before = process_cpu(config), await stage_totals(config)
                await run_block(host, chain_port, chain_request, per_block, level, chain,
                                lambda: progress.advance(task), stagger)
                after, stages_after = process_cpu(config), await stage_totals(config)
                for name in after:
                    cpu[name] = cpu.get(name, 0.0) + after[name] - before.get(name, after[name])
                for name, (seconds, count) in stages_after.items():
                    was = stages_before.get(name, (0.0, 0.0))
                    total = stages.setdefault(name, [0.0, 0.0])
                    total[0] += seconds - was[0]
                    total[1] += count - was[1]
            results["levels"][str(level)] = _level_result(direct, chain, cpu, stages)
    return results


def _level_result(direct: Samples, chain: Samples, cpu: dict[str, float], stages: dict[str, list[float]]) -> dict:
    d, c = summarize(direct), summarize(chain)
    added = {kind: {q: round(c[kind][q] - d[kind][q], 2) if None not in (c[kind][q], d[kind][q]) else None
                    for q in d[kind]}
             for kind in ("total_ms", "ttft_ms", "token_ms")}
    count = max(1, len(chain.total_ms))
    return {
        "direct": d, "chain": c, "added": added,
        # where the chain's CPU goes (ms per chain request, this load generator included)
        "chain_cpu_ms_per_request": {k: round(v * 1000 / count, 3) for k, v in sorted(cpu.items())
                                     if v * 1000 / count >= 0.01},
        # where the first token waits: mean ms per hop and stage (dualgate_stage_seconds)
        "chain_stage_ms": {name: round(seconds * 1000 / n, 3) for name, (seconds, n) in stages.items() if n}}


async def stage_totals(config: StackConfig) -> dict[str, tuple[float, float]]:
    """'<service> <stage>' -> (seconds, count) so far of dualgate_stage_seconds, over the AI gateways and chat."""
    from prometheus_client.parser import text_string_to_metric_families

    from stack.supervisor import Supervisor

    names = [name for name in Supervisor(config).processes() if name.startswith(("gateway-ai", "chat"))]
    totals: dict[str, list[float]] = {}
    async with httpx.AsyncClient(timeout=5.0) as client:
        pages = await asyncio.gather(*(client.get(f"http://127.0.0.1:{config.port(name)}/metrics") for name in names))
    for page in pages:
        for family in text_string_to_metric_families(page.text):
            if family.name != "dualgate_stage_seconds":
                continue
            for sample in family.samples:
                kind = sample.name.removeprefix("dualgate_stage_seconds_")
                if kind in ("sum", "count"):
                    total = totals.setdefault(f"{sample.labels['service']} {sample.labels['stage']}", [0.0, 0.0])
                    total[kind == "count"] += sample.value
    return {name: (seconds, count) for name, (seconds, count) in totals.items()}


def ms_text(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict, console: Console) -> None:
    table = Table("concurrency", "path", "total p50", "p95", "p99", "TTFT p50", "p95", "p99",
                  "token p50", "p95", "p99", "errors")
    for level, r in results["levels"].items():
        for path in ("direct", "chain", "added"):
            row = r[path]
            table.add_row(level, path, *(ms_text(row[kind][q]) for kind in ("total_ms", "ttft_ms", "token_ms")
                                         for q in ("p50", "p95", "p99")), str(row.get("errors", "")))
    console.print(table)
    console.print("times in ms; token = each token from its emission by the engine to its arrival here; "
                  "'added' = chain minus direct at the same percentile")
    for level, r in results["levels"].items():
        console.print(f"concurrency {level}, CPU ms per chain request: "
                      + ", ".join(f"{k} {v}" for k, v in r["chain_cpu_ms_per_request"].items()))
        console.print(f"concurrency {level}, where the first token waits (mean ms; a stage that calls the next "
                      "hop includes it): " + ", ".join(f"{k} {v}" for k, v in r["chain_stage_ms"].items()))


def main(args: argparse.Namespace) -> int:
    console = Console()
    config = StackConfig()
    levels = [int(x) for x in args.concurrency.split(",")]
    results = asyncio.run(overhead(config, args.requests, levels, console, args.arrivals))
    results["workload"] = {"model": STAMPED, "engine": "synthetic", **SYNTHETIC, "stream": True,
                           "requests_per_path": args.requests, "arrivals": args.arrivals}
    print_table(results, console)
    write(results, args.output, console)
    return 0
