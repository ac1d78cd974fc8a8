"""The hops' HTTP transport (common.http.FastTransport: httpx's API over aiohttp) reports each failure as
the httpx error the hops act on: a refused connection (nothing sent, safe to retry anywhere) is a
ConnectError, an answer cut mid-body a RemoteProtocolError, silence a ReadTimeout; and it streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from edge_support import free_port

from common.http import FastTransport, HopClient, finish

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


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("read_the_rest, connections", [(True, 1), (False, 3)])
async def test_an_answer_finished_after_done_leaves_its_connection_to_the_next_request(serve, read_the_rest,
                                                                                        connections):
    """The chunked body's end comes a moment after `[DONE]`: closing in between costs the next request a
    new connection (a name lookup on a thread and a handshake); `finish` with the rest keeps it."""
    accepted = 0
    client_has_done = asyncio.Event()

    async def sse(reader, writer):
        nonlocal accepted
        accepted += 1
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:  # the client closed this connection
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         + _chunked(b'data: {"n":1}\n\n') + _chunked(b"data: [DONE]\n\n"))
            await writer.drain()
            await client_has_done.wait()  # the body's end goes out only once the client has read [DONE]
            client_has_done.clear()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    url = await serve(sse)
    async with _client() as client:
        for _ in range(3):
            response = await client.send(client.build_request("GET", url), stream=True)
            chunks = response.aiter_raw()
            seen = b""
            async for chunk in chunks:
                seen += chunk
                if seen.endswith(b"data: [DONE]\n\n"):
                    break
            client_has_done.set()
            await finish(response, chunks if read_the_rest else None)
    assert accepted == connections


async def test_a_cookie_one_answer_sets_is_never_sent_with_a_later_request(serve):
    """A hop client serves every user: a Set-Cookie from one user's answer must not ride along on the next."""
    cookies_sent: list[bytes] = []

    async def sets_a_cookie(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            cookies_sent.extend(line for line in head.lower().split(b"\r\n") if line.startswith(b"cookie:"))
            writer.write(b"HTTP/1.1 200 OK\r\nset-cookie: session=alice; Path=/\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()

    url = await serve(sets_a_cookie)
    async with HopClient(transport=FastTransport(), timeout=1.0) as client:
        for _ in range(2):
            assert (await client.get(url)).status_code == 200
    assert cookies_sent == []
