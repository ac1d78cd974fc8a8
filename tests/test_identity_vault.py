"""Least privilege: each process's AppRole reaches only its own secrets, and a service's database
credentials open only its own database. Postgres takes no password-less logins."""

from __future__ import annotations

import asyncio
import base64

import httpx
import hvac
import hvac.exceptions
import psycopg
import pytest
from identity_support import bearer, current_creds, redis_client, stack_tokens, vault_root
from support import eventually

from common.db import with_credentials
from common.vault import DATABASE_MOUNT, INTERNAL_KEYS_PATH, JWT_TRANSIT_KEY, PEPPER_PATH, database_role
from gateway.authn import SnapshotAuthenticator
from stack.config import DATABASES
from stack.local import LocalStack


def _login(stack: LocalStack, process: str) -> hvac.Client:
    role = current_creds(stack).approles[process]
    client = hvac.Client(url=stack.config.url("vault"), timeout=5)
    client.auth.approle.login(role_id=role.role_id, secret_id=role.secret_id)
    return client


def _actions(stack: LocalStack, client: hvac.Client) -> dict:
    root = vault_root(stack)

    def db_creds(service: str):
        def read() -> None:
            lease = client.read(f"{DATABASE_MOUNT}/creds/{database_role(service)}")
            root.sys.revoke_lease(lease["lease_id"])  # it only had to be issued
        return read

    actions = {
        "read internal keys": lambda: client.secrets.kv.v2.read_secret_version(
            INTERNAL_KEYS_PATH, raise_on_deleted_version=True),
        "read the pepper": lambda: client.secrets.kv.v2.read_secret_version(PEPPER_PATH, raise_on_deleted_version=True),
        "sign a jwt": lambda: client.secrets.transit.sign_data(JWT_TRANSIT_KEY, hash_input=base64.b64encode(b"x").decode()),
        "export the jwt key": lambda: client.secrets.transit.export_key(JWT_TRANSIT_KEY, "signing-key"),
        "rotate the jwt key": lambda: client.secrets.transit.rotate_key(JWT_TRANSIT_KEY),
        "write the internal keys": lambda: client.secrets.kv.v2.create_or_update_secret(
            INTERNAL_KEYS_PATH, secret={"current": "v9", "v9": "00"}),
        "revoke the auth service's lease": lambda: client.sys.revoke_lease(
            f"{DATABASE_MOUNT}/creds/{database_role('auth')}/not-yours"),
    }
    actions.update({f"{service} database credentials": db_creds(service) for service in sorted(DATABASES)})
    return actions


def _allowed(action) -> bool:
    """Whether the policy lets it through (a request Vault then finds invalid still got through)."""
    try:
        action()
    except hvac.exceptions.Forbidden:
        return False
    except hvac.exceptions.InvalidRequest:
        return True
    return True


EXPECTED = {
    "auth": {"read internal keys", "read the pepper", "sign a jwt", "auth database credentials",
             "revoke the auth service's lease"},
    "users": {"read internal keys", "users database credentials"},
    "chat": {"read internal keys", "chat database credentials"},
    "models": {"read internal keys", "models database credentials"},
    "inference": {"read internal keys"},
    "gateway-identity": {"read internal keys"},
    "gateway-ai": {"read internal keys"},
    "gateway-fallback": {"read internal keys"},
}


@pytest.mark.parametrize("process", sorted(EXPECTED))
def test_each_approle_reaches_only_what_its_process_needs(stack, process):
    client = _login(stack, process)
    granted = {what for what, action in _actions(stack, client).items() if _allowed(action)}
    assert granted == EXPECTED[process]


def test_database_credentials_open_only_their_own_database(stack):
    root = vault_root(stack)
    lease = root.read(f"{DATABASE_MOUNT}/creds/{database_role('users')}")
    try:
        user, password = lease["data"]["username"], lease["data"]["password"]
        own = with_credentials(stack.config.database_url("users"), user, password)
        with psycopg.connect(own, connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == "users_owner"
        for other in ("auth", "chat", "models"):
            with pytest.raises(psycopg.OperationalError, match="permission denied"):
                psycopg.connect(with_credentials(stack.config.database_url(other), user, password), connect_timeout=5)
    finally:
        root.sys.revoke_lease(lease["lease_id"])
    # once revoked, the role is gone
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(own, connect_timeout=5)


def test_postgres_refuses_logins_without_the_password(stack):
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(stack.config.database_url("postgres"), connect_timeout=5)


async def test_a_vault_restarted_under_the_stack_is_configured_again_and_services_still_start(stack):
    """Dev-mode Vault forgets everything when it restarts. Without the stack's listener no service
    could log in afterwards, so one restarted then would never start again. Its new JWT signing key
    (version 1 again, perhaps under a kid already known) verifies at once, also on the fallback
    gateway, which only has the JWKS auth seals into Redis."""
    key = current_creds(stack).demo_key
    redis = redis_client(stack)
    fallback = SnapshotAuthenticator(redis, stack_tokens(stack, "gateway-fallback"))  # no auth service to ask
    await fallback.start()
    http = httpx.AsyncClient(base_url=stack.config.base_url, timeout=10)

    async def new_jwt() -> str | None:
        resp = await http.post("/v1/auth/token", headers=bearer(key))
        return resp.json()["access_token"] if resp.status_code == 200 else None

    try:
        await fallback.authenticate_token(await new_jwt())  # the fallback now holds the old key
        await asyncio.to_thread(stack.supervisor.stop, "vault")
        await asyncio.to_thread(stack.supervisor.start, "vault")
        await asyncio.to_thread(stack.wait_vault_configured, 60.0)

        secret = vault_root(stack).secrets.kv.v2.read_secret_version(INTERNAL_KEYS_PATH,
                                                                      raise_on_deleted_version=True)
        assert secret["data"]["data"] == current_creds(stack).internal_keys  # the recorded versions, rotations too

        signed_after = await eventually(new_jwt, timeout=30, what="auth signs with the new Vault's key")
        for entry in ("/v1/models", "/v1/users/me"):  # both primary gateways
            resp = await http.get(entry, headers=bearer(signed_after))
            assert resp.status_code == 200, resp.text
        assert (await fallback.authenticate_token(signed_after)).principal.key_id

        await asyncio.to_thread(stack.supervisor.stop, "models")
        await asyncio.to_thread(stack.supervisor.start, "models")
        await asyncio.to_thread(stack.wait_ready, ("models",), 60.0)
        models = await http.get("/v1/models", headers=bearer(key))
        assert models.status_code == 200, models.text
    finally:
        await http.aclose()
        await fallback.stop()
        await redis.aclose()
