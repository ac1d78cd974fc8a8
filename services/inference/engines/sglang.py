"""SGLang runtime workers behind one engine, over their OpenAI-compatible HTTP API.

Routing: a request goes to the worker that rendezvous-hashing ranks first for its affinity key (the
conversation id, else a hash of the prompt prefix), so every turn of a conversation meets the same
radix cache. When that worker is busy beyond a bound (absolute, or well above the mean load), the
least-outstanding worker takes the request instead. A worker leaves the rotation when its health
checks (`/health_generate`) fail or its circuit breaker opens, and comes back when they pass again;
rendezvous hashing moves only the conversations of the worker that left.

A failure before the first token (connect error, 5xx, 429, a stream cut before any text) is retried on
the next worker; after the first token nothing is retried and the stream ends with an error.

The `sglang` package itself is never imported: workers are separate processes (`sglang_launcher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import msgspec

from common.breaker import AsyncBreaker, BreakerOpen
from common.engines.base import EngineRejected, EngineUnavailable, Finished, GenerationRequest, TokenDelta
from common.http import finish
from common.metrics import ENGINE_WORKER_OUTSTANDING, ENGINE_WORKER_REQUESTS, ENGINE_WORKER_UP

log = logging.getLogger(__name__)

ENGINE = "sglang"
ROUTE_KEY_HEADER = "x-dualgate-route-key"  # lets a worker's logs group a conversation's requests
MAX_ERROR_BODY = 4096


# ---- routing ---------------------------------------------------------------------------------

def route_key(request: GenerationRequest) -> str:
    """The affinity key: the conversation id, else the prompt up to its first user message (which
    every later turn of the same conversation repeats)."""
    if request.affinity_key:
        basis = b"conversation:" + request.affinity_key.encode()
    else:
        prefix: list[dict] = []
        for message in request.messages:
            prefix.append(message)
            if message.get("role") == "user":
                break
        basis = b"prefix:" + msgspec.json.encode(prefix)
    return hashlib.blake2b(basis, digest_size=8).hexdigest()


def _rank(key: str, url: str) -> int:
    """Rendezvous (highest-random-weight) score of a worker for a key."""
    return int.from_bytes(hashlib.blake2b(f"{key}|{url}".encode(), digest_size=8).digest(), "big")


# ---- the wire format -----------------------------------------------------------------------------

class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict | None = None
    object: str = ""
    message: str = ""


_chunk = msgspec.json.Decoder(_Chunk)
_encoder = msgspec.json.Encoder()


class _SglangRequest(msgspec.Struct, omit_defaults=True):
    model: str
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool  # no defaults here: omit_defaults would drop them from the wire
    stream_options: dict
    stop: list[str] | None = None
    seed: int | None = None


class _Retryable(Exception):
    """The worker failed before the first token: another worker may answer."""


class _BreakerOpen(_Retryable):
    """The worker's circuit is open: it was not called."""


class WorkerStreamError(RuntimeError):
    """The worker failed after the first token: the answer is cut and ends with an error."""


# ---- workers -----------------------------------------------------------------------------------

@dataclass
class WorkerOptions:
    health_interval: float = 1.0
    health_timeout: float = 5.0
    fall: int = 2  # failed health checks before a worker leaves (a refused connection: at once)
    rise: int = 2  # passed health checks before it comes back
    fail_max: int = 3  # request failures in a row that open its breaker
    reset_timeout: float = 5.0  # open breaker: seconds before one trial request
    max_workers: int = 256  # workers known at once; the least recently used beyond this are dropped
    max_outstanding: int = 64  # a worker this busy loses its affinity traffic (deployment param overrides)
    load_factor: float = 2.0  # ...as does one this far above the mean load (0: never)...
    load_slack: int = 16  # ...plus this many: small bursts never break affinity


@dataclass(eq=False)
class Worker:
    url: str
    breaker: AsyncBreaker
    healthy: bool = True  # optimistic until the first check: a dead one fails fast and is retried elsewhere
    outstanding: int = 0
    passes: int = 0
    failures: int = 0
    served_model: str = ""
    max_model_len: int | None = None
    model_info: dict = field(default_factory=dict)
    last_check: float = 0.0
    last_error: str = ""
    watcher: asyncio.Task | None = None
    check_now: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def in_rotation(self) -> bool:
        # an open breaker is asked on each attempt (it answers at once): after its reset timeout it
        # lets one trial through, which is how a recovered worker gets its traffic back
        return self.healthy

    def status(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "breaker": self.breaker.state,
                "in_rotation": self.in_rotation, "outstanding": self.outstanding,
                "served_model": self.served_model, "max_model_len": self.max_model_len,
                "last_error": self.last_error}


