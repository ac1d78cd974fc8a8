"""`dualgate drill <scenario>`: a steady mixed load, a fault at t1 removed at t2, and what users saw.

The load: several users and keys, streamed and whole chat completions (deterministic ones that
repeat, and unique ones), model lists and profile reads, across both domains, paced to a steady
rate. The fault goes through the supervisor (stop/start, SIGSTOP/SIGCONT) or, for slow-inference,
a latency injected by pausing the inference process most of the time. Then the report:

  availability      answered (clean or flagged degraded answer with content) / requests
  degraded_share    flagged degraded answers with content / requests
  flagged_share     flagged 503s (the chain's last layer: honest, retryable) / requests
  unflagged_failure_share   everything else: unflagged 5xx, cut streams, connection errors
  errors            by status (or error kind)
  latency_ms, ttft_ms        p50/p95/p99
  failover_seconds  from t1 until the end of the last unflagged failure that started in the fault
  recovery_seconds  from t2 until every later request is a clean answer from the primary path
  turns_lost        clean chat answers (the chat service answered) whose turn is missing from the
                    chat database's `turns` table after recovery (matched by request id)
  revoked_accepted  answers given to a revoked key more than 1 s after its revocation
  cross_tenant_hits answers whose completion id was first seen by another user

JSON + Markdown + a PNG timeline in --output; a progress bar while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from stack.config import DATABASES, REPLICA_OF, StackConfig
from stack.credentials import Credentials, load_or_create
from stack.report import percentiles
from stack.supervisor import Supervisor

DEGRADED = "x-dualgate-degraded"
ROUTE = "x-dualgate-route"
REVOCATION_GRACE = 1.0  # a revoked key may pass this long (DESIGN §4), never longer
MODEL = "synthetic"


# ---- scenarios ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    stop: tuple[str, ...] = ()  # supervisor programs stopped at t1, started at t2
    pause: tuple[str, ...] = ()  # SIGSTOP at t1, SIGCONT at t2
    slow: str | None = None  # paused most of the time between t1 and t2 (injected latency)
    revoke: bool = False
    restarts_vault: bool = False  # the stack's listener configures the restarted dev-mode vault: wait for it


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
)}


@dataclass(frozen=True)
class Timing:
    duration: float
    t1: float
    t2: float
    rate: float  # requests per second, all workers together
    workers: int

    @classmethod
    def of(cls, short: bool) -> "Timing":
        return cls(6.0, 1.5, 3.5, 16.0, 6) if short else cls(30.0, 8.0, 20.0, 16.0, 8)


# ---- load ---------------------------------------------------------------------------------------

@dataclass
class Sample:
    start: float  # seconds since the drill began
    kind: str
    user: str
    status: int  # 0: no HTTP answer
    outcome: str  # ok | degraded | flagged | failed | refused-revoked | limited
    latency_ms: float
    ttft_ms: float | None = None
    error: str = ""
    route: str = ""
    layer: str = ""
    cache: str = ""
    request_id: str = ""
    completion_id: str = ""
    idempotent: bool = False
    revoked_key: bool = False


@dataclass
class Tenant:
    user_id: str
    keys: list[str]
    key_ids: list[str]
    prompts: list[str]


def _admin(creds: Credentials) -> dict[str, str]:
    return {"authorization": f"Bearer {creds.admin_key}"}


async def _expect(response: httpx.Response, status: int, what: str) -> dict:
    if response.status_code != status:
        raise RuntimeError(f"drill setup could not {what}: {response.status_code} {response.text[:200]}")
    return response.json()


async def make_tenants(http: httpx.AsyncClient, creds: Credentials, users: int = 3,
                       keys_each: int = 2) -> list[Tenant]:
    tenants = []
    run = uuid.uuid4().hex[:6]
    for i in range(users):
        user = await _expect(await http.post("/v1/users", json={"name": f"drill-{run}-{i}"}, headers=_admin(creds)),
                             201, "create a drill user")
        keys, key_ids = [], []
        for k in range(keys_each):
            key = await _expect(await http.post("/v1/keys", json={"name": f"drill-{k}", "user_id": user["id"]},
                                                headers=_admin(creds)), 201, "create a drill key")
            keys.append(key["key"])
            key_ids.append(key["id"])
        # the same prompts for every user: a cache shared between tenants would show as foreign ids
        tenants.append(Tenant(user["id"], keys, key_ids, [f"drill prompt {n}" for n in range(4)]))
    return tenants


class Load:
    def __init__(self, http: httpx.AsyncClient, tenants: list[Tenant], timing: Timing, seed: int = 7) -> None:
        self.http = http
        self.tenants = tenants
        self.timing = timing
        self.samples: list[Sample] = []
        self.random = random.Random(seed)
        self.started = 0.0
        self.victim: str | None = None  # a key used by one worker of its own (revoke-key-under-load)

    def now(self) -> float:
        return time.monotonic() - self.started

    async def one(self, kind: str, tenant: Tenant, key: str, *, revoked_key: bool = False,
                  prompt: str | None = None) -> Sample:
        request_id = f"drill-{uuid.uuid4().hex}"
        headers = {"authorization": f"Bearer {key}", "x-request-id": request_id}
        idempotent = kind in ("models", "me")
        body: dict | None = None
        if kind.startswith("chat"):
            deterministic = "det" in kind
            if prompt is None:
                prompt = self.random.choice(tenant.prompts) if deterministic else f"unique {uuid.uuid4().hex}"
            body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": prompt}],
                    "temperature": 0 if deterministic else 0.7, "stream": "stream" in kind}
            if body["stream"]:
                body["stream_options"] = {"include_usage": True}
            if not deterministic and not body["stream"]:
                headers["idempotency-key"] = uuid.uuid4().hex
                idempotent = True
        sample = Sample(start=self.now(), kind=kind, user=tenant.user_id, status=0, outcome="failed",
                        latency_ms=0.0, request_id=request_id, idempotent=idempotent, revoked_key=revoked_key)
        began = time.perf_counter()
        try:
            if body is None:
                path = "/v1/models" if kind == "models" else "/v1/users/me"
                response = await self.http.get(path, headers=headers)
                self._judge(sample, response, response.content)
            elif body["stream"]:
                async with self.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                    parts = []
                    async for chunk in response.aiter_raw():
                        if sample.ttft_ms is None and b'"content":"' in chunk.replace(b'"content":""', b""):
                            sample.ttft_ms = (time.perf_counter() - began) * 1000
                        parts.append(chunk)
                    self._judge(sample, response, b"".join(parts))
            else:
                response = await self.http.post("/v1/chat/completions", json=body, headers=headers)
                self._judge(sample, response, response.content)
        except httpx.HTTPError as exc:
            sample.error = type(exc).__name__
        sample.latency_ms = (time.perf_counter() - began) * 1000
        return sample

    @staticmethod
    def _judge(sample: Sample, response: httpx.Response, content: bytes) -> None:
        sample.status = response.status_code
        sample.route = response.headers.get(ROUTE, "")
        sample.layer = response.headers.get(DEGRADED, "")
        sample.cache = response.headers.get("x-cache", "")
        status = response.status_code
        if status == 401 and sample.revoked_key:
            sample.outcome = "refused-revoked"
            return
        if status == 429:
            sample.outcome = "limited"
            return
        if 200 <= status < 300:
            if sample.kind.startswith("chat"):
                if b'data: {"error"' in content:
                    sample.outcome, sample.error = "failed", "error event"
                    return
                if "stream" in sample.kind and not content.rstrip().endswith(b"[DONE]"):
                    sample.outcome, sample.error = "failed", "cut stream"
                    return
                marker = content.find(b'"id":"chatcmpl-')
                if marker >= 0:
                    sample.completion_id = content[marker + 6:content.find(b'"', marker + 6)].decode()
            sample.outcome = "degraded" if sample.layer else "ok"
        elif sample.layer:
            sample.outcome = "flagged"
        else:
            sample.outcome = "failed"
            sample.error = f"status {status}"

    async def run(self, on_tick: Callable[[float], None] = lambda _: None) -> None:
        timing = self.timing
        self.started = time.monotonic()
        # a shuffled deck, dealt in turn: every 20 requests hold the mix exactly
        mix = ["chat-stream-det"] * 6 + ["chat-stream"] * 4 + ["chat-det"] * 3 + ["chat"] * 3 + ["models"] * 2 + \
            ["me"] * 2
        deck: list[str] = []

        def deal() -> str:
            if not deck:
                deck.extend(self.random.sample(mix, len(mix)))
            return deck.pop()

        interval = timing.workers / timing.rate
        keys = [(t, k) for t in self.tenants for k in t.keys if k != self.victim]

        async def worker(index: int) -> None:
            next_at = self.started + index * interval / timing.workers
            while time.monotonic() - self.started < timing.duration:
                tenant, key = keys[self.random.randrange(len(keys))]
                self.samples.append(await self.one(deal(), tenant, key))
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        async def victim_worker() -> None:
            tenant = next(t for t in self.tenants if self.victim in t.keys)
            while time.monotonic() - self.started < timing.duration:
                self.samples.append(await self.one("models", tenant, self.victim, revoked_key=True))
                await asyncio.sleep(0.05)

        async def ticker() -> None:
            while (elapsed := self.now()) < timing.duration:
                on_tick(elapsed)
                await asyncio.sleep(0.25)
            on_tick(timing.duration)

        tasks = [worker(i) for i in range(timing.workers)] + [ticker()]
        if self.victim:
            tasks.append(victim_worker())
        await asyncio.gather(*tasks)


# ---- faults ---------------------------------------------------------------------------------------

class Faults:
    """Injects and removes a scenario's fault through the stack's supervisor."""

    def __init__(self, stack, scenario: Scenario, creds: Credentials, admin: httpx.AsyncClient) -> None:
        self.stack = stack
        self.scenario = scenario
        self.creds = creds
        self.admin = admin
        self._slow_task: asyncio.Task | None = None
        self.revoked_at: float | None = None  # monotonic

    def _call(self, method: str, *args: str) -> None:
        # one XML-RPC connection per call: the proxy is not safe to share between threads
        getattr(Supervisor(self.stack.config), method)(*args)

    async def _each(self, method: str, names: tuple[str, ...], *args: str) -> None:
        await asyncio.gather(*(asyncio.to_thread(self._call, method, name, *args) for name in names))

    async def inject(self, load: Load) -> None:
        s = self.scenario
        await self._each("stop", s.stop)
        await self._each("signal", s.pause, "STOP")
        if s.slow:
            self._slow_task = asyncio.create_task(self._slow(s.slow))
        if s.revoke and load.victim:
            tenant = next(t for t in load.tenants if load.victim in t.keys)
            key_id = tenant.key_ids[tenant.keys.index(load.victim)]
            response = await self.admin.delete(f"/v1/keys/{key_id}", headers=_admin(self.creds))
            if response.status_code != 200:
                raise RuntimeError(f"could not revoke the drill key: {response.status_code} {response.text[:200]}")
            self.revoked_at = time.monotonic()

    async def _slow(self, name: str) -> None:
        try:
            while True:
                await self._each("signal", (name,), "STOP")
                await asyncio.sleep(0.4)
                await self._each("signal", (name,), "CONT")
                await asyncio.sleep(0.1)
        finally:
            await self._each("signal", (name,), "CONT")

    async def remove(self) -> None:
        s = self.scenario
        if self._slow_task is not None:
            self._slow_task.cancel()
            await asyncio.gather(self._slow_task, return_exceptions=True)
        await self._each("signal", s.pause, "CONT")
        await self._each("start", s.stop)
        if s.restarts_vault:
            await asyncio.to_thread(self.stack.wait_vault_configured, 60.0)

    def restore_sync(self) -> None:
        """Whatever happened, leave every component running and ready."""
        sup = Supervisor(self.stack.config)
        for name in self.scenario.pause + ((self.scenario.slow,) if self.scenario.slow else ()):
            try:
                sup.signal(name, "CONT")
            except Exception:  # not paused, or already gone: starting it below covers it
                pass
        for name in self.scenario.stop:
            sup.start(name)
        if self.scenario.restarts_vault:
            # the restarted dev-mode Vault forgot every lease: database-backed services start again
            # and take fresh dynamic credentials (not measured: the load has ended)
            self.stack.wait_vault_configured(60.0)
            for name in DATABASES:
                sup.stop(name)
                sup.start(name)
        self.stack.wait_ready(tuple(self.stack.config.components), 120.0)
        self.settle()

    def settle(self, timeout: float = 30.0) -> None:
        """Until both domains answer cleanly on their primary path three times running (breakers
        closed, pools healthy), so one drill's aftermath never counts against the next."""
        headers = {"authorization": f"Bearer {self.creds.demo_key}"}
        deadline = time.monotonic() + timeout
        clean = 0
        with httpx.Client(base_url=self.stack.config.base_url, timeout=10) as http:
            while clean < 3 and time.monotonic() < deadline:
                try:
                    answers = [
                        http.post("/v1/chat/completions", headers=headers, json={
                            "model": MODEL, "max_tokens": 2, "temperature": 0.7,
                            "messages": [{"role": "user", "content": f"settle {uuid.uuid4().hex}"}]}),
                        http.get("/v1/users/me", headers=headers),
                    ]
                    ok = all(a.status_code == 200 and DEGRADED not in a.headers
                             and a.headers.get(ROUTE) in ("ai", "identity") for a in answers)
                except httpx.HTTPError:
                    ok = False
                clean = clean + 1 if ok else 0
                if not ok:
                    time.sleep(0.2)


