"""`dualgate bench transport`: CPU per proxied request of the hops' HTTP transport, httpx's default
(httpcore) against `common.http.FastTransport` (httpx over aiohttp), in one run on this machine.

No stack needed: a bare uvicorn app answers a small chat.completion JSON; the client sends the same
POST through each transport in turn (alternating rounds, warmed first) and counts its own process
CPU time per request, which is what a relaying hop pays.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import httpx
from rich.console import Console
from rich.table import Table

from common.http import FastTransport
from stack.report import write
from stack.servers import free_port, wait_listening

ANSWER = (b'{"id":"chatcmpl-bench","object":"chat.completion","choices":[{"index":0,"message":{"role":'
          b'"assistant","content":"hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,'
          b'"completion_tokens":2,"total_tokens":7}}')
QUESTION = b'{"model":"synthetic","messages":[{"role":"user","content":"hi"}],"temperature":0}'


async def upstream(scope, receive, send) -> None:
    """The ASGI app the benchmark's own uvicorn serves."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]})
    await send({"type": "http.response.body", "body": ANSWER})


def _transports(connections: int) -> dict[str, httpx.AsyncBaseTransport]:
    return {"httpx default (httpcore)": httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections)),
            "FastTransport (aiohttp)": FastTransport(connections)}


async def _round(transport: httpx.AsyncBaseTransport, url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """(CPU ms per request, requests per second) for `requests` POSTs, `concurrency` at a time."""
    headers = [("content-type", "application/json"), ("authorization", "Bearer dg-bench")]
    timeout = {"connect": 1.0, "read": 5.0, "write": 5.0, "pool": 5.0}
    left = iter(range(requests))

    async def worker() -> None:
        for _ in left:
            request = httpx.Request("POST", url, content=QUESTION, headers=headers, extensions={"timeout": timeout})
            response = await transport.handle_async_request(request)
            body = b"".join([chunk async for chunk in response.aiter_raw()])
            await response.aclose()
            if response.status_code != 200 or body != ANSWER:
                raise RuntimeError(f"unexpected answer {response.status_code}")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu * 1000 / requests, requests / wall


async def compare(url: str, requests: int, concurrency: int, rounds: int) -> dict:
    transports = _transports(concurrency)
    results: dict[str, dict[str, list[float]]] = {name: {"cpu_ms": [], "rps": []} for name in transports}
    try:
        for name, transport in transports.items():  # warm: connections open, code paths hot
            await _round(transport, url, min(500, requests), concurrency)
        for _ in range(rounds):
            for name, transport in transports.items():
                cpu_ms, rps = await _round(transport, url, requests, concurrency)
                results[name]["cpu_ms"].append(round(cpu_ms, 3))
                results[name]["rps"].append(round(rps, 1))
    finally:
        for transport in transports.values():
            await transport.aclose()
    return results


def transport_main(args: argparse.Namespace) -> int:
    console = Console()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "stack.bench.transport:upstream", "--port", str(port),
                               "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"])
    try:
        try:
            wait_listening(server, port, "the benchmark's upstream", timeout=20)
        except RuntimeError as exc:
            console.print(f"[red]{exc}")
            return 1
        import uvloop

        results = uvloop.run(compare(f"http://127.0.0.1:{port}/v1/chat/completions", args.requests,
                                     args.concurrency, args.rounds))
    finally:
        server.terminate()
        server.wait()
    table = Table("transport", "CPU ms/request (each round)", "req/s (each round)")
    for name, figures in results.items():
        table.add_row(name, ", ".join(map(str, figures["cpu_ms"])), ", ".join(map(str, figures["rps"])))
    console.print(table)
    default, fast = (min(f["cpu_ms"]) for f in results.values())
    console.print(f"CPU per request, best round each: httpcore / aiohttp = {default / fast:.1f}x")
    write({"requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds, "results": results},
          args.output, console)
    return 0


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    cmd = bench_sub.add_parser("transport", help="CPU per proxied request: httpx's default transport vs FastTransport")
    cmd.add_argument("--requests", type=int, default=3000, help="requests per round and transport")
    cmd.add_argument("--concurrency", type=int, default=16)
    cmd.add_argument("--rounds", type=int, default=2)
    cmd.add_argument("--output", default="bench-results/transport.json")
    cmd.set_defaults(func=transport_main)
