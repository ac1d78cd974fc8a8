"""Model resolution through the models service, cached briefly; the last known answer is kept
for when the models service is down (docs/DESIGN.md §5: models down -> last known registry)."""

from __future__ import annotations

import time

import httpx
import msgspec

from common.contracts import ModelRecord, url_id
from common.errors import ApiError, unavailable
from common.security import InternalTokens, service_principal

_decoder = msgspec.json.Decoder(ModelRecord)
MAX_ENTRIES = 1024


class ModelResolver:
    def __init__(self, client: httpx.AsyncClient, tokens: InternalTokens, ttl: float) -> None:
        self.client = client
        self.tokens = tokens
        self.ttl = ttl
        self._cache: dict[str, tuple[ModelRecord, float]] = {}
        self._principal = service_principal("chat")

    async def resolve(self, model_id: str) -> ModelRecord:
        cached = self._cache.get(model_id)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        path = f"/internal/models/{url_id('model', model_id)}"  # an id that cannot name a model: its 404
        try:
            resp = await self.client.get(path,
                                         headers=self.tokens.headers("models", self._principal))
        except httpx.HTTPError:
            if cached:  # stale beats unavailable
                return cached[0]
            raise unavailable("The model registry is unreachable.", code="models_unavailable") from None
        if resp.status_code == 404:
            self._cache.pop(model_id, None)
            raise ApiError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        if resp.status_code != 200:
            if cached:
                return cached[0]
            raise unavailable("The model registry failed.", code="models_unavailable")
        record = _decoder.decode(resp.content)
        if len(self._cache) >= MAX_ENTRIES:
            self._cache.clear()
        self._cache[model_id] = (record, time.monotonic() + self.ttl)
        return record
