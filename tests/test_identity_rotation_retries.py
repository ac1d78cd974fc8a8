"""Key rotation never shortens a grace window it promised (issue 23): two rotations in quick succession
keep the first secret working until the end its rotation's answer named, on every gateway, and a retried
rotation (the same Idempotency-Key) gets the first answer back without rotating again."""

from __future__ import annotations

import time
import uuid

import msgspec
from identity_support import bearer
from support import eventually, new_key, new_user

from common.contracts import AuthChange, KeyPrincipal
from gateway.authn import Verdict, judge


def gateway_urls(stack) -> list[str]:
    return ["/v1/users/me", f"{stack.config.url('gateway-identity')}/v1/users/me",
            f"{stack.config.url('gateway-ai')}/v1/models"]


async def codes(http, stack, key: str) -> list[int]:
    return [(await http.get(url, headers=bearer(key))).status_code for url in gateway_urls(stack)]


async def test_two_rotations_in_quick_succession_keep_the_first_secret_for_its_promised_grace(
        http, admin_headers, stack):
    user_id = await new_user(http, admin_headers, plan="unlimited")  # polled as fast as it goes
    original, key_id = await new_key(http, admin_headers, user_id)
    assert await codes(http, stack, original) == [200, 200, 200]  # cached on both gateways

    grace = 6
    first = await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": grace}, headers=admin_headers)
    promised = first.json()["previous_secret_expires_at"]
    second = await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": 600}, headers=admin_headers)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json()["rotations"] == 2
    assert second.json()["previous_secret_expires_at"] >= int(time.time()) + 590

    # every secret works until the end its rotation promised: the original one too
    checks = 0
    while time.time() < promised - 1.0:
        for key in (original, first.json()["key"], second.json()["key"]):
            assert await codes(http, stack, key) == [200, 200, 200], (checks, key == original)
        checks += 1
    assert checks >= 2

    async def original_refused_everywhere() -> bool:
        return await codes(http, stack, original) == [401, 401, 401]

    # and not longer: the second rotation's 600 s are the first's new secret's, not the original's
    await eventually(original_refused_everywhere, timeout=promised + 3.0 - time.time(), what="original refused")
    assert await codes(http, stack, first.json()["key"]) == [200, 200, 200]
    assert await codes(http, stack, second.json()["key"]) == [200, 200, 200]


async def test_a_retried_rotation_returns_the_first_answer_and_rotates_nothing(http, admin_headers, stack):
    user_id = await new_user(http, admin_headers, plan="unlimited")
    original, key_id = await new_key(http, admin_headers, user_id)
    retry = {**admin_headers, "idempotency-key": f"rotate-{uuid.uuid4().hex}"}

    first = await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": 600}, headers=retry)
    again = await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": 600}, headers=retry)
    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert again.json() == first.json()  # the same new secret, generation and grace
    assert again.headers.get("x-dualgate-idempotent-replay") == "true"
    assert first.json()["rotations"] == 1
    assert (await http.get(f"/v1/keys/{key_id}", headers=admin_headers)).json()["rotations"] == 1
    assert await codes(http, stack, first.json()["key"]) == [200, 200, 200]
    assert await codes(http, stack, original) == [200, 200, 200]

    # the same Idempotency-Key with another request is refused, and rotates nothing either
    other = await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": 5}, headers=retry)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    # a new Idempotency-Key is a new rotation (here by the key's owner); both earlier secrets keep their 600 s
    later = await http.post(f"/v1/keys/{key_id}/rotate", json={"grace_seconds": 600},
                            headers={**bearer(first.json()["key"]), "idempotency-key": f"rotate-{uuid.uuid4().hex}"})
    assert later.status_code == 200 and later.json()["rotations"] == 2
    for key in (original, first.json()["key"], later.json()["key"]):
        assert await codes(http, stack, key) == [200, 200, 200]


def test_a_cached_secret_older_than_the_previous_lives_out_its_own_grace():
    now = time.time()
    cached = KeyPrincipal(user_id="u", key_id="k" * 16, scopes=["user"], generation=0)

    def marker(older: dict[int, float]) -> dict[str, AuthChange]:
        change = AuthChange(kind="key_rotated", key_id="k" * 16, generation=2, grace_until=now + 600,
                            older_grace=older)
        # as gateways read it back from Redis
        return {f"rotated:{'k' * 16}": msgspec.json.decode(msgspec.json.encode(change), type=AuthChange)}

    assert judge(cached, now - 5, marker({0: now + 10}), now) is Verdict.ADMIT
    assert judge(cached, now - 5, marker({0: now - 1}), now) is Verdict.REJECT
    assert judge(cached, now - 5, marker({}), now) is Verdict.REJECT
    previous = msgspec.structs.replace(cached, generation=1)
    assert judge(previous, now - 5, marker({}), now) is Verdict.ADMIT
