"""The fallback chain shared by both gateways (DESIGN §4), and the chat path that uses it.

model fallback -> cached response (per tenant) -> simplified model -> degraded 503 with Retry-After.
Every fallback answer is flagged `x-dualgate-degraded: <layer>` and counted in
`dualgate_fallback_total{layer}`; none is ever presented as the answer that was asked for.
"""

from fallback.degraded import DEGRADED_HEADER, degraded_response

__all__ = ["DEGRADED_HEADER", "degraded_response"]
