"""Long-lived httpx clients for upstream hops, and the streaming relay every hop uses."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpx

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
    return httpx.AsyncClient(
        base_url=base_url,
        # small writes (headers, then body; one SSE event at a time) must not wait for Nagle
        transport=httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        ),
        timeout=httpx.Timeout(
            connect=settings.connect_timeout,
            read=read_timeout if read_timeout is not None else settings.first_byte_timeout,
            write=5.0,
            pool=5.0,
        ),
        event_hooks={"request": [_propagate_ids]},
    )


def forward_headers(headers: object, drop: frozenset[str] = frozenset()) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS and k.lower() not in drop}


async def relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """Yield upstream bytes as they arrive; always release the connection, even on disconnect."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()
