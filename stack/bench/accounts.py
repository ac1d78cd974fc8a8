"""What a bench sets up through the admin API: its user and keys, its stamped model, and the internal
tokens it mints to enter the chain behind the gateways."""

from __future__ import annotations

import os

import httpx

from common.security import InternalTokens
from stack.bench.client import STAMPED, STAMPED_PARAMS
from stack.config import StackConfig
from stack.credentials import load_or_create


def admin_client(config: StackConfig) -> httpx.Client:
    creds = load_or_create(config)
    return httpx.Client(base_url=config.base_url, timeout=30,
                        headers={"authorization": f"Bearer {creds.admin_key}"})


def register_stamped_model(config: StackConfig) -> None:
    """The bench's own model: the synthetic engine at SYNTHETIC's pace, stamping each token."""
    model = {"context_length": 32768, "engine": "synthetic", "tokenizer": "words", "params": STAMPED_PARAMS}
    with admin_client(config) as http:
        answer = http.post("/v1/models", json={"id": STAMPED, **model})
        if answer.status_code == 409:  # registered by an earlier run: make sure it has today's pace
            answer = http.patch(f"/v1/models/{STAMPED}", json=model)
        answer.raise_for_status()


def bench_user(config: StackConfig, count: int) -> tuple[str, list[str]]:
    """A fresh bench user and `count` keys: each key has its own requests/min bucket, the user is one
    cache tenant."""
    with admin_client(config) as http:
        user = http.post("/v1/users", json={"name": f"bench-{os.getpid()}", "plan": "unlimited"})
        user.raise_for_status()
        keys = []
        for i in range(count):
            key = http.post("/v1/keys", json={"name": f"bench-{i}", "user_id": user.json()["id"]})
            key.raise_for_status()
            keys.append(key.json()["key"])
    return user.json()["id"], keys


def bench_keys(config: StackConfig, count: int) -> list[str]:
    return bench_user(config, count)[1]


def internal_tokens(config: StackConfig) -> InternalTokens:
    """Tokens the bench mints itself, to enter the chain behind the gateways."""
    creds = load_or_create(config)
    return InternalTokens(issuer_service="bench",
                          keys={k: bytes.fromhex(v) for k, v in creds.internal_keys.items() if k != "current"},
                          current=creds.internal_keys["current"], ttl=3600)
