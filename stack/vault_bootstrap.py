"""Configure the Vault (OpenBao) server from vault/: engines, policies, one AppRole per service, secrets.

Idempotent: run on every start of the stack's Vault (dev mode keeps everything in memory).
"""

from __future__ import annotations

import hvac
from hvac.exceptions import InvalidRequest

from common.settings import REPO_ROOT
from common.vault import INTERNAL_KEYS_PATH, KV_MOUNT, PEPPER_PATH
from stack.credentials import Credentials

POLICY_DIR = REPO_ROOT / "vault" / "policies"
JWT_TRANSIT_KEY = "dualgate-jwt"


def _policies_for(service: str) -> list[str]:
    names = ["dualgate-common"]
    if (POLICY_DIR / f"{service}.hcl").exists():
        names.append(f"dualgate-{service}")
    return names


def bootstrap(vault_addr: str, creds: Credentials) -> None:
    client = hvac.Client(url=vault_addr, token=creds.root_token, timeout=5)
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    if f"{KV_MOUNT}/" not in mounts:
        client.sys.enable_secrets_engine("kv", path=KV_MOUNT, options={"version": "2"})
    if "transit/" not in mounts:
        client.sys.enable_secrets_engine("transit", path="transit")
    try:
        client.secrets.transit.read_key(JWT_TRANSIT_KEY)
    except hvac.exceptions.InvalidPath:
        client.secrets.transit.create_key(JWT_TRANSIT_KEY, key_type="ed25519")
    if "approle/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle")

    client.sys.create_or_update_policy("dualgate-common", (POLICY_DIR / "common.hcl").read_text())
    for path in POLICY_DIR.glob("*.hcl"):
        if path.stem != "common":
            client.sys.create_or_update_policy(f"dualgate-{path.stem}", path.read_text())

    client.secrets.kv.v2.create_or_update_secret(INTERNAL_KEYS_PATH, secret=creds.internal_keys, mount_point=KV_MOUNT)
    client.secrets.kv.v2.create_or_update_secret(PEPPER_PATH, secret=creds.pepper, mount_point=KV_MOUNT)

    for service, approle in creds.approles.items():
        role = f"dualgate-{service}"
        client.auth.approle.create_or_update_approle(
            role, token_policies=_policies_for(service), token_ttl="1h", token_max_ttl="24h",
            secret_id_ttl="0", bind_secret_id=True)
        client.auth.approle.update_role_id(role, approle.role_id)
        try:
            client.write(f"auth/approle/role/{role}/custom-secret-id", secret_id=approle.secret_id)
        except InvalidRequest as exc:  # already there from an earlier bootstrap of this server
            if "already" not in str(exc).lower():
                raise
