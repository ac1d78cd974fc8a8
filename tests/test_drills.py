"""Every failure-matrix row (docs/DESIGN.md §5) as a short drill: steady mixed load, the fault at t1, removed at t2.

Each asserts what users must see: every answer either served or honestly flagged, no turn lost, no
revoked key passing after 1 s, no answer crossing tenants; and the stack is whole again afterwards.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from common.settings import REPO_ROOT
from stack.credentials import load_or_create
from stack.drill import SCENARIOS, make_tenants, run_drill


@pytest.fixture(scope="module")
def tenants(stack):
    async def make():
        async with httpx.AsyncClient(base_url=stack.config.base_url, timeout=30) as http:
            return await make_tenants(http, load_or_create(stack.config))
    return asyncio.run(make())


@pytest.mark.parametrize("name", [name for name, s in SCENARIOS.items() if not s.chaos])
def test_drill_keeps_every_answer_served_or_flagged_and_loses_nothing(stack, tenants, name):
    report, samples = asyncio.run(run_drill(stack, SCENARIOS[name], short=True, turns_wait=20.0, tenants=tenants))
    context = json.dumps({k: report[k] for k in ("outcomes", "errors", "degraded_layers", "routes")})
    assert report["requests"] >= 40, context  # the load ran (slow fallback answers lower the count)
    assert report["served_or_flagged"] >= 0.99, context  # no unflagged 5xx, no silent cut, no hang
    assert report["turns_lost"] == 0, f"{report['turns_lost']} of {report['turns_checked']} turns lost"
    assert report["revoked_accepted"] == 0
    assert report["cross_tenant_hits"] == 0
    if name == "gateway-ai":
        assert report["idempotent_failed"] == 0 and report["failover_seconds"] <= 1.0, context
    if name == "revoke-key-under-load":
        assert any(s.outcome == "refused-revoked" for s in samples)  # the revocation did take effect
    # the stack is whole again: a clean answer through the primary path
    creds = load_or_create(stack.config)
    answer = httpx.get(f"{stack.config.base_url}/v1/models", headers={"authorization": f"Bearer {creds.demo_key}"},
                       timeout=30)
    assert answer.status_code == 200 and answer.headers["x-dualgate-route"] == "ai"
    assert report["availability"] >= 0.99, context


def test_chaos_stores_every_answered_turn_once_and_gives_one_answer_per_key(stack, tenants):
    """Kills, pauses and restarts, one or two components at once, under conversation load with
    Idempotency-Key retries (issue 23's chaos run, short)."""
    report, samples = asyncio.run(run_drill(stack, SCENARIOS["chaos"], short=True, turns_wait=30.0, tenants=tenants))
    context = json.dumps({k: report[k] for k in ("outcomes", "errors", "degraded_layers", "routes", "chaos")})
    assert {c["action"] for c in report["chaos"]} == {"kill", "pause", "restart"}, context
    assert any(len(c["targets"]) == 2 for c in report["chaos"]), context  # two at once
    assert report["turns_lost"] == 0, f"{report['turns_lost']} of {report['turns_checked']} turns lost; {context}"
    assert report["turns_stored_twice"] == 0, context
    assert report["keys_with_two_answers"] == 0, context
    assert any(s.retry and s.outcome in ("ok", "degraded") for s in samples), context  # keys were replayed
    assert report["failures_not_json"] == 0, context  # every failure told as OpenAI-style JSON
    assert report["cross_tenant_hits"] == 0
    assert report["served_or_flagged"] >= 0.99, context
    # the stack is whole again: a clean answer through the primary path
    creds = load_or_create(stack.config)
    answer = httpx.get(f"{stack.config.base_url}/v1/models", headers={"authorization": f"Bearer {creds.demo_key}"},
                       timeout=30)
    assert answer.status_code == 200 and answer.headers["x-dualgate-route"] == "ai"


def test_drill_lists_its_scenarios_and_prints_one_json_report(stack, tmp_path):
    env = {"DUALGATE_HOME": str(stack.config.home), "DUALGATE_PORT_OFFSET": str(stack.config.port_offset),
           "PATH": "/usr/bin:/bin"}
    listed = subprocess.run([sys.executable, "-m", "stack.cli", "drill", "--list"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0
    assert {line.split()[0] for line in listed.stdout.splitlines()} == {*SCENARIOS, "all"}
    run = subprocess.run([sys.executable, "-m", "stack.cli", "drill", "revoke-key-under-load", "--short", "--json",
                          "--output", str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    for key in ("availability", "degraded_share", "errors", "latency_ms", "ttft_ms", "failover_seconds",
                "recovery_seconds", "turns_lost", "revoked_accepted"):
        assert key in report
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}
    assert {p.suffix for p in tmp_path.iterdir()} >= {".json", ".md", ".png"}


@pytest.mark.parametrize("seed", range(40))
def test_a_chaos_step_never_takes_down_every_router_at_once(seed):
    # both routers down is an outage of the whole edge, not a failover the drill could measure
    from stack.drill.scenarios import WHOLE_TIER, Timing, chaos_schedule
    for short in (True, False):
        steps = chaos_schedule(Timing.of(short, SCENARIOS["chaos"]), short=short, seed=seed)
        assert {step.action for step in steps} == {"kill", "pause", "restart"}
        assert any(len(step.targets) == 2 for step in steps)
        assert not any(WHOLE_TIER <= set(step.targets) for step in steps)
