"""Request rate limits and daily token budgets, exact across every replica (atomic Lua in Redis).

Requests per period per key use GCRA (the generic cell rate algorithm): one Redis key per
client holds its theoretical arrival time (TAT); a request is admitted when it would not push
TAT more than one period past now. That is a token bucket of `limit` requests refilled evenly
over the period, stored as one number, with exact remaining / reset / retry-after figures.

Tokens per UTC day per user use reserve/settle: a request holds its maximum cost before the
call, a stream grows its hold as it goes, and settle replaces the hold with the real usage.
Holds carry deadlines, so a replica that dies before settling leaks nothing for long.

A chat completion asks both, and its response cache, in one round trip (TokenBudget.admit): the
request is counted first, then a fresh cached answer comes back instead of a reservation.

Redis being unreachable or slow never reaches the caller: every Redis call is bounded by a
short timeout, and the in-process limiter with the same interface answers instead, with the
replica's share of each limit (limit // replicas).

The package, by concern: `redis_calls` (bounded Redis calls with a cool-down), `decisions` (what a
limit answers), `rates` (requests per period), `budget` (tokens per day), `headers` (what the caller
is told), and the Lua scripts in `lua/`.
"""

from common.limits.budget import LocalTokenBudget, TokenBudget
from common.limits.decisions import Admission, BudgetDecision, RateDecision, Reservation
from common.limits.headers import rate_headers, retry_after
from common.limits.rates import KeyRate, LocalRateLimiter, RequestRateLimiter, SyncedRateLimiter, rate_decision
from common.limits.redis_calls import REDIS_COOLDOWN, REDIS_TIMEOUT, RedisCalls, RedisUnavailable

__all__ = ["REDIS_COOLDOWN", "REDIS_TIMEOUT", "Admission", "BudgetDecision", "KeyRate", "LocalRateLimiter",
           "LocalTokenBudget", "RateDecision", "RedisCalls", "RedisUnavailable", "RequestRateLimiter",
           "Reservation", "SyncedRateLimiter", "TokenBudget", "rate_decision", "rate_headers", "retry_after"]
