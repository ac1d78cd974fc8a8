"""`dualgate openapi`: build the edge's OpenAPI document from the services' own schemas.

The router serves the document (common.openapi.PUBLIC_DOCUMENT) but may not import the services, so
it is built here, ahead of time, and committed; `--check` (and a test) fails when it is stale.
"""

from __future__ import annotations

import argparse
import importlib

from common.contracts import API_ROUTES
from common.openapi import PUBLIC_DOCUMENT, encode, public_document
from common.settings import Settings

# the services behind the public routes, each built with default settings: only its routes are read
PUBLIC_SERVICES = tuple(sorted({service for _, _, service in API_ROUTES}))


def build() -> bytes:
    apps = {name: importlib.import_module(f"services.{name}.app").create_app(Settings.from_env(env={}, service=name))
            for name in PUBLIC_SERVICES}
    return encode(public_document(apps))


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("openapi", help="rebuild the edge's OpenAPI document from the services' schemas")
    parser.add_argument("--check", action="store_true", help="only say whether the committed document is current")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    built = build()
    current = PUBLIC_DOCUMENT.read_bytes() if PUBLIC_DOCUMENT.exists() else b""
    if args.check:
        print(f"{PUBLIC_DOCUMENT} is {'current' if built == current else 'stale: run `dualgate openapi`'}")
        return 0 if built == current else 1
    PUBLIC_DOCUMENT.write_bytes(built)
    print(f"wrote {PUBLIC_DOCUMENT}")
    return 0