class WorkerPool:
    """Every SGLang worker this process knows, each health-checked once however many deployments use it."""

    def __init__(self, client: httpx.AsyncClient, options: WorkerOptions | None = None) -> None:
        self.client = client
        self.options = options or WorkerOptions()
        self._workers: OrderedDict[str, Worker] = OrderedDict()
        self._engines: OrderedDict[tuple, SglangEngine] = OrderedDict()
        self._closing = False

    def workers(self, urls: list[str]) -> list[Worker]:
        found = []
        for url in urls:
            url = url.rstrip("/")
            worker = self._workers.get(url)
            if worker is None:
                worker = self._add(url)
            self._workers.move_to_end(url)
            found.append(worker)
        return found

    def engine(self, urls: list[str], served_model: str = "", params: dict[str, float] | None = None) -> "SglangEngine":
        """The engine for one deployment (cached: a deployment's routing state outlives its requests)."""
        params = params or {}
        key = (tuple(urls), served_model, tuple(sorted(params.items())))
        engine = self._engines.get(key)
        if engine is None:
            engine = SglangEngine(self, urls, served_model=served_model,
                                  max_outstanding=int(params.get("max_outstanding", self.options.max_outstanding)),
                                  load_factor=float(params.get("load_factor", self.options.load_factor)),
                                  load_slack=int(params.get("load_slack", self.options.load_slack)),
                                  attempts=int(params.get("attempts", 3)))
            self._engines[key] = engine
            while len(self._engines) > 64:
                self._engines.popitem(last=False)
        self._engines.move_to_end(key)
        return engine

    def _add(self, url: str) -> Worker:
        options = self.options
        worker = Worker(url=url, breaker=AsyncBreaker(f"sglang:{url}", None, fail_max=options.fail_max,
                                                      reset_timeout=options.reset_timeout))
        self._workers[url] = worker
        ENGINE_WORKER_UP.labels(ENGINE, url).set(1)
        ENGINE_WORKER_OUTSTANDING.labels(ENGINE, url).set_function(lambda: worker.outstanding)
        worker.watcher = asyncio.create_task(self._watch(worker), name=f"sglang-health-{url}")
        while len(self._workers) > options.max_workers:
            _, old = self._workers.popitem(last=False)
            self._forget(old)
        return worker

    def _forget(self, worker: Worker) -> None:
        if worker.watcher:
            worker.watcher.cancel()
        with contextlib.suppress(KeyError):
            ENGINE_WORKER_UP.remove(ENGINE, worker.url)
            ENGINE_WORKER_OUTSTANDING.remove(ENGINE, worker.url)

    async def close(self) -> None:
        # a flag as well as cancel(): on 3.11 a cancel landing as wait_for times out can be swallowed
        self._closing = True
        tasks = [w.watcher for w in self._workers.values() if w.watcher]
        for worker in list(self._workers.values()):
            worker.check_now.set()
            self._forget(worker)
        self._workers.clear()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    def status(self) -> list[dict]:
        return [w.status() for w in self._workers.values()]

    # ---- health --------------------------------------------------------------------------------

    async def _watch(self, worker: Worker) -> None:
        await self._describe(worker)
        while not self._closing:
            await self._check(worker)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.check_now.wait(), self.options.health_interval)
            worker.check_now.clear()

    async def _describe(self, worker: Worker) -> None:
        """What the worker serves (`/get_model_info`, `/v1/models`); best effort, retried by later checks."""
        timeout = self.options.health_timeout
        try:
            info = await self.client.get(f"{worker.url}/get_model_info", timeout=timeout)
            if info.status_code == 200:
                worker.model_info = info.json()
            models = await self.client.get(f"{worker.url}/v1/models", timeout=timeout)
            if models.status_code == 200 and (data := models.json().get("data")):
                worker.served_model = str(data[0].get("id") or "")
                worker.max_model_len = data[0].get("max_model_len")
        except (httpx.HTTPError, ValueError) as exc:
            worker.last_error = f"describe: {type(exc).__name__}"

    async def _check(self, worker: Worker) -> None:
        options = self.options
        refused = False
        try:
            resp = await self.client.get(f"{worker.url}/health_generate", timeout=options.health_timeout)
            ok = resp.status_code == 200
            why = "" if ok else f"health_generate {resp.status_code}"
        except httpx.ConnectError as exc:
            ok, refused, why = False, True, f"{type(exc).__name__}"
        except httpx.HTTPError as exc:
            ok, why = False, f"{type(exc).__name__}"
        worker.last_check = time.time()
        if ok:
            worker.passes, worker.failures = worker.passes + 1, 0
            if not worker.healthy and worker.passes >= options.rise:
                worker.healthy = True
                ENGINE_WORKER_UP.labels(ENGINE, worker.url).set(1)
                log.warning("sglang worker back in rotation", extra={"worker": worker.url})
                if not worker.served_model:
                    await self._describe(worker)
        else:
            worker.passes, worker.failures = 0, worker.failures + 1
            worker.last_error = why
            if worker.healthy and (refused or worker.failures >= options.fall):
                worker.healthy = False
                ENGINE_WORKER_UP.labels(ENGINE, worker.url).set(0)
                log.warning("sglang worker taken out of rotation", extra={"worker": worker.url, "why": why})


