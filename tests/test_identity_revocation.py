"""A revoked key fails on every gateway within one second: both domain gateways (each with the key
cached) and the fallback gateway's snapshot authenticator, also when the auth-change subscription
has dropped or Redis is frozen. Cached auth keeps known keys working while Redis or the auth
service is down, and never lets a revoked one through."""

from __future__ import annotations

import asyncio
import hashlib
import time

import httpx
import msgspec
import pytest
from identity_support import bearer, paused, redis_client, stack_tokens
from support import eventually, new_key, new_user

from common.contracts import AUTH_SNAPSHOT
from common.errors import ApiError
from gateway.authn import KeyAuthenticator, SnapshotAuthenticator, seal_entry, unseal_entry
from stack.local import LocalStack

DEADLINE = 1.0


@pytest.fixture
async def snapshot_auth(stack: LocalStack):
    """The fallback gateway's authenticator, wired as the fallback gateway wires it."""
    redis = redis_client(stack)
    auth = httpx.AsyncClient(base_url=stack.config.url("auth"), timeout=2)
    authenticator = SnapshotAuthenticator(redis, stack_tokens(stack, "gateway-fallback"), auth_client=auth)
    await authenticator.start()
    await eventually(lambda: _true(authenticator.feed.subscribed), timeout=5, what="snapshot feed subscribed")
    yield authenticator
    await authenticator.stop()
    await auth.aclose()
    await redis.aclose()


async def _true(value: bool) -> bool:
    return value


def _gateway_probes(stack: LocalStack, http: httpx.AsyncClient, snapshot: SnapshotAuthenticator):
    identity = f"{stack.config.url('gateway-identity')}/v1/users/me"
    ai = f"{stack.config.url('gateway-ai')}/v1/models"

    async def snapshot_status(key: str) -> int:
        try:
            await snapshot.authenticate_token(key)
            return 200
        except ApiError as err:
            return err.status

    return {
        "gateway-identity": lambda key: _status(http, identity, key),
        "gateway-ai": lambda key: _status(http, ai, key),
        "gateway-fallback (snapshot)": snapshot_status,
    }


async def _status(http: httpx.AsyncClient, url: str, key: str) -> int:
    return (await http.get(url, headers=bearer(key), timeout=5)).status_code


async def _seconds_until_refused(probe, key: str, since: float, timeout: float = 5.0) -> float:
    while True:
        if await probe(key) == 401:
            return time.monotonic() - since
        if time.monotonic() - since > timeout:
            return float("inf")
        await asyncio.sleep(0.01)


async def _revoke_and_measure(http, admin_headers, probes, key: str, key_id: str) -> dict[str, float]:
    sent = time.monotonic()
    resp = await http.delete(f"/v1/keys/{key_id}", headers=admin_headers)
    assert resp.status_code == 200
    revoked = time.monotonic()
    names = list(probes)
    delays = await asyncio.gather(*(_seconds_until_refused(probes[name], key, revoked) for name in names))
    print(f"revocation answered in {revoked - sent:.3f}s; refused after",
          {name: round(delay, 3) for name, delay in zip(names, delays)})
    return dict(zip(names, delays))


async def _warm(probes, key: str) -> None:
    for name, probe in probes.items():
        assert await probe(key) == 200, name


async def test_a_revoked_key_fails_on_every_gateway_within_one_second(http, admin_headers, stack, snapshot_auth):
    key, key_id = await new_key(http, admin_headers, await new_user(http, admin_headers))
    probes = _gateway_probes(stack, http, snapshot_auth)
    await _warm(probes, key)
    delays = await _revoke_and_measure(http, admin_headers, probes, key, key_id)
    assert all(delay < DEADLINE for delay in delays.values()), delays


async def test_revocation_still_lands_within_one_second_when_subscriptions_drop(
        http, admin_headers, stack, snapshot_auth):
    key, key_id = await new_key(http, admin_headers, await new_user(http, admin_headers))
    probes = _gateway_probes(stack, http, snapshot_auth)
    await _warm(probes, key)
    redis = redis_client(stack)
    try:
        killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 3  # both domain gateways and the snapshot authenticator were listening
        delays = await _revoke_and_measure(http, admin_headers, probes, key, key_id)
    finally:
        await redis.aclose()
    assert all(delay < DEADLINE for delay in delays.values()), delays


