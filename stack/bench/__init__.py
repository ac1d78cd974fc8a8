"""`dualgate bench ...`: what the edge costs, against a running stack (the engine and transport benches
need none).

Modules: client (the load generator), accounts (what a bench sets up), overhead, layers, cache,
engines (cpu, routing), transport.


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

from stack.bench.cache import cache_main
from stack.bench.layers import layers_main
from stack.bench.overhead import main as overhead_main


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks against a running stack")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    overhead_cmd = bench_sub.add_parser("overhead", help="latency the full chain adds over the inference service")
    overhead_cmd.add_argument("--requests", type=int, default=200, help="requests per concurrency level and path")
    overhead_cmd.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    overhead_cmd.add_argument("--arrivals", choices=("spread", "burst"), default="spread",
                              help="streams start spread over one answer's time, or all at one instant")
    overhead_cmd.add_argument("--output", default="bench-results/overhead.json")
    overhead_cmd.set_defaults(func=overhead_main)
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
    from stack.bench.engines import register_bench  # the AI domain's engine benchmarks (cpu, routing)
    register_bench(bench_sub)
    from stack.bench import transport  # the hops' HTTP transport, no stack needed
    transport.register_bench(bench_sub)
