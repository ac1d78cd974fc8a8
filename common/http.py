"""Long-lived httpx clients for upstream hops, and the streaming relay every hop uses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from common.errors import ApiError
from common.logging import request_id_var, trace_id_var
from common.settings import Settings

# Request headers never forwarded between hops: hop-by-hop ones, and the caller's
# credentials (services authenticate the internal token instead).
HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})


async def _propagate_ids(request: httpx.Request) -> None:
    if rid := request_id_var.get():
        request.headers.setdefault("x-request-id", rid)
    if tid := trace_id_var.get():
        # a new span id per hop is not tracked; the trace id is what ties the logs together
        request.headers.setdefault("traceparent", f"00-{tid}-{'0' * 15}1-01")


# aiohttp's errors as the httpx errors our hops act on. Order matters (most specific first): what
# failed before the request left (connect) may be retried for any request, what failed after may not.
_PRECISE_ERRORS: tuple[tuple[type[BaseException], type[httpx.HTTPError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (asyncio.TimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientError, httpx.TransportError),
)
_TRANSPORT_ERRORS = (httpx.TransportError, aiohttp.ClientError, asyncio.TimeoutError)


def _precise(exc: BaseException) -> httpx.HTTPError:
    """httpx-aiohttp maps every aiohttp connection error to ConnectTimeout (a refused connection and a
    server that hung up mid-answer alike); look at the aiohttp error underneath instead."""
    cause = exc if isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError)) else exc.__cause__
    for aiohttp_error, httpx_error in _PRECISE_ERRORS:
        if isinstance(cause, aiohttp_error):
            return httpx_error(str(cause) or type(cause).__name__)
    return exc if isinstance(exc, httpx.HTTPError) else httpx.TransportError(repr(exc))


class _PreciseStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except _TRANSPORT_ERRORS as exc:
            raise _precise(exc) from exc

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        except _TRANSPORT_ERRORS as exc:
            raise _precise(exc) from exc


def _utf8_headers(raw: list[tuple[bytes, bytes]]) -> httpx.Headers:
    """Header values as aiohttp can send them: it writes header text as UTF-8, and httpx decodes every
    value with one encoding guessed for all, so one latin-1 value would garble a UTF-8 one beside it.
    Each value stays the same text: UTF-8 bytes pass as they are, any other bytes are read as latin-1."""
    def utf8(value: bytes) -> bytes:
        try:
            value.decode("utf-8")
            return value
        except UnicodeDecodeError:
            return value.decode("latin-1").encode("utf-8")

    return httpx.Headers([(name, utf8(value)) for name, value in raw], encoding="utf-8")


class FastTransport(AiohttpTransport):
    """httpx's API over aiohttp's connection pool and C HTTP parser (httpx-aiohttp).

    Every hop keeps speaking httpx; only the transport underneath changes. httpx's own (httpcore:
    pure-Python h11 over anyio) costs about 1 ms of CPU per proxied request on this 2-core machine,
    aiohttp's about 0.15 ms (BENCHMARKS.md): on a hop that only relays bytes that is the budget.
    aiohttp sets TCP_NODELAY on its connections, so small writes (one SSE event) never wait for Nagle.
    """

    def __init__(self, max_connections: int = 256, keepalive_seconds: float = 5.0) -> None:
        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=keepalive_seconds)
            # the caller's headers go as given: no user agent or encodings of aiohttp's own
            return aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent", "Accept-Encoding"),
                                         auto_decompress=False)

        super().__init__(client=session)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not all(value.isascii() for _, value in request.headers.raw):
            request.headers = _utf8_headers(request.headers.raw)
        try:
            response = await super().handle_async_request(request)
        except _TRANSPORT_ERRORS as exc:
            raise _precise(exc) from exc
        response.stream = _PreciseStream(response.stream)
        return response


class _NoCookies(httpx.Cookies):
    def extract_cookies(self, response: httpx.Response) -> None:
        pass


_NO_COOKIES = _NoCookies()


class HopClient(httpx.AsyncClient):
    """An httpx client for a hop between our services: it keeps no cookies. One client carries every
    user's requests, so a Set-Cookie in one answer must never ride along on the next; and httpx's jar
    wraps every response in urllib objects to look for one (about 3 % of a gateway's CPU)."""

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        raise TypeError("hop clients keep no cookies")


def upstream_client(
    settings: Settings,
    base_url: str = "",
    *,
    max_connections: int = 256,
    read_timeout: float | None = None,
) -> httpx.AsyncClient:
    """One client per upstream, built once at start: keep-alive pool sized for the concurrency.

    The read timeout bounds the wait for the first byte and for each chunk after it.
    """
    return HopClient(
        base_url=base_url,
        transport=FastTransport(max_connections),
        timeout=httpx.Timeout(
            connect=settings.connect_timeout,
            read=read_timeout if read_timeout is not None else settings.first_byte_timeout,
            write=5.0,
            pool=5.0,
        ),
        event_hooks={"request": [_propagate_ids]},
    )


def forward_headers(headers: object, drop: frozenset[str] = frozenset()) -> dict[str, bytes]:
    """The caller's headers to pass on, as the bytes they came as (a latin-1 User-Agent included: as
    text, httpx would refuse anything but ASCII)."""
    return {k: v.encode("latin-1") for k, v in headers.items()
            if k.lower() not in HOP_HEADERS and k.lower() not in drop}


# how long an answer whose content has ended may take to end its body (its chunked terminator)
FINISH_SECONDS = 1.0


async def finish(response: httpx.Response, rest: AsyncIterator | None = None,
                 timeout: float = FINISH_SECONDS) -> None:
    """Close an upstream answer; with `rest` (the iterator its body was being read through), read
    what is left of it first, briefly, so its connection goes back to the pool.

    Pass `rest` only once the content has ended (`[DONE]` seen): the chunked body's terminator
    comes a moment after the last event, and an answer closed before it takes its connection with
    it, so the next request pays a name lookup on a thread and a new TCP handshake. Without `rest`
    (the caller went away, an error, a cut) the answer is closed at once and the upstream stops.
    """
    if rest is not None:
        with contextlib.suppress(TimeoutError, httpx.HTTPError):
            async with asyncio.timeout(timeout):
                async for _ in rest:
                    pass
    await response.aclose()


async def relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """Yield upstream bytes as they arrive; always release the connection, even on disconnect."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


# ---- what a hop cannot send on ------------------------------------------------------------------

UNSENDABLE = (httpx.InvalidURL, httpx.UnsupportedProtocol, httpx.LocalProtocolError, UnicodeEncodeError)


def unsendable(exc: BaseException) -> ApiError:
    return ApiError(400, f"The request cannot be passed on as it is ({type(exc).__name__}).",
                    code="invalid_request")


def upstream_path(scope: dict) -> str:
    """The request's path as the client encoded it, to pass on: the decoded one would turn an id's %2F,
    %3F or %23 into structure ("/", a query, a fragment) on the next hop."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if raw else quote(scope["path"])
