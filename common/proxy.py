"""Forwarding one request to an upstream and relaying its answer byte for byte (router and gateways)."""

from __future__ import annotations

import httpx
from litestar import Request
from litestar.response import Stream

from common.http import HOP_HEADERS, relay

# Response headers that describe the upstream's framing, not the content.
_RESPONSE_DROP = HOP_HEADERS | {"content-length", "date", "server", "x-request-id"}


async def open_upstream(client: httpx.AsyncClient, request: Request, url: str, *, body: bytes,
                        headers: dict[str, str]) -> httpx.Response:
    """Send and wait for the status line and headers only; the body is relayed later, unbuffered."""
    upstream_request = client.build_request(request.method, url, params=request.url.query or None,
                                            content=body, headers=headers)
    return await client.send(upstream_request, stream=True)


def relay_response(upstream: httpx.Response, extra_headers: dict[str, str] | None = None) -> Stream:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP}
    if extra_headers:
        headers.update(extra_headers)
    return Stream(relay(upstream), status_code=upstream.status_code, headers=headers,
                  media_type=upstream.headers.get("content-type"))


def request_body_too_large(request: Request, limit: int) -> bool:
    length = request.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) > limit
