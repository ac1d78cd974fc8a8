"""What the caller is told: OpenAI's `x-ratelimit-*` headers and Retry-After."""

from __future__ import annotations

import math

from common.limits.decisions import BudgetDecision, RateDecision


def _duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1.5s, 6m0s, 3h2m1s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def rate_headers(requests: RateDecision | None = None, tokens: BudgetDecision | None = None) -> dict[str, str]:
    """`x-ratelimit-limit/remaining/reset-requests|tokens` for every answer a limit looked at."""
    headers: dict[str, str] = {}
    if requests is not None:
        headers["x-ratelimit-limit-requests"] = str(requests.limit)
        headers["x-ratelimit-remaining-requests"] = str(requests.remaining)
        headers["x-ratelimit-reset-requests"] = _duration(requests.reset_seconds)
    if tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(tokens.limit)
        headers["x-ratelimit-remaining-tokens"] = str(tokens.remaining)
        headers["x-ratelimit-reset-tokens"] = _duration(tokens.reset_seconds)
    return headers


def retry_after(seconds: float) -> str:
    """Retry-After in whole seconds, never 0 for a refusal."""
    return str(max(1, math.ceil(seconds)))
