"""`dualgate secrets rotate jwt|pepper|internal|db [--service NAME]`: rotation with overlap, no failed request.

- jwt: the transit key gets a new version; new tokens carry its kid, tokens signed by older
  versions verify until they expire (the JWKS keeps serving those versions meanwhile).
- pepper / internal: staged. The new version is published first while the current one keeps
  hashing/signing; once every process has re-read Vault (two refresh intervals) it becomes
  current. Every pepper version stays (keys are re-hashed on use); internal keys keep the
  previous version only, dropped once no token it signed can still be alive.
- db: each service is asked (through Vault) to move to new dynamic credentials; it swaps its
  pool and revokes its old lease itself. The command waits until the old leases are gone.

`dualgate secrets retire pepper` finishes a pepper rotation: it drops every version older than the
current one that no live key's hash (nor a rotated key's previous secret in its grace window) still
uses. Keys are re-hashed with the current pepper when used, so a version frees itself as its keys
are used; one only unused keys hold stays until they are used or revoked.

Runs with the stack's root token (operator credentials) and records new pepper / internal
versions in the stack's credentials, so a restart of the in-memory Vault re-applies them.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time

from stack.config import DATABASES, StackConfig

INTERNAL_TOKEN_LIFETIME = 60  # InternalTokens.ttl: the longest an internal token lives
WAIT_DB_SECONDS = 90.0


def _client(config: StackConfig, creds):
    import hvac

    return hvac.Client(url=config.url("vault"), token=creds.root_token, timeout=5)


def _refresh_interval() -> float:
    from common.settings import Settings

    return Settings.from_env().secrets_refresh_seconds


def _say(message: str) -> None:
    print(message, flush=True)


def rotate_jwt(client) -> None:
    from common.vault import JWT_TRANSIT_KEY, TRANSIT_MOUNT

    client.secrets.transit.rotate_key(JWT_TRANSIT_KEY, mount_point=TRANSIT_MOUNT)
    latest = client.secrets.transit.read_key(JWT_TRANSIT_KEY, mount_point=TRANSIT_MOUNT)["data"]["latest_version"]
    _say(f"jwt: signing key is now version {latest}; tokens signed by earlier versions stay valid until they expire")


def _write_versioned(client, path: str, data: dict[str, str]) -> None:
    from common.vault import KV_MOUNT

    client.secrets.kv.v2.create_or_update_secret(path, secret=data, mount_point=KV_MOUNT)


def rotate_versioned(client, config: StackConfig, creds, what: str) -> None:
    """Staged rotation of `pepper` or `internal` (see the module docstring)."""
    from common.vault import INTERNAL_KEYS_PATH, KV_MOUNT, PEPPER_PATH, unix_time
    from stack.credentials import save

    path = PEPPER_PATH if what == "pepper" else INTERNAL_KEYS_PATH
    resp = client.secrets.kv.v2.read_secret_version(path=path, mount_point=KV_MOUNT, raise_on_deleted_version=True)
    data: dict[str, str] = resp["data"]["data"]
    current = data["current"]
    versions = [name for name in data if name != "current"]
    new = f"v{max(map(_version_number, versions)) + 1}"
    interval = _refresh_interval()
    keep = dict(data)
    if what == "internal":
        # only the version signing now stays; older ones go once nothing they signed can be alive
        retired = [v for v in versions if v != current]
        if retired:
            since_switch = time.time() - unix_time(resp["data"]["metadata"]["created_time"])
            wait = 2 * interval + INTERNAL_TOKEN_LIFETIME + 1 - since_switch
            if wait > 0:
                _say(f"internal: waiting {wait:.0f}s until no token signed by {', '.join(retired)} can be alive")
                time.sleep(wait)
        keep = {"current": current, current: data[current]}
    staged = {**keep, new: secrets.token_hex(32)}
    _write_versioned(client, path, staged)
    _remember(creds, what, staged)
    save(config, creds)
    _say(f"{what}: {new} published; every process learns it within {2 * interval:.0f}s ...")
    time.sleep(2 * interval + 0.5)
    switched = {**staged, "current": new}
    _write_versioned(client, path, switched)
    _remember(creds, what, switched)
    save(config, creds)
    kept = sorted(v for v in switched if v != "current")
    _say(f"{what}: {new} is current; {', '.join(v for v in kept if v != new) or 'no older version'} still verifies")


def _version_number(version: str) -> int:
    return int(version.removeprefix("v"))


def pepper_versions_in_use(config: StackConfig) -> set[str]:
    """The pepper versions live keys' hashes were made with (read from the auth database)."""
    import psycopg

    from stack.local import LocalStack

    with psycopg.connect(LocalStack(config).admin_dsn("auth"), connect_timeout=5) as conn:
        rows = conn.execute(
            """SELECT pepper_version FROM api_keys WHERE revoked_at IS NULL
               UNION
               SELECT p.pepper_version FROM previous_secrets p JOIN api_keys k USING (key_id)
               WHERE k.revoked_at IS NULL AND p.expires_at > now()
               UNION
               SELECT pepper_version FROM key_rotations  -- a rotation's answer a retry may still need
               WHERE created_at > now() - interval '1 day'"""
        ).fetchall()
    return {version for (version,) in rows}


