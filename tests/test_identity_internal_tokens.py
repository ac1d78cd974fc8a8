"""Services trust only internal tokens a gateway or service signed for them: no token, a token for
another audience, an expired or badly signed one, or headers that merely claim an identity -> 401."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest
from identity_support import current_creds
from support import internal_tokens

from common.security import INTERNAL_TOKEN_HEADER, Principal, service_principal
from stack.local import LocalStack

ADMIN = Principal(subject="usr_admin", scopes=("admin", "user"), key_id="0123456789abcdef")
# one route per service; a valid token gets past authentication (any answer but 401)
CALLS = {
    "auth": ("GET", "/v1/keys"),
    "users": ("GET", "/v1/users/me"),
    "chat": ("POST", "/v1/chat/completions"),
    "models": ("GET", "/v1/models"),
    "inference": ("GET", "/v1/models"),
}


def _call(stack: LocalStack, service: str, headers: dict[str, str]) -> httpx.Response:
    method, path = CALLS[service]
    return httpx.request(method, f"{stack.config.url(service)}{path}", headers=headers, timeout=10,
                         json={} if method == "POST" else None)


@pytest.mark.parametrize("service", sorted(CALLS))
def test_a_service_refuses_any_call_without_a_valid_internal_token_for_it(stack, service):
    tokens = internal_tokens(current_creds(stack), "gateway-identity")
    other = "auth" if service != "auth" else "users"
    now = int(time.time())
    claims = {"iss": "dualgate-internal", "src": "gateway-ai", "aud": service, "sub": "usr_admin",
              "scp": ["admin", "user"], "iat": now - 120, "exp": now - 60}
    current = tokens.current
    refused = {
        "no token": {},
        "a token for another audience": {INTERNAL_TOKEN_HEADER: tokens.mint(other, ADMIN)},
        "an expired token": {INTERNAL_TOKEN_HEADER: jwt.encode(claims, tokens.keys[current], algorithm="HS256",
                                                               headers={"kid": current})},
        "a token signed with another key": {INTERNAL_TOKEN_HEADER: jwt.encode(
            {**claims, "exp": now + 60}, b"not-the-key" * 3, algorithm="HS256", headers={"kid": current})},
        "an unsigned token": {INTERNAL_TOKEN_HEADER: jwt.encode({**claims, "exp": now + 60}, None,
                                                                algorithm="none", headers={"kid": current})},
        "headers that claim to be the admin": {"x-user-id": "usr_admin", "x-scopes": "admin",
                                               "x-dualgate-principal": "usr_admin"},
    }
    for what, headers in refused.items():
        resp = _call(stack, service, headers)
        assert resp.status_code == 401, (service, what, resp.status_code, resp.text[:200])
        assert resp.json()["error"]["type"] == "authentication_error"
    # the control: a token minted for this service gets through
    accepted = _call(stack, service, {INTERNAL_TOKEN_HEADER: tokens.mint(service, ADMIN)})
    assert accepted.status_code != 401, (service, accepted.text[:200])


def test_introspection_is_for_services_only(stack):
    tokens = internal_tokens(current_creds(stack), "gateway-identity")
    url = f"{stack.config.url('auth')}/internal/introspect"
    body = {"key": "dg-0123456789abcdef-whatever"}
    as_user = httpx.post(url, json=body, headers={INTERNAL_TOKEN_HEADER: tokens.mint("auth", ADMIN)})
    assert as_user.status_code == 403
    as_service = httpx.post(url, json=body, headers=tokens.headers("auth", service_principal("gateway-identity")))
    assert as_service.status_code == 401  # a service may ask; this key just is not valid
