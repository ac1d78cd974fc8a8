"""The model registry: OpenAI-format listing for callers, an admin API, and resolution for the chat service."""

from __future__ import annotations

import msgspec
from litestar import Request, delete, get, patch, post
from litestar.datastructures import State

from common.contracts import ModelRecord
from common.errors import ApiError, decode_body, not_found
from common.openai_schema import ModelCard, ModelList
from common.openapi import documented
from common.security import Principal
from services.models.schemas import ModelDetail, RegisterModel, UpdateModel
from services.models.store import ModelExists

AUDIENCE = "models"


def _card(m: ModelRecord) -> ModelCard:
    return ModelCard(id=m.id, created=m.created, owned_by=m.owned_by)


def _detail(m: ModelRecord) -> ModelDetail:
    d = m.deployment
    return ModelDetail(id=m.id, created=m.created, owned_by=m.owned_by, context_length=m.context_length,
                       engine=d.engine, served_model=d.served_model, workers=list(d.workers), params=dict(d.params),
                       fallback_model=m.fallback_model, enabled=m.enabled, tokenizer=m.tokenizer)


def _admin(request: Request, state: State) -> Principal:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    principal.require_scope("admin")
    return principal


async def _check_deployment(state: State, model_id: str, engine: str, workers: list[str],
                            fallback: str | None) -> None:
    if engine == "sglang" and not workers:
        raise ApiError(400, "An sglang model needs at least one worker URL.", param="workers", code="invalid_value")
    if engine != "sglang" and workers:
        raise ApiError(400, f"The {engine} engine runs in the inference service; it takes no worker URLs.",
                       param="workers", code="invalid_value")
    if fallback is None:
        return
    if fallback == model_id:
        raise ApiError(400, "A model cannot be its own fallback.", param="fallback_model", code="invalid_value")
    if await state.deps.store.get(fallback) is None:
        raise ApiError(400, f"The fallback model '{fallback}' is not registered.", param="fallback_model",
                       code="invalid_value")
    if model_id in await state.deps.store.fallback_chain(fallback):
        raise ApiError(400, f"Falling back to '{fallback}' would loop back to '{model_id}'.",
                       param="fallback_model", code="invalid_value")


@get("/v1/models", **documented())
async def list_models(request: Request, state: State) -> ModelList:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    allowed = await state.deps.allowed.for_principal(principal)
    models = await state.deps.store.enabled_models()
    return ModelList(data=[_card(m) for m in models if allowed is None or m.id in allowed])


@get("/v1/models/{model_id:path}", **documented(errors=(404,)))
async def read_model(request: Request, state: State, model_id: str) -> ModelCard | ModelDetail:
    principal = state.deps.tokens.principal_from(request, AUDIENCE)
    model_id = model_id.lstrip("/")
    record = await state.deps.store.get(model_id)
    if principal.is_admin and record is not None:
        return _detail(record)
    allowed = await state.deps.allowed.for_principal(principal)
    if record is None or not record.enabled or (allowed is not None and model_id not in allowed):
        raise not_found(f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return _card(record)


@post("/v1/models", status_code=201, **documented(RegisterModel, errors=(403, 409)))
async def register_model(request: Request, state: State) -> ModelDetail:
    _admin(request, state)
    body: RegisterModel = decode_body(await request.body(), RegisterModel)
    await _check_deployment(state, body.id, body.engine, body.workers, body.fallback_model)
    fields = {f: getattr(body, f) for f in body.__struct_fields__}
    try:
        record = await state.deps.store.insert(fields)
    except ModelExists:
        raise ApiError(409, f"The model '{body.id}' is already registered; PATCH it to change it.",
                       param="id", code="model_exists") from None
    return _detail(record)


@patch("/v1/models/{model_id:path}", **documented(UpdateModel, errors=(403, 404)))
async def update_model(request: Request, state: State, model_id: str) -> ModelDetail:
    _admin(request, state)
    model_id = model_id.lstrip("/")
    body: UpdateModel = decode_body(await request.body(), UpdateModel)
    current = await state.deps.store.get(model_id)
    if current is None:
        raise not_found(f"The model '{model_id}' does not exist.", code="model_not_found")
    changes = {f: v for f in body.__struct_fields__ if (v := getattr(body, f)) is not msgspec.UNSET}
    engine = changes.get("engine", current.deployment.engine)
    workers = changes.get("workers", current.deployment.workers)
    fallback = changes["fallback_model"] if "fallback_model" in changes else current.fallback_model
    await _check_deployment(state, model_id, engine, workers, fallback if "fallback_model" in changes else None)
    if not changes:
        return _detail(current)
    record = await state.deps.store.update(model_id, changes)
    if record is None:
        raise not_found(f"The model '{model_id}' does not exist.", code="model_not_found")
    return _detail(record)


@delete("/v1/models/{model_id:path}", status_code=200, **documented(errors=(403, 404)))
async def disable_model(request: Request, state: State, model_id: str) -> ModelDetail:
    """Disable, never erase: turns and usage keep naming the model."""
    _admin(request, state)
    model_id = model_id.lstrip("/")
    record = await state.deps.store.update(model_id, {"enabled": False})
    if record is None:
        raise not_found(f"The model '{model_id}' does not exist.", code="model_not_found")
    return _detail(record)


@get("/internal/models/{model_id:path}")
async def resolve_model(request: Request, state: State, model_id: str) -> ModelRecord:
    state.deps.tokens.principal_from(request, AUDIENCE)
    model_id = model_id.lstrip("/")
    record = await state.deps.store.get(model_id)
    if record is None or not record.enabled:
        raise not_found(f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return record


route_handlers = [list_models, read_model, register_model, update_model, disable_model, resolve_model]
