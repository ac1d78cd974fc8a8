"""The usage ledger (usage.events.v1 -> Postgres) and the audit log (audit.events.v1 -> Postgres):
redelivery counts once, poison goes to the DLQ without stopping the consumer, audit rows name the
actor and the request."""

from __future__ import annotations

import time
import uuid

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from identity_support import bearer
from kafka_support import produce
from support import eventually, new_key, new_user

from common.contracts import USAGE_TOPIC, UsageEvent
from stack.local import LocalStack

DLQ = f"{USAGE_TOPIC}.dlq"


@pytest.fixture
async def producer(stack: LocalStack):
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{stack.config.port('kafka')}", acks="all",
                                enable_idempotence=False)
    await producer.start()
    yield producer
    await producer.stop()


def _event(user_id: str, prompt: int, completion: int, **override) -> UsageEvent:
    fields = dict(event_id=uuid.uuid4().hex, user_id=user_id, key_id=None, model="synthetic", prompt_tokens=prompt,
                  completion_tokens=completion, created=time.time())
    fields.update(override)
    return UsageEvent(**fields)


async def _publish(producer: AIOKafkaProducer, user_id: str, value: bytes) -> None:
    await produce(producer, USAGE_TOPIC, user_id, value)


async def _used(http, admin_headers, user_id: str) -> int:
    resp = await http.get("/v1/usage", params={"user_id": user_id}, headers=admin_headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["used_tokens"]


async def test_the_same_usage_event_delivered_twice_counts_once(http, admin_headers, producer):
    user_id = await new_user(http, admin_headers)
    key, _ = await new_key(http, admin_headers, user_id)
    event = msgspec.json.encode(_event(user_id, 10, 5))
    await _publish(producer, user_id, event)
    await _publish(producer, user_id, event)  # redelivered
    # a later event on the same partition: once it counts, the duplicate has been processed too
    await _publish(producer, user_id, msgspec.json.encode(_event(user_id, 1, 0)))
    await eventually(lambda: _at(http, admin_headers, user_id, 16), timeout=30, interval=0.2, what="ledger caught up")
    usage = (await http.get("/v1/usage", headers=bearer(key))).json()
    assert (usage["used_tokens"], usage["requests"]) == (16, 2)
    assert usage["remaining_tokens"] == usage["tokens_per_day"] - 16


async def _at(http, admin_headers, user_id: str, expected: int) -> bool:
    used = await _used(http, admin_headers, user_id)
    assert used <= expected, f"counted {used}, more than the {expected} tokens sent"
    return used == expected


async def test_poison_usage_events_go_to_the_dlq_and_the_ledger_keeps_going(http, admin_headers, producer, stack):
    user_id = await new_user(http, admin_headers)
    marker = uuid.uuid4().hex
    unreadable = f"not json {marker}".encode()
    # readable, but the database refuses it for its content (NUL in text): no retry, straight to the DLQ
    refused = msgspec.json.encode(_event(f"usr_{marker}\u0000", 1, 1, event_id=f"nul-{marker}"))
    negative = msgspec.json.encode(_event(user_id, -5, 1, event_id=f"neg-{marker}"))
    for value in (unreadable, refused, negative):
        await _publish(producer, user_id, value)
    await _publish(producer, user_id, msgspec.json.encode(_event(user_id, 7, 0)))
    await eventually(lambda: _at(http, admin_headers, user_id, 7), timeout=30, interval=0.2,
                     what="the event after the poison counted")

    consumer = AIOKafkaConsumer(bootstrap_servers=f"127.0.0.1:{stack.config.port('kafka')}", group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # loads the metadata that names the DLQ's partitions
        partitions = consumer.partitions_for_topic(DLQ) or {0}
        consumer.assign([TopicPartition(DLQ, p) for p in partitions])
        await consumer.seek_to_beginning()
        found: list[bytes] = []

        async def all_three() -> bool:
            batches = await consumer.getmany(timeout_ms=200)
            found.extend(r.value for records in batches.values() for r in records if marker.encode() in r.value)
            return len(found) >= 3

        await eventually(all_three, timeout=20, interval=0.05, what="poison in the DLQ")
    finally:
        await consumer.stop()
    assert set(found) == {unreadable, refused, negative}


async def test_audit_rows_name_the_actor_and_the_request(http, admin_headers):
    request_id = f"audit-{uuid.uuid4().hex}"
    headers = {**admin_headers, "x-request-id": request_id}
    user = await http.post("/v1/users", json={"name": "audited"}, headers=headers)
    user_id = user.json()["id"]
    key = await http.post("/v1/keys", json={"name": "a", "user_id": user_id}, headers=headers)
    key_id = key.json()["id"]
    await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": 0}, headers=headers)
    await http.post("/v1/auth/token", headers=headers)
    await http.post(f"/v1/users/{user_id}/disable", headers=headers)
    await http.delete(f"/v1/keys/{key_id}", headers=headers)
    failed_id = f"audit-fail-{uuid.uuid4().hex}"
    await http.get("/v1/users/me", headers={**bearer(f"dg-{key_id}-wrongsecret"), "x-request-id": failed_id})

    async def recorded() -> list[dict] | None:
        resp = await http.get("/v1/auth/audit", params={"request_id": request_id}, headers=admin_headers)
        rows = resp.json()["data"]
        return rows if len(rows) >= 6 else None

    rows = await eventually(recorded, timeout=30, interval=0.3, what="audit rows")
    seen = {(r["action"], r["target"]) for r in rows}
    assert seen >= {("user.created", user_id), ("key.created", key_id), ("key.rotated", key_id),
                    ("user.disabled", user_id), ("key.revoked", key_id)}
    assert any(action == "token.issued" for action, _ in seen)
    assert {r["actor"] for r in rows} == {"usr_admin"} and {r["request_id"] for r in rows} == {request_id}

    async def failure_recorded() -> list[dict] | None:
        resp = await http.get("/v1/auth/audit", params={"request_id": failed_id}, headers=admin_headers)
        return resp.json()["data"] or None

    failure = (await eventually(failure_recorded, timeout=30, interval=0.3, what="auth failure audited"))[0]
    assert (failure["action"], failure["outcome"], failure["target"]) == ("auth.failed", "denied", key_id)
