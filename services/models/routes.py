from __future__ import annotations

from litestar import Request, get
from litestar.datastructures import State

from common.errors import not_found
from common.openai_schema import ModelCard, ModelList
from common.contracts import ModelRecord

AUDIENCE = "models"


@get("/v1/models")
async def list_models(request: Request, state: State) -> ModelList:
    state.deps.tokens.principal_from(request, AUDIENCE)
    models = await state.deps.store.enabled_models()
    return ModelList(data=[ModelCard(id=m.id, created=m.created, owned_by=m.owned_by) for m in models])


@get("/internal/models/{model_id:str}")
async def resolve_model(request: Request, state: State, model_id: str) -> ModelRecord:
    state.deps.tokens.principal_from(request, AUDIENCE)
    record = await state.deps.store.get(model_id)
    if record is None or not record.enabled:
        raise not_found(f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return record


route_handlers = [list_models, resolve_model]
