from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from common.contracts import ID_PATTERNS

# the kit's pattern: an id registered here is one every hop can put into a URL
ModelId = Annotated[str, Meta(pattern=ID_PATTERNS["model"])]
WorkerUrl = Annotated[str, Meta(pattern=r"^https?://[A-Za-z0-9.\-\[\]:]+(/[^\s]*)?$", max_length=512)]
Tokenizer = Annotated[str, Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,200})?$")]
Engine = Literal["cpu", "synthetic", "sglang"]
OwnedBy = Annotated[str, Meta(min_length=1, max_length=128)]
ContextLength = Annotated[int, Meta(ge=16, le=10_000_000)]
ServedModel = Annotated[str, Meta(max_length=256)]
Workers = Annotated[list[WorkerUrl], Meta(max_length=64)]
Params = Annotated[dict[Annotated[str, Meta(max_length=64)], float], Meta(max_length=32)]


class RegisterModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: ModelId
    context_length: ContextLength
    engine: Engine
    owned_by: OwnedBy = "dualgate"
    served_model: ServedModel = ""
    workers: Workers = []
    params: Params = {}
    fallback_model: ModelId | None = None
    enabled: bool = True
    tokenizer: Tokenizer = ""


class UpdateModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Only the fields present change; `fallback_model: null` removes the fallback."""

    context_length: ContextLength | UnsetType = UNSET
    engine: Engine | UnsetType = UNSET
    owned_by: OwnedBy | UnsetType = UNSET
    served_model: ServedModel | UnsetType = UNSET
    workers: Workers | UnsetType = UNSET
    params: Params | UnsetType = UNSET
    fallback_model: ModelId | None | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET
    tokenizer: Tokenizer | UnsetType = UNSET


class ModelDetail(msgspec.Struct, kw_only=True):
    """A registry row as an admin sees it: the OpenAI model card plus its deployment."""

    id: str
    created: int
    owned_by: str
    context_length: int
    engine: str
    served_model: str
    workers: list[str]
    params: dict[str, float]
    fallback_model: str | None
    enabled: bool
    tokenizer: str
    object: str = "model"
