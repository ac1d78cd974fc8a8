"""A FAKE SGLang runtime worker, for tests and benchmarks only (no GPU, no model).

It speaks the part of SGLang's HTTP API the `sglang` engine uses, in SGLang's documented wire format:
streaming `POST /v1/chat/completions` (role chunk, content chunks, a finish chunk with `matched_stop`, a
usage chunk with empty `choices`, `data: [DONE]`), the non-streaming form, `GET /health_generate`,
`GET /health`, `GET /get_model_info` and `GET /v1/models` (with `max_model_len`). Tokens come from
the synthetic engine, so timing is set by `--ttft-ms` / `--itl-ms`.

Test controls live under `/fake/` (never part of SGLang): request statistics, a switch that makes
`/health_generate` fail, and injected failures.

    python -m services.inference.testing.fake_sglang_worker --port 0 --worker-id w1

prints `FAKE_SGLANG_WORKER_LISTENING port=<n>` once it accepts connections. `FakeSglangWorker`
starts, kills and restarts such a process from a test or a benchmark.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream

from common.engines.base import Finished, GenerationRequest
from services.inference.engines.sglang import ROUTE_KEY_HEADER
from services.inference.engines.synthetic import SyntheticEngine

LISTENING = "FAKE_SGLANG_WORKER_LISTENING"


class _Message(msgspec.Struct):
    role: str
    content: str


class _Request(msgspec.Struct):
    messages: list[_Message]
    model: str = "default"
    stream: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict | None = None


@dataclass
class _State:
    worker_id: str
    model: str
    context_length: int
    engine: SyntheticEngine
    healthy: bool = True
    fail_status: int = 0
    fail_count: int = 0
    requests: int = 0
    in_flight: int = 0
    route_keys: Counter = field(default_factory=Counter)


def _error(status: int, message: str) -> Response:
    # SGLang's error body: {"object": "error", "message", "type", "param", "code"}
    kind = "BadRequestError" if status < 500 else "InternalServerError"
    return Response(content=msgspec.json.encode({"object": "error", "message": message, "type": kind,
                                                 "param": None, "code": status}),
                    status_code=status, media_type="application/json")


def create_app(state: _State) -> Litestar:
    encoder = msgspec.json.Encoder()

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request) -> Response | Stream:
        try:
            body = msgspec.json.decode(await request.body(), type=_Request)
        except msgspec.MsgspecError as exc:
            return _error(400, str(exc))
        state.requests += 1
        state.route_keys[request.headers.get(ROUTE_KEY_HEADER, "")] += 1
        if state.fail_count > 0:
            state.fail_count -= 1
            return _error(state.fail_status, "injected failure")
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        prompt_tokens = SyntheticEngine.count_prompt_tokens(messages)
        if prompt_tokens >= state.context_length:
            return _error(400, f"The input ({prompt_tokens} tokens) is longer than the model's context "
                               f"length ({state.context_length} tokens).")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        generation = GenerationRequest(messages=messages, max_tokens=body.max_tokens or 128,
                                       temperature=body.temperature, top_p=body.top_p, stop=stops)
        rid, created = uuid.uuid4().hex, int(time.time())
        if not body.stream:
            text, finished = "", None
            state.in_flight += 1
            try:
                async for event in state.engine.generate(generation):
                    if isinstance(event, Finished):
                        finished = event
                    else:
                        text += event.text
            finally:
                state.in_flight -= 1
            assert finished is not None
            return Response(content=encoder.encode({
                "id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "reasoning_content": None,
                                                     "tool_calls": None},
                             "logprobs": None, "finish_reason": finished.finish_reason, "matched_stop": None}],
                "usage": {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
                          "total_tokens": finished.prompt_tokens + finished.completion_tokens,
                          "prompt_tokens_details": None},
            }), media_type="application/json")
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None, matched_stop=None) -> bytes:
            return b"data: " + encoder.encode({
                "id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                             "matched_stop": matched_stop}],
                "usage": None}) + b"\n\n"

        async def events():
            state.in_flight += 1
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for event in state.engine.generate(generation):
                    if isinstance(event, Finished):
                        yield chunk({"role": None, "content": None}, event.finish_reason,
                                    stops[0] if event.finish_reason == "stop" and stops else None)
                        if include_usage:
                            yield b"data: " + encoder.encode({
                                "id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": body.model, "choices": [],
                                "usage": {"prompt_tokens": event.prompt_tokens,
                                          "completion_tokens": event.completion_tokens,
                                          "total_tokens": event.prompt_tokens + event.completion_tokens,
                                          "prompt_tokens_details": None}}) + b"\n\n"
                        yield b"data: [DONE]\n\n"
                        return
                    yield chunk({"role": None, "content": event.text})
            finally:
                state.in_flight -= 1

        return Stream(events(), media_type="text/event-stream")

    @get("/health_generate")
    async def health_generate() -> Response:
        return Response(content=b"", status_code=200 if state.healthy else 503)

    @get("/health")
    async def health() -> Response:
        return Response(content=b"", status_code=200)

    @get("/get_model_info")
    async def model_info() -> dict:
        return {"model_path": state.model, "tokenizer_path": state.model, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": "default"}

    @get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model, "object": "model", "created": 0, "owned_by": "sglang",
                                             "root": state.model, "max_model_len": state.context_length}]}

    # ---- test controls: not SGLang ----------------------------------------------------------------
    @get("/fake/stats")
    async def stats() -> dict:
        return {"worker_id": state.worker_id, "requests": state.requests, "in_flight": state.in_flight,
                "route_keys": dict(state.route_keys)}

    @post("/fake/health", status_code=200)
    async def set_health(data: dict) -> dict:
        state.healthy = bool(data.get("healthy", True))
        return {"healthy": state.healthy}

    @post("/fake/fail", status_code=200)
    async def fail(data: dict) -> dict:
        state.fail_status, state.fail_count = int(data.get("status", 500)), int(data.get("count", 1))
        return {"status": state.fail_status, "count": state.fail_count}

    @post("/fake/reset", status_code=200)
    async def reset() -> dict:
        state.requests, state.fail_count = 0, 0
        state.route_keys.clear()
        return {"reset": True}

    return Litestar([chat, health_generate, health, model_info, models, stats, set_health, fail, reset],
                    logging_config=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a FAKE SGLang worker for tests and benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed once listening)")
    parser.add_argument("--worker-id", default="fake")
    parser.add_argument("--model", default="fake-sglang-model")
    parser.add_argument("--context-length", type=int, default=32768)
    parser.add_argument("--ttft-ms", type=float, default=10.0)
    parser.add_argument("--itl-ms", type=float, default=2.0)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)

    import uvicorn

    state = _State(worker_id=args.worker_id, model=args.model, context_length=args.context_length,
                   engine=SyntheticEngine(ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, tokens=args.tokens))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)  # connections queue from here on, before the server loop starts
    print(f"{LISTENING} port={sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[sock])


class FakeSglangWorker:
    """A fake worker process, driven from a test or a benchmark: start, kill (SIGKILL), restart."""

    def __init__(self, worker_id: str, *, ttft_ms: float = 10.0, itl_ms: float = 2.0, tokens: int = 16,
                 model: str = "fake-sglang-model", context_length: int = 32768) -> None:
        self.worker_id = worker_id
        self.args = ["--worker-id", worker_id, "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms),
                     "--tokens", str(tokens), "--model", model, "--context-length", str(context_length)]
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "FakeSglangWorker":
        from common.settings import REPO_ROOT

        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.inference.testing.fake_sglang_worker", "--port", str(self.port),
             *self.args],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                line = self.process.stdout.readline()
                if line.startswith(LISTENING):
                    self.port = int(line.split("port=")[1])
                    return self
                if not line and self.process.poll() is not None:
                    break
        self.kill()
        raise RuntimeError(f"fake SGLang worker {self.worker_id} did not start")

    def kill(self) -> None:
        """SIGKILL: the worker vanishes mid-request, as a crashed GPU worker does."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        if self.process and self.process.stdout:
            self.process.stdout.close()

    def restart(self) -> "FakeSglangWorker":
        self.kill()
        return self.start()  # on the same port, so the registry's URL stays valid

    def __enter__(self) -> "FakeSglangWorker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


if __name__ == "__main__":
    main()
