"""The kit's defences against malformed input (issue 23), in process: the input guard every app runs,
the id patterns and their encoding, body decoding, and a hop that cannot send a request."""

from __future__ import annotations

import httpx
import pytest
from litestar import Request, get, post

from common.app import create_service_app
from common.breaker import AsyncBreaker
from common.contracts import check_path_ids, url_id, valid_id
from common.errors import ApiError, decode_body
from common.guard import check_headers, check_path, check_query
from common.http import forward_headers
from common.openai_schema import ChatCompletionRequest
from common.settings import Settings
from gateway.proxy import Hop


@pytest.mark.parametrize("path", [b"/v1/conversations/a%01b", b"/v1/plans/a%16b", b"/v1/models/a%00", b"/v1/x%7f",
                                  b"/v1/models/%ff", b"/v1/models/%c2%85", b"/v1/models/../keys",
                                  b"/v1/models/%2e%2e/keys", b"/v1/./models"])
def test_a_path_with_a_control_character_bad_utf8_or_dot_segments_is_a_400(path):
    with pytest.raises(ApiError) as refused:
        check_path(path)
    assert refused.value.status == 400 and refused.value.body.error.code == "invalid_path"


@pytest.mark.parametrize("path", [b"/v1/models/Qwen%2FQwen2.5", b"/v1/conversations/conv_1", b"/v1/models/caf%C3%A9",
                                  b"/v1/models/a..b"])
def test_ordinary_paths_pass(path):
    check_path(path)


@pytest.mark.parametrize(("query", "param"), [(b"before=%00", "before"), (b"user_id=a%0ab", "user_id"),
                                              (b"actor=%ff", None), (b"a%01=1", None)])
def test_a_query_with_a_control_character_or_bad_utf8_is_a_400(query, param):
    with pytest.raises(ApiError) as refused:
        check_query(query)
    assert refused.value.status == 400 and refused.value.body.error.param == param


def test_ordinary_queries_pass():
    check_query(b"limit=2&after=msg_1&q=caf%C3%A9+x&empty=")


@pytest.mark.parametrize(("header", "param"), [
    ((b"idempotency-key", "ключ".encode()), "Idempotency-Key"),
    ((b"idempotency-key", b"k" * 256), "Idempotency-Key"),
    ((b"idempotency-key", b"  "), "Idempotency-Key"),
    ((b"x-request-id", "é".encode()), "X-Request-ID"),
    ((b"user-agent", b"a\x00b"), "user-agent"),
    ((b"user-agent", b"a\x1bb"), "user-agent"),
])
def test_a_header_that_cannot_be_passed_on_is_a_400_naming_it(header, param):
    with pytest.raises(ApiError) as refused:
        check_headers([header])
    assert refused.value.status == 400 and refused.value.body.error.param == param


def test_latin1_header_bytes_pass_and_are_forwarded_as_they_came():
    headers = [(b"user-agent", "é".encode()), (b"x-note", b"caf\xe9\tok"), (b"idempotency-key", b"k-1 2")]
    check_headers(headers)
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": b""})
    forwarded = forward_headers(request.headers)
    assert forwarded["user-agent"] == "é".encode() and forwarded["x-note"] == b"caf\xe9\tok"
    assert httpx.Request("GET", "http://upstream/", headers=forwarded).headers.raw[1][1] == "é".encode()


