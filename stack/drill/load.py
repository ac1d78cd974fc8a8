"""A drill's steady load: tenants with keys and a conversation each, paced workers, and how each answer
is judged (ok, degraded, flagged, failed, limited). Under chaos, keyed requests are retried with their
Idempotency-Key as a client would, and some are sent again after an answer to see it replayed."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from stack.credentials import Credentials
from stack.drill.scenarios import DEGRADED, MODEL, ROUTE, Timing

RETRIES = 4  # a client's retries of one Idempotency-Key
RESEND_SHARE = 0.25  # keyed requests sent once more after their answer: the replay must be the same answer


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
    idempotency_key: str = ""
    prompt: str = ""
    json_error: bool = False  # a failure told as an OpenAI-style JSON error (a body, or a stream's error event)
    retry: bool = False


@dataclass
class Tenant:
    user_id: str
    keys: list[str]
    key_ids: list[str]
    prompts: list[str]
    conversation: str = ""


def admin_headers(creds: Credentials) -> dict[str, str]:
    return {"authorization": f"Bearer {creds.admin_key}"}


async def expect(response: httpx.Response, status: int, what: str) -> dict:
    if response.status_code != status:
        raise RuntimeError(f"drill setup could not {what}: {response.status_code} {response.text[:200]}")
    return response.json()


async def make_tenants(http: httpx.AsyncClient, creds: Credentials, users: int = 3,
                       keys_each: int = 2) -> list[Tenant]:
    tenants = []
    run = uuid.uuid4().hex[:6]
    for i in range(users):
        # drills measure faults, not quotas: a conversation's context grows every turn, and a long drill's
        # conversation load would spend a default plan's daily tokens within minutes
        user = await expect(await http.post("/v1/users", json={"name": f"drill-{run}-{i}", "plan": "unlimited"},
                                            headers=admin_headers(creds)), 201, "create a drill user")
        keys, key_ids = [], []
        for k in range(keys_each):
            key = await expect(await http.post("/v1/keys", json={"name": f"drill-{k}", "user_id": user["id"]},
                                               headers=admin_headers(creds)), 201, "create a drill key")
            keys.append(key["key"])
            key_ids.append(key["id"])
        conversation = await expect(await http.post("/v1/conversations", json={"title": "drill"},
                                                    headers={"authorization": f"Bearer {keys[0]}"}),
                                    201, "create a drill conversation")
        # the same prompts for every user: a cache shared between tenants would show as foreign ids
        tenants.append(Tenant(user["id"], keys, key_ids, [f"drill prompt {n}" for n in range(4)],
                              conversation["id"]))
    return tenants


def _is_json_error(content: bytes) -> bool:
    try:
        import json

        return isinstance(json.loads(content).get("error"), dict)
    except (ValueError, AttributeError):
        return False


class Load:
    def __init__(self, http: httpx.AsyncClient, tenants: list[Tenant], timing: Timing, seed: int = 7,
                 *, chaos: bool = False) -> None:
        self.http = http
        self.tenants = tenants
        self.timing = timing
        self.chaos = chaos
        self.samples: list[Sample] = []
        self.random = random.Random(seed)
        self.started = 0.0
        self.victim: str | None = None  # a key used by one worker of its own (revoke-key-under-load)

    def now(self) -> float:
        return time.monotonic() - self.started

    def _body(self, kind: str, tenant: Tenant, prompt: str | None) -> dict:
        deterministic = "det" in kind
        if prompt is None:
            prompt = self.random.choice(tenant.prompts) if deterministic else f"unique {uuid.uuid4().hex}"
        body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0 if deterministic else 0.7, "stream": "stream" in kind}
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        if "conv" in kind:
            body["conversation_id"] = tenant.conversation
        return body

    async def one(self, kind: str, tenant: Tenant, key: str, *, revoked_key: bool = False,
                  prompt: str | None = None, idempotency_key: str | None = None) -> Sample:
        request_id = f"drill-{uuid.uuid4().hex}"
        headers = {"authorization": f"Bearer {key}", "x-request-id": request_id}
        body = self._body(kind, tenant, prompt) if kind.startswith("chat") else None
        if body is not None and not body["stream"] and body["temperature"]:
            headers["idempotency-key"] = idempotency_key or uuid.uuid4().hex
        sample = Sample(start=self.now(), kind=kind, user=tenant.user_id, status=0, outcome="failed",
                        latency_ms=0.0, request_id=request_id, revoked_key=revoked_key,
                        idempotent=kind in ("models", "me") or "idempotency-key" in headers,
                        idempotency_key=headers.get("idempotency-key", ""),
                        prompt=body["messages"][0]["content"] if body else "", retry=idempotency_key is not None)
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
        if status == 429 or (status == 409 and sample.idempotency_key):  # retryable by design
            sample.outcome = "limited"
            return
        if 200 <= status < 300:
            if sample.kind.startswith("chat"):
                if b'data: {"error"' in content:
                    sample.outcome, sample.error, sample.json_error = "failed", "error event", True
                    return
                if "stream" in sample.kind and not content.rstrip().endswith(b"[DONE]"):
                    sample.outcome, sample.error = "failed", "cut stream"
                    return
                marker = content.find(b'"id":"chatcmpl-')
                if marker >= 0:
                    sample.completion_id = content[marker + 6:content.find(b'"', marker + 6)].decode()
            sample.outcome = "degraded" if sample.layer else "ok"
            return
        sample.json_error = _is_json_error(content)
        if sample.layer:
            sample.outcome = "flagged"
        else:
            sample.outcome = "failed"
            sample.error = f"status {status}"

    async def _keyed(self, kind: str, tenant: Tenant, key: str) -> None:
        """A request and, as a careful client does, its retries under the same Idempotency-Key."""
        sample = await self.one(kind, tenant, key)
        self.samples.append(sample)
        for attempt in range(RETRIES):
            answered = sample.outcome in ("ok", "degraded")
            if not sample.idempotency_key or (answered and (attempt or self.random.random() >= RESEND_SHARE)):
                return
            await asyncio.sleep(0.25 * (attempt + 1))  # the client's backoff before it asks again
            sample = await self.one(kind, tenant, key, prompt=sample.prompt, idempotency_key=sample.idempotency_key)
            self.samples.append(sample)

    def _mix(self) -> list[str]:
        if self.chaos:
            return ["chat-conv"] * 4 + ["chat-conv-stream"] * 3 + ["chat-stream-det"] * 3 + ["chat-stream"] * 2 + \
                ["chat"] * 4 + ["chat-det"] * 1 + ["models"] * 2 + ["me"] * 1
        return ["chat-stream-det"] * 6 + ["chat-stream"] * 4 + ["chat-det"] * 3 + ["chat"] * 3 + ["models"] * 2 + \
            ["me"] * 2

    async def run(self, on_tick: Callable[[float], None] = lambda _: None) -> None:
        timing = self.timing
        self.started = time.monotonic()
        mix = self._mix()
        deck: list[str] = []  # a shuffled deck, dealt in turn: every len(mix) requests hold the mix exactly

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
                await self._keyed(deal(), tenant, key)
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