def admin_dsn(stack, database: str) -> str:
    """The stack's own superuser URL for `database` (with its password where the stack has one)."""
    dsn = getattr(stack, "admin_dsn", None)
    return dsn(database) if dsn is not None else stack.config.database_url(database)


# ---- report ---------------------------------------------------------------------------------------

def summarize(samples: list[Sample], scenario: Scenario, timing: Timing, revoked_at: float | None,
              turns_lost: int | None, turns_checked: int) -> dict:
    considered = [s for s in samples if s.outcome not in ("refused-revoked",)]
    total = len(considered) or 1
    by = Counter(s.outcome for s in considered)
    errors = Counter(str(s.status) if s.status else s.error for s in considered if s.outcome in ("failed", "flagged",
                                                                                                    "limited"))
    failed_in_fault = [s for s in considered if s.outcome == "failed" and timing.t1 <= s.start < timing.t2 + 1.0]
    failover = max((s.start + s.latency_ms / 1000 - timing.t1 for s in failed_in_fault), default=0.0)
    # recovery: the earliest moment after t2 from which every request is a clean primary answer
    after = sorted((s for s in considered if s.start >= timing.t2), key=lambda s: s.start)
    recovery: float | None = 0.0
    for s in reversed(after):
        if s.outcome != "ok" or s.route == "fallback":
            recovery = s.start + s.latency_ms / 1000 - timing.t2
            break
    if after and (after[-1].outcome != "ok" or after[-1].route == "fallback"):
        recovery = None  # not recovered before the drill ended
    first_user: dict[str, str] = {}
    cross = 0
    for s in sorted(samples, key=lambda s: s.start):
        if s.completion_id:
            owner = first_user.setdefault(s.completion_id, s.user)
            cross += owner != s.user
    revoked_accepted = 0
    if revoked_at is not None:
        revoked_accepted = sum(1 for s in samples if s.revoked_key and s.outcome in ("ok", "degraded")
                               and s.start > revoked_at + REVOCATION_GRACE)
    streams = [s.ttft_ms for s in considered if s.ttft_ms is not None and s.outcome in ("ok", "degraded")]
    answered = [s.latency_ms for s in considered if s.outcome in ("ok", "degraded")]
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "requests": len(considered),
        "availability": round((by["ok"] + by["degraded"]) / total, 4),
        "degraded_share": round(by["degraded"] / total, 4),
        "flagged_share": round(by["flagged"] / total, 4),
        "served_or_flagged": round((by["ok"] + by["degraded"] + by["flagged"]) / total, 4),
        "unflagged_failure_share": round(by["failed"] / total, 4),
        "limited": by["limited"],
        "outcomes": dict(by),
        "errors": dict(errors),
        "idempotent_failed": sum(1 for s in considered if s.idempotent and s.outcome == "failed"),
        "latency_ms": percentiles(answered),
        "ttft_ms": percentiles(streams),
        "failover_seconds": round(failover, 3),
        "recovery_seconds": round(recovery, 3) if recovery is not None else None,
        "turns_lost": turns_lost,
        "turns_checked": turns_checked,
        "revoked_accepted": revoked_accepted,
        "cross_tenant_hits": cross,
        "degraded_layers": dict(Counter(s.layer for s in considered if s.layer)),
        "routes": dict(Counter(s.route or "-" for s in considered)),
        "timing": asdict(timing),
    }


