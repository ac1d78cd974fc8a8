"""Chat service: orchestrates a completion and hands the finished turn to Kafka."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from litestar import Litestar

from common.app import create_service_app
from common.contracts import TURNS_TOPIC
from common.db import ping
from common.lifespan import service_basics
from common.events import EventPublisher, consume_forever
from common.http import upstream_client
from common.security import InternalTokens
from common.settings import Settings
from services.chat.events import TurnRecorder, turn_writer
from services.chat.models_client import ModelResolver
from services.chat.routes import route_handlers
from services.chat.store import TurnStore

MIGRATIONS = Path(__file__).parent / "migrations"
WRITER_GROUP = "chat-turn-writer"


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@dataclass
class ChatDeps:
    tokens: InternalTokens
    store: TurnStore
    models: ModelResolver
    inference: httpx.AsyncClient
    turns: TurnRecorder


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="chat")

    @asynccontextmanager
    async def lifespan(app: Litestar):
        async with contextlib.AsyncExitStack() as stack:
            basics = await stack.enter_async_context(service_basics(settings, MIGRATIONS))
            models_http = await stack.enter_async_context(
                upstream_client(settings, settings.models_url, read_timeout=2.0))
            inference_http = await stack.enter_async_context(upstream_client(settings, settings.inference_url))
            publisher = EventPublisher(settings.kafka_bootstrap, client_id="chat")
            await publisher.start()
            stack.push_async_callback(publisher.stop)
            store = TurnStore(basics.pool)
            deps = ChatDeps(tokens=basics.tokens, store=store, inference=inference_http,
                            models=ModelResolver(models_http, basics.tokens, settings.model_cache_ttl),
                            turns=TurnRecorder(publisher))
            # the writer consumer persists turns from Kafka; one long-lived consumer group
            writer = asyncio.create_task(consume_forever(
                settings.kafka_bootstrap, TURNS_TOPIC, WRITER_GROUP, turn_writer(store), publisher))
            stack.push_async_callback(_cancel, writer)
            stack.push_async_callback(deps.turns.drain)  # runs first: publish what was answered
            app.state.deps = deps
            yield

    def readiness(state):
        return {"postgres": lambda: ping(state.deps.store.pool)}

    return create_service_app(settings, route_handlers=route_handlers, readiness=readiness, lifespan=lifespan)