async def test_revocation_lands_within_one_second_while_redis_is_frozen(http, admin_headers, stack, snapshot_auth):
    key, key_id = await new_key(http, admin_headers, await new_user(http, admin_headers))
    token = (await http.post("/v1/auth/token", headers=bearer(key))).json()["access_token"]
    probes = _gateway_probes(stack, http, snapshot_auth)
    await _warm(probes, key)
    await _warm(probes, token)
    with paused(stack, "redis"):
        assert (await http.delete(f"/v1/keys/{key_id}", headers=admin_headers)).status_code == 200
        revoked = time.monotonic()
        # the key, and its JWT: gateways verify that locally, against markers polled from the auth service
        checks = [(name, what, credential) for name in probes for what, credential in (("key", key), ("jwt", token))]
        delays = dict(zip([(name, what) for name, what, _ in checks], await asyncio.gather(
            *(_seconds_until_refused(probes[name], credential, revoked) for name, _, credential in checks))))
    print("with redis frozen, refused after", {k: round(v, 3) for k, v in delays.items()})
    assert all(delay < DEADLINE for delay in delays.values()), delays
    # once Redis is back the markers are re-seeded and the key stays refused everywhere
    await eventually(lambda: _true(snapshot_auth.feed.subscribed), timeout=10, what="resubscribed")
    for name, probe in probes.items():
        assert await probe(key) == 401, name


async def test_a_disabled_user_fails_on_every_gateway_within_one_second(http, admin_headers, stack, snapshot_auth):
    user_id = await new_user(http, admin_headers)
    key, _ = await new_key(http, admin_headers, user_id)
    probes = _gateway_probes(stack, http, snapshot_auth)
    await _warm(probes, key)
    assert (await http.post(f"/v1/users/{user_id}/disable", headers=admin_headers)).status_code == 200
    disabled = time.monotonic()
    delays = await asyncio.gather(*(_seconds_until_refused(p, key, disabled) for p in probes.values()))
    assert all(delay < DEADLINE for delay in delays), delays
    # enabling the user lets the key in again
    assert (await http.post(f"/v1/users/{user_id}/enable", headers=admin_headers)).status_code == 200
    await eventually(lambda: _all_ok(probes, key), timeout=2, what="key accepted again")


async def _all_ok(probes, key: str) -> bool:
    return all([await probe(key) == 200 for probe in probes.values()])


async def test_the_snapshot_authenticator_serves_from_memory_while_redis_is_down(
        http, admin_headers, stack):
    """The fallback gateway without Redis and without asking the auth service: its memory is enough."""
    key, key_id = await new_key(http, admin_headers, await new_user(http, admin_headers))
    stranger, _ = await new_key(http, admin_headers, await new_user(http, admin_headers))
    assert (await http.get("/v1/users/me", headers=bearer(key))).status_code == 200  # a gateway snapshots it
    redis = redis_client(stack)
    # no auth client: the snapshot is all it has
    authenticator = SnapshotAuthenticator(redis, stack_tokens(stack, "gateway-fallback"), sync_seconds=3600)
    await authenticator.start()
    try:
        await eventually(lambda: _true(authenticator.feed.subscribed), timeout=5, what="subscribed")
        await authenticator.sync()
        with paused(stack, "redis"):
            await eventually(lambda: _true(not authenticator.feed.subscribed), timeout=3, what="drop noticed")
            identity = await authenticator.authenticate_token(key)
            assert identity.principal.key_id == key_id
            with pytest.raises(ApiError) as refused:  # never snapshotted: unknown here
                await authenticator.authenticate_token(stranger)
            assert refused.value.status == 401
    finally:
        await authenticator.stop()
        await redis.aclose()


