"""The stack's generated secrets, kept in <home>/credentials.json (0600).

The embedded Vault runs in dev mode (in memory), so the stack re-applies these exact values
whenever Vault starts; services always see the same pepper, keys and AppRoles.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile

import msgspec

from common.security import generate_api_key, parse_api_key
from stack.config import SERVICES, StackConfig

# every process that logs in to Vault gets its own AppRole
VAULT_CLIENTS = SERVICES + ("gateway-identity", "gateway-ai", "gateway-fallback")


class AppRole(msgspec.Struct):
    role_id: str
    secret_id: str


class Credentials(msgspec.Struct, kw_only=True):
    root_token: str
    internal_keys: dict[str, str]
    pepper: dict[str, str]
    approles: dict[str, AppRole]
    admin_key: str
    demo_key: str | None = None
    demo_user: str | None = None
    postgres_password: str = ""  # the `postgres` superuser's (the stack's own setup steps only)
    vault_db_password: str = ""  # the role Vault's database engine logs in as to issue credentials


def _versioned_secret() -> dict[str, str]:
    return {"current": "v1", "v1": secrets.token_hex(32)}


def load_or_create(config: StackConfig) -> Credentials:
    """The stack's credentials, filling in whatever is missing. The file is written only when
    something was filled in: readers run beside rotations (the Vault listener, drills, benches),
    and a reader writing back what it read could undo a rotation saved in between."""
    path = config.credentials_file
    try:
        stored = path.read_bytes()
    except FileNotFoundError:
        stored = None
    if stored is not None:
        creds = msgspec.json.decode(stored, type=Credentials)
    else:
        creds = Credentials(
            root_token=secrets.token_urlsafe(24),
            internal_keys=_versioned_secret(),
            pepper=_versioned_secret(),
            approles={},
            admin_key=generate_api_key()[0],
        )
    creds.postgres_password = creds.postgres_password or secrets.token_urlsafe(24)
    creds.vault_db_password = creds.vault_db_password or secrets.token_urlsafe(24)
    for client in VAULT_CLIENTS:
        creds.approles.setdefault(client, AppRole(role_id=secrets.token_hex(16), secret_id=secrets.token_hex(24)))
    if config.admin_key:
        if parse_api_key(config.admin_key) is None:
            raise SystemExit("DUALGATE_ADMIN_KEY must look like dg-<16 hex>-<secret>")
        creds.admin_key = config.admin_key
    if stored is None or msgspec.json.decode(stored, type=Credentials) != creds:
        save(config, creds)
    return creds


def save(config: StackConfig, creds: Credentials) -> None:
    path = config.credentials_file
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of its own (mkstemp: 0600), so writers in two processes never rename each other's
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(msgspec.json.format(msgspec.json.encode(creds)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
