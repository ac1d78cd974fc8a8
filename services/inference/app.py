"""Inference service: the engine front. SGLang runtime workers (GPU), the embedded CPU model, and the
synthetic engine; the models registry's deployment on each request says which."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from litestar import Litestar

from common.app import create_service_app, freeze_long_lived_objects
from common.http import upstream_client
from common.lifespan import followed_internal_tokens
from common.metrics import ENGINE_ACTIVE, ENGINE_QUEUE_DEPTH
from common.security import InternalTokens
from common.settings import Settings
from services.inference.engines.sglang import WorkerOptions, WorkerPool
from services.inference.routes import route_handlers

if TYPE_CHECKING:
    from common.engines.cpu import CpuEngine

log = logging.getLogger(__name__)


@dataclass
class InferenceDeps:
    settings: Settings
    tokens: InternalTokens
    cpu: "CpuEngine | None"
    sglang: WorkerPool
    loading: asyncio.Task | None = None
    load_error: str | None = field(default=None)


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="inference")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with contextlib.AsyncExitStack() as stack:  # unwound in reverse
            tokens = await followed_internal_tokens(settings, stack)
            # one long-lived client for every SGLang worker; its read timeout bounds the wait for each token
            workers_http = upstream_client(settings, max_connections=1024)
            stack.push_async_callback(workers_http.aclose)
            sglang = WorkerPool(workers_http, WorkerOptions(
                health_interval=settings.sglang_health_interval, max_outstanding=settings.sglang_max_outstanding))
            stack.push_async_callback(sglang.close)
            cpu = None
            if settings.cpu_engine_enabled:
                # imported only when used: torch and transformers take seconds to import
                from common.engines.cpu import CpuEngine

                cpu = CpuEngine(cache_dir=Path(settings.model_cache), threads=settings.cpu_threads,
                                max_batch=settings.cpu_max_batch, max_queue=settings.cpu_max_queue)
                ENGINE_QUEUE_DEPTH.labels("cpu").set_function(lambda: cpu.queue_depth)
                ENGINE_ACTIVE.labels("cpu").set_function(lambda: cpu.active_sequences)
                stack.push_async_callback(cpu.stop)
            deps = InferenceDeps(settings=settings, tokens=tokens, cpu=cpu, sglang=sglang)
            if cpu is not None:
                # load in the background so /healthz answers and /readyz can say "loading"
                deps.loading = asyncio.create_task(_load(deps, cpu))
                stack.callback(deps.loading.cancel)
            app.state.deps = deps
            yield

    async def _load(deps: InferenceDeps, cpu) -> None:
        try:
            await cpu.start()
            freeze_long_lived_objects()  # the model and its libraries: ~180k objects no request frees
            log.info("cpu engine ready", extra={"model": cpu.model_name})
        except Exception as exc:
            deps.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("cpu engine failed to load")

    def readiness(state):
        deps: InferenceDeps | None = getattr(state, "deps", None)

        async def cpu_engine() -> None:
            if deps is None or deps.cpu is None:
                return
            if deps.load_error:
                raise RuntimeError(deps.load_error)
            if not deps.cpu.ready:
                raise RuntimeError("model loading")

        return {"cpu_engine": cpu_engine}

    return create_service_app(settings, route_handlers=route_handlers, readiness=readiness, lifespan=lifespan)
