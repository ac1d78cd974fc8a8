from __future__ import annotations

from litestar import Response

from common.contracts import DEGRADED_HEADER
from common.errors import ErrorBody, ErrorEnvelope, error_response
from common.metrics import FALLBACKS

RETRY_AFTER_SECONDS = 5


def degraded_response(service: str, reason: str, headers: dict[str, str] | None = None,
                      retry_after: int = RETRY_AFTER_SECONDS) -> Response:
    """Never a fabricated answer: a structured 503 the client can act on."""
    FALLBACKS.labels(service, "degraded").inc()
    body = ErrorEnvelope(ErrorBody(
        message=f"The service is degraded and cannot answer this request now ({reason}). Retry shortly.",
        type="service_unavailable", code="degraded"))
    return error_response(503, body, {**(headers or {}), "Retry-After": str(retry_after),
                                      DEGRADED_HEADER: "degraded"})
