"""The stack's generated secrets, kept in <home>/credentials.json (0600).

The embedded Vault runs in dev mode (in memory), so the stack re-applies these exact values
whenever Vault starts; services always see the same pepper, keys and AppRoles.
"""

from __future__ import annotations

import os
import secrets

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
    path = config.credentials_file
    if path.exists():
        creds = msgspec.json.decode(path.read_bytes(), type=Credentials)
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
    save(config, creds)
    return creds


def save(config: StackConfig, creds: Credentials) -> None:
    path = config.credentials_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(msgspec.json.format(msgspec.json.encode(creds)))
    os.replace(tmp, path)
