"""Stopping a service never cuts a client's stream silently: in-flight streams finish, then it exits."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from stack.local import LocalStack

BODY = {"model": "synthetic", "stream": True, "max_tokens": 32,
        "messages": [{"role": "user", "content": "keep talking while I restart you"}]}


async def _stream_through_a_restart(http: httpx.AsyncClient, headers: dict, stack: LocalStack,
                                    component: str) -> list[str]:
    events: list[str] = []
    stopping: asyncio.Future | None = None
    async with http.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if stopping is None and '"content":"' in line and '"content":""' not in line:
                # the first token is out: ask the supervisor to stop the service now (SIGTERM)
                stopping = asyncio.ensure_future(asyncio.to_thread(stack.supervisor.stop, component))
    assert stopping is not None
    await stopping
    return events


@pytest.mark.parametrize("component", ["chat", "inference"])
async def test_a_stream_in_flight_finishes_when_its_service_is_stopped(http, demo_headers, stack: LocalStack,
                                                                        component):
    try:
        events = await _stream_through_a_restart(http, demo_headers, stack, component)
    finally:
        stack.supervisor.start(component)
        await asyncio.to_thread(stack.wait_ready, (component,), 120)
    assert events[-1] == "[DONE]"
    assert not any('"error"' in event for event in events)
    words = [e for e in events if '"content":"' in e and '"content":""' not in e]
    assert len(words) == 32  # every token, none lost to the shutdown
