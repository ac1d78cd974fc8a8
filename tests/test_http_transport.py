"""The hops' HTTP transport (common.http.FastTransport: httpx's API over aiohttp) reports each failure as
the httpx error the hops act on: a refused connection (nothing sent, safe to retry anywhere) is a
ConnectError, an answer cut mid-body a RemoteProtocolError, silence a ReadTimeout; and it streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from common.http import FastTransport
from edge_support import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=FastTransport(), timeout=httpx.Timeout(1.0, read=0.5))


async def test_a_refused_connection_is_a_connect_error():
    async with _client() as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{free_port()}/v1/chat/completions", content=b"{}")


async def test_an_answer_cut_mid_body_is_a_protocol_error_not_a_connect_error(serve):
    async def cut(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"par")
        await writer.drain()
        writer.close()

    async with _client() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(await serve(cut), content=b"{}")


async def test_an_upstream_that_never_answers_is_a_read_timeout(serve):
    async def silent(reader, writer):
        await _read_request(reader)
        await asyncio.sleep(5)

    async with _client() as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(await serve(silent))


async def test_events_arrive_one_by_one_as_the_upstream_sends_them(serve):
    release = asyncio.Event()

    async def sse(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await release.wait()  # the second event waits until the client has the first
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async with _client() as client, client.stream("GET", await serve(sse)) as response:
        received = []
        async for chunk in response.aiter_raw():
            received.append(chunk)
            release.set()
    assert received == [b"data: one\n\n", b"data: two\n\n"]