# ---- one deployment ------------------------------------------------------------------------------

class SglangEngine:
    def __init__(self, pool: WorkerPool, urls: list[str], *, served_model: str = "", max_outstanding: int = 64,
                 load_factor: float = 2.0, load_slack: int = 16, attempts: int = 3) -> None:
        self.pool = pool
        self.urls = [u.rstrip("/") for u in urls]
        self.served_model = served_model
        self.max_outstanding = max_outstanding
        self.load_factor = load_factor
        self.load_slack = load_slack
        self.attempts = max(1, attempts)

    @property
    def workers(self) -> list[Worker]:
        return self.pool.workers(self.urls)

    def choose(self, key: str, exclude: frozenset[str] | set[str] = frozenset()) -> Worker:
        live = [w for w in self.workers if w.url not in exclude and w.in_rotation]
        if not live:
            raise EngineUnavailable("No SGLang worker of this deployment is available.")
        preferred = max(live, key=lambda w: _rank(key, w.url))
        if not self._busy(preferred, live):
            return preferred
        return min(live, key=lambda w: (w.outstanding, -_rank(key, w.url)))

    def _busy(self, worker: Worker, live: list[Worker]) -> bool:
        if worker.outstanding >= self.max_outstanding:
            return True
        if self.load_factor <= 0 or len(live) < 2:
            return False
        mean = sum(w.outstanding for w in live) / len(live)
        return worker.outstanding >= self.load_factor * mean + self.load_slack

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | Finished]:
        key = route_key(request)
        tried: set[str] = set()
        attempts = 0
        last_error = "no attempt"
        while attempts < self.attempts:
            try:
                worker = self.choose(key, tried)
            except EngineUnavailable:
                if tried:  # some were tried and failed; the rest are out of rotation
                    break
                raise
            tried.add(worker.url)
            worker.outstanding += 1
            released = False

            async def release(outcome: str, response: httpx.Response | None = None,
                              rest: AsyncIterator[str] | None = None) -> None:
                # settled before the last event is handed out: a consumer that stops reading at
                # Finished (and never closes the generator) must not leave the worker looking busy
                nonlocal released
                if not released:
                    released = True
                    worker.outstanding -= 1
                    ENGINE_WORKER_REQUESTS.labels(ENGINE, worker.url, outcome).inc()
                    if response is not None:
                        await finish(response, rest)  # `rest`: read to its end, the connection is kept

            try:
                response, reader, first = await self._open(worker, request, key)
            except _BreakerOpen as exc:  # not called at all: try the next worker, at no cost
                last_error = str(exc)
                await release("skipped")
                continue
            except _Retryable as exc:
                attempts += 1
                last_error = str(exc)
                worker.check_now.set()
                await release("retried")
                continue
            except EngineRejected:
                await release("rejected")
                raise
            except BaseException:
                await release("cancelled")
                raise
            try:
                async for event in self._events(first, reader, worker):
                    if isinstance(event, Finished):  # came with [DONE]: only the body's end is left
                        await release("ok", response, reader.lines)
                    yield event
            except WorkerStreamError:
                worker.check_now.set()
                await release("cut", response)
                raise
            finally:
                await release("cancelled", response)
            return
        raise EngineUnavailable(f"Every SGLang worker tried failed before the first token ({last_error}).")

    def _payload(self, worker: Worker, request: GenerationRequest) -> bytes:
        return _encoder.encode(_SglangRequest(
            model=request.model or self.served_model or worker.served_model or "default",
            messages=request.messages, max_tokens=request.max_tokens, temperature=request.temperature,
            top_p=request.top_p, stream=True, stream_options={"include_usage": True}, stop=request.stop or None,
            seed=request.seed,
        ))

    async def _open(self, worker: Worker, request: GenerationRequest, key: str
                    ) -> tuple[httpx.Response, "_Reader", list[TokenDelta | Finished]]:
        """Send the request and read up to the first token, under the worker's breaker."""
        client = self.pool.client
        http_request = client.build_request(
            "POST", f"{worker.url}/v1/chat/completions", content=self._payload(worker, request),
            headers={"content-type": "application/json", "accept": "text/event-stream", ROUTE_KEY_HEADER: key})
        try:
            async with worker.breaker.guard() as attempt:
                response = await client.send(http_request, stream=True)
                if response.status_code != 200:
                    attempt.record(response)
                    detail = await _error_text(response)
                    if 400 <= response.status_code < 500 and response.status_code != 429:
                        raise EngineRejected(detail, response.status_code)
                    raise _Retryable(f"{worker.url} answered {response.status_code}: {detail}")
                try:
                    reader = _Reader(response.aiter_lines())
                    first = await self._until_first_token(reader)
                except WorkerStreamError as exc:  # an error event instead of the first token
                    attempt.record(httpx.RemoteProtocolError(str(exc)))
                    await response.aclose()
                    raise _Retryable(f"{worker.url}: {exc}") from None
                except BaseException:
                    await response.aclose()
                    raise
                if not first:
                    cut = httpx.RemoteProtocolError("the stream ended before the first token")
                    attempt.record(cut)
                    await response.aclose()
                    raise _Retryable(f"{worker.url}: {cut}")
                attempt.record(response)
                return response, reader, first
        except BreakerOpen as exc:
            raise _BreakerOpen(str(exc)) from None
        except httpx.HTTPError as exc:
            raise _Retryable(f"{worker.url}: {type(exc).__name__}: {exc}") from None

    @staticmethod
    async def _until_first_token(reader: "_Reader") -> list[TokenDelta | Finished]:
        """Events up to and including the first with text (or the end); empty if the stream just stops."""
        async for line in reader.lines:
            events = reader.parse(line)
            if events:
                return events
        return []

    @staticmethod
    async def _events(first: list[TokenDelta | Finished], reader: "_Reader", worker: Worker
                      ) -> AsyncIterator[TokenDelta | Finished]:
        pending = list(first)
        try:
            while True:
                for event in pending:
                    if isinstance(event, Finished):
                        event.worker = worker.url
                    yield event
                    if isinstance(event, Finished):
                        return
                pending = []
                while not pending:
                    line = await anext(reader.lines, None)
                    if line is None:
                        raise WorkerStreamError("the worker's stream ended without [DONE]")
                    pending = reader.parse(line) or []
        except httpx.HTTPError as exc:
            raise WorkerStreamError(f"the worker's stream broke: {type(exc).__name__}") from None


