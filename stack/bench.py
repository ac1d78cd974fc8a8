"""`dualgate bench overhead|cache`: what the edge costs.

overhead: the same streaming requests (synthetic engine: 20 ms TTFT, 5 ms/token, 32 tokens) go (a)
straight to the inference service and (b) through nginx -> router -> gateway -> chat -> inference
with the full policy chain on (API key, requests/min per key, token reservation and settlement,
cache lookup and store, breakers, usage read from the stream), in alternating blocks so machine
noise hits both alike. Reports p50/p95/p99 of total latency and TTFT.

cache: one deterministic request answered from the response cache, as fast as a raw keep-alive
HTTP client can ask it, through router + gateway (or nginx + router + gateway). Reports req/s and
latency percentiles.
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import httpx
import msgspec
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.http import FastTransport
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


async def one_request(client: httpx.AsyncClient, url: str, headers, body, samples: Samples) -> None:
    """One streamed request, read as raw chunks: the load generator shares the two cores with the
    stack it measures, so it must cost as little as possible per chunk (the same for both paths)."""
    headers = headers.next() if isinstance(headers, _Rotating) else headers
    body = body() if callable(body) else body
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


def bench_keys(config: StackConfig, count: int) -> list[str]:
    """Keys of a fresh bench user: each key has its own requests/min bucket, the user one cache tenant."""
    creds = load_or_create(config)
    admin = {"authorization": f"Bearer {creds.admin_key}"}
    with httpx.Client(base_url=config.base_url, timeout=30) as http:
        user = http.post("/v1/users", json={"name": f"bench-{os.getpid()}", "plan": "unlimited"}, headers=admin)
        user.raise_for_status()
        keys = []
        for i in range(count):
            key = http.post("/v1/keys", json={"name": f"bench-{i}", "user_id": user.json()["id"]}, headers=admin)
            key.raise_for_status()
            keys.append(key.json()["key"])
    return keys


class _Rotating:
    """Headers that name the next bench key each time they are read (one bucket per key)."""

    def __init__(self, keys: list[str]) -> None:
        self._headers = [{"authorization": f"Bearer {k}", "content-type": "application/json"} for k in keys]
        self._i = 0

    def next(self) -> dict[str, str]:
        self._i = (self._i + 1) % len(self._headers)
        return self._headers[self._i]


async def overhead(config: StackConfig, requests: int, levels: list[int], console: Console) -> dict:
    creds = load_or_create(config)
    tokens = InternalTokens(issuer_service="bench",
                            keys={k: bytes.fromhex(v) for k, v in creds.internal_keys.items() if k != "current"},
                            current=creds.internal_keys["current"], ttl=3600)
    direct_headers = {**tokens.headers("inference", service_principal("bench")), "content-type": "application/json"}
    # enough keys that the requests/min limit (checked on every request) never refuses the bench
    chain_headers = _Rotating(bench_keys(config, max(1, (requests * len(levels) * 2) // 500 + 1)))
    # deterministic and each one new: every chain request looks up the cache, misses, and is stored
    counter = iter(range(10**9))

    def chain_body() -> bytes:
        return msgspec.json.encode({"model": "synthetic", "stream": True, "temperature": 0,
                                    "messages": [{"role": "user", "content": f"benchmark {next(counter)}"}],
                                    "max_tokens": SYNTHETIC["tokens"]})

    def direct_body() -> bytes:
        return msgspec.json.encode({"model": "synthetic", "stream": True, "temperature": 0,
                                    "messages": [{"role": "user", "content": f"benchmark {next(counter)}"}],
                                    "max_tokens": SYNTHETIC["tokens"],
                                    "deployment": {"engine": "synthetic", "params": SYNTHETIC}})
    direct_url = f"{config.url('inference')}/v1/chat/completions"
    chain_url = f"{config.base_url}/v1/chat/completions"
    results: dict = {"levels": {}}
    # the load generator shares the 2 cores with the stack: the hops' own lean transport keeps its share small
    async with httpx.AsyncClient(transport=FastTransport(max(levels) * 2), timeout=30) as client:
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
                cpu: dict[str, float] = {}
                for _ in range(BLOCKS):
                    await run_block(client, direct_url, direct_headers, direct_body, per_block, level, direct,
                                    lambda: progress.advance(task))
                    before = process_cpu(config)
                    await run_block(client, chain_url, chain_headers, chain_body, per_block, level, chain,
                                    lambda: progress.advance(task))
                    after = process_cpu(config)
                    for name in after:
                        cpu[name] = cpu.get(name, 0.0) + after[name] - before.get(name, after[name])
                d, c = summarize(direct), summarize(chain)
                added = {kind: {q: round(c[kind][q] - d[kind][q], 2) for q in d[kind]} for kind in ("total_ms", "ttft_ms")}
                count = max(1, len(chain.total_ms))
                results["levels"][str(level)] = {
                    "direct": d, "chain": c, "added": added,
                    # where the chain's CPU goes (ms per chain request, this load generator included)
                    "chain_cpu_ms_per_request": {k: round(v * 1000 / count, 3) for k, v in sorted(cpu.items())
                                                 if v * 1000 / count >= 0.01}}
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
    for level, r in results["levels"].items():
        console.print(f"concurrency {level}, CPU ms per chain request: "
                      + ", ".join(f"{k} {v}" for k, v in r["chain_cpu_ms_per_request"].items()))


# ---- cache hits --------------------------------------------------------------------------------

CACHE_BODY = {"model": "synthetic", "temperature": 0, "max_tokens": 16,
              "messages": [{"role": "user", "content": "a cached benchmark answer"}]}


def _cache_request(host: str, port: int, key: str, body: bytes) -> bytes:
    """One keep-alive request as raw bytes: built once, sent many times."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


