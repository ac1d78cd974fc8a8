"""Helpers shared by the AI-domain tests: calling a service as a gateway would, and registry setup."""

from __future__ import annotations

from typing import TypeVar

import httpx
from support import internal_tokens

from common.security import Principal
from stack.credentials import Credentials

T = TypeVar("T")


def acting_as(creds: Credentials, audience: str, user_id: str, scopes: tuple[str, ...] = ("user",)) -> dict[str, str]:
    """Headers a gateway would send to a service on behalf of `user_id` (tests that call services directly)."""
    return internal_tokens(creds).headers(audience, Principal(subject=user_id, scopes=scopes))


async def register_model(http: httpx.AsyncClient, admin_headers: dict[str, str], **fields) -> dict:
    """Register a model through the gateway's admin API, or update it when it exists already."""
    resp = await http.post("/v1/models", json=fields, headers=admin_headers)
    if resp.status_code == 409:
        model_id = fields.pop("id")
        resp = await http.patch(f"/v1/models/{model_id}", json=fields, headers=admin_headers)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()
