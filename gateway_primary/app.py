"""A domain gateway (DOMAIN=identity or ai): authentication, limits, cache, resilient upstream calls.

Built by the gateway kit's factory (`gateway/app.py`) in the domain's role, with this gateway's routes.
"""

from __future__ import annotations

import msgspec
from litestar import Litestar

from common.settings import Settings
from gateway.app import build, role_of
from gateway_primary.routes import route_handlers


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env(service="gateway")
    role = role_of(settings, settings.domain)
    if settings.service == "gateway":
        settings = msgspec.structs.replace(settings, service=f"gateway-{settings.domain}")
    return build(settings, role, route_handlers)
