"""What many tests need: waiting on a condition, users and keys through the public API, and internal
tokens minted from the stack's credentials (to call a service as a gateway would)."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from common.security import InternalTokens
from stack.credentials import Credentials

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T] | T], timeout: float = 30.0, *, interval: float = 0.02,
                     what: str = "condition") -> T:
    """Poll `check` (plain or async) until it returns something truthy, and return that; fail naming
    `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


def wait_for(check: Callable[[], T], timeout: float = 30.0, *, interval: float = 0.05, what: str = "condition") -> T:
    """`eventually` for tests without an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        time.sleep(interval)


async def new_user(http: httpx.AsyncClient, admin: dict[str, str], plan: str = "default") -> str:
    """A fresh user on `plan`, made through the admin API: its id."""
    resp = await http.post("/v1/users", json={"name": f"user-{uuid.uuid4().hex[:8]}", "plan": plan}, headers=admin)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


async def new_key(http: httpx.AsyncClient, admin: dict[str, str], user_id: str,
                  scopes: list[str] | None = None) -> tuple[str, str]:
    """A fresh API key for `user_id`: (the key, its id)."""
    body: dict = {"name": "test", "user_id": user_id, **({"scopes": scopes} if scopes else {})}
    resp = await http.post("/v1/keys", json=body, headers=admin)
    assert resp.status_code == 201, resp.text
    return resp.json()["key"], resp.json()["id"]


async def user_with_key(http: httpx.AsyncClient, admin: dict[str, str], plan: str = "default") -> tuple[str, str]:
    """A fresh user and an API key for them: (user id, key)."""
    user_id = await new_user(http, admin, plan)
    return user_id, (await new_key(http, admin, user_id))[0]


def internal_tokens(creds: Credentials, issuer: str = "tests") -> InternalTokens:
    """Internal tokens signed with the stack's internal keys, as the process named `issuer` would sign them."""
    keys = {k: bytes.fromhex(v) for k, v in creds.internal_keys.items() if k != "current"}
    return InternalTokens(issuer_service=issuer, keys=keys, current=creds.internal_keys["current"], ttl=600)
