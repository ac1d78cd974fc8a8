"""/readyz tells which dependency is missing, and recovers when it returns."""

from __future__ import annotations

import httpx
from support import wait_for

from stack.local import LocalStack


def test_chat_readyz_names_postgres_while_it_is_down_and_recovers(stack: LocalStack):
    readyz = f"{stack.config.url('chat')}/readyz"
    assert httpx.get(readyz).status_code == 200
    stack.supervisor.stop("postgres")
    try:
        down = wait_for(lambda: (r := httpx.get(readyz, timeout=5)).status_code == 503 and r)
        assert "postgres" in down.json()["failing"]
    finally:
        stack.supervisor.start("postgres")
    wait_for(lambda: httpx.get(readyz, timeout=5).status_code == 200, timeout=60)
    # the whole stack is ready again, so later tests see a healthy platform
    stack.wait_ready(("postgres", "chat", "auth", "users", "models"), timeout=60)


def test_every_component_reports_health_and_metrics(stack: LocalStack):
    for name in ("router", "gateway-ai", "gateway-identity", "gateway-fallback", "auth", "users", "chat",
                 "models", "inference"):
        base = stack.config.url(name)
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
        metrics = httpx.get(f"{base}/metrics").text
        assert "dualgate_requests_total" in metrics
        assert "dualgate_request_duration_seconds" in metrics


def test_services_refuse_calls_without_an_internal_token(stack: LocalStack, creds):
    # a user key is not an internal token: services only trust what a gateway signed
    headers = {"authorization": f"Bearer {creds.admin_key}"}
    for name, path in (("chat", "/v1/chat/completions"), ("models", "/v1/models"), ("users", "/v1/users/me"),
                       ("auth", "/v1/keys"), ("inference", "/v1/models")):
        method = "POST" if path.endswith("completions") else "GET"
        resp = httpx.request(method, f"{stack.config.url(name)}{path}", headers=headers,
                             json={"model": "synthetic", "messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 401, (name, resp.text)
