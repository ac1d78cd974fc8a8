"""Schemathesis over the edge's OpenAPI document: no 5xx, and every 4xx an OpenAI-style JSON error.

Every public operation is fuzzed with valid and with invalid data (a few examples each, a fixed seed,
a time bound), once with an admin key and once with a user key. Both belong to users made for the run
(on a plan of their own), so nothing the fuzzer does can lock out the stack's admin or demo user:
there is no stateful phase (it would feed real ids from one answer into the next request), and the
model registry, which every user sees, is only sent invalid writes; a model registered all the same
is disabled at the end.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import Case, GenerationMode

from stack.credentials import Credentials

EXAMPLES = 5  # per operation, key and mode: ~400 requests in all
FUZZ_SEED = 23
TIME_BUDGET = 90.0  # seconds of fuzzing; passes not begun by then are skipped (and named)
HEALTHY_WITHIN = 30.0
MODEL_WRITES = {"POST /v1/models", "PATCH /v1/models/{model_id}", "DELETE /v1/models/{model_id}"}
ERROR_FIELDS = {"message", "type", "param", "code"}


def _controls(value: object) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in str(value))


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


@dataclass
class Findings:
    requests: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (operation, what)
    fuzzed: set[str] = field(default_factory=set)  # operations
    not_reached: list[str] = field(default_factory=list)


def _content_type(response) -> str:
    return (response.headers.get("content-type") or [""])[0]  # Schemathesis: name -> list of values


def _is_openai_error(response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (_content_type(response).startswith("application/json")
            and isinstance(error, dict) and set(error) >= ERROR_FIELDS and isinstance(error["message"], str))


def _wait_healthy(http: httpx.Client, headers: dict[str, str]) -> None:
    """Until both domains answer unflagged (a breaker opened by a 5xx closes again within seconds)."""
    deadline = time.monotonic() + HEALTHY_WITHIN
    while True:
        answers = [http.get(path, headers=headers) for path in ("/v1/models", "/v1/users/me")]
        if all(a.status_code == 200 and "x-dualgate-degraded" not in a.headers for a in answers):
            return
        assert time.monotonic() < deadline, f"the stack is not healthy again: {[a.text[:200] for a in answers]}"
        time.sleep(0.2)


def _fuzz(schema, base_url: str, keys: dict[str, str], http: httpx.Client) -> Findings:
    findings = Findings()
    deadline = time.monotonic() + TIME_BUDGET

    def check(case: Case, who: str, key: str) -> None:
        headers = {"authorization": f"Bearer {key}"}
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        findings.requests += 1
        if response.status_code >= 500 and "x-dualgate-degraded" in response.headers:
            # a flagged outage may be a breaker another case opened: the same request again, once healthy
            _wait_healthy(http, headers)
            response = case.call(base_url=base_url, headers=headers, timeout=30)
            findings.requests += 1
        if response.status_code >= 500:
            what = f"{response.status_code}: {response.text[:300]}"
        elif response.status_code >= 400 and not _is_openai_error(response):
            what = f"{response.status_code} not an OpenAI error: {_content_type(response)} {response.text[:200]}"
        else:
            return
        findings.failures.append((case.operation.label, f"as {who}: {what}\n  {case.as_curl_command()}"))

    operations = [result.ok() for result in schema.get_all_operations()]
    # pass by pass over every operation, invalid data first: a slow machine that runs out of time
    # still covers each operation, and the passes it did not reach are named
    for mode, who in ((GenerationMode.NEGATIVE, "user"), (GenerationMode.NEGATIVE, "admin"),
                      (GenerationMode.POSITIVE, "user"), (GenerationMode.POSITIVE, "admin")):
        for operation in operations:
            if who == "admin" and mode is GenerationMode.POSITIVE and operation.label in MODEL_WRITES:
                continue  # a model registered or disabled by the fuzzer would change every user's models
            if time.monotonic() > deadline:
                findings.not_reached.append(f"{operation.label} as {who} ({mode.value})")
                continue
            findings.fuzzed.add(operation.label)

            @seed(FUZZ_SEED)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Case) -> None:
                check(case, who, keys[who])  # run() is called at once: this pass's `who`

            run()
    return findings


@contextmanager
def fuzz_principals(http: httpx.Client, admin: dict[str, str]) -> Iterator[dict[str, str]]:
    """An admin and a user of the fuzzer's own, on their own plan; any model it registered is disabled."""
    models_before = {m["id"] for m in http.get("/v1/models", headers=admin).json()["data"]}
    plan = f"fuzz-{uuid.uuid4().hex[:8]}"
    created = http.post("/v1/plans", headers=admin, json={
        "name": plan, "requests_per_min": 100_000, "tokens_per_day": 1_000_000, "max_tokens": 16})
    assert created.status_code == 201, created.text
    keys = {}
    for who, scopes in (("admin", ["user", "admin"]), ("user", ["user"])):
        user = http.post("/v1/users", headers=admin, json={"name": f"fuzz-{who}", "plan": plan})
        assert user.status_code == 201, user.text
        key = http.post("/v1/keys", headers=admin,
                        json={"name": "fuzz", "user_id": user.json()["id"], "scopes": scopes})
        assert key.status_code == 201, key.text
        keys[who] = key.json()["key"]
    try:
        yield keys
    finally:
        _wait_healthy(http, admin)
        for model in http.get("/v1/models", headers=admin).json()["data"]:
            if model["id"] not in models_before:
                http.delete(f"/v1/models/{model['id']}", headers=admin)


def test_fuzzing_the_edge_finds_no_5xx_and_only_openai_errors(base_url: str, creds: Credentials):
    admin = {"authorization": f"Bearer {creds.admin_key}"}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        document = http.get("/schema/openapi.json")
        assert document.status_code == 200
        schema = schemathesis.openapi.from_dict(document.json())
        with fuzz_principals(http, admin) as keys:
            findings = _fuzz(schema, base_url, keys, http)
        # the stack's own admin and demo user still work
        assert http.get("/v1/users/me", headers=admin).status_code == 200
        demo = http.get("/v1/models", headers={"authorization": f"Bearer {creds.demo_key}"})
        assert demo.status_code == 200 and "x-dualgate-degraded" not in demo.headers
    assert findings.requests >= 200, findings
    assert findings.fuzzed == {result.ok().label for result in schema.get_all_operations()}, findings.not_reached
    if findings.not_reached:  # a slow machine: every operation was fuzzed, not every pass
        print(f"not fuzzed within {TIME_BUDGET:.0f}s: {findings.not_reached}")
    assert not findings.failures, "\n".join(f"{operation} {what}" for operation, what in findings.failures)


def test_the_fuzzer_reads_the_committed_document_whole():
    """Every operation of the document loads into Schemathesis (a broken schema would fuzz nothing)."""
    from common.openapi import PUBLIC_DOCUMENT

    schema = schemathesis.openapi.from_dict(json.loads(PUBLIC_DOCUMENT.read_text()))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(item) for item in json.loads(PUBLIC_DOCUMENT.read_text())["paths"].values())
