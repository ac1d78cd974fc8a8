"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` on every 4xx/5xx."""

from __future__ import annotations

import logging
import re

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException, ValidationException

from common.storable import unstorable_field

log = logging.getLogger(__name__)


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


class ApiError(Exception):
    """An error the caller should see, with its HTTP status and OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorEnvelope(ErrorBody(message=message, type=type, param=param, code=code))
        self.headers = headers or {}


def unauthorized() -> ApiError:
    # one message for every failure so a guesser learns nothing about which part was wrong
    return ApiError(401, "Invalid or missing credentials.", type="authentication_error", code="invalid_api_key")


def forbidden(message: str = "This credential lacks the scope for this operation.") -> ApiError:
    return ApiError(403, message, type="permission_error", code="insufficient_scope")


def not_found(message: str, code: str = "not_found", param: str | None = None) -> ApiError:
    return ApiError(404, message, type="invalid_request_error", code=code, param=param)


def unavailable(message: str, retry_after: int = 5, code: str = "service_unavailable") -> ApiError:
    return ApiError(
        503, message, type="service_unavailable", code=code, headers={"Retry-After": str(retry_after)}
    )


_PARAM_RE = re.compile(r"at `\$\.?([^`]*)`")
_MISSING_RE = re.compile(r"missing required field `([^`]*)`")


def decode_body(body: bytes, schema: type[msgspec.Struct]):
    """Decode and validate a JSON body; bad input becomes a 400 naming the parameter."""
    if not body:
        raise ApiError(400, "Request body is empty; a JSON object is required.", code="invalid_json")
    if (unstorable := unstorable_field(body)) is not None:
        param, problem = unstorable
        raise ApiError(400, f"{param or 'The body'} contains {problem}, which cannot be stored.",
                       param=param or None, code="invalid_value")
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PARAM_RE.search(text)
        param = match.group(1) if match else None
        if param is None and (missing := _MISSING_RE.search(text)):  # a top-level field is missing
            param = missing.group(1)
        raise ApiError(400, text, param=param or None, code="invalid_value") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    except UnicodeDecodeError:  # msgspec checks a string's UTF-8 as it decodes it
        raise ApiError(400, "Request body is not valid UTF-8.", code="invalid_json") from None
    except RecursionError:  # msgspec's depth guard: nesting no request of ours needs
        raise ApiError(400, "Request body is nested too deeply.", code="invalid_json") from None


def error_response(status: int, body: ErrorEnvelope, headers: dict[str, str] | None = None) -> Response:
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers)


def _api_error_handler(_: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.body, exc.headers)


def _validation_handler(_: Request, exc: ValidationException) -> Response:
    """A bad query or path parameter: 400 naming it, like a bad body field (decode_body)."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    first = next((p for p in problems if isinstance(p, dict) and p.get("key")), {})
    message = f"{first['key']}: {first.get('message', 'invalid value')}" if first else str(exc.detail)
    return error_response(400, ErrorEnvelope(ErrorBody(message=message, type="invalid_request_error",
                                                       param=first.get("key"), code="invalid_value")))


def _http_exception_handler(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
    return error_response(status, ErrorEnvelope(ErrorBody(message=str(exc.detail), type=kind, code=code)))


def _unhandled_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", extra={"path": request.url.path})
    return error_response(500, ErrorEnvelope(ErrorBody(message="Internal error.", type="server_error")))


EXCEPTION_HANDLERS = {
    ApiError: _api_error_handler,
    ValidationException: _validation_handler,
    NotFoundException: _http_exception_handler,
    MethodNotAllowedException: _http_exception_handler,
    HTTPException: _http_exception_handler,
    Exception: _unhandled_handler,
}