async def count_lost_turns(stack, samples: list[Sample], wait: float) -> tuple[int, int]:
    """Clean chat answers the chat service gave (not a cache hit, not a fallback layer) whose turn
    is not in the chat database after up to `wait` seconds."""
    import asyncpg

    wanted = {s.request_id for s in samples if s.kind.startswith("chat") and s.outcome == "ok"
              and s.cache != "hit" and not s.layer}
    if not wanted:
        return 0, 0
    deadline = time.monotonic() + wait
    missing = set(wanted)
    while True:
        try:
            conn = await asyncpg.connect(admin_dsn(stack, "chat"), timeout=5)
            try:
                rows = await conn.fetch("SELECT request_id FROM turns WHERE request_id = ANY($1::text[])",
                                        list(missing))
            finally:
                await conn.close()
            missing -= {r["request_id"] for r in rows}
        except (OSError, asyncpg.PostgresError):
            pass
        if not missing or time.monotonic() > deadline:
            return len(missing), len(wanted)
        await asyncio.sleep(0.5)


def markdown(report: dict) -> str:
    lines = [f"# Drill: {report['scenario']}", "", report["description"], "",
             "| measure | value |", "|---|---|"]
    for key in ("requests", "availability", "degraded_share", "flagged_share", "served_or_flagged",
                "unflagged_failure_share", "idempotent_failed", "failover_seconds", "recovery_seconds",
                "turns_lost", "turns_checked", "revoked_accepted", "cross_tenant_hits"):
        lines.append(f"| {key} | {report[key]} |")
    for key in ("latency_ms", "ttft_ms"):
        values = report[key]
        lines.append(f"| {key} p50/p95/p99 | {values['p50']} / {values['p95']} / {values['p99']} |")
    lines += ["", f"errors: {report['errors'] or 'none'}", f"degraded layers: {report['degraded_layers'] or 'none'}",
              f"routes: {report['routes']}", ""]
    return "\n".join(lines)


