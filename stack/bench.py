"""`dualgate bench overhead|layers|cache`: what the edge costs.

overhead: the same streaming requests (synthetic engine: 20 ms TTFT, 5 ms/token, 32 tokens) go (a)
straight to the inference service and (b) through nginx -> router -> gateway -> chat -> inference
with the full policy chain on (API key, requests/min per key, token reservation and settlement,
cache lookup and store, breakers, usage read from the stream), in alternating blocks so machine
noise hits both alike. Reports p50/p95/p99 of total latency, TTFT, and each token's latency: the
engine stamps every token with the clock as it emits it (a model registered for the bench, `STAMPED`),
and the load generator reads the clock as the token reaches it.

layers: the same request entering at inference, chat, gateway-ai, router and nginx in turn, one at a
time: the TTFT each hop adds with no queueing, to find which hop to look at.

cache: one deterministic request answered from the response cache, as fast as a raw keep-alive
HTTP client can ask it, through router + gateway (or nginx + router + gateway). Reports req/s and
latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import httptools
import httpx
import msgspec
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.security import InternalTokens, Principal, service_principal
from stack.config import StackConfig
from stack.credentials import load_or_create
from stack.report import percentiles, write

SYNTHETIC = {"ttft_ms": 20, "itl_ms": 5, "tokens": 32}
STAMPED = "bench-synthetic-stamped"  # the synthetic engine, each token its emission time (CLOCK_MONOTONIC ns)
STAMPED_PARAMS = {**SYNTHETIC, "stamp": 1}
BLOCKS = 4  # alternate direct/chain blocks per level
ANSWER_TIMEOUT = 30.0
STREAM_SECONDS = (SYNTHETIC["ttft_ms"] + SYNTHETIC["tokens"] * SYNTHETIC["itl_ms"]) / 1000  # one answer, alone
FIRST_TOKEN = re.compile(rb'"content":"[^"]')  # the role chunk carries "content":"" and does not count
TOKEN_STAMP = re.compile(rb'"content":" ?t(\d+)"')


@dataclass
class Samples:
    total_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    token_ms: list[float] = field(default_factory=list)  # each token, from its emission to its arrival
    errors: int = 0


def raw_request(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """One HTTP/1.1 request as the bytes sent (keep-alive is HTTP/1.1's default)."""
    head = f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (head + "\r\n").encode() + body


class StreamedAnswer:
    """What the load generator reads of one answer, from httptools' (C, llhttp) parser callbacks."""

    __slots__ = ("hit", "first", "complete", "closing", "token_ms", "_tail")

    def __init__(self) -> None:
        self.token_ms: list[float] = []
        self.reset()

    def reset(self) -> None:
        self.hit = False  # x-cache: hit
        self.first = 0.0  # when the first generated token arrived
        self.complete = False
        self.closing = False  # the server closes the connection after this answer
        self.token_ms.clear()
        self._tail = b""  # an event cut between two reads is matched when the rest arrives

    def on_header(self, name: bytes, value: bytes) -> None:
        if value == b"hit" and name.lower() == b"x-cache":
            self.hit = True
        elif value.lower() == b"close" and name.lower() == b"connection":
            self.closing = True

    def on_body(self, body: bytes) -> None:
        if not self.first and FIRST_TOKEN.search(body):
            self.first = time.perf_counter()
        now, data, end = time.monotonic_ns(), self._tail + body, 0
        for stamp in TOKEN_STAMP.finditer(data):
            self.token_ms.append((now - int(stamp[1])) / 1e6)
            end = stamp.end()
        self._tail = data[end:][-64:]

    def on_message_complete(self) -> None:
        self.complete = True


class RawConnection:
    """A keep-alive HTTP/1.1 client over a bare socket, parsing in C: the load generator shares the two
    cores with the servers it measures, so it must cost as little as it can per request and per chunk
    (an httpx client cost more CPU per streamed answer than the router relaying it)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.answer = StreamedAnswer()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = None

    async def exchange(self, request: bytes) -> int:
        """Send `request`, read its whole answer; returns the status (self.answer holds the rest)."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self._parser = httptools.HttpResponseParser(self.answer)
        self.answer.reset()
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                self._writer.write(request)
                while not self.answer.complete:
                    data = await self._reader.read(65536)
                    if not data:
                        raise ConnectionError("the server closed the connection")
                    self._parser.feed_data(data)
        except (OSError, httptools.HttpParserError):  # TimeoutError included
            self.close()
            raise
        status = self._parser.get_status_code()
        if self.answer.closing:
            self.close()
        return status

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def one_request(connection: RawConnection, request, samples: Samples) -> None:
    """One streamed request; `request` builds its bytes (each one new, so each is a cache miss)."""
    started = time.perf_counter()
    try:
        status = await connection.exchange(request())
    except (OSError, httptools.HttpParserError):
        samples.errors += 1
        return
    if status != 200:
        samples.errors += 1
        return
    done = time.perf_counter()
    samples.total_ms.append((done - started) * 1000)
    samples.ttft_ms.append(((connection.answer.first or done) - started) * 1000)
    samples.token_ms.extend(connection.answer.token_ms)


async def run_block(host: str, port: int, request, count: int, concurrency: int, samples: Samples,
                    advance, stagger: float = 0.0) -> None:
    """`count` requests, `concurrency` at a time; worker i starts i * `stagger` seconds in."""
    queue = iter(range(count))

    async def worker(i: int):
        await asyncio.sleep(i * stagger)  # an arrival schedule, not a wait for a condition
        connection = RawConnection(host, port)
        try:
            for _ in queue:
                await one_request(connection, request, samples)
                advance()
        finally:
            connection.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


def summarize(samples: Samples) -> dict:
    return {
        "requests": len(samples.total_ms), "errors": samples.errors,
        "total_ms": percentiles(samples.total_ms),
        "ttft_ms": percentiles(samples.ttft_ms),
        "token_ms": percentiles(samples.token_ms),
        "tokens": len(samples.token_ms),
        "mean_total_ms": round(statistics.fmean(samples.total_ms), 2) if samples.total_ms else None,
    }


def admin_client(config: StackConfig) -> httpx.Client:
    creds = load_or_create(config)
    return httpx.Client(base_url=config.base_url, timeout=30,
                        headers={"authorization": f"Bearer {creds.admin_key}"})


def register_stamped_model(config: StackConfig) -> None:
    """The bench's own model: the synthetic engine at SYNTHETIC's pace, stamping each token."""
    model = {"context_length": 32768, "engine": "synthetic", "tokenizer": "words", "params": STAMPED_PARAMS}
    with admin_client(config) as http:
        answer = http.post("/v1/models", json={"id": STAMPED, **model})
        if answer.status_code == 409:  # registered by an earlier run: make sure it has today's pace
            answer = http.patch(f"/v1/models/{STAMPED}", json=model)
        answer.raise_for_status()


def bench_user(config: StackConfig, count: int) -> tuple[str, list[str]]:
    """A fresh bench user and `count` keys: each key has its own requests/min bucket, the user is one
    cache tenant."""
    with admin_client(config) as http:
        user = http.post("/v1/users", json={"name": f"bench-{os.getpid()}", "plan": "unlimited"})
        user.raise_for_status()
        keys = []
        for i in range(count):
            key = http.post("/v1/keys", json={"name": f"bench-{i}", "user_id": user.json()["id"]})
            key.raise_for_status()
            keys.append(key.json()["key"])
    return user.json()["id"], keys


def bench_keys(config: StackConfig, count: int) -> list[str]:
    return bench_user(config, count)[1]


def internal_tokens(config: StackConfig) -> InternalTokens:
    """Tokens the bench mints itself, to enter the chain behind the gateways."""
    creds = load_or_create(config)
    return InternalTokens(issuer_service="bench",
                          keys={k: bytes.fromhex(v) for k, v in creds.internal_keys.items() if k != "current"},
                          current=creds.internal_keys["current"], ttl=3600)


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
            d, c = summarize(direct), summarize(chain)
            added = {kind: {q: round(c[kind][q] - d[kind][q], 2) if None not in (c[kind][q], d[kind][q]) else None
                            for q in d[kind]}
                     for kind in ("total_ms", "ttft_ms", "token_ms")}
            count = max(1, len(chain.total_ms))
            results["levels"][str(level)] = {
                "direct": d, "chain": c, "added": added,
                # where the chain's CPU goes (ms per chain request, this load generator included)
                "chain_cpu_ms_per_request": {k: round(v * 1000 / count, 3) for k, v in sorted(cpu.items())
                                             if v * 1000 / count >= 0.01},
                # where the first token waits: mean ms per hop and stage (dualgate_stage_seconds)
                "chain_stage_ms": {name: round(seconds * 1000 / n, 3) for name, (seconds, n) in stages.items() if n}}
    return results


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


def _ms(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict, console: Console) -> None:
    table = Table("concurrency", "path", "total p50", "p95", "p99", "TTFT p50", "p95", "p99",
                  "token p50", "p95", "p99", "errors")
    for level, r in results["levels"].items():
        for path in ("direct", "chain", "added"):
            row = r[path]
            table.add_row(level, path, *(_ms(row[kind][q]) for kind in ("total_ms", "ttft_ms", "token_ms")
                                         for q in ("p50", "p95", "p99")), str(row.get("errors", "")))
    console.print(table)
    console.print("times in ms; token = each token from its emission by the engine to its arrival here; "
                  "'added' = chain minus direct at the same percentile")
    for level, r in results["levels"].items():
        console.print(f"concurrency {level}, CPU ms per chain request: "
                      + ", ".join(f"{k} {v}" for k, v in r["chain_cpu_ms_per_request"].items()))
        console.print(f"concurrency {level}, where the first token waits (mean ms; a stage that calls the next "
                      "hop includes it): " + ", ".join(f"{k} {v}" for k, v in r["chain_stage_ms"].items()))


# ---- cache hits --------------------------------------------------------------------------------

CACHE_BODY = {"model": "synthetic", "temperature": 0, "max_tokens": 16,
              "messages": [{"role": "user", "content": "a cached benchmark answer"}]}


# ---- what each hop adds, one request at a time ------------------------------------------------

LAYERS = ("inference", "chat", "gateway-ai", "router", "nginx")  # each one hop further from the engine


async def layers(config: StackConfig, requests: int, console: Console) -> dict:
    """TTFT and total latency entering at each layer, one request at a time, the layers taking turns:
    each hop's own cost with no queueing, and machine drift spread over every layer alike."""
    tokens = internal_tokens(config)
    user, (key,) = bench_user(config, 1)
    register_stamped_model(config)
    counter = iter(range(10**9))
    host = "127.0.0.1"

    def body(**extra: object) -> bytes:
        return msgspec.json.encode({"model": STAMPED, "stream": True, "temperature": 0, "max_tokens": 4,
                                    "messages": [{"role": "user", "content": f"layers {next(counter)}"}], **extra})

    keyed = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    as_gateway = {**tokens.headers("chat", Principal(subject=user, scopes=("user",))),
                  "content-type": "application/json"}
    as_chat = {**tokens.headers("inference", service_principal("bench")), "content-type": "application/json"}
    requests_for = {
        "inference": lambda: raw_request(host, config.port("inference"), "/v1/chat/completions", as_chat,
                                         body(deployment={"engine": "synthetic", "params": STAMPED_PARAMS})),
        "chat": lambda: raw_request(host, config.port("chat"), "/v1/chat/completions", as_gateway, body()),
        **{layer: (lambda port=config.port(layer): raw_request(host, port, "/v1/chat/completions", keyed, body()))
           for layer in ("gateway-ai", "router", "nginx")},
    }
    connections = {layer: RawConnection(host, config.port(layer)) for layer in LAYERS}
    warm = Samples()  # two rounds that fill pools and caches, not counted
    for _ in range(2):
        for layer in LAYERS:
            await one_request(connections[layer], requests_for[layer], warm)
    samples = {layer: Samples() for layer in LAYERS}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("one request at a time", total=requests * len(LAYERS))
        for _ in range(requests):
            for layer in LAYERS:
                await one_request(connections[layer], requests_for[layer], samples[layer])
                progress.advance(task)
    results: dict = {"layers": {}}
    below = None
    for layer in LAYERS:
        kept = samples[layer]
        row = {"requests": len(kept.ttft_ms), "errors": kept.errors,
               "ttft_p50_ms": percentiles(kept.ttft_ms, (50,))["p50"],
               "total_p50_ms": percentiles(kept.total_ms, (50,))["p50"]}
        ttft = row["ttft_p50_ms"]
        if layer == LAYERS[0]:
            row["ttft_added_ms"] = 0.0
        else:  # unknown (None) when either layer had no answer at all
            row["ttft_added_ms"] = round(ttft - below, 2) if None not in (below, ttft) else None
        below = ttft
        results["layers"][layer] = row
    for connection in connections.values():
        connection.close()
    return results


def layers_main(args: argparse.Namespace) -> int:
    console = Console()
    results = asyncio.run(layers(StackConfig(), args.requests, console))
    results["workload"] = {"model": STAMPED, "engine": "synthetic", **SYNTHETIC, "max_tokens": 4,
                           "requests_per_layer": args.requests, "concurrency": 1}
    table = Table(title="TTFT entering at each layer, one request at a time (ms)")
    for column in ("layer", "TTFT p50", "added by this hop", "total p50", "errors"):
        table.add_column(column)
    for layer, row in results["layers"].items():
        table.add_row(layer, _ms(row["ttft_p50_ms"]), _ms(row["ttft_added_ms"], "+.2f"), _ms(row["total_p50_ms"]),
                      str(row["errors"]))
    console.print(table)
    write(results, args.output, console)
    return 0


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
    table = Table("via", "concurrency", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "outcomes")
    lat = results["latency_ms"]
    table.add_row(results["via"], str(results["concurrency"]), str(results["requests"]),
                  str(results["requests_per_second"]), str(lat["p50"]), str(lat["p95"]), str(lat["p99"]),
                  str(results["outcomes"]))
    console.print(table)
    console.print("CPU ms per request: " + ", ".join(f"{k} {v}" for k, v in results["cpu_ms_per_request"].items()))
    write(results, args.output, console)
    return 0 if set(results["outcomes"]) == {"hit"} else 1


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks against a running stack")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    overhead_cmd = bench_sub.add_parser("overhead", help="latency the full chain adds over the inference service")
    overhead_cmd.add_argument("--requests", type=int, default=200, help="requests per concurrency level and path")
    overhead_cmd.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    overhead_cmd.add_argument("--arrivals", choices=("spread", "burst"), default="spread",
                              help="streams start spread over one answer's time, or all at one instant")
    overhead_cmd.add_argument("--output", default="bench-results/overhead.json")
    overhead_cmd.set_defaults(func=main)
    layers_cmd = bench_sub.add_parser("layers", help="TTFT each hop adds, entering at each layer in turn")
    layers_cmd.add_argument("--requests", type=int, default=100, help="requests per layer")
    layers_cmd.add_argument("--output", default="bench-results/layers.json")
    layers_cmd.set_defaults(func=layers_main)
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
    results = asyncio.run(overhead(config, args.requests, levels, console, args.arrivals))
    results["workload"] = {"model": STAMPED, "engine": "synthetic", **SYNTHETIC, "stream": True,
                           "requests_per_path": args.requests, "arrivals": args.arrivals}
    print_table(results, console)
    write(results, args.output, console)
    return 0
