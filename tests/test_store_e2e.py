"""A store app in many tenants, end to end: the real broker, the relay in-process serving its event URL, the
sandbox in its own process as the referee (its arrival times must not be the relay's event loop's).

The relay starts with no app_ticket anywhere: it asks for a resend, the sandbox pushes the ticket to the relay's
event URL, the inbound side publishes it to the tickets topic, and the outbound side reads it from there. Then
every tenant's backlog goes at that tenant's own quota, all in parallel, none throttled; one tenant's token is
invalidated mid-run and refreshed once, for that tenant only; a relay started afterwards finds the ticket in
the topic at once.

Feishu time runs at ``SCALE`` (0.1: windows 10x longer than Feishu's) so that 50 tenants at their quota (50 x
16.25 calls per Feishu second) are ~80 calls per real second, which a shared 2-core machine can referee, and a
stall of a few real seconds (a loaded broker, a busy machine) is made good by each bucket's burst.
"""

from __future__ import annotations

import socket
from collections import defaultdict
from typing import Any

import aiohttp
import msgspec
import pytest

from relay.kafka import make_producer
from relay.tickets import KafkaTickets
from tests.relaykit import Collector, SandboxProcess, config_data, produce, relay_in_process, to_config

pytestmark = pytest.mark.integration

SCALE = 0.1
TENANTS = 50
STORE_ID, STORE_SECRET, VERIFY = "cli_store", "store-secret", "store-verification-token"
QUOTA = 1000 / 60  # message.send per tenant: 1000 per minute (50 per second), per Feishu second
WINDOW = 8.0  # Feishu seconds over which each tenant's rate is measured, all tenants at once
BACKLOG = 240  # per tenant: its burst plus 16.25/s through the wait for every tenant and the window, with room


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def send(tenant: str, i: int) -> dict[str, Any]:
    return {"kind": "message.send", "id": f"{tenant}-{i}", "app": "shop", "tenant_key": tenant,
            "receive_id_type": "chat_id", "receive_id": f"oc_{tenant}_{i}", "msg_type": "text",
            "content": {"text": str(i)}}


async def control(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/_sandbox/control", json=body) as resp:
            assert resp.status == 200
        async with http.get(f"{url}/_sandbox/stats") as resp:
            stats: dict[str, Any] = await resp.json()
            return stats


async def test_fifty_tenants_each_at_its_own_quota_with_a_resent_ticket_and_a_refreshed_token(
        kafka_bootstrap: str, topic_prefix: str) -> None:
    port = free_port()
    tenants = [f"tenant{n:02d}" for n in range(TENANTS)]
    box = SandboxProcess(time_scale=SCALE, log_bodies=False, ticket_interval=0, store_apps={STORE_ID: {
        "app_secret": STORE_SECRET, "ticket_url": f"http://127.0.0.1:{port}/feishu/events/shop",
        "verification_token": VERIFY, "tenants": tenants}})
    await box.start()
    try:
        # limit_jitter is real seconds, not scaled by time_scale: at SCALE 0.1 the default 0.15 s would be 0.015
        # Feishu seconds of slack for arrival-time variance (here: the referee's own process lagging on a loaded
        # machine); its most, 1 s, is 0.1 Feishu seconds, closer to what the default gives at time scale 1
        data = config_data(kafka_bootstrap, topic_prefix, box.url, time_scale=SCALE,
                           feishu={"limit_jitter": 1.0},
                           http={"enabled": True, "port": port},
                           kafka={"app_tickets_topic": f"{topic_prefix}.app-tickets"})
        data["apps"].append({"name": "shop", "type": "store", "app_id": STORE_ID, "app_secret": STORE_SECRET,
                             "verification_token": VERIFY})
        config = to_config(data)
        # round-robin over the tenants, as a fan-out producer writes them: every partition holds all tenants
        intents = [send(tenant, i) for i in range(BACKLOG) for tenant in tenants]
        async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results:
            await produce(kafka_bootstrap, config.kafka.intents_topics[0], intents)
            expired = tenants[len(tenants) // 3]
            # late in the run (after the window the rates are measured in): one tenant's token stops working
            await results.wait_for(int(len(intents) * 0.85), timeout=400, what="results")
            stats = await control(box.url, {"expire_tenant_tokens": [{"app_id": STORE_ID, "tenant_key": expired}]})
            await results.wait_for(len(intents), timeout=200, what="results")
        calls = await box.calls()
    finally:
        await box.stop()

    by_id = results.by_id()
    assert all(len(found) == 1 for found in by_id.values())
    assert {found[0]["status"] for found in by_id.values()} == {"ok"}
    assert all(found[0]["tenant_key"] == found[0]["id"].rsplit("-", 1)[0] for found in by_id.values())

    violations = [(c.tenant_key, round(c.at * SCALE, 2), c.violation) for c in calls if c.violation]
    assert violations == [] and [c for c in calls if c.throttled] == []
    # the missing ticket: one resend, one push answered 200 by the relay, one app token for every tenant
    assert stats["app_ticket_resends"] == 1 and [status for _, status in stats["app_ticket_pushes"]] == [200]
    assert [c.code for c in calls if c.api == "auth.app_access_token"] == [0]
    token_requests: dict[str | None, int] = defaultdict(int)
    for call in calls:
        if call.api == "auth.tenant_access_token":
            token_requests[call.tenant_key] += 1
    assert token_requests == {tenant: 2 if tenant == expired else 1 for tenant in tenants}
    stale = [c for c in calls if c.api == "message.send" and c.code == 99991663]
    retried = {found[0]["tenant_key"] for found in by_id.values() if found[0]["attempts"] == 2}
    assert stale and retried == {expired}  # the calls in flight on the invalidated token, each retried once
    assert sum(found[0]["attempts"] for found in by_id.values()) == len(intents) + len(stale)

    # every tenant at >= 0.95 of its own quota, all in the same window of Feishu time
    sent: dict[str, list[float]] = defaultdict(list)
    for call in calls:
        if call.api == "message.send" and call.code == 0:
            assert call.tenant_key is not None
            sent[call.tenant_key].append(call.at * SCALE)
    start = max(min(times) for times in sent.values()) + 2.0  # every tenant's burst spent
    rates = {tenant: sum(1 for t in times if start <= t < start + WINDOW) / WINDOW for tenant, times in sent.items()}
    assert all(max(times) >= start + WINDOW for times in sent.values()), "a backlog ran out inside the window"
    slow = {tenant: round(rate / QUOTA, 3) for tenant, rate in rates.items() if rate < 0.95 * QUOTA}
    print(f"store e2e: {len(rates)} tenants, share of quota min {min(rates.values()) / QUOTA:.3f} "
          f"max {max(rates.values()) / QUOTA:.3f}, {len(stale)} calls on the invalidated token")
    assert not slow, f"tenants under 0.95 of their quota: {slow}"

    # a relay started now finds the ticket in the topic without waiting for Feishu's next push
    producer = make_producer(config.kafka)
    await producer.start()
    tickets = KafkaTickets(config.kafka, producer)
    try:
        tail = await tickets.start()
        assert tickets.get(STORE_ID) is not None and not tail.done()
    finally:
        await tickets.stop()
        await producer.stop()
    assert msgspec.json.encode(sorted(sent)) == msgspec.json.encode(sorted(tenants))
