"""Process settings from DUALGATE_* environment variables, with local defaults.

Every deployable reads one `Settings`; the stack sets the variables per process.
Nothing here knows whether the servers behind the URLs are embedded or managed.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

ENV_PREFIX = "DUALGATE_"
REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(msgspec.Struct, kw_only=True):
    service: str = "dualgate"
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"

    # infrastructure
    database_url: str = "postgresql://postgres@127.0.0.1:15432/postgres"
    redis_url: str = "redis://127.0.0.1:16379/0"
    kafka_bootstrap: str = "127.0.0.1:19092"
    vault_addr: str = "http://127.0.0.1:18200"
    vault_role_id: str = ""
    vault_secret_id: str = ""

    # upstreams
    auth_url: str = "http://127.0.0.1:8301"
    users_url: str = "http://127.0.0.1:8302"
    chat_url: str = "http://127.0.0.1:8303"
    models_url: str = "http://127.0.0.1:8304"
    inference_url: str = "http://127.0.0.1:8305"
    gateway_identity_urls: str = "http://127.0.0.1:8201"  # comma-separated pool
    gateway_ai_urls: str = "http://127.0.0.1:8202"
    gateway_fallback_url: str = "http://127.0.0.1:8209"

    # gateway
    domain: str = "ai"  # identity | ai

    # timeouts (seconds)
    connect_timeout: float = 1.0
    first_byte_timeout: float = 30.0
    total_timeout: float = 300.0

    # limits
    max_body_bytes: int = 1_048_576

    # auth service: bootstrap admin key (hashed on start; never logged)
    bootstrap_admin_key: str = ""

    # inference
    model_cache: str = str(REPO_ROOT / ".dualgate" / "models")
    cpu_threads: int = 2
    cpu_max_batch: int = 8
    cpu_max_queue: int = 64
    cpu_engine_enabled: bool = True

    # models service cache TTL used by the chat service (seconds)
    model_cache_ttl: float = 5.0

    # identity: secrets, tokens, caches (issue 3)
    db_credentials: str = "vault"  # vault: dynamic credentials from Vault's database engine | url: as given
    secrets_refresh_seconds: float = 2.0  # how often a process re-reads rotating secrets from Vault
    jwt_issuer: str = "dualgate-auth"
    jwt_audience: str = "dualgate-api"
    jwt_ttl_seconds: int = 900
    key_grace_seconds: int = 86_400  # default grace for a rotated key's previous secret
    auth_cache_seconds: float = 10.0  # gateways' in-process key cache while subscribed to auth changes
    auth_snapshot_max_age: float = 86_400.0  # oldest cached principal a gateway may fall back on

    # chat: the durable turn spool (outbox); each chat process uses <spool_dir>/<service>-<port>
    spool_dir: str = str(REPO_ROOT / ".dualgate" / "spool")
    outbox_max_pending: int = 20_000  # turns held before the chat service answers 503 (bounded memory)

    # inference: SGLang runtime workers (per-deployment params can override these)
    sglang_health_interval: float = 1.0
    sglang_max_outstanding: int = 64  # a worker this busy loses its affinity traffic to the least loaded

    # ---- edge resilience (gateways, router, fallback chain) ----
    gateway_replicas: int = 1  # replicas sharing the limits: each one's in-process share when Redis is down
    cache_ttl: float = 300.0  # a deterministic answer is replayed this long
    cache_stale_ttl: float = 86_400.0  # and kept this long for the fallback chain's cached layer
    cache_local_entries: int = 2048  # in-process copies of recent cache entries (bounded)
    breaker_fail_max: int = 5
    breaker_reset_timeout: float = 2.0
    retry_attempts: int = 2  # per upstream call, before the first byte only
    retry_budget_ratio: float = 0.1
    initial_token_hold: int = 256  # tokens held for a completion that names no max_tokens; grows as it streams
    fallback_first_byte_timeout: float = 5.0  # the fallback gateway's and chain's short waits
    simplified_model: str = "smollm2-135m-instruct"
    simplified_max_tokens: int = 128
    # the chain's CPU model in the gateway's own process (the stack turns it on for AI gateways);
    # off, the layer asks the inference service's copy
    simplified_in_process: bool = False
    simplified_threads: int = 1
    simplified_max_batch: int = 4
    simplified_max_queue: int = 16
    fallback_rate_share: float = 0.5  # the fallback gateway admits this share of a plan's requests/min
    router_ip_rpm: int = 120_000  # per client IP, all routes
    router_ip_sync_seconds: float = 0.1  # how often router replicas share their per-IP counts
    router_first_byte_timeout: float = 60.0
    health_interval: float = 0.5
    health_timeout: float = 0.5

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> "Settings":
        env = os.environ if env is None else env
        fields = {f.name for f in msgspec.structs.fields(cls)}
        raw: dict[str, object] = {
            key[len(ENV_PREFIX):].lower(): value
            for key, value in env.items()
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in fields
        }
        raw.update(overrides)
        # strict=False converts "8080" -> 8080 and "true" -> True from env strings
        return msgspec.convert(raw, cls, strict=False)

    def url_list(self, value: str) -> list[str]:
        return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
