"""JWTs through nginx: an API key buys a short-lived token signed by Vault transit, both gateways
verify it locally against the JWKS, and every forged or out-of-date token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from identity_support import bearer, vault_root
from support import eventually, new_key, new_user

from common.vault import JWT_TRANSIT_KEY
from stack.local import LocalStack

PROTECTED = ("/v1/users/me", "/v1/models")  # one route per gateway


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _latest_version(stack: LocalStack) -> int:
    return vault_root(stack).secrets.transit.read_key(JWT_TRANSIT_KEY)["data"]["latest_version"]


def vault_signed(stack: LocalStack, claims: dict, header: dict | None = None) -> str:
    """A token signed by the platform's real transit key (as the operator): only its claims are wrong."""
    version = _latest_version(stack)
    header = header or {"alg": "EdDSA", "typ": "JWT", "kid": str(version)}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = vault_root(stack).secrets.transit.sign_data(
        JWT_TRANSIT_KEY, hash_input=base64.b64encode(signing_input.encode()).decode(), key_version=version)
    return f"{signing_input}.{_b64(base64.b64decode(signature['data']['signature'].split(':')[2]))}"


def _claims(user_id: str, **override) -> dict:
    now = int(time.time())
    claims = {"iss": "dualgate-auth", "aud": "dualgate-api", "sub": user_id, "scp": ["user"], "iat": now,
              "nbf": now, "exp": now + 300}
    claims.update(override)
    return claims


async def test_an_api_key_buys_a_short_lived_jwt_both_gateways_accept(http, admin_headers):
    user_id = await new_user(http, admin_headers)
    key, key_id = await new_key(http, admin_headers, user_id)
    resp = await http.post("/v1/auth/token", json={"expires_in": 120}, headers=bearer(key))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 120
    token = body["access_token"]
    header, claims = jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "EdDSA" and header["kid"].isdigit()
    assert claims["sub"] == user_id and claims["akid"] == key_id and claims["exp"] - claims["iat"] == 120
    for path in PROTECTED:
        assert (await http.get(path, headers=bearer(token))).status_code == 200, path
    me = await http.get("/v1/users/me", headers=bearer(token))
    assert me.json()["id"] == user_id
    # the JWKS is public and verifies the token on its own
    jwks = (await http.get("/.well-known/jwks.json")).json()
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    public = jwt.PyJWK(jwk).key
    assert jwt.decode(token, public, algorithms=["EdDSA"], audience="dualgate-api")["sub"] == user_id
    # a token cannot buy a token: only an API key can
    again = await http.post("/v1/auth/token", headers=bearer(token))
    assert again.status_code == 403


async def test_every_forged_or_out_of_date_jwt_is_refused_on_both_gateways(http, admin_headers, stack):
    user_id = await new_user(http, admin_headers)
    version = str(_latest_version(stack))
    jwks = (await http.get("/.well-known/jwks.json")).json()
    public_x = next(k for k in jwks["keys"] if k["kid"] == version)["x"]
    now = int(time.time())
    unsigned = f"{_b64(json.dumps({'alg': 'none', 'kid': version}).encode())}." \
               f"{_b64(json.dumps(_claims(user_id)).encode())}."
    hs_input = f"{_b64(json.dumps({'alg': 'HS256', 'kid': version}).encode())}." \
               f"{_b64(json.dumps(_claims(user_id)).encode())}"
    hs256 = f"{hs_input}.{_b64(hmac.new(public_x.encode(), hs_input.encode(), hashlib.sha256).digest())}"
    foreign = Ed25519PrivateKey.generate()
    attacks = {
        "alg none": unsigned,
        "HS256 signed with the public key": hs256,
        "a foreign key under the real kid": jwt.encode(_claims(user_id), foreign, algorithm="EdDSA",
                                                       headers={"kid": version}),
        "a foreign kid": jwt.encode(_claims(user_id), foreign, algorithm="EdDSA", headers={"kid": "987654"}),
        "expired": vault_signed(stack, _claims(user_id, iat=now - 600, nbf=now - 600, exp=now - 60)),
        "not valid before the future": vault_signed(stack, _claims(user_id, nbf=now + 600)),
        "another audience": vault_signed(stack, _claims(user_id, aud="another-api")),
        "another issuer": vault_signed(stack, _claims(user_id, iss="evil-auth")),
    }
    control = vault_signed(stack, _claims(user_id))  # the same signer with honest claims passes
    for path in PROTECTED:
        assert (await http.get(path, headers=bearer(control))).status_code == 200, path
        for what, token in attacks.items():
            resp = await http.get(path, headers=bearer(token))
            assert resp.status_code == 401, (what, path, resp.status_code)
            assert resp.json()["error"]["message"] == "Invalid or missing credentials."


async def test_tokens_stop_when_their_key_is_revoked_or_their_user_disabled(http, admin_headers):
    user_id = await new_user(http, admin_headers)
    key, key_id = await new_key(http, admin_headers, user_id)
    other_key, _ = await new_key(http, admin_headers, user_id)
    token = (await http.post("/v1/auth/token", headers=bearer(key))).json()["access_token"]
    other_token = (await http.post("/v1/auth/token", headers=bearer(other_key))).json()["access_token"]
    assert (await http.get("/v1/models", headers=bearer(token))).status_code == 200

    await http.delete(f"/v1/keys/{key_id}", headers=admin_headers)

    async def refused(tok: str) -> bool:
        return all([(await http.get(path, headers=bearer(tok))).status_code == 401 for path in PROTECTED])

    await eventually(lambda: refused(token), timeout=1.0, what="token of a revoked key refused")
    assert (await http.get("/v1/models", headers=bearer(other_token))).status_code == 200
    await http.post(f"/v1/users/{user_id}/disable", headers=admin_headers)
    await eventually(lambda: refused(other_token), timeout=1.0, what="token of a disabled user refused")


async def test_a_refused_jwt_is_audited_with_who_it_claimed_to_be_and_why(http, admin_headers):
    """JWTs are verified on the gateways, never by the auth service, so the gateways audit their refusals."""
    key, key_id = await new_key(http, admin_headers, await new_user(http, admin_headers))
    first, second = [(await http.post("/v1/auth/token", headers=bearer(key))).json()["access_token"]
                     for _ in range(2)]
    forged = first.rsplit(".", 1)[0] + "." + second.rsplit(".", 1)[1]  # a real signature, of another token
    refused = {}
    for path, gateway in (("/v1/users/me", "gateway-identity"), ("/v1/models", "gateway-ai")):
        request_id = f"jwt-refused-{uuid.uuid4().hex}"
        resp = await http.get(path, headers={**bearer(forged), "x-request-id": request_id})
        assert resp.status_code == 401
        refused[request_id] = gateway

    for request_id, gateway in refused.items():
        async def audited() -> list[dict] | None:
            resp = await http.get("/v1/auth/audit", params={"request_id": request_id}, headers=admin_headers)
            return resp.json()["data"] or None

        (row,) = await eventually(audited, timeout=30, interval=0.3, what=f"{gateway} audits the refused JWT")
        assert (row["action"], row["outcome"], row["actor"], row["target"]) == ("auth.failed", "denied", "anonymous",
                                                                              key_id)
        assert row["detail"]["via"] == "jwt" and row["detail"]["reason"] == "jwt_invalid"
        assert row["detail"]["service"].startswith(gateway)  # gateway-ai or its second replica