def timeline(samples: list[Sample], timing: Timing, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ok": "tab:green", "degraded": "tab:orange", "flagged": "tab:purple", "failed": "tab:red",
               "limited": "tab:gray", "refused-revoked": "tab:blue"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[3, 1])
    for outcome, colour in colours.items():
        points = [s for s in samples if s.outcome == outcome]
        if points:
            top.scatter([s.start for s in points], [max(s.latency_ms, 0.1) for s in points], s=8, c=colour,
                        label=f"{outcome} ({len(points)})")
    top.set_yscale("log")
    top.set_ylabel("latency (ms)")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(title)
    bins = [i * 0.5 for i in range(int(timing.duration / 0.5) + 2)]
    for outcome in ("ok", "degraded", "flagged", "failed"):
        starts = [s.start for s in samples if s.outcome == outcome]
        if starts:
            bottom.hist(starts, bins=bins, histtype="step", color=colours[outcome], label=outcome)
    bottom.set_ylabel("requests / 0.5 s")
    bottom.set_xlabel("seconds since start")
    for axis in (top, bottom):
        axis.axvspan(timing.t1, timing.t2, color="tab:red", alpha=0.08)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- running ----------------------------------------------------------------------------------------

async def run_drill(stack, scenario: Scenario, *, short: bool, on_tick: Callable[[float], None] = lambda _: None,
                    turns_wait: float | None = None, tenants: list[Tenant] | None = None) -> tuple[dict, list[Sample]]:
    config = stack.config
    creds = load_or_create(config)
    timing = Timing.of(short)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    timeout = httpx.Timeout(60.0, connect=5.0)
    async with httpx.AsyncClient(base_url=config.base_url, timeout=timeout, limits=limits) as http:
        tenants = [Tenant(t.user_id, list(t.keys), list(t.key_ids), list(t.prompts)) for t in tenants] \
            if tenants else await make_tenants(http, creds)
        load = Load(http, tenants, timing)
        if scenario.revoke:
            victim = await _expect(await http.post("/v1/keys", json={"name": "drill-victim",
                                                                      "user_id": tenants[0].user_id},
                                                    headers=_admin(creds)), 201, "create the victim key")
            tenants[0].keys.append(victim["key"])
            tenants[0].key_ids.append(victim["id"])
            load.victim = victim["key"]
        # warm-up, not measured: every tenant's repeated prompts and reads once, and every key presented
        # once, as steady traffic would have. (A key first presented while the auth service is down cannot
        # be verified anywhere: it gets a flagged, retryable 503 by design, never a guess.)
        for tenant in tenants:
            for prompt in tenant.prompts:
                await load.one("chat-stream-det", tenant, tenant.keys[0], prompt=prompt)
                await load.one("chat-det", tenant, tenant.keys[0], prompt=prompt)
            await load.one("models", tenant, tenant.keys[0])
            for key in tenant.keys:
                await load.one("me", tenant, key)
        faults = Faults(stack, scenario, creds, http)
        try:
            async def schedule() -> None:
                await asyncio.sleep(max(0.0, timing.t1 - load.now()))
                await faults.inject(load)
                await asyncio.sleep(max(0.0, timing.t2 - load.now()))
                await faults.remove()

            await asyncio.gather(load.run(on_tick), schedule())
        finally:
            await asyncio.to_thread(faults.restore_sync)
        revoked_at = faults.revoked_at - load.started if faults.revoked_at is not None else None
        wait = turns_wait if turns_wait is not None else (20.0 if short else 60.0)
        lost, checked = await count_lost_turns(stack, load.samples, wait)
    return summarize(load.samples, scenario, timing, revoked_at, lost, checked), load.samples


