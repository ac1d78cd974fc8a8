"""What both gateways do around every call: admit by requests/min, and forward with the last good
copy of a per-tenant read kept for when its service cannot answer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
from litestar import Request, Response
from litestar.response import Stream

from common.contracts import DEGRADED_HEADER, UPSTREAM_HEADER, check_path_ids
from common.errors import ApiError
from common.http import forward_headers, upstream_path
from common.limits import KeyRate, RateDecision, RequestRateLimiter, rate_headers, retry_after
from common.metrics import FALLBACKS, RATE_LIMITED
from common.security import INTERNAL_TOKEN_HEADER, InternalTokens
from fallback.degraded import degraded_response
from gateway.authn import Identity
from gateway.cache import LastKnown
from gateway.proxy import Hop, UpstreamUnavailable, may_retry, relay_response, response_headers

log = logging.getLogger(__name__)

# GET paths whose last good answer is kept per tenant (the identity fallback's read-only answers)
LAST_KNOWN_PATHS = frozenset({"/v1/users/me", "/v1/usage", "/v1/models"})
DROP_REQUEST_HEADERS = frozenset({"authorization", "cookie", INTERNAL_TOKEN_HEADER})


@dataclass(frozen=True)
class Upstream:
    audience: str
    hop: Hop


def key_rate(limiter: RequestRateLimiter, identity: Identity, limit: int) -> KeyRate:
    """Requests per minute per API key (per user for a JWT). The user in braces: on a Redis Cluster the
    count shares a slot with the user's token budget, which the chat path updates in the same script."""
    principal = identity.principal
    return KeyRate(limiter, f"{{{principal.subject}}}:{principal.key_id or principal.subject}", limit)


async def admit(service: str, rate: KeyRate) -> dict[str, str]:
    """Count one request: the rate headers to send, or a 429 with Retry-After."""
    decision = await rate.limiter.hit(rate.key, rate.limit)
    headers = rate_headers(requests=decision)
    if not decision.allowed:
        raise refused(service, decision, headers)
    return headers


def refused(service: str, decision: RateDecision, headers: dict[str, str]) -> ApiError:
    RATE_LIMITED.labels(service, "requests").inc()
    return ApiError(429, f"Rate limit reached: {decision.limit} requests per minute.", type="requests",
                    code="rate_limit_exceeded", headers={**headers, "Retry-After": retry_after(decision.retry_after)})


async def read_body(response: httpx.Response, timeout: float) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            return await response.aread()
    except (TimeoutError, httpx.HTTPError):
        raise ApiError(502, "The upstream answer was cut before it finished.", type="server_error",
                       code="stream_interrupted") from None
    finally:
        await response.aclose()


def read_key(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


async def recalled(last_known: LastKnown, service: str, tenant: str, key: str,
                   headers: dict[str, str]) -> Response | None:
    """The last good answer, flagged as coming from the cache; None when there is none."""
    content = await last_known.recall(tenant, key)
    if content is None:
        return None
    FALLBACKS.labels(service, "cache").inc()
    return Response(content, status_code=200, media_type="application/json",
                    headers={**headers, DEGRADED_HEADER: "cache"})


async def forward_to(service: str, upstream: Upstream, tokens: InternalTokens, last_known: LastKnown,
                     request: Request, identity: Identity, headers: dict[str, str],
                     total_timeout: float) -> Response | Stream:
    """Forward with the caller's identity in an internal token; before the first byte, a failure
    answers from the last good copy (remembered reads) or as a flagged 503."""
    method, path, query = request.method, request.url.path, request.url.query
    check_path_ids(path)  # before any I/O: an id no resource can have is its 404 here
    remembered = method == "GET" and path in LAST_KNOWN_PATHS
    tenant = identity.principal.subject
    upstream_headers = forward_headers(request.headers, DROP_REQUEST_HEADERS)
    upstream_headers.update(tokens.headers(upstream.audience, identity.principal))
    try:
        response = await upstream.hop.open(method, upstream_path(request.scope), content=await request.body(),
                                           headers=upstream_headers,
                                           params=query or None, retry_ok=may_retry(method, request.headers))
    except UpstreamUnavailable as failure:
        log.warning("upstream failed before first byte", extra={"upstream": failure.upstream,
                                                                "reason": failure.reason})
        if remembered and (answer := await recalled(last_known, service, tenant, read_key(path, query),
                                                    headers)) is not None:
            return answer
        if failure.answer is not None:  # the service's own error (say, signing unavailable): passed on
            return Response(failure.answer.content, status_code=failure.answer.status,
                            headers={**failure.answer.headers, **headers, UPSTREAM_HEADER: failure.upstream},
                            media_type=failure.answer.headers.get("content-type"))
        return degraded_response(service, f"{failure.upstream} unavailable", headers)
    if remembered and response.status_code == 200:
        content = await read_body(response, total_timeout)
        last_known.remember(tenant, read_key(path, query), content)
        return Response(content, status_code=200, headers=response_headers(response, headers),
                        media_type=response.headers.get("content-type"))
    return relay_response(response, headers)
