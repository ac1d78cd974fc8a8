"""Chat service: conversations, context building, model fallback, streaming; turns leave through a
durable outbox to Kafka, and a writer consumer persists them."""

from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from litestar import Litestar

from common.app import create_service_app
from common.contracts import TURNS_TOPIC
from common.db import ping
from common.events import EventPublisher, run_consumer
from common.http import upstream_client
from common.lifespan import service_basics
from common.redis_client import redis_client
from common.security import InternalTokens
from common.settings import Settings
from services.chat.claims import IdempotencyClaims
from services.chat.context import Tokenizers, TurnCounts
from services.chat.events import turn_writer
from services.chat.history import Conversations
from services.chat.models_client import ModelResolver
from services.chat.outbox import TurnOutbox
from services.chat.routes import route_handlers
from services.chat.store import ConversationStore, TurnStore

MIGRATIONS = Path(__file__).parent / "migrations"
WRITER_GROUP = "chat-turn-writer"


@dataclass
class ChatDeps:
    tokens: InternalTokens
    store: TurnStore
    conversation_store: ConversationStore
    conversations: Conversations
    models: ModelResolver
    inference: httpx.AsyncClient
    outbox: TurnOutbox
    tokenizers: Tokenizers
    claims: IdempotencyClaims
    turn_counts: TurnCounts = field(default_factory=TurnCounts)


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
            redis = redis_client(settings)
            stack.push_async_callback(redis.aclose)
            store = TurnStore(basics.pool)
            outbox = TurnOutbox(Path(settings.spool_dir) / f"{settings.service}-{settings.port}", publisher,
                                store.settled, service=settings.service, max_pending=settings.outbox_max_pending)
            await outbox.start()
            # the writer consumer persists turns from Kafka; one long-lived consumer group
            run_consumer(stack, settings.kafka_bootstrap, TURNS_TOPIC, WRITER_GROUP, turn_writer(store), publisher)
            stack.push_async_callback(outbox.stop)  # runs first: send what was answered while we can
            conversation_store = ConversationStore(basics.pool)
            app.state.deps = ChatDeps(
                tokens=basics.tokens, store=store, conversation_store=conversation_store,
                conversations=Conversations(conversation_store, store, outbox), inference=inference_http,
                models=ModelResolver(models_http, basics.tokens, settings.model_cache_ttl), outbox=outbox,
                tokenizers=Tokenizers(Path(settings.model_cache)), claims=IdempotencyClaims(redis, basics.tokens))
            yield

    def readiness(state):
        return {"postgres": lambda: ping(state.deps.store.pool)}

    return create_service_app(settings, route_handlers=route_handlers, readiness=readiness, lifespan=lifespan)
