"""Running a drill: tenants, warm-up, the load and the fault together, then the report files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx

from stack.credentials import load_or_create
from stack.drill.faults import Faults
from stack.drill.load import Load, Sample, Tenant, admin_headers, expect, make_tenants
from stack.drill.report import markdown, summarize, timeline
from stack.drill.scenarios import Scenario, Timing, chaos_schedule
from stack.drill.turns import check_turns


async def _warm_up(load: Load, tenants: list[Tenant]) -> None:
    """Not measured: every tenant's repeated prompts and reads once, and every key presented once, as
    steady traffic would have. (A key first presented while the auth service is down cannot be verified
    anywhere: it gets a flagged, retryable 503 by design, never a guess.)"""
    for tenant in tenants:
        for prompt in tenant.prompts:
            await load.one("chat-stream-det", tenant, tenant.keys[0], prompt=prompt)
            await load.one("chat-det", tenant, tenant.keys[0], prompt=prompt)
        await load.one("models", tenant, tenant.keys[0])
        for key in tenant.keys:
            await load.one("me", tenant, key)


async def run_drill(stack, scenario: Scenario, *, short: bool, on_tick: Callable[[float], None] = lambda _: None,
                    turns_wait: float | None = None, tenants: list[Tenant] | None = None) -> tuple[dict, list[Sample]]:
    config = stack.config
    creds = load_or_create(config)
    timing = Timing.of(short, scenario)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    timeout = httpx.Timeout(60.0, connect=5.0)
    async with httpx.AsyncClient(base_url=config.base_url, timeout=timeout, limits=limits) as http:
        tenants = [replace(t, keys=list(t.keys), key_ids=list(t.key_ids)) for t in tenants] \
            if tenants else await make_tenants(http, creds)
        load = Load(http, tenants, timing, chaos=scenario.chaos)
        if scenario.revoke:
            victim = await expect(await http.post("/v1/keys", json={"name": "drill-victim",
                                                                     "user_id": tenants[0].user_id},
                                                   headers=admin_headers(creds)), 201, "create the victim key")
            tenants[0].keys.append(victim["key"])
            tenants[0].key_ids.append(victim["id"])
            load.victim = victim["key"]
        await _warm_up(load, tenants)
        schedule = chaos_schedule(timing, short=short) if scenario.chaos else None
        faults = Faults(stack, scenario, creds, http, schedule)
        try:
            async def inject_then_remove() -> None:
                await asyncio.sleep(max(0.0, timing.t1 - load.now()))
                await faults.inject(load)
                await asyncio.sleep(max(0.0, timing.t2 - load.now()))
                await faults.remove()

            await asyncio.gather(load.run(on_tick), inject_then_remove())
        finally:
            await asyncio.to_thread(faults.restore_sync)
        revoked_at = faults.revoked_at - load.started if faults.revoked_at is not None else None
        wait = turns_wait if turns_wait is not None else (20.0 if short else 60.0)
        turns = await check_turns(stack, load.samples, wait)
    return summarize(load.samples, scenario, timing, revoked_at, turns, faults.done), load.samples


def write_reports(report: dict, samples: list[Sample], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / report["scenario"]
    paths = {"json": f"{stem}.json", "markdown": f"{stem}.md", "png": f"{stem}.png"}
    Path(paths["json"]).write_text(json.dumps(report, indent=2))
    Path(paths["markdown"]).write_text(markdown(report))
    timeline(samples, Timing(**report["timing"]), f"drill {report['scenario']}", Path(paths["png"]),
             report["chaos"])
    return paths
