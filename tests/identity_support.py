"""Helpers shared by the identity tests: users and keys through the public API, the stack's own
clients (Redis, Vault as the operator), internal tokens, and pausing a server to inject a fault."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import httpx
import hvac
import msgspec
import redis.asyncio

from common.security import InternalTokens
from stack.credentials import Credentials
from stack.local import LocalStack

T = TypeVar("T")


def current_creds(stack: LocalStack) -> Credentials:
    """The credentials file as it is now (rotations rewrite it)."""
    return msgspec.json.decode(stack.config.credentials_file.read_bytes(), type=Credentials)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def wait_until(predicate: Callable[[], Awaitable[T]], timeout: float, interval: float = 0.05,
                     what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(interval)


async def new_user(http: httpx.AsyncClient, admin: dict[str, str], plan: str = "default") -> str:
    resp = await http.post("/v1/users", json={"name": f"user-{uuid.uuid4().hex[:8]}", "plan": plan}, headers=admin)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


async def new_key(http: httpx.AsyncClient, admin: dict[str, str], user_id: str,
                  scopes: list[str] | None = None) -> tuple[str, str]:
    body: dict = {"name": "test", "user_id": user_id}
    if scopes:
        body["scopes"] = scopes
    resp = await http.post("/v1/keys", json=body, headers=admin)
    assert resp.status_code == 201, resp.text
    return resp.json()["key"], resp.json()["id"]


def internal_tokens(stack: LocalStack, issuer: str = "identity-tests") -> InternalTokens:
    keys = current_creds(stack).internal_keys
    return InternalTokens(issuer_service=issuer, current=keys["current"],
                          keys={k: bytes.fromhex(v) for k, v in keys.items() if k != "current"})


def redis_client(stack: LocalStack) -> redis.asyncio.Redis:
    return redis.asyncio.Redis(port=stack.config.port("redis"), socket_timeout=2, socket_connect_timeout=2)


def vault_root(stack: LocalStack) -> hvac.Client:
    return hvac.Client(url=stack.config.url("vault"), token=current_creds(stack).root_token, timeout=5)


@contextlib.contextmanager
def paused(stack: LocalStack, name: str) -> Iterator[None]:
    """Freeze a server (SIGSTOP): connections hang, as on a network partition; it resumes with its state."""
    stack.supervisor.signal(name, "STOP")
    try:
        yield
    finally:
        stack.supervisor.signal(name, "CONT")
