"""`dualgate drill <scenario>`: a steady mixed load, a fault at t1 removed at t2, and what users saw.

The load: several users and keys, streamed and whole chat completions (deterministic ones that
repeat, and unique ones), model lists and profile reads, across both domains, paced to a steady
rate. The fault goes through the supervisor (stop/start, SIGSTOP/SIGCONT) or, for slow-inference,
a latency injected by pausing the inference process most of the time; `chaos` kills (-9), pauses and
restarts components on a seeded schedule, one or two at once, while conversation turns and
Idempotency-Key retries run (scenarios.py). Then the report:

  availability      answered (clean or flagged degraded answer with content) / requests
  degraded_share    flagged degraded answers with content / requests
  flagged_share     flagged 503s (the chain's last layer: honest, retryable) / requests
  unflagged_failure_share   everything else: unflagged 5xx, cut streams, connection errors
  errors            by status (or error kind)
  latency_ms, ttft_ms        p50/p95/p99
  failover_seconds  from t1 until the end of the last unflagged failure that started in the fault
  recovery_seconds  from t2 until every later request is a clean answer from the primary path
  failures_not_json failures not told as an OpenAI-style JSON error (HTML, a cut stream, no answer)
  keys_with_two_answers   Idempotency-Keys answered with more than one completion
  turns_lost        answers the history owes (clean chat answers; in a conversation flagged ones too)
                    missing from the chat database after recovery (by request id, or by key)
  turns_stored_twice      request ids with more than one stored turn
  revoked_accepted  answers given to a revoked key more than 1 s after its revocation
  cross_tenant_hits answers whose completion id was first seen by another user

JSON + Markdown + a PNG timeline in --output; a progress bar while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from pathlib import Path

from stack.config import StackConfig
from stack.drill.load import Sample, Tenant, make_tenants
from stack.drill.report import markdown, summarize
from stack.drill.run import run_drill, write_reports
from stack.drill.scenarios import SCENARIOS, Scenario, Timing
from stack.drill.turns import admin_dsn, check_turns

__all__ = ["SCENARIOS", "Sample", "Scenario", "Tenant", "Timing", "admin_dsn", "check_turns", "make_tenants",
           "markdown", "register", "run_drill", "summarize", "write_reports"]


def register(sub: argparse._SubParsersAction) -> None:
    drill = sub.add_parser("drill", help="inject a failure under steady load and report what users saw")
    drill.add_argument("scenario", nargs="?", help=f"one of: {', '.join(SCENARIOS)}, or all")
    drill.add_argument("--list", action="store_true", help="list the scenarios")
    drill.add_argument("--short", action="store_true", help="a run of a few seconds")
    drill.add_argument("--json", action="store_true", help="print the report as one JSON object")
    drill.add_argument("--output", default="drill-results", help="folder for the JSON, Markdown and PNG reports")
    drill.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from stack.local import LocalStack

    console = Console(stderr=True)
    if args.list or not args.scenario:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:24} {scenario.description}")
        print(f"{'all':24} every scenario in turn")
        return 0
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        console.print(f"[red]unknown scenario {unknown[0]!r}[/red]; `dualgate drill --list` shows them")
        return 2
    stack = LocalStack(StackConfig())
    if not stack.supervisor.is_running():
        console.print("[red]the stack is not running[/red]; start it with `dualgate up`")
        return 1
    reports = []
    for name in names:
        scenario = SCENARIOS[name]
        timing = Timing.of(args.short, scenario)
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            task = progress.add_task(f"drill {name}", total=timing.duration)
            report, samples = asyncio.run(run_drill(
                stack, scenario, short=args.short, on_tick=lambda t: progress.update(task, completed=t)))
        report["files"] = write_reports(report, samples, Path(args.output))
        Path(args.output, f"{name}.samples.json").write_text(json.dumps([asdict(s) for s in samples]))
        reports.append(report)
        if not args.json:
            console.print(markdown(report), markup=False)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else {"scenarios": reports}))
    return 0
