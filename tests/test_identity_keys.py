"""API keys and users end to end through nginx: the lifecycle, rotation with a grace window, who may
see what, every refusal, and the admin CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from identity_support import bearer, current_creds
from support import eventually, internal_tokens, new_key, new_user

from common.security import service_principal
from common.settings import REPO_ROOT
from stack.local import LocalStack

UNAUTHORIZED = {"error": {"message": "Invalid or missing credentials.", "type": "authentication_error",
                          "param": None, "code": "invalid_api_key"}}


async def test_key_lifecycle_create_use_list_rotate_revoke(http, admin_headers):
    user_id = await new_user(http, admin_headers)
    created = await http.post("/v1/keys", json={"name": "laptop", "user_id": user_id}, headers=admin_headers)
    assert created.status_code == 201
    key, key_id = created.json()["key"], created.json()["id"]
    assert key.startswith(f"dg-{key_id}-") and created.json()["scopes"] == ["user"]

    me = await http.get("/v1/users/me", headers=bearer(key))
    assert me.status_code == 200 and me.json()["id"] == user_id
    listed = await http.get("/v1/keys", headers=bearer(key))
    assert [k["id"] for k in listed.json()["data"]] == [key_id]
    assert key.split("-", 2)[2] not in listed.text  # the secret is shown once, never again
    one = await http.get(f"/v1/keys/{key_id}", headers=bearer(key))
    assert one.status_code == 200 and "key" not in one.json()

    # the user rotates their own key; the old secret stops at once with a zero grace
    rotated = await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": 0}, headers=bearer(key))
    assert rotated.status_code == 200 and rotated.json()["id"] == key_id
    new = rotated.json()["key"]
    assert (await http.get("/v1/users/me", headers=bearer(new))).status_code == 200
    assert (await http.get("/v1/users/me", headers=bearer(key))).json() == UNAUTHORIZED

    revoked = await http.delete(f"/v1/keys/{key_id}", headers=bearer(new))
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    after = await http.get("/v1/users/me", headers=bearer(new))
    assert after.status_code == 401 and after.json() == UNAUTHORIZED
    again = await http.get(f"/v1/keys/{key_id}", headers=admin_headers)
    assert again.json()["revoked"] is True


async def test_a_rotated_key_keeps_its_old_secret_for_the_grace_window_then_not(http, admin_headers, stack):
    # unlimited: this polls as fast as it can, and the gateways enforce requests/min per key
    user_id = await new_user(http, admin_headers, plan="unlimited")
    old, key_id = await new_key(http, admin_headers, user_id)
    gateways = {"identity": (f"{stack.config.url('gateway-identity')}/v1/users/me"),
                "ai": (f"{stack.config.url('gateway-ai')}/v1/models")}
    for url in gateways.values():  # both gateways have the old secret cached
        assert (await http.get(url, headers=bearer(old))).status_code == 200
    grace = 3
    rotated = await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": grace}, headers=admin_headers)
    grace_end = time.time() + grace
    new = rotated.json()["key"]
    assert rotated.json()["previous_secret_expires_at"] >= int(grace_end) - 1

    # throughout the window both secrets work, through nginx and on each gateway
    checks = 0
    while time.time() < grace_end - 0.5:
        for headers in (bearer(old), bearer(new)):
            assert (await http.get("/v1/users/me", headers=headers)).status_code == 200
            for url in gateways.values():
                assert (await http.get(url, headers=headers)).status_code == 200
        checks += 1
    assert checks >= 3

    async def old_refused_everywhere() -> bool:
        codes = [(await http.get(url, headers=bearer(old))).status_code for url in gateways.values()]
        codes.append((await http.get("/v1/users/me", headers=bearer(old))).status_code)
        return all(code == 401 for code in codes)

    await eventually(old_refused_everywhere, timeout=grace_end + 1.0 - time.time(), what="old secret refused")
    assert (await http.get("/v1/users/me", headers=bearer(new))).status_code == 200


async def test_introspection_gives_gateways_the_plan_and_the_end_of_a_grace_window(http, admin_headers, stack):
    user_id = await new_user(http, admin_headers, plan="unlimited")
    old, key_id = await new_key(http, admin_headers, user_id)
    rotated = await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": 600}, headers=admin_headers)
    new = rotated.json()["key"]
    tokens = internal_tokens(current_creds(stack), "gateway-identity")
    headers = tokens.headers("auth", service_principal("gateway-identity"))
    answers = {}
    for name, key in (("old", old), ("new", new)):
        resp = await http.post(f"{stack.config.url('auth')}/internal/introspect", json={"key": key}, headers=headers)
        assert resp.status_code == 200, resp.text
        answers[name] = resp.json()
    for answer in answers.values():
        assert (answer["user_id"], answer["key_id"], answer["scopes"]) == (user_id, key_id, ["user"])
        assert answer["plan"]["name"] == "unlimited" and answer["plan"]["tokens_per_day"] == 1_000_000_000_000
    assert answers["new"]["expires_at"] is None
    assert abs(answers["old"]["expires_at"] - (time.time() + 600)) < 30
    assert answers["new"]["generation"] == answers["old"]["generation"] + 1


async def test_a_user_cannot_see_or_touch_another_users_keys_users_or_usage(http, admin_headers):
    alice, bob = await new_user(http, admin_headers), await new_user(http, admin_headers)
    alice_key, _ = await new_key(http, admin_headers, alice)
    _, bob_key_id = await new_key(http, admin_headers, bob)
    as_alice = bearer(alice_key)
    attempts = {
        "list bob's keys": await http.get("/v1/keys", params={"user_id": bob}, headers=as_alice),
        "read bob's key": await http.get(f"/v1/keys/{bob_key_id}", headers=as_alice),
        "revoke bob's key": await http.delete(f"/v1/keys/{bob_key_id}", headers=as_alice),
        "rotate bob's key": await http.post(f"/v1/keys/{bob_key_id}/rotate", json={}, headers=as_alice),
        "read bob": await http.get(f"/v1/users/{bob}", headers=as_alice),
        "read bob's usage": await http.get("/v1/usage", params={"user_id": bob}, headers=as_alice),
        "create a key for bob": await http.post("/v1/keys", json={"name": "x", "user_id": bob}, headers=as_alice),
    }
    for what, resp in attempts.items():
        assert resp.status_code == 404, (what, resp.status_code, resp.text)
        assert bob not in resp.text and bob_key_id not in resp.text, what
    # bob's key is untouched, and a missing key looks the same as bob's
    assert (await http.get(f"/v1/keys/{bob_key_id}", headers=admin_headers)).json()["revoked"] is False
    missing = await http.get("/v1/keys/0123456789abcdef", headers=as_alice)
    assert missing.json() == attempts["read bob's key"].json()
    # alice's own usage and user are hers
    usage = await http.get("/v1/usage", headers=as_alice)
    assert usage.status_code == 200 and usage.json()["user_id"] == alice


async def test_admin_operations_need_the_admin_scope(http, admin_headers):
    user_key, _ = await new_key(http, admin_headers, await new_user(http, admin_headers))
    for method, path, body in (("GET", "/v1/users", None), ("POST", "/v1/users", {"name": "x"}),
                               ("POST", "/v1/users/usr_admin/disable", None), ("GET", "/v1/auth/audit", None),
                               ("GET", "/v1/plans", None), ("GET", "/v1/plans/default", None),
                               ("POST", "/v1/plans", {"name": "mine", "requests_per_min": 10**6,
                                                      "tokens_per_day": 10**12, "max_tokens": 32768})):
        resp = await http.request(method, path, json=body, headers=bearer(user_key))
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json()["error"]["type"] == "permission_error"
    # nor can a user mint a key with scopes they lack
    escalate = await http.post("/v1/keys", json={"name": "x", "scopes": ["admin"]}, headers=bearer(user_key))
    assert escalate.status_code == 403 and escalate.json()["error"]["param"] == "scopes"


async def test_an_admin_creates_a_plan_and_its_users_get_its_limits(http, admin_headers):
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    plan = {"name": name, "requests_per_min": 50, "tokens_per_day": 5000, "max_tokens": 64,
            "allowed_models": ["synthetic"]}
    created = await http.post("/v1/plans", json=plan, headers=admin_headers)
    assert (created.status_code, created.json()) == (201, plan)
    again = await http.post("/v1/plans", json={**plan, "tokens_per_day": 1}, headers=admin_headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "plan_exists"
    assert (await http.get(f"/v1/plans/{name}", headers=admin_headers)).json() == plan  # unchanged
    listed = (await http.get("/v1/plans", headers=admin_headers)).json()["data"]
    assert {"default", "unlimited", name} <= {p["name"] for p in listed}
    missing = await http.get("/v1/plans/no-such-plan", headers=admin_headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "plan_not_found"

    user = await http.post("/v1/users", json={"name": "on-tiny", "plan": name}, headers=admin_headers)
    assert user.status_code == 201 and user.json()["plan"] == plan
    key, _ = await new_key(http, admin_headers, user.json()["id"])
    usage = (await http.get("/v1/usage", headers=bearer(key))).json()
    assert (usage["plan"], usage["tokens_per_day"]) == (name, 5000)
    assert [m["id"] for m in (await http.get("/v1/models", headers=bearer(key))).json()["data"]] == ["synthetic"]
    ask = {"model": "synthetic", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert (await http.post("/v1/chat/completions", json=ask, headers=bearer(key))).status_code == 200
    too_long = await http.post("/v1/chat/completions", json={**ask, "max_tokens": 65}, headers=bearer(key))
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("change, param", [
    ({"name": "Has Spaces"}, "name"),
    ({"name": ""}, "name"),
    ({"requests_per_min": 0}, "requests_per_min"),
    ({"tokens_per_day": -5}, "tokens_per_day"),
    ({"max_tokens": "lots"}, "max_tokens"),
    ({"allowed_models": "synthetic"}, "allowed_models"),
    ({"allowed_models": [""]}, "allowed_models[0]"),
    ({"colour": "red"}, None),
])
async def test_invalid_plans_are_400_naming_the_field(http, admin_headers, change, param):
    body = {"name": f"p-{uuid.uuid4().hex[:8]}", "requests_per_min": 5, "tokens_per_day": 100, "max_tokens": 10,
            **change}
    resp = await http.post("/v1/plans", json=body, headers=admin_headers)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error", resp.text
    assert resp.json()["error"]["param"] == param


async def test_every_bad_credential_gets_the_same_401(http, admin_headers):
    user_id = await new_user(http, admin_headers)
    revoked, revoked_id = await new_key(http, admin_headers, user_id)
    await http.delete(f"/v1/keys/{revoked_id}", headers=admin_headers)
    expired, expired_id = await new_key(http, admin_headers, user_id)
    await http.post(f"/v1/keys/{expired_id}/rotate", json={"grace_seconds": 0}, headers=admin_headers)
    disabled_user = await new_user(http, admin_headers)
    disabled, _ = await new_key(http, admin_headers, disabled_user)
    assert (await http.post(f"/v1/users/{disabled_user}/disable", headers=admin_headers)).status_code == 200
    valid, valid_id = await new_key(http, admin_headers, user_id)
    cases = {
        "missing": {},
        "not bearer": {"authorization": f"Basic {valid}"},
        "malformed": bearer("dg-nothex-abc"),
        "unknown key id": bearer("dg-0123456789abcdef-" + "x" * 43),
        "right id, wrong secret": bearer(f"dg-{valid_id}-" + "y" * 43),
        "revoked": bearer(revoked),
        "rotated past its grace": bearer(expired),
        "disabled user": bearer(disabled),
    }
    for what, headers in cases.items():
        for path in ("/v1/users/me", "/v1/models"):
            resp = await http.get(path, headers=headers)
            assert (resp.status_code, resp.json()) == (401, UNAUTHORIZED), (what, path)


@pytest.mark.parametrize("body, param", [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x", "scopes": ["root"]}, "scopes[0]"),
    ({"name": "x", "colour": "red"}, None),
])
async def test_invalid_key_requests_are_400_naming_the_field(http, admin_headers, body, param):
    resp = await http.post("/v1/keys", json=body, headers=admin_headers)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    if param:
        assert resp.json()["error"]["param"] == param


async def test_invalid_rotation_and_user_requests_are_400_naming_the_field(http, admin_headers):
    user_id = await new_user(http, admin_headers)
    _, key_id = await new_key(http, admin_headers, user_id)
    grace = await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": -1}, headers=admin_headers)
    assert grace.status_code == 400 and grace.json()["error"]["param"] == "grace_seconds"
    plan = await http.post("/v1/users", json={"name": "x", "plan": "platinum"}, headers=admin_headers)
    assert plan.status_code == 400 and plan.json()["error"]["param"] == "plan"
    token = await http.post("/v1/auth/token", json={"expires_in": 1}, headers=admin_headers)
    assert token.status_code == 400 and token.json()["error"]["param"] == "expires_in"


def _dualgate(stack: LocalStack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DUALGATE_HOME": str(stack.config.home), "DUALGATE_PORT_OFFSET": str(stack.config.port_offset),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "stack.cli", *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_the_admin_cli_manages_users_and_keys_on_the_running_stack(stack, base_url):
    created = _dualgate(stack, "users", "create", "cli-user", "--json")
    assert created.returncode == 0, created.stderr
    user_id = json.loads(created.stdout)["id"]
    assert user_id in _dualgate(stack, "users", "list").stdout

    key = _dualgate(stack, "keys", "create", "--user", user_id, "--name", "cli")
    assert key.returncode == 0 and "secret (shown once): dg-" in key.stdout
    secret = key.stdout.split("secret (shown once): ")[1].split()[0]
    key_id = secret.split("-")[1]
    listing = _dualgate(stack, "keys", "list", "--user", user_id)
    assert key_id in listing.stdout and secret not in listing.stdout
    assert httpx.get(f"{base_url}/v1/users/me", headers=bearer(secret)).status_code == 200

    rotated = _dualgate(stack, "keys", "rotate", key_id, "--grace", "0", "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_secret = json.loads(rotated.stdout)["key"]
    assert httpx.get(f"{base_url}/v1/users/me", headers=bearer(secret)).status_code == 401
    assert httpx.get(f"{base_url}/v1/users/me", headers=bearer(new_secret)).status_code == 200

    assert _dualgate(stack, "keys", "revoke", key_id).returncode == 0
    assert httpx.get(f"{base_url}/v1/users/me", headers=bearer(new_secret)).status_code == 401

    other = json.loads(_dualgate(stack, "users", "create", "cli-2", "--json").stdout)["id"]
    other_key = json.loads(_dualgate(stack, "keys", "create", "--user", other, "--name", "k", "--json").stdout)["key"]
    assert httpx.get(f"{base_url}/v1/users/me", headers=bearer(other_key)).status_code == 200
    assert _dualgate(stack, "users", "disable", other).returncode == 0
    assert httpx.get(f"{base_url}/v1/users/me", headers=bearer(other_key)).status_code == 401
    users = json.loads(_dualgate(stack, "users", "list", "--json").stdout)["data"]
    assert next(u for u in users if u["id"] == other)["disabled"] is True

    plan = f"cli-{uuid.uuid4().hex[:6]}"
    made = _dualgate(stack, "plans", "create", plan, "--requests-per-min", "30", "--tokens-per-day", "900",
                     "--max-tokens", "16", "--model", "synthetic")
    assert made.returncode == 0, made.stderr
    assert plan in _dualgate(stack, "plans", "list").stdout
    moved = _dualgate(stack, "users", "set-plan", user_id, plan, "--json")
    assert moved.returncode == 0 and json.loads(moved.stdout)["plan"]["tokens_per_day"] == 900

    missing = _dualgate(stack, "keys", "revoke", "0123456789abcdef")
    assert missing.returncode == 1 and "404" in missing.stderr
