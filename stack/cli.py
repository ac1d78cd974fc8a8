"""`dualgate`: the platform's command line (up, down, status; admin, secrets, drills, benches, chat)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys

from rich.console import Console
from rich.table import Table

from stack.config import StackConfig
from stack.local import AlreadyRunning, LocalStack, StackError

console = Console()


def cmd_up(args: argparse.Namespace) -> int:
    stack = LocalStack(StackConfig())
    try:
        with console.status("starting dualgate") as status:
            creds = stack.up(progress=lambda msg: status.update(msg))
    except AlreadyRunning as exc:
        console.print(f"[yellow]{exc}[/yellow]; nothing changed")
        return 0
    except StackError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    base = stack.config.base_url
    print(f"dualgate is up: point an OpenAI client at {base}/v1")
    print(f"admin key: {creds.admin_key}")
    print(f"demo key: {creds.demo_key}")
    print("try it:")
    print(f"  curl -N {base}/v1/chat/completions -H 'Authorization: Bearer {creds.demo_key}' "
          "-H 'Content-Type: application/json' "
          "-d '{\"model\": \"smollm2-135m-instruct\", \"stream\": true, "
          "\"messages\": [{\"role\": \"user\", \"content\": \"Say hello in five words.\"}]}'")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stack = LocalStack(StackConfig())
    if stack.down():
        print("dualgate stopped")
    else:
        print("dualgate is not running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    stack = LocalStack(StackConfig())
    rows = stack.status()
    if args.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows]))
        return 0 if all(r.ready for r in rows) else 1
    table = Table("component", "port", "pid", "state", "ready")
    for row in rows:
        ready = "[green]ready[/green]" if row.ready else f"[red]not ready[/red] ({row.why})"
        table.add_row(row.name, str(row.port), str(row.pid or "-"), row.state.lower(), ready)
    console.print(table)
    return 0 if all(r.ready for r in rows) else 1


# Commands that live in their own modules: each has `register(subparsers)` and imports its heavy
# dependencies lazily, so `dualgate status` stays fast.
COMMAND_MODULES = ("stack.bench", "stack.admin", "stack.secrets", "stack.drill", "stack.chat", "stack.openapi")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualgate", description="dualgate: resilient OpenAI-compatible chat platform")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the whole platform on embedded servers").set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop everything `up` started").set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="every component: port, pid, ready or why not")
    status.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    status.set_defaults(func=cmd_status)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