async def test_with_the_auth_service_down_known_keys_keep_working_and_revoked_ones_do_not(
        http, admin_headers, stack):
    user_id = await new_user(http, admin_headers)
    known, known_id = await new_key(http, admin_headers, user_id)
    revoked, revoked_id = await new_key(http, admin_headers, user_id)
    never_seen, _ = await new_key(http, admin_headers, user_id)
    identity_gw = f"{stack.config.url('gateway-identity')}/v1/users/me"
    ai_gw = f"{stack.config.url('gateway-ai')}/v1/models"
    redis = redis_client(stack)
    tokens = stack_tokens(stack, "gateway-identity")

    async def snapshotted(key: str):
        # a gateway writes the snapshot when it introspects while subscribed (it may still be
        # resubscribing after an earlier test froze Redis)
        assert await _status(http, identity_gw, key) == 200
        return unseal_entry(tokens, await redis.hget(AUTH_SNAPSHOT, hashlib.sha256(key.encode()).hexdigest()))

    entry = await eventually(lambda: snapshotted(known), timeout=10, interval=0.3, what="known key snapshotted")
    assert entry.principal.key_id == known_id
    await eventually(lambda: snapshotted(revoked), timeout=10, interval=0.3, what="revoked key snapshotted")
    assert (await http.delete(f"/v1/keys/{revoked_id}", headers=admin_headers)).status_code == 200
    # the snapshot entry is five minutes old: no gateway trusts it without asking, unless it cannot ask
    digest = hashlib.sha256(known.encode()).hexdigest()
    aged = msgspec.structs.replace(entry, cached_at=time.time() - 300)
    await redis.hset(AUTH_SNAPSHOT, digest, seal_entry(tokens, aged))
    await redis.aclose()

    stack.supervisor.stop("auth")
    try:
        assert await _status(http, ai_gw, known) == 200  # never seen by this gateway; the snapshot vouches
        assert await _status(http, ai_gw, revoked) == 401
        unseen = await http.get(ai_gw, headers=bearer(never_seen))
        assert unseen.status_code == 503 and unseen.json()["error"]["code"] == "auth_unavailable"
        create = await http.post("/v1/keys", json={"name": "x", "user_id": user_id}, headers=admin_headers)
        assert create.status_code == 503
    finally:
        stack.supervisor.start("auth")
        await asyncio.to_thread(stack.wait_ready, ("auth",), 60)
    assert await _status(http, ai_gw, never_seen) == 200


async def test_with_auth_unreachable_a_gateway_keeps_a_key_it_checked_even_when_redis_lost_its_entry(
        http, admin_headers, stack):
    """The shared snapshot is one copy; the gateway's own memory is the other (docs/DESIGN.md §4)."""
    user_id = await new_user(http, admin_headers)
    key, key_id = await new_key(http, admin_headers, user_id)
    redis = redis_client(stack)
    auth = httpx.AsyncClient(base_url=stack.config.url("auth"), timeout=2)
    authenticator = KeyAuthenticator(auth, stack_tokens(stack, "gateway-ai"), "gateway-ai", redis, cache_seconds=0.2)
    await authenticator.start()
    try:
        await eventually(lambda: _true(authenticator._subscribed), timeout=5, what="subscribed")
        assert (await authenticator.authenticate_token(key)).principal.key_id == key_id
        digest = hashlib.sha256(key.encode())
        await redis.hdel(AUTH_SNAPSHOT, digest.hexdigest())  # the shared copy is gone
        authenticator.client = httpx.AsyncClient(base_url="http://127.0.0.1:1", timeout=0.5)  # auth unreachable
        cached = authenticator._cache[digest.digest()]
        await eventually(lambda: _true(time.monotonic() - cached.stored > 0.2), timeout=2, what="cache lifetime over")
        assert (await authenticator.authenticate_token(key)).principal.key_id == key_id
        # a key this gateway never saw is not admitted: 503 (it cannot ask), never a guess
        stranger, _ = await new_key(http, admin_headers, user_id)
        with pytest.raises(ApiError) as refused:
            await authenticator.authenticate_token(stranger)
        assert refused.value.status == 503
    finally:
        await authenticator.client.aclose()
        await auth.aclose()
        await authenticator.stop()
        await redis.aclose()


async def test_the_fallback_gateway_answers_a_key_it_cannot_verify_with_a_flagged_503_never_401(
        http, admin_headers, stack):
    """While the auth service is unreachable a good key may simply be unknown here: never admitted,
    never called invalid."""
    key, _ = await new_key(http, admin_headers, await new_user(http, admin_headers))
    redis = redis_client(stack)
    unreachable = httpx.AsyncClient(base_url="http://127.0.0.1:1", timeout=0.5)
    authenticator = SnapshotAuthenticator(redis, stack_tokens(stack, "gateway-fallback"), auth_client=unreachable,
                                          sync_seconds=3600)
    await authenticator.start()
    try:
        await eventually(lambda: _true(authenticator.feed.subscribed), timeout=5, what="subscribed")
        with pytest.raises(ApiError) as refused:
            await authenticator.authenticate_token(key)  # never used, so in no snapshot
        assert refused.value.status == 503
        assert refused.value.headers["x-dualgate-degraded"] == "degraded"
        assert int(refused.value.headers["Retry-After"]) >= 1
    finally:
        await authenticator.stop()
        await unreachable.aclose()
        await redis.aclose()
