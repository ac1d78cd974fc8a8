"""Helpers shared by the identity tests: the stack's own clients (Redis, Vault as the operator), its
current credentials, and pausing a server to inject a fault."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import hvac
import msgspec
import redis.asyncio
from support import internal_tokens

from common.security import InternalTokens
from stack.credentials import Credentials
from stack.local import LocalStack

T = TypeVar("T")


def current_creds(stack: LocalStack) -> Credentials:
    """The credentials file as it is now (rotations rewrite it)."""
    return msgspec.json.decode(stack.config.credentials_file.read_bytes(), type=Credentials)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def stack_tokens(stack: LocalStack, issuer: str) -> InternalTokens:
    """Internal tokens from the stack's credentials as they are now (rotations rewrite them)."""
    return internal_tokens(current_creds(stack), issuer)


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
