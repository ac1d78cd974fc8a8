"""Malformed requests refused at the door: a 400 before any route, any I/O, any upstream.

Every app the kit builds (the router, the gateways, the services) runs `InputGuardMiddleware` first
thing, so a control character in a path, query string or header, a path that is not UTF-8 or walks
with "..", or a header another hop could not send on is the caller's 400, never a 500 further down
the chain (which a breaker counts, and which would move other users' traffic onto the degraded path).
Header values may carry latin-1 bytes (RFC 9110 obs-text), relayed as they came; the few headers
the platform reads itself must be printable ASCII.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote_to_bytes

import msgspec
from litestar.types import ASGIApp, Receive, Scope, Send

from common.errors import ApiError

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# in a header value: every control byte but HTAB (CR, LF and NUL would split or end the header)
_HEADER_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]+")
# the common case, decided in one pass: nothing escaped, nothing but visible ASCII (and, in headers, spaces
# and tabs) -- no control character and no invalid UTF-8 can hide in it
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]*")
_HEADER_TEXT = re.compile(rb"[\x20-\x7e\t]*")
MAX_IDEMPOTENCY_KEY = 255
# headers the platform reads and passes on as text: their spelling as errors name them
ASCII_HEADERS = {b"idempotency-key": "Idempotency-Key", b"x-request-id": "X-Request-ID"}
_encoder = msgspec.json.Encoder()


def _bad(message: str, param: str | None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def check_path(raw_path: bytes) -> None:
    """The path, percent-decoded, is UTF-8 with no control character and no "." or ".." segment."""
    if b"%" not in raw_path and b"/." not in raw_path and _VISIBLE_ASCII.fullmatch(raw_path):
        return
    try:
        path = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("The request path is not valid UTF-8 once percent-decoded.", None, "invalid_path") from None
    if _CONTROL.search(path):
        raise _bad("The request path contains a control character.", None, "invalid_path")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise _bad("The request path contains a '.' or '..' segment.", None, "invalid_path")


def check_query(query_string: bytes) -> None:
    """Every name and value, percent-decoded, is UTF-8 with no control character."""
    if not query_string or (b"%" not in query_string and _VISIBLE_ASCII.fullmatch(query_string)):
        return
    try:
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, encoding="utf-8",
                          errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise _bad("The query string is not valid UTF-8 once percent-decoded.", None, "invalid_query") from None
    for name, value in pairs:
        if _CONTROL.search(name):
            raise _bad("A query parameter's name contains a control character.", None, "invalid_value")
        if _CONTROL.search(value):
            raise _bad(f"The query parameter '{name}' contains a control character.", name, "invalid_value")


def check_headers(headers: list[tuple[bytes, bytes]]) -> None:
    plain = _HEADER_TEXT.fullmatch(b"".join([value for _, value in headers])) is not None
    for name, value in headers:
        shown = ASCII_HEADERS.get(name)
        if shown is None:
            if not plain and _HEADER_CONTROL.search(value):
                shown = name.decode("latin-1")
                raise _bad(f"The {shown} header contains a control character.", shown, "invalid_header")
        elif name == b"idempotency-key":
            key = value.strip()
            if not key or len(key) > MAX_IDEMPOTENCY_KEY or not _PRINTABLE_ASCII.fullmatch(key):
                raise _bad(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters.",
                           shown, "invalid_value")
        elif value and not _PRINTABLE_ASCII.fullmatch(value):
            raise _bad(f"{shown} must be printable ASCII.", shown, "invalid_value")


def check_request(scope: Scope) -> None:
    """Raises the 400 (ApiError) a malformed request gets."""
    check_path(scope.get("raw_path") or scope["path"].encode("utf-8"))
    check_query(scope.get("query_string") or b"")
    check_headers(scope["headers"])


class InputGuardMiddleware:
    """Answers a malformed request with its 400 before the app sees it (see the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                check_request(scope)
            except ApiError as error:
                body = _encoder.encode(error.body)
                await send({"type": "http.response.start", "status": error.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
        await self.app(scope, receive, send)