def write_reports(report: dict, samples: list[Sample], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / report["scenario"]
    paths = {"json": f"{stem}.json", "markdown": f"{stem}.md", "png": f"{stem}.png"}
    Path(paths["json"]).write_text(json.dumps(report, indent=2))
    Path(paths["markdown"]).write_text(markdown(report))
    timeline(samples, Timing(**report["timing"]), f"drill {report['scenario']}", Path(paths["png"]))
    return paths


def register(sub: argparse._SubParsersAction) -> None:
    drill = sub.add_parser("drill", help="inject a failure under steady load and report what users saw")
    drill.add_argument("scenario", nargs="?", help=f"one of: {', '.join(SCENARIOS)}, or all")
    drill.add_argument("--list", action="store_true", help="list the scenarios")
    drill.add_argument("--short", action="store_true", help="a run of a few seconds")
    drill.add_argument("--json", action="store_true", help="print the report as one JSON object")
    drill.add_argument("--output", default="drill-results", help="folder for the JSON, Markdown and PNG reports")
    drill.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from stack.local import LocalStack

    console = Console(stderr=True)
    if args.list or not args.scenario:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:24} {scenario.description}")
        print(f"{'all':24} every scenario in turn")
        return 0
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        console.print(f"[red]unknown scenario {unknown[0]!r}[/red]; `dualgate drill --list` shows them")
        return 2
    stack = LocalStack(StackConfig())
    if not stack.supervisor.is_running():
        console.print("[red]the stack is not running[/red]; start it with `dualgate up`")
        return 1
    reports = []
    for name in names:
        scenario = SCENARIOS[name]
        timing = Timing.of(args.short)
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            task = progress.add_task(f"drill {name}", total=timing.duration)
            report, samples = asyncio.run(run_drill(
                stack, scenario, short=args.short, on_tick=lambda t: progress.update(task, completed=t)))
        report["files"] = write_reports(report, samples, Path(args.output))
        Path(args.output, f"{name}.samples.json").write_text(json.dumps([asdict(s) for s in samples]))
        reports.append(report)
        if not args.json:
            console.print(markdown(report), markup=False)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else {"scenarios": reports}))
    return 0