class _Answer:
    """What the bench reads of one answer, from httptools' (C, llhttp) parser callbacks."""

    __slots__ = ("hit", "complete")

    def __init__(self) -> None:
        self.hit = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if value == b"hit" and name.lower() == b"x-cache":
            self.hit = True

    def on_message_complete(self) -> None:
        self.complete = True


async def _raw_worker(host: str, port: int, requests: list[bytes], until: float, latencies: list[float],
                      outcomes: Counter) -> None:
    """A keep-alive HTTP/1.1 client over a bare socket, parsing in C: the load generator shares the two
    cores with the servers it measures, so it must cost as little as it can per request."""
    reader, writer = await asyncio.open_connection(host, port)
    answer = _Answer()
    parser = httptools.HttpResponseParser(answer)
    i = 0
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            answer.hit = answer.complete = False
            while not answer.complete:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                parser.feed_data(data)
            latencies.append((time.perf_counter() - started) * 1000)
            status = parser.get_status_code()
            outcomes["hit" if status == 200 and answer.hit else f"status {status}" if status != 200 else "miss"] += 1
    finally:
        writer.close()


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
    requests = [_cache_request(host, port, key, body) for key in keys]
    warm: list[float] = []
    await asyncio.gather(*(_raw_worker(host, port, requests, time.perf_counter() + 1.0, warm, Counter())
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
        await asyncio.gather(tick(), *(_raw_worker(host, port, requests, started + seconds, latencies, outcomes)
                                       for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu_after = process_cpu(config)
    count = max(1, len(latencies))
    return {"via": via, "seconds": round(elapsed, 2), "concurrency": concurrency, "requests": len(latencies),
            "requests_per_second": round(len(latencies) / elapsed, 1), "outcomes": dict(outcomes),
            "latency_ms": {f"p{q}": round(percentile(latencies, q), 2) for q in (50, 95, 99)},
            "cpu_ms_per_request": {name: round((cpu_after[name] - cpu_before[name]) * 1000 / count, 3)
                                   for name in cpu_after if name in cpu_before
                                   and cpu_after[name] - cpu_before[name] > 0.001}}


def process_cpu(config: StackConfig) -> dict[str, float]:
    """CPU seconds used so far by each running component (and by this load generator)."""
    import psutil

    from stack.supervisor import Supervisor

    used = {"load-generator": sum(psutil.Process().cpu_times()[:2])}
    for name, info in Supervisor(config).processes().items():
        if info.get("pid"):
            try:
                process = psutil.Process(info["pid"])
                used[name] = sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])
            except psutil.Error:
                pass
    return used


def cache_main(args: argparse.Namespace) -> int:
    console = Console()
    config = StackConfig()
    results = asyncio.run(cache_bench(config, args.seconds, args.concurrency, args.via, console))
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}
    table = Table("via", "concurrency", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "outcomes")
    lat = results["latency_ms"]
    table.add_row(results["via"], str(results["concurrency"]), str(results["requests"]),
                  str(results["requests_per_second"]), str(lat["p50"]), str(lat["p95"]), str(lat["p99"]),
                  str(results["outcomes"]))
    console.print(table)
    console.print("CPU ms per request: " + ", ".join(f"{k} {v}" for k, v in results["cpu_ms_per_request"].items()))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")
    return 0 if set(results["outcomes"]) == {"hit"} else 1


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks against a running stack")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    overhead_cmd = bench_sub.add_parser("overhead", help="latency the full chain adds over the inference service")
    overhead_cmd.add_argument("--requests", type=int, default=200, help="requests per concurrency level and path")
    overhead_cmd.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    overhead_cmd.add_argument("--output", default="bench-results/overhead.json")
    overhead_cmd.set_defaults(func=main)
    cache_cmd = bench_sub.add_parser("cache", help="cache-hit answers per second through router + gateway")
    cache_cmd.add_argument("--seconds", type=float, default=10.0)
    cache_cmd.add_argument("--concurrency", type=int, default=16, help="keep-alive connections")
    cache_cmd.add_argument("--via", choices=("router", "nginx"), default="router",
                           help="enter at the router (router + gateway) or at nginx (the whole edge)")
    cache_cmd.add_argument("--output", default="bench-results/cache.json")
    cache_cmd.set_defaults(func=cache_main)
    from stack.bench_engines import register_bench  # the AI domain's engine benchmarks (cpu, routing)
    register_bench(bench_sub)
    from stack import bench_transport  # the hops' HTTP transport, no stack needed
    bench_transport.register_bench(bench_sub)


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
