"""POST /v1/chat/completions in the OpenAI format, streamed from the engine the deployment names."""

from __future__ import annotations

import time

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.response import Stream

from common.engines.base import EngineBusy, EngineRejected, EngineUnavailable, GenerationRequest
from common.engines.render import completion, sse_chunks
from common.errors import ApiError, decode_body, unavailable
from common.metrics import TTFT
from common.openai_schema import EngineSpec, InferenceRequest, ModelCard, ModelList
from common.sse import SSE_HEADERS
from services.inference.engines.synthetic import SyntheticEngine

AUDIENCE = "inference"
DEFAULT_MAX_TOKENS = 256


def _engine_for(state: State, spec: EngineSpec | None, model: str):
    deps = state.deps
    spec = spec or EngineSpec(engine="synthetic" if model.startswith("synthetic") else "cpu")
    if spec.engine == "synthetic":
        return SyntheticEngine.from_params(spec.params)
    if spec.engine == "cpu":
        if deps.cpu is None or not deps.cpu.ready:
            raise unavailable("The CPU engine is not loaded yet.", retry_after=5, code="engine_unavailable")
        return deps.cpu
    if spec.engine == "sglang":
        if not spec.workers:
            raise unavailable("This deployment names no SGLang worker.", code="engine_unavailable")
        return deps.sglang.engine(spec.workers, spec.served_model, spec.params)
    raise ApiError(501, f"Engine '{spec.engine}' is not available on this inference service.",
                   type="server_error", code="engine_unavailable")


async def _first_event(events):
    """The engine's first event; failures before it become the caller's status code, before any byte."""
    try:
        return await events.__anext__()
    except EngineBusy as busy:
        await events.aclose()
        raise ApiError(429, "The engine queue is full; retry shortly.", type="rate_limit_error",
                       code="engine_overloaded", headers={"Retry-After": str(max(1, round(busy.retry_after)))})
    except EngineUnavailable as exc:
        await events.aclose()
        raise unavailable(str(exc), retry_after=max(1, round(exc.retry_after)), code="engine_unavailable") from None
    except EngineRejected as exc:
        await events.aclose()
        raise ApiError(400, f"The model runtime rejected the request: {exc}", param="messages",
                       code="invalid_request") from None
    except ValueError as exc:  # the CPU engine's check that the prompt fits the context
        await events.aclose()
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except RuntimeError as exc:  # the engine stopped (shutdown) or failed outright
        await events.aclose()
        raise unavailable(f"The engine failed: {exc}", code="engine_unavailable") from None


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request, state: State) -> Response | Stream:
    state.deps.tokens.principal_from(request, AUDIENCE)
    body: InferenceRequest = decode_body(await request.body(), InferenceRequest)
    engine = _engine_for(state, body.deployment, body.model)
    generation = GenerationRequest(
        messages=body.plain_messages(),
        max_tokens=body.token_limit() or DEFAULT_MAX_TOKENS,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        affinity_key=body.conversation_id,
        model=body.deployment.served_model if body.deployment else "",
    )
    started = time.perf_counter()
    events = engine.generate(generation)
    first = await _first_event(events)
    model = body.model
    TTFT.labels("inference", model).observe(time.perf_counter() - started)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Stream(sse_chunks(first, events, model, include_usage, "inference"), media_type="text/event-stream",
                      headers=SSE_HEADERS)
    answer = await completion(first, events, model, "inference")
    return Response(content=msgspec.json.encode(answer), media_type="application/json")


@get("/internal/engines")
async def engine_status(request: Request, state: State) -> dict:
    """What serves here now: the CPU engine's slots and queue, every SGLang worker's rotation state."""
    state.deps.tokens.principal_from(request, AUDIENCE)
    cpu = state.deps.cpu
    return {
        "cpu": None if cpu is None else {"ready": cpu.ready, "active_sequences": cpu.active_sequences,
                                         "queue_depth": cpu.queue_depth, "max_batch": cpu.max_batch,
                                         "max_queue": cpu.max_queue},
        "sglang": {"workers": state.deps.sglang.status()},
    }


@get("/v1/models")
async def list_engines(request: Request, state: State) -> ModelList:
    state.deps.tokens.principal_from(request, AUDIENCE)
    cards = [ModelCard(id="synthetic", created=0, owned_by="dualgate")]
    if state.deps.cpu is not None and state.deps.cpu.ready:
        cards.append(ModelCard(id=state.deps.cpu.model_name, created=0, owned_by="dualgate"))
    return ModelList(data=cards)


route_handlers = [chat_completions, engine_status, list_engines]
