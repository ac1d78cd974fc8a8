"""One real stack for the whole session: the same code as `dualgate up`, on its own ports and folder."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from common.settings import REPO_ROOT
from stack.config import StackConfig
from stack.credentials import Credentials
from stack.local import LocalStack

TEST_PORT_OFFSET = int(os.environ.get("DUALGATE_TEST_PORT_OFFSET", "1000"))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_itemcollected(item: pytest.Item) -> None:
    # `-m "not stack"` is the in-process tier: every test that needs the running platform says so
    if "stack" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.stack)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # the embedded broker (Tansu 0.6, memory engine) restarted under connected clients refuses produces
    # (AlreadyExists) and reports a log end behind records it holds, so a consumer can wait on the newest
    # record until the next one arrives; tests that restart it run last, so no other test inherits that
    items.sort(key=lambda item: item.get_closest_marker("restarts_kafka") is not None)  # stable


@pytest.fixture(scope="session")
def stack() -> LocalStack:
    home = REPO_ROOT / ".dualgate-test"
    if home.exists():
        leftover = LocalStack(StackConfig(home=home, port_offset=TEST_PORT_OFFSET))
        leftover.down()
        shutil.rmtree(home)
    stack = LocalStack(StackConfig(home=home, port_offset=TEST_PORT_OFFSET, admin_key=None))
    try:
        stack.credentials = stack.up()
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def creds(stack: LocalStack) -> Credentials:
    return stack.credentials


@pytest.fixture(scope="session")
def base_url(stack: LocalStack) -> str:
    return stack.config.base_url


@pytest.fixture(scope="session")
def demo_headers(creds: Credentials) -> dict[str, str]:
    return {"authorization": f"Bearer {creds.demo_key}"}


@pytest.fixture(scope="session")
def admin_headers(creds: Credentials) -> dict[str, str]:
    return {"authorization": f"Bearer {creds.admin_key}"}


@pytest.fixture
async def http(base_url: str):
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(base_url: str, creds: Credentials):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key=creds.demo_key, max_retries=0, timeout=120)
