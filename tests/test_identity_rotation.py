"""Secrets from Vault: services keep serving on what they fetched while Vault is unreachable, and every
rotation (JWT signing key, API-key pepper, internal-token key, database credentials) happens under
continuous authenticated load without one failed request."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import time

import httpx
import hvac.exceptions
import jwt
from identity_support import bearer, current_creds, paused, vault_root
from support import eventually, new_key, new_user

from common.settings import REPO_ROOT
from common.vault import DATABASE_MOUNT, KV_MOUNT, PEPPER_PATH, database_role, unix_time
from stack.config import DATABASES
from stack.local import LocalStack
from stack.secrets import pepper_versions_in_use
from stack.vault_bootstrap import write_database_role


def _cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DUALGATE_HOME": str(stack.config.home), "DUALGATE_PORT_OFFSET": str(stack.config.port_offset)}
    return subprocess.run([sys.executable, "-m", "stack.cli", *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180)


async def _readyz(stack: LocalStack, service: str) -> dict:
    async with httpx.AsyncClient(timeout=5) as client:
        resp = await client.get(f"{stack.config.url(service)}/readyz")
    return {"code": resp.status_code, **resp.json()}


async def test_services_keep_serving_on_fetched_secrets_while_vault_is_unreachable(http, admin_headers, stack):
    key, _ = await new_key(http, admin_headers, await new_user(http, admin_headers))
    with paused(stack, "vault"):
        for service in ("auth", "users"):
            async def degraded(service=service):
                ready = await _readyz(stack, service)
                return ready["code"] == 200 and ready["status"] == "degraded" and "vault" in ready["degraded"]
            await eventually(degraded, timeout=20, interval=0.5, what=f"{service} reports vault degraded")
        # requests keep working on the pepper, internal keys and database credentials already fetched
        assert (await http.get("/v1/users/me", headers=bearer(key))).status_code == 200
        fresh, _ = await new_key(http, admin_headers, await new_user(http, admin_headers))
        assert (await http.get("/v1/users/me", headers=bearer(fresh))).status_code == 200
        assert (await http.get("/.well-known/jwks.json")).status_code == 200
        # signing needs Vault: a clear 503, not a hang or a 500
        token = await http.post(f"{stack.config.url('gateway-identity')}/v1/auth/token", headers=bearer(key))
        assert token.status_code == 503 and token.json()["error"]["code"] == "signing_unavailable"
    for service in ("auth", "users"):
        async def ready(service=service):
            return (await _readyz(stack, service))["status"] == "ready"
        await eventually(ready, timeout=20, interval=0.5, what=f"{service} ready again")
    assert (await http.post("/v1/auth/token", headers=bearer(key))).status_code == 200


class Load:
    """Authenticated clients that never stop until told: API keys, JWTs, and keys made on the fly."""

    def __init__(self, base_url: str, admin: dict[str, str], key: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30)
        self.admin = admin
        self.key = key
        self.done = asyncio.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.kids: set[str] = set()

    def _check(self, what: str, resp: httpx.Response, expected: int = 200) -> None:
        self.counts[what] += 1
        if resp.status_code != expected:
            self.failures.append(f"{what}: {resp.status_code} {resp.text[:200]}")

    async def _guard(self, what: str, call) -> None:
        try:
            await call()
        except httpx.HTTPError as exc:
            self.failures.append(f"{what}: {exc!r}")

    async def api_key_user(self) -> None:
        while not self.done.is_set():
            await self._guard("users/me", lambda: self._get("users/me", "/v1/users/me", self.key))
            await self._guard("keys", lambda: self._get("keys", "/v1/keys", self.key))
            await self._guard("models", lambda: self._get("models", "/v1/models", self.key))

    async def jwt_user(self) -> None:
        while not self.done.is_set():
            async def once() -> None:
                resp = await self.http.post("/v1/auth/token", json={"expires_in": 60}, headers=bearer(self.key))
                self._check("token", resp)
                if resp.status_code != 200:
                    return
                token = resp.json()["access_token"]
                self.kids.add(jwt.get_unverified_header(token)["kid"])
                for _ in range(3):
                    await self._get("jwt models", "/v1/models", token)
                    await self._get("jwt users/me", "/v1/users/me", token)
            await self._guard("jwt", once)

    async def new_keys(self, user_id: str) -> None:
        while not self.done.is_set():
            async def once() -> None:
                resp = await self.http.post("/v1/keys", json={"name": "load", "user_id": user_id}, headers=self.admin)
                self._check("create key", resp, 201)
                if resp.status_code == 201:
                    await self._get("new key users/me", "/v1/users/me", resp.json()["key"])
            await self._guard("new keys", once)

    async def chat(self) -> None:
        body = {"model": "synthetic", "max_tokens": 8, "messages": [{"role": "user", "content": "rotate"}]}
        while not self.done.is_set():
            async def once() -> None:
                self._check("chat", await self.http.post("/v1/chat/completions", json=body, headers=bearer(self.key)))
            await self._guard("chat", once)

    async def _get(self, what: str, path: str, credential: str) -> None:
        self._check(what, await self.http.get(path, headers=bearer(credential)))


def _leases(stack: LocalStack) -> dict[str, set[str]]:
    client = vault_root(stack)
    found = {}
    for service in DATABASES:
        prefix = f"{DATABASE_MOUNT}/creds/{database_role(service)}/"
        try:
            found[service] = set(client.sys.list_leases(prefix)["data"]["keys"])
        except hvac.exceptions.InvalidPath:  # none: a restarted dev-mode Vault forgot the leases it issued
            found[service] = set()
    return found


async def test_rotating_every_secret_under_load_fails_no_request(http, admin_headers, stack, base_url):
    # unlimited: the load runs flat out, and the gateways enforce requests/min per key
    user_id = await new_user(http, admin_headers, plan="unlimited")
    key, _ = await new_key(http, admin_headers, user_id)
    creds_before = current_creds(stack)
    leases_before = _leases(stack)
    load = Load(base_url, admin_headers, key)
    workers = [asyncio.create_task(w) for w in (load.api_key_user(), load.api_key_user(), load.jwt_user(),
                                                  load.new_keys(user_id), load.chat())]
    timings = {}
    try:
        for kind in ("jwt", "pepper", "internal", "db"):
            started = time.monotonic()
            done = await asyncio.to_thread(_cli, stack, "secrets", "rotate", kind)
            assert done.returncode == 0, (kind, done.stdout, done.stderr)
            timings[kind] = round(time.monotonic() - started, 1)
        # keep the load on a little longer: everything after the rotations must work too
        settle = sum(load.counts.values()) + 100
        await eventually(lambda: _at_least(load, settle), timeout=60, what="load after the rotations")
    finally:
        load.done.set()
        await asyncio.gather(*workers)
        await load.http.aclose()
    print("rotations took", timings, "requests", dict(load.counts))
    assert load.failures == []
    assert sum(load.counts.values()) > 300 and load.counts["token"] > 10 and load.counts["create key"] > 5
    assert load.counts["chat"] > 10

    # and each rotation really happened
    creds_after = current_creds(stack)
    assert creds_after.pepper["current"] != creds_before.pepper["current"]
    assert creds_after.internal_keys["current"] != creds_before.internal_keys["current"]
    assert len(load.kids) >= 2  # tokens were signed by the old and then the new transit version
    published = {k["kid"] for k in (await http.get("/.well-known/jwks.json")).json()["keys"]}
    assert load.kids <= published  # every version with live tokens is still published
    leases_after = _leases(stack)
    for service in DATABASES:
        assert leases_after[service] and not (leases_after[service] & leases_before[service]), service


async def _at_least(load: Load, count: int) -> bool:
    return sum(load.counts.values()) >= count


async def test_retiring_the_pepper_drops_the_versions_no_live_key_uses_and_keys_keep_working(
        http, admin_headers, stack):
    """The second half of a pepper rotation. After the rotation test above, keys made before it and
    not used since still hold the previous version: it must stay, and only a version nothing uses goes."""
    user_id = await new_user(http, admin_headers)
    key, _ = await new_key(http, admin_headers, user_id)
    vault = vault_root(stack)
    pepper = vault.secrets.kv.v2.read_secret_version(PEPPER_PATH, mount_point=KV_MOUNT,
                                                     raise_on_deleted_version=True)["data"]["data"]
    # a version older than every other, that no key uses (as once every key it hashed has been used)
    vault.secrets.kv.v2.create_or_update_secret(PEPPER_PATH, secret={**pepper, "v0": "00" * 32},
                                                mount_point=KV_MOUNT)

    done = await asyncio.to_thread(_cli, stack, "secrets", "retire", "pepper")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "retired v0" in done.stdout
    after = vault.secrets.kv.v2.read_secret_version(PEPPER_PATH, mount_point=KV_MOUNT,
                                                    raise_on_deleted_version=True)["data"]["data"]
    assert "v0" not in after and after["current"] == pepper["current"]
    in_use = await asyncio.to_thread(pepper_versions_in_use, stack.config)
    assert in_use <= set(after)  # every version a live key's hash uses is still there, unchanged
    assert all(pepper[version] == secret for version, secret in after.items())
    assert current_creds(stack).pepper == after  # recorded, so a restarted Vault gets the same ring
    for credential in (key, current_creds(stack).demo_key):
        assert (await http.get("/v1/users/me", headers=bearer(credential))).status_code == 200


async def test_a_service_renews_its_database_lease_and_moves_on_before_it_ends(http, admin_headers, stack):
    """Leases of seconds instead of hours: the users service must renew, then swap to new credentials
    before the role's max TTL, while requests that need its database never fail."""
    # unlimited: the load runs flat out, and the gateways enforce requests/min per key
    key, _ = await new_key(http, admin_headers, await new_user(http, admin_headers, plan="unlimited"))
    client = vault_root(stack)
    write_database_role(client, "users", default_ttl="4s", max_ttl="9s")
    failures: list[str] = []
    served = 0
    done = asyncio.Event()

    async def load() -> None:
        nonlocal served
        while not done.is_set():
            for headers, path in ((bearer(key), "/v1/users/me"), (admin_headers, "/v1/users")):
                try:
                    resp = await http.get(path, headers=headers)
                    served += 1
                    if resp.status_code != 200:
                        failures.append(f"{path}: {resp.status_code} {resp.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(f"{path}: {exc!r}")

    worker = asyncio.create_task(load())
    try:
        assert (await asyncio.to_thread(_cli, stack, "secrets", "rotate", "db", "--service", "users")).returncode == 0
        (short,) = _leases(stack)["users"]
        lease_id = f"{DATABASE_MOUNT}/creds/{database_role('users')}/{short}"
        issued = unix_time(client.sys.read_lease(lease_id)["data"]["issue_time"])

        async def renewed() -> bool:
            return bool(client.sys.read_lease(lease_id)["data"].get("last_renewal"))

        await eventually(renewed, timeout=4, interval=0.2, what="the lease renewed")

        async def replaced() -> bool:
            return short not in _leases(stack)["users"]

        await eventually(replaced, timeout=12, interval=0.2, what="the lease replaced")
        assert time.time() - issued < 9  # before the role's max TTL ended it
        assert _leases(stack)["users"]  # by a new one
    finally:
        write_database_role(client, "users")
        back = await asyncio.to_thread(_cli, stack, "secrets", "rotate", "db", "--service", "users")
        done.set()
        await worker
    assert back.returncode == 0, back.stdout + back.stderr
    assert failures == [] and served > 20
