"""`dualgate users create|list|set-plan|disable|enable`, `dualgate plans create|list` and
`dualgate keys create|list|revoke|rotate`.

They call the running stack's public API through nginx with the admin key from the stack's
credentials (DUALGATE_HOME), exactly as any admin client would. `--json` prints the API's answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from datetime import datetime, timezone

from stack.config import StackConfig

TIMEOUT = 10.0


class AdminError(Exception):
    pass


def _call(method: str, path: str, body: dict | None = None, params: dict | None = None,
          idempotency_key: str | None = None) -> dict:
    """One admin API call. With an `idempotency_key` it is safe to send again, and is: a lost answer or a
    5xx is retried a few times with the same key, so the server answers it once."""
    import httpx
    import msgspec

    from stack.credentials import Credentials

    config = StackConfig()
    if not config.credentials_file.exists():
        raise AdminError(f"no stack credentials in {config.home}; is the stack up (dualgate up)?")
    creds = msgspec.json.decode(config.credentials_file.read_bytes(), type=Credentials)
    headers = {"authorization": f"Bearer {creds.admin_key}"}
    if idempotency_key:
        headers["idempotency-key"] = idempotency_key
    attempts = 3 if idempotency_key else 1
    for attempt in range(1, attempts + 1):
        try:
            resp = httpx.request(method, f"{config.base_url}{path}", json=body, params=params, timeout=TIMEOUT,
                                 headers=headers)
        except httpx.HTTPError as exc:
            if attempt < attempts:
                time.sleep(0.5 * attempt)
                continue
            raise AdminError(f"cannot reach the stack at {config.base_url}: {exc}") from None
        if resp.status_code >= 500 and attempt < attempts:
            time.sleep(0.5 * attempt)
            continue
        break
    data = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
    if resp.status_code >= 400:
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        raise AdminError(f"{resp.status_code}: {message or resp.text[:200]}")
    return data


def _segment(kind: str, value: str) -> str:
    """An id as one URL path segment (checked and percent-encoded): "../keys" must not name another route."""
    from common.contracts import url_id, valid_id

    if not valid_id(kind, value):
        raise AdminError(f"not a valid {kind} id: {value!r}")
    return url_id(kind, value)


def _when(unix: int | None) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if unix else "-"


def _table(headers: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _print_users(users: list[dict]) -> None:
    _table(["id", "name", "plan", "disabled", "created"],
           [[u["id"], u["name"], u["plan"]["name"], "yes" if u["disabled"] else "no", _when(u["created"])]
            for u in users])


def _print_keys(keys: list[dict]) -> None:
    _table(["id", "user", "name", "scopes", "created", "revoked", "previous secret until"],
           [[k["id"], k["user_id"], k["name"], ",".join(k["scopes"]), _when(k["created"]),
             "yes" if k["revoked"] else "no", _when(k.get("previous_secret_expires_at"))] for k in keys])


# ---- users ---------------------------------------------------------------------------------------

def users_create(args: argparse.Namespace) -> dict:
    user = _call("POST", "/v1/users", {"name": args.name, "plan": args.plan})
    if not args.json:
        _print_users([user])
    return user


def users_list(args: argparse.Namespace) -> dict:
    users = _call("GET", "/v1/users")
    if not args.json:
        _print_users(users["data"])
    return users


def users_set_plan(args: argparse.Namespace) -> dict:
    user = _call("PATCH", f"/v1/users/{_segment('user', args.user_id)}", {"plan": args.plan})
    if not args.json:
        print(f"user {user['id']} is on plan {user['plan']['name']}: every gateway enforces it from now on")
    return user


def users_disable(args: argparse.Namespace) -> dict:
    user = _call("POST", f"/v1/users/{_segment('user', args.user_id)}/disable")
    if not args.json:
        print(f"user {user['id']} disabled: none of its keys or tokens work any more")
    return user


def users_enable(args: argparse.Namespace) -> dict:
    user = _call("POST", f"/v1/users/{_segment('user', args.user_id)}/enable")
    if not args.json:
        print(f"user {user['id']} enabled")
    return user


# ---- plans ---------------------------------------------------------------------------------------

def _print_plans(plans: list[dict]) -> None:
    _table(["name", "requests/min", "tokens/day", "max tokens", "models"],
           [[p["name"], str(p["requests_per_min"]), str(p["tokens_per_day"]), str(p["max_tokens"]),
             ",".join(p["allowed_models"]) or "all"] for p in plans])


def plans_create(args: argparse.Namespace) -> dict:
    plan = _call("POST", "/v1/plans", {"name": args.name, "requests_per_min": args.requests_per_min,
                                       "tokens_per_day": args.tokens_per_day, "max_tokens": args.max_tokens,
                                       "allowed_models": args.model or []})
    if not args.json:
        _print_plans([plan])
    return plan


def plans_list(args: argparse.Namespace) -> dict:
    plans = _call("GET", "/v1/plans")
    if not args.json:
        _print_plans(plans["data"])
    return plans


# ---- keys ----------------------------------------------------------------------------------------

def keys_create(args: argparse.Namespace) -> dict:
    body = {"name": args.name, "user_id": args.user, "scopes": args.scopes.split(",") if args.scopes else None}
    key = _call("POST", "/v1/keys", {k: v for k, v in body.items() if v is not None})
    if not args.json:
        print(f"key {key['id']} for {key['user_id']} ({','.join(key['scopes'])})")
        print(f"secret (shown once): {key['key']}")
    return key


def keys_list(args: argparse.Namespace) -> dict:
    keys = _call("GET", "/v1/keys", params={"user_id": args.user} if args.user else None)
    if not args.json:
        _print_keys(keys["data"])
    return keys


def keys_revoke(args: argparse.Namespace) -> dict:
    result = _call("DELETE", f"/v1/keys/{_segment('key', args.key_id)}")
    if not args.json:
        print(f"key {args.key_id} revoked: it fails on every gateway within a second")
    return result


def keys_rotate(args: argparse.Namespace) -> dict:
    # one Idempotency-Key for every attempt: a retry gets the first rotation's answer, never a second
    # rotation that would leave the caller without the secret it made
    key = _call("POST", f"/v1/keys/{_segment('key', args.key_id)}/rotate", {"grace_seconds": args.grace},
                idempotency_key=f"cli-rotate-{uuid.uuid4().hex}")
    if not args.json:
        until = key.get("previous_secret_expires_at")
        print(f"key {key['id']} rotated; the previous secret works until {_when(until)}" if until
              else f"key {key['id']} rotated; the previous secret no longer works")
        print(f"new secret (shown once): {key['key']}")
    return key


def _run(handler):
    def main(args: argparse.Namespace) -> int:
        try:
            result = handler(args)
        except AdminError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(result))
        return 0
    return main


def register(sub: argparse._SubParsersAction) -> None:
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print the API's JSON answer")

    users = sub.add_parser("users", help="manage users (admin, through the running stack)")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    cmd = users_sub.add_parser("create", parents=[json_flag], help="create a user")
    cmd.add_argument("name")
    cmd.add_argument("--plan", default="default")
    cmd.set_defaults(func=_run(users_create))
    users_sub.add_parser("list", parents=[json_flag], help="list users").set_defaults(func=_run(users_list))
    cmd = users_sub.add_parser("set-plan", parents=[json_flag], help="move a user to another plan")
    cmd.add_argument("user_id")
    cmd.add_argument("plan")
    cmd.set_defaults(func=_run(users_set_plan))
    for name, handler, what in (("disable", users_disable, "disable a user: every key and token stops working"),
                                ("enable", users_enable, "enable a disabled user")):
        cmd = users_sub.add_parser(name, parents=[json_flag], help=what)
        cmd.add_argument("user_id")
        cmd.set_defaults(func=_run(handler))

    plans = sub.add_parser("plans", help="manage plans (admin, through the running stack)")
    plans_sub = plans.add_subparsers(dest="plans_command", required=True)
    cmd = plans_sub.add_parser("create", parents=[json_flag],
                               help="create a plan (plans never change: move users to a new one to change limits)")
    cmd.add_argument("name")
    cmd.add_argument("--requests-per-min", type=int, required=True)
    cmd.add_argument("--tokens-per-day", type=int, required=True)
    cmd.add_argument("--max-tokens", type=int, required=True, help="the most tokens one request may ask for")
    cmd.add_argument("--model", action="append", help="a model the plan allows (repeat; default: every model)")
    cmd.set_defaults(func=_run(plans_create))
    plans_sub.add_parser("list", parents=[json_flag], help="list plans").set_defaults(func=_run(plans_list))

    keys = sub.add_parser("keys", help="manage API keys (admin, through the running stack)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    cmd = keys_sub.add_parser("create", parents=[json_flag], help="create a key (the secret is shown once)")
    cmd.add_argument("--user", help="the user the key is for (default: the admin)")
    cmd.add_argument("--name", required=True)
    cmd.add_argument("--scopes", help="comma-separated: user, admin (default: user)")
    cmd.set_defaults(func=_run(keys_create))
    cmd = keys_sub.add_parser("list", parents=[json_flag], help="list keys (never their secrets)")
    cmd.add_argument("--user", help="whose keys (default: the admin's)")
    cmd.set_defaults(func=_run(keys_list))
    cmd = keys_sub.add_parser("revoke", parents=[json_flag], help="revoke a key")
    cmd.add_argument("key_id")
    cmd.set_defaults(func=_run(keys_revoke))
    cmd = keys_sub.add_parser("rotate", parents=[json_flag], help="give a key a new secret")
    cmd.add_argument("key_id")
    cmd.add_argument("--grace", type=int, default=86_400,
                     help="seconds the previous secret keeps working (default 86400; 0: stops at once)")
    cmd.set_defaults(func=_run(keys_rotate))
