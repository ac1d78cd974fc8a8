"""What a drill does to the stack: its scenarios, their timing, and the chaos scenario's fault schedule."""

from __future__ import annotations

import random
from dataclasses import dataclass

from stack.config import REPLICA_OF

DEGRADED = "x-dualgate-degraded"
ROUTE = "x-dualgate-route"
REVOCATION_GRACE = 1.0  # a revoked key may pass this long (docs/DESIGN.md §4), never longer
MODEL = "synthetic"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    stop: tuple[str, ...] = ()  # supervisor programs stopped at t1, started at t2
    pause: tuple[str, ...] = ()  # SIGSTOP at t1, SIGCONT at t2
    slow: str | None = None  # paused most of the time between t1 and t2 (injected latency)
    revoke: bool = False
    restarts_vault: bool = False  # the stack's listener configures the restarted dev-mode vault: wait for it
    chaos: bool = False  # a seeded schedule of kills, pauses and restarts between t1 and t2 (chaos_schedule)


def _ai_gateways() -> tuple[str, ...]:
    return ("gateway-ai", *[name for name, of in REPLICA_OF.items() if of == "gateway-ai"])


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("gateway-ai", "every AI gateway replica stopped: the router fails over to the fallback gateway",
             stop=_ai_gateways()),
    Scenario("gateway-identity", "the identity gateway stopped: reads go through the fallback gateway",
             stop=("gateway-identity",)),
    Scenario("auth", "the auth service stopped: gateways authenticate from cached auth", stop=("auth",)),
    Scenario("users", "the users service stopped: profile reads come from their last good copy", stop=("users",)),
    Scenario("chat", "the chat service stopped: the fallback chain answers (cache, simplified model, degraded)",
             stop=("chat",)),
    Scenario("models", "the models service stopped: last known registry", stop=("models",)),
    Scenario("inference", "the inference service stopped: cache, then a flagged degraded answer",
             stop=("inference",)),
    Scenario("redis", "Redis stopped: in-process limits and caches", stop=("redis",)),
    Scenario("postgres", "PostgreSQL stopped: chat keeps answering, turns land on recovery", stop=("postgres",)),
    Scenario("kafka", "the broker paused (SIGSTOP): turns wait and are published on recovery", pause=("kafka",)),
    Scenario("vault", "Vault stopped: last fetched secrets stay in use", stop=("vault",), restarts_vault=True),
    Scenario("slow-inference", "inference paused 80% of the time: latency injected, nothing fails",
             slow="inference"),
    Scenario("revoke-key-under-load", "a key revoked while it is in use: refused within 1 s everywhere",
             revoke=True),
    Scenario("chaos", "processes killed (-9), paused and restarted, one or two at once, under conversation "
                      "load with Idempotency-Key retries: every turn stored once, one answer per key", chaos=True),
)}


@dataclass(frozen=True)
class Timing:
    duration: float
    t1: float
    t2: float
    rate: float  # requests per second, all workers together
    workers: int

    @classmethod
    def of(cls, short: bool, scenario: Scenario | None = None) -> "Timing":
        if scenario is not None and scenario.chaos:
            return cls(30.0, 2.0, 24.0, 12.0, 6) if short else cls(180.0, 10.0, 170.0, 16.0, 8)
        return cls(6.0, 1.5, 3.5, 16.0, 6) if short else cls(30.0, 8.0, 20.0, 16.0, 8)


# ---- chaos ----------------------------------------------------------------------------------------

# Python processes and Redis die cleanly under SIGKILL and supervisord starts them again at once.
# PostgreSQL is paused or restarted, never killed (a killed postmaster's backends hold its shared
# memory, and a new one refuses to start until they go). The broker is only paused: the embedded
# Tansu keeps messages in memory, and a restart under connected clients refuses produces for a while
# (tests/conftest.py), which real Kafka does not. Vault (dev mode, in memory) and nginx (the edge the
# load measures from) are never touched.
KILLABLE = ("router", "router-2", "gateway-ai", "gateway-ai-2", "gateway-identity", "gateway-fallback",
            "auth", "users", "chat", "models", "inference", "redis")
RESTARTABLE = (*KILLABLE, "postgres")
PAUSABLE = (*RESTARTABLE, "kafka")
# every replica of a tier nothing stands in for: both down at once is an outage of the whole edge, which
# the drill's availability would measure instead of the platform's failover (the AI gateways' pair may
# go together: the fallback gateway stands in for them)
WHOLE_TIER = frozenset({"router", "router-2"})


@dataclass(frozen=True)
class ChaosStep:
    at: float  # seconds since the drill began
    action: str  # kill | pause | restart
    targets: tuple[str, ...]
    hold: float  # how long a pause lasts


def chaos_schedule(timing: Timing, *, short: bool, seed: int = 23) -> list[ChaosStep]:
    """One fault every few seconds between t1 and t2; every third one hits two components at once.
    A step ends (pause lifted, restart done) before the next begins, so at most two are down together."""
    rng = random.Random(seed)
    hold = 2.0 if short else 5.0
    every = 4.0 if short else 9.0
    actions = ("kill", "pause", "restart")
    pools = {"kill": KILLABLE, "pause": PAUSABLE, "restart": RESTARTABLE}
    steps, at, n = [], timing.t1, 0
    while at + hold < timing.t2:
        action = actions[n % 3] if n < 3 else rng.choice(actions)  # each action at least once
        width = 2 if n % 3 == 2 else 1
        targets = rng.sample(pools[action], width)
        while WHOLE_TIER <= set(targets):
            targets = rng.sample(pools[action], width)
        steps.append(ChaosStep(round(at, 2), action, tuple(targets), hold))
        at += every
        n += 1
    return steps
