"""The fallback gateway: what answers, for both domains, when a domain gateway cannot.

Built by the gateway kit's factory (`gateway/app.py`) in the fallback role: authentication from the
auth snapshot (`gateway.authn.SnapshotAuthenticator`: Redis mirrored in process memory, obeying
revocations), one short try per upstream, and conservative limits (a share of each plan), still
exact across replicas while Redis answers.
"""

from __future__ import annotations

from litestar import Litestar

from common.settings import Settings
from gateway.app import FALLBACK, build, role_of
from gateway_fallback.routes import route_handlers


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="gateway-fallback")
    return build(settings, role_of(settings, FALLBACK), route_handlers)
