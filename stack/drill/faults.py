"""Injects and removes a drill's fault through the stack's supervisor: stop/start, SIGSTOP/SIGCONT,
injected latency, a revoked key, or the chaos scenario's schedule of kills, pauses and restarts."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from stack.config import DATABASES
from stack.credentials import Credentials
from stack.drill.load import Load, admin_headers
from stack.drill.scenarios import DEGRADED, MODEL, PAUSABLE, ROUTE, ChaosStep, Scenario
from stack.supervisor import Supervisor


class Faults:
    def __init__(self, stack, scenario: Scenario, creds: Credentials, admin: httpx.AsyncClient,
                 schedule: list[ChaosStep] | None = None) -> None:
        self.stack = stack
        self.scenario = scenario
        self.creds = creds
        self.admin = admin
        self.schedule = schedule or []
        self._background: asyncio.Task | None = None  # injected latency, or the chaos schedule
        self.revoked_at: float | None = None  # monotonic
        self.done: list[tuple[float, ChaosStep]] = []  # chaos steps as they began (seconds since the drill began)

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
            self._background = asyncio.create_task(self._slow(s.slow))
        if s.chaos:
            self._background = asyncio.create_task(self._chaos(load))
        if s.revoke and load.victim:
            tenant = next(t for t in load.tenants if load.victim in t.keys)
            key_id = tenant.key_ids[tenant.keys.index(load.victim)]
            response = await self.admin.delete(f"/v1/keys/{key_id}", headers=admin_headers(self.creds))
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

    async def _chaos(self, load: Load) -> None:
        for step in self.schedule:
            await asyncio.sleep(max(0.0, step.at - load.now()))
            self.done.append((load.now(), step))
            if step.action == "kill":  # supervisord starts a killed program again at once (autorestart)
                await self._each("signal", step.targets, "KILL")
            elif step.action == "pause":
                await self._each("signal", step.targets, "STOP")
                try:
                    await asyncio.sleep(step.hold)
                finally:
                    await self._each("signal", step.targets, "CONT")
            else:
                await self._each("stop", step.targets)
                await self._each("start", step.targets)

    async def remove(self) -> None:
        s = self.scenario
        if self._background is not None:
            if s.chaos:  # the schedule ends by itself before t2
                await asyncio.gather(self._background, return_exceptions=True)
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
        await self._each("signal", s.pause, "CONT")
        await self._each("start", s.stop)
        if s.restarts_vault:
            await asyncio.to_thread(self.stack.wait_vault_configured, 60.0)

    def restore_sync(self) -> None:
        """Whatever happened, leave every component running and ready."""
        sup = Supervisor(self.stack.config)
        paused = self.scenario.pause + ((self.scenario.slow,) if self.scenario.slow else ())
        if self.scenario.chaos:
            paused += PAUSABLE
        for name in paused:
            try:
                sup.signal(name, "CONT")
            except Exception:  # not paused, or already gone: starting it below covers it
                pass
        for name in self.scenario.stop + tuple(t for _, step in self.done for t in step.targets):
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
