"""The Idempotency-Key header: a client's name for one logical request, so a retry gets the first answer."""

from __future__ import annotations

from litestar import Request

from common.contracts import IDEMPOTENCY_HEADER
from common.errors import ApiError
from common.guard import MAX_IDEMPOTENCY_KEY


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key, or None without one; a 400 naming it when it is not 1 to 255
    printable characters (the kit's input guard already refused one that is not printable ASCII)."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise ApiError(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters.",
                       param="Idempotency-Key", code="invalid_value")
    return key
