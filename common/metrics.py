"""Prometheus metrics shared by every process; names start with `dualgate_`."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "dualgate_requests_total", "HTTP requests handled", ["service", "route", "method", "status"]
)
REQUEST_DURATION = Histogram(
    "dualgate_request_duration_seconds",
    "HTTP request duration, first byte in to last byte out",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TTFT = Histogram(
    "dualgate_ttft_seconds",
    "Time to first token",
    ["service", "model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TOKENS = Counter("dualgate_tokens_total", "Tokens processed", ["service", "model", "kind"])
FALLBACKS = Counter("dualgate_fallback_total", "Answers served by a fallback layer", ["service", "layer"])
ENGINE_QUEUE_DEPTH = Gauge("dualgate_engine_queue_depth", "Requests waiting for an engine slot", ["engine"])
ENGINE_ACTIVE = Gauge("dualgate_engine_active_sequences", "Sequences being generated", ["engine"])
EVENTS_PUBLISHED = Counter("dualgate_events_published_total", "Events published to Kafka", ["topic"])
EVENTS_CONSUMED = Counter("dualgate_events_consumed_total", "Events consumed from Kafka", ["topic", "outcome"])
AUTH_LOOKUPS = Counter(
    "dualgate_auth_lookups_total", "Credentials checked at a gateway, by where the answer came from",
    ["service", "source"],  # memory | snapshot | introspection | stale | jwt
)
AUTH_FAILURES = Counter("dualgate_auth_failures_total", "Credentials refused at a gateway", ["service", "reason"])
VAULT_ROTATIONS = Counter("dualgate_secret_rotations_total", "Rotated secrets a process picked up", ["service", "secret"])

# ---- AI domain (issue 4) ---------------------------------------------------------------------
ENGINE_CANCELLED = Counter("dualgate_engine_cancelled_total",
                           "Sequences dropped because their client went away", ["engine", "stage"])
ENGINE_BATCH_SIZE = Histogram("dualgate_engine_batch_size", "Sequences advanced together by one decode step",
                              ["engine"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
ENGINE_WORKER_UP = Gauge("dualgate_engine_worker_up", "1 while a runtime worker is in rotation", ["engine", "worker"])
ENGINE_WORKER_OUTSTANDING = Gauge("dualgate_engine_worker_outstanding", "Requests in flight on a runtime worker",
                                  ["engine", "worker"])
ENGINE_WORKER_REQUESTS = Counter("dualgate_engine_worker_requests_total", "Requests sent to a runtime worker",
                                 ["engine", "worker", "outcome"])
OUTBOX_PENDING = Gauge("dualgate_outbox_pending", "Turns in the durable spool: not yet published, or published "
                       "and not yet seen in the database", ["service", "state"])

# ---- edge (issue 5) ---------------------------------------------------------------------------
CACHE_HITS = Counter("dualgate_cache_hits_total", "Response cache hits", ["service"])
CACHE_MISSES = Counter("dualgate_cache_misses_total", "Response cache misses (cacheable requests only)", ["service"])
RATE_LIMITED = Counter("dualgate_rate_limited_total", "Requests refused by a limit", ["service", "limit"])
STAGE_SECONDS = Histogram(
    "dualgate_stage_seconds",
    "Where a chat completion's first token waits, per hop and stage (auth, limits, the upstream's headers, "
    "its first event); a stage that calls the next hop includes that hop's time",
    ["service", "stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
FAILOVERS = Counter("dualgate_failover_total", "Requests the router replayed to the fallback gateway", ["domain", "reason"])
GC_FROZEN = Gauge("dualgate_gc_frozen_objects", "Objects moved out of the garbage collector's sight after startup "
                  "and after a model load (common.app.freeze_long_lived_objects)")


def stage_done(service: str, stage: str, since: float) -> float:
    """Observe `stage`, begun at `since` (perf_counter), as over now; returns now, where the next one begins."""
    now = time.perf_counter()
    STAGE_SECONDS.labels(service, stage).observe(now - since)
    return now
