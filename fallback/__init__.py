"""The fallback chain shared by both gateways (DESIGN §4).

Today: the last layer, a degraded 503 with an OpenAI-style error and Retry-After.
Model fallback, cached response and the simplified CPU model layers plug in before it.
Every fallback answer is flagged `x-dualgate-degraded: <layer>` and counted.
"""

from fallback.degraded import DEGRADED_HEADER, degraded_response

__all__ = ["DEGRADED_HEADER", "degraded_response"]