async def test_every_app_the_kit_builds_answers_malformed_requests_with_a_json_400_before_its_route():
    calls = []

    @get("/v1/things/{thing:str}", sync_to_thread=False)
    def thing(thing: str) -> dict:
        calls.append(thing)
        return {"thing": thing}

    @post("/v1/bodies")
    async def body(request: Request) -> dict:
        return {"n": len(decode_body(await request.body(), ChatCompletionRequest).messages)}

    app = create_service_app(Settings(service="guarded"), route_handlers=[thing, body])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
        for target, headers in [("/v1/things/a%01b", {}), ("/v1/things/x?q=%00", {}),
                                ("/v1/things/x", {"idempotency-key": "ключ".encode()})]:
            response = await http.get(target, headers=headers)
            assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
            assert response.headers["x-request-id"]
        assert calls == []
        assert (await http.get("/v1/things/x", headers={"user-agent": "é".encode()})).json() == {"thing": "x"}
        for bad in [b'{"model":"m","messages":[{"role":"user","content":"\xff"}]}',
                    b'{"x":' * 5000 + b"1" + b"}" * 5000]:
            response = await http.post("/v1/bodies", content=bad)
            assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("model", ["x/../fake-model", "fake-model?x=1", "fake-model#", "m%00", "m\x00", "/m", "m/",
                                   "a//b", "", "é", "m" * 129])
def test_a_model_id_that_could_name_another_url_is_refused_as_unknown(model):
    assert not valid_id("model", model)
    with pytest.raises(ApiError) as refused:
        url_id("model", model)
    assert refused.value.status == 404 and refused.value.body.error.code == "model_not_found"


def test_valid_ids_are_percent_encoded_as_one_segment():
    assert url_id("model", "Qwen/Qwen2.5-0.5B-Instruct") == "Qwen%2FQwen2.5-0.5B-Instruct"
    assert url_id("model", "smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert url_id("user", "usr_0123abcd") == "usr_0123abcd"
    assert url_id("key", "0123456789abcdef") == "0123456789abcdef"
    assert not valid_id("user", "../keys") and not valid_id("key", "0123") and not valid_id("plan", "a\x16b")


def test_bad_utf8_and_deep_nesting_in_a_body_are_400s():
    for body in [b'{"model":"m","messages":[],"x":"\xed\xa0\x80"}', b"[" * 5000 + b"]" * 5000,
                 b'{"model":"m","x":' + b'{"a":' * 5000 + b"1" + b"}" * 5001]:
        with pytest.raises(ApiError) as refused:
            decode_body(body, ChatCompletionRequest)
        assert refused.value.status == 400


async def test_a_request_a_hop_cannot_send_is_a_400_and_never_a_breaker_failure():
    sent = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200)),
                               base_url="http://upstream")
    breaker = AsyncBreaker("unsendable", None, fail_max=1)
    hop = Hop("upstream", client, breaker, first_byte_timeout=1.0, total_timeout=1.0)
    for url, headers in [("/v1/a\x01b", {}), ("/v1/x", {"user-agent": "é"})]:
        with pytest.raises(ApiError) as refused:
            await hop.open("GET", url, headers=headers, retry_ok=True)
        assert refused.value.status == 400
    assert sent == [] and breaker.state == "closed"
    assert (await hop.open("GET", "/v1/x")).status_code == 200 and len(sent) == 1
    await client.aclose()


@pytest.mark.parametrize(("path", "code"), [
    ("/v1/conversations/a b", "conversation_not_found"),
    ("/v1/conversations/ключ/messages", "conversation_not_found"),
    ("/v1/models/x/../m", "model_not_found"), ("/v1/keys/nope/rotate", "key_not_found"),
    ("/v1/users/usr_1?x", "user_not_found"), ("/v1/plans/A", "plan_not_found"),
])
def test_a_public_path_whose_id_matches_no_pattern_is_its_404(path, code):
    with pytest.raises(ApiError) as refused:
        check_path_ids(path)
    assert refused.value.status == 404 and refused.value.body.error.code == code


@pytest.mark.parametrize("path", ["/v1/conversations/conv_0a1b", "/v1/conversations/conv_0a1b/messages", "/v1/models",
                                  "/v1/models/Qwen/Qwen2.5-0.5B", "/v1/keys/0123456789abcdef/rotate", "/v1/users/me",
                                  "/v1/users/usr_admin/disable", "/v1/plans/default", "/v1/chat/completions"])
def test_public_paths_with_valid_ids_pass(path):
    check_path_ids(path)
