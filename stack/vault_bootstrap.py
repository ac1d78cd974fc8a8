"""Configure the Vault (OpenBao) server from vault/: engines, policies, one AppRole per service, secrets,
and the database engine that issues each service short-lived Postgres credentials.

Idempotent: run on every start of the stack's Vault (dev mode keeps everything in memory).
"""

from __future__ import annotations

import hvac
from hvac.exceptions import InvalidRequest

from common.settings import REPO_ROOT
from common.vault import (
    DATABASE_MOUNT, INTERNAL_KEYS_PATH, JWT_TRANSIT_KEY, KV_MOUNT, PEPPER_PATH, TRANSIT_MOUNT, database_role,
)
from stack.config import DATABASES, StackConfig
from stack.credentials import Credentials
from stack.servers import VAULT_DB_ROLE, owner_role

POLICY_DIR = REPO_ROOT / "vault" / "policies"
DB_LEASE_TTL = "1h"  # services renew at two thirds and move to new credentials before the max
DB_LEASE_MAX_TTL = "24h"


def _policies_for(service: str) -> list[str]:
    names = ["dualgate-common"]
    if (POLICY_DIR / f"{service}.hcl").exists():
        names.append(f"dualgate-{service}")
    return names


def _creation_statements(database: str) -> list[str]:
    owner = owner_role(database)
    return [
        # VALID UNTIL: even a lease Vault never revokes (Vault lost) stops working at its expiry
        f'CREATE ROLE "{{{{name}}}}" WITH LOGIN PASSWORD \'{{{{password}}}}\' VALID UNTIL \'{{{{expiration}}}}\' '
        f'IN ROLE "{owner}";',
        # act as the owner: what migrations create belongs to the database, not to this short-lived role
        f'ALTER ROLE "{{{{name}}}}" SET role = \'{owner}\';',
    ]


REVOCATION_STATEMENTS = [
    # the service moved its pool before revoking; anything still connected is a leak: cut it
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
    'DROP ROLE IF EXISTS "{{name}}";',
]


RENEW_STATEMENTS = ["""ALTER ROLE "{{name}}" VALID UNTIL '{{expiration}}';"""]


def _configure_database_engine(client: hvac.Client, config: StackConfig, creds: Credentials) -> None:
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    if f"{DATABASE_MOUNT}/" not in mounts:
        client.sys.enable_secrets_engine("database", path=DATABASE_MOUNT)
    for service, database in DATABASES.items():
        role = database_role(service)
        client.write(
            f"{DATABASE_MOUNT}/config/{role}", plugin_name="postgresql-database-plugin",
            connection_url=(f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{config.port('postgres')}"
                            f"/{database}?sslmode=disable"),
            username=VAULT_DB_ROLE, password=creds.vault_db_password, allowed_roles=[role],
            verify_connection=True, max_open_connections=2)
        write_database_role(client, service)


def write_database_role(client: hvac.Client, service: str, default_ttl: str = DB_LEASE_TTL,
                        max_ttl: str = DB_LEASE_MAX_TTL) -> None:
    """The role that issues `service` its credentials (renewals move VALID UNTIL with the lease)."""
    role = database_role(service)
    client.write(
        f"{DATABASE_MOUNT}/roles/{role}", db_name=role, creation_statements=_creation_statements(DATABASES[service]),
        revocation_statements=REVOCATION_STATEMENTS, renew_statements=RENEW_STATEMENTS,
        default_ttl=default_ttl, max_ttl=max_ttl)


def configured(config: StackConfig, creds: Credentials) -> bool:
    """Whether every service can log in to this Vault (the last thing bootstrap sets up)."""
    try:
        for approle in creds.approles.values():
            hvac.Client(url=config.url("vault"), timeout=2).auth.approle.login(approle.role_id, approle.secret_id)
    except (hvac.exceptions.VaultError, OSError):  # requests' errors are OSErrors
        return False
    return True


def bootstrap(config: StackConfig, creds: Credentials) -> None:
    client = hvac.Client(url=config.url("vault"), token=creds.root_token, timeout=5)
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    if f"{KV_MOUNT}/" not in mounts:
        client.sys.enable_secrets_engine("kv", path=KV_MOUNT, options={"version": "2"})
    if f"{TRANSIT_MOUNT}/" not in mounts:
        client.sys.enable_secrets_engine("transit", path=TRANSIT_MOUNT)
    try:
        client.secrets.transit.read_key(JWT_TRANSIT_KEY, mount_point=TRANSIT_MOUNT)
    except hvac.exceptions.InvalidPath:
        client.secrets.transit.create_key(JWT_TRANSIT_KEY, key_type="ed25519", mount_point=TRANSIT_MOUNT)
    if "approle/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle")
    _configure_database_engine(client, config, creds)

    for path in POLICY_DIR.glob("*.hcl"):
        client.sys.create_or_update_policy(f"dualgate-{path.stem}", path.read_text())

    client.secrets.kv.v2.create_or_update_secret(INTERNAL_KEYS_PATH, secret=creds.internal_keys, mount_point=KV_MOUNT)
    client.secrets.kv.v2.create_or_update_secret(PEPPER_PATH, secret=creds.pepper, mount_point=KV_MOUNT)

    for service, approle in creds.approles.items():
        role = f"dualgate-{service}"
        client.auth.approle.create_or_update_approle(
            role, token_policies=_policies_for(service), token_ttl="1h", token_max_ttl="24h",
            secret_id_ttl="0", bind_secret_id=True)
        client.auth.approle.update_role_id(role, approle.role_id)
        try:
            client.write(f"auth/approle/role/{role}/custom-secret-id", secret_id=approle.secret_id)
        except InvalidRequest as exc:  # already there from an earlier bootstrap of this server
            if "already" not in str(exc).lower():
                raise