def retire_pepper(client, config: StackConfig, creds) -> None:
    from common.vault import KV_MOUNT, PEPPER_PATH
    from stack.credentials import save

    data: dict[str, str] = client.secrets.kv.v2.read_secret_version(
        path=PEPPER_PATH, mount_point=KV_MOUNT, raise_on_deleted_version=True)["data"]["data"]
    current = data["current"]
    # newer than current: a rotation in progress publishes its version before it hashes anything
    older = {v for v in data if v != "current" and _version_number(v) < _version_number(current)}
    in_use = pepper_versions_in_use(config)
    retired = sorted(older - in_use, key=_version_number)
    held = sorted(older & in_use, key=_version_number)
    if retired:
        kept = {k: v for k, v in data.items() if k not in retired}
        _write_versioned(client, PEPPER_PATH, kept)
        _remember(creds, "pepper", kept)
        save(config, creds)
        _say(f"pepper: retired {', '.join(retired)}; no key can be verified with it any more")
    if held:
        _say(f"pepper: {', '.join(held)} still hash live keys, kept until those keys are used or revoked")
    if not retired and not held:
        _say(f"pepper: nothing to retire; {current} is the only version")


def _remember(creds, what: str, data: dict[str, str]) -> None:
    if what == "pepper":
        creds.pepper = dict(data)
    else:
        creds.internal_keys = dict(data)


def _leases(client, service: str) -> set[str]:
    import hvac

    from common.vault import DATABASE_MOUNT, database_role

    prefix = f"{DATABASE_MOUNT}/creds/{database_role(service)}/"
    try:
        keys = client.sys.list_leases(prefix)["data"]["keys"]
    except hvac.exceptions.InvalidPath:
        return set()
    return {prefix + key for key in keys}


def rotate_db(client, services: list[str]) -> bool:
    import hvac

    from common.vault import KV_MOUNT, ROTATION_PATH

    before = {service: _leases(client, service) for service in services}
    try:
        requests = client.secrets.kv.v2.read_secret_version(
            path=ROTATION_PATH, mount_point=KV_MOUNT, raise_on_deleted_version=True)["data"]["data"]
    except hvac.exceptions.InvalidPath:
        requests = {}
    for service in services:
        requests[f"db:{service}"] = str(int(requests.get(f"db:{service}", "0")) + 1)
    _write_versioned(client, ROTATION_PATH, requests)
    _say(f"db: asked {', '.join(services)} to move to new credentials ...")
    deadline = time.monotonic() + WAIT_DB_SECONDS
    pending = set(services)
    while pending and time.monotonic() < deadline:
        for service in sorted(pending):
            now = _leases(client, service)
            if not (before[service] & now) and now:
                _say(f"db: {service} moved to new credentials; its previous lease is revoked")
                pending.discard(service)
        time.sleep(0.2)
    for service in sorted(pending):
        _say(f"db: {service} still holds its previous lease after {WAIT_DB_SECONDS:.0f}s (is it running?)")
    return not pending


def main(args: argparse.Namespace) -> int:
    import msgspec

    from stack.credentials import Credentials

    config = StackConfig()
    if not config.credentials_file.exists():
        print(f"error: no stack credentials in {config.home}; is the stack up (dualgate up)?", file=sys.stderr)
        return 1
    if args.service and args.kind != "db":
        print("error: --service applies to `db` only", file=sys.stderr)
        return 2
    import hvac.exceptions
    import requests

    creds = msgspec.json.decode(config.credentials_file.read_bytes(), type=Credentials)
    client = _client(config, creds)
    try:
        if args.secrets_command == "retire":
            retire_pepper(client, config, creds)
        elif args.kind == "jwt":
            rotate_jwt(client)
        elif args.kind in ("pepper", "internal"):
            rotate_versioned(client, config, creds, args.kind)
        else:
            services = [args.service] if args.service else sorted(DATABASES)
            return 0 if rotate_db(client, services) else 1
    except (hvac.exceptions.VaultError, requests.RequestException) as exc:
        print(f"error: vault at {config.url('vault')} refused or did not answer: {exc}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("secrets", help="rotate (and retire) the platform's secrets without a failed request")
    secrets_sub = cmd.add_subparsers(dest="secrets_command", required=True)
    rotate = secrets_sub.add_parser("rotate", help="rotate one kind of secret")
    rotate.add_argument("kind", choices=["jwt", "pepper", "internal", "db"])
    rotate.add_argument("--service", choices=sorted(DATABASES), help="db only: just this service's credentials")
    rotate.set_defaults(func=main)
    retire = secrets_sub.add_parser("retire", help="drop old secret versions nothing uses any more")
    retire.add_argument("kind", choices=["pepper"])
    retire.set_defaults(func=main, service=None)
