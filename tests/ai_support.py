"""Helpers shared by the AI-domain tests (issue 4): internal tokens, waiting on conditions, registry setup."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from common.security import InternalTokens, Principal
from stack.credentials import Credentials

T = TypeVar("T")


def internal_tokens(creds: Credentials, issuer: str = "tests") -> InternalTokens:
    keys = {k: bytes.fromhex(v) for k, v in creds.internal_keys.items() if k != "current"}
    return InternalTokens(issuer_service=issuer, keys=keys, current=creds.internal_keys["current"], ttl=600)


def acting_as(creds: Credentials, audience: str, user_id: str, scopes: tuple[str, ...] = ("user",)) -> dict[str, str]:
    """Headers a gateway would send to a service on behalf of `user_id` (tests that call services directly)."""
    return internal_tokens(creds).headers(audience, Principal(subject=user_id, scopes=scopes))


async def eventually(check: Callable[[], Awaitable[T] | T], *, timeout: float = 30.0, interval: float = 0.1,
                     what: str = "condition") -> T:
    """Poll until `check` returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        last = value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


async def register_model(http: httpx.AsyncClient, admin_headers: dict[str, str], **fields) -> dict:
    """Register a model through the gateway's admin API, or update it when it exists already."""
    resp = await http.post("/v1/models", json=fields, headers=admin_headers)
    if resp.status_code == 409:
        model_id = fields.pop("id")
        resp = await http.patch(f"/v1/models/{model_id}", json=fields, headers=admin_headers)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


async def new_user(http: httpx.AsyncClient, admin_headers: dict[str, str], plan: str = "default") -> tuple[str, str]:
    """A fresh user and an API key for them: (user id, key)."""
    user = await http.post("/v1/users", json={"name": f"u-{uuid.uuid4().hex[:8]}", "plan": plan},
                           headers=admin_headers)
    assert user.status_code == 201, user.text
    key = await http.post("/v1/keys", json={"name": "test", "user_id": user.json()["id"]}, headers=admin_headers)
    assert key.status_code == 201, key.text
    return user.json()["id"], key.json()["key"]
