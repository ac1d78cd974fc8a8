"""The fallback chain the gateways share (docs/DESIGN.md §4) and its last layer, the degraded answer.

model fallback -> cached response (per tenant) -> simplified model -> degraded 503 with Retry-After.
Every fallback answer is flagged `x-dualgate-degraded: <layer>` and counted in
`dualgate_fallback_total{layer}`; none is ever presented as the answer that was asked for.
"""

from fallback.degraded import degraded_response

__all__ = ["degraded_response"]
