"""`dualgate bench layers`: the same request entering at each layer in turn, one at a time: the TTFT
each hop adds with no queueing."""

from __future__ import annotations

import argparse
import asyncio

import msgspec
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.security import Principal, service_principal
from stack.bench.accounts import bench_user, internal_tokens, register_stamped_model
from stack.bench.client import (
    STAMPED, STAMPED_PARAMS, SYNTHETIC, RawConnection, Samples, ms_text, one_request, raw_request,
)
from stack.config import StackConfig
from stack.report import percentiles, write

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
        table.add_row(layer, ms_text(row["ttft_p50_ms"]), ms_text(row["ttft_added_ms"], "+.2f"), ms_text(row["total_p50_ms"]),
                      str(row["errors"]))
    console.print(table)
    write(results, args.output, console)
    return 0