class _Reader:
    """One response's SSE lines, and what they said so far about the finish and usage."""

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self.lines = lines
        self.reason: str | None = None
        self.usage: _Usage | None = None

    def parse(self, line: str) -> list[TokenDelta | Finished] | None:
        """One SSE line -> the events it carries; None for lines that carry nothing."""
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            usage = self.usage or _Usage()
            return [Finished(self.reason or "stop", usage.prompt_tokens, usage.completion_tokens)]
        try:
            chunk = _chunk.decode(data)
        except msgspec.MsgspecError:
            raise WorkerStreamError("the worker sent a chunk that is not JSON") from None
        if chunk.error is not None or chunk.object == "error":
            message = (chunk.error or {}).get("message") or chunk.message or "generation failed"
            raise WorkerStreamError(f"the worker reported an error: {message}")
        events: list[TokenDelta | Finished] = []
        for choice in chunk.choices:
            if choice.delta.content:
                events.append(TokenDelta(choice.delta.content))
            if choice.finish_reason:
                self.reason = choice.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage
        return events or None


async def _error_text(response: httpx.Response) -> str:
    try:
        body = b""
        async for part in response.aiter_bytes():
            body += part
            if len(body) > MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        body = b""
    finally:
        await response.aclose()
    try:
        decoded = msgspec.json.decode(body[:MAX_ERROR_BODY])
        if isinstance(decoded, dict):
            error = decoded.get("error")
            message = error.get("message") if isinstance(error, dict) else decoded.get("message")
            if message:
                return str(message)[:500]
    except msgspec.MsgspecError:
        pass
    return body[:200].decode(errors="replace") or f"HTTP {response.status_code}"
