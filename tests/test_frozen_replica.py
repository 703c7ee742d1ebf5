"""A replica frozen (SIGSTOP) past its session timeout, replaced by another, then woken (SIGCONT): against the
real broker and the sandbox, with both relays as real subprocesses.

The woken replica may have lost its partitions to the other one. It must make no Feishu call and write no result
for them (it abandons their jobs instead of draining them), then rejoin the group and work normally. The two
relays use different app credentials, both accepted by the sandbox, so its call log says which relay made each
call (the credentials are config; nothing in the relay knows it is being told apart).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from relay.sandbox import CallRecord, Sandbox, SandboxOptions
from tests.relaykit import Collector, RelayProcess, config_data, create_relay_topics, produce, to_config, to_toml

pytestmark = pytest.mark.integration

APPS = {"cli_frozen_a": "secret-a", "cli_frozen_b": "secret-b"}
A_ID, B_ID = APPS


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    # latency keeps calls in flight, so the freeze lands with work started and work waiting
    box = Sandbox(SandboxOptions(apps=APPS, latency=0.2))
    await box.start()
    yield box
    await box.stop()


def reactions(phase: str, n: int) -> list[dict[str, Any]]:
    """uuid-less intents, each on its own message: a reaction performed twice is visible at the sandbox."""
    return [{"kind": "reaction.add", "id": f"{phase}-{i}", "message_id": f"om_{phase}_{i}", "emoji_type": "SMILE"}
            for i in range(n)]


async def relay_for(tmp_path: Path, data: dict[str, Any], app_id: str, name: str) -> RelayProcess:
    data = {**data, "apps": [{"name": "default", "app_id": app_id, "app_secret": APPS[app_id]}]}
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(data))
    return RelayProcess(path, tmp_path / f"{name}.log")


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str, *relays: RelayProcess) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        for relay in relays:
            assert relay.proc is not None and relay.proc.returncode is None, f"a relay died:\n{relay.log_tail()}"
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_committed(bootstrap: str, group: str, topic: str, partitions: int, timeout: float) -> None:
    """Until the group's committed offsets reach the end of every partition of ``topic``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            ends = await consumer.end_offsets(tps)
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
            behind = {tp.partition: ends[tp] - (committed[tp].offset if tp in committed else 0) for tp in tps}
            if all(n <= 0 for n in behind.values()):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the group's commits did not reach the end: {behind}")
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()
        await admin.close()


def assigned_lines(relay: RelayProcess) -> list[str]:
    """The relay's "partitions assigned" log lines that name at least one partition."""
    text = relay.log_path.read_text(errors="replace") if relay.log_path.exists() else ""
    return [line for line in text.splitlines() if "partitions assigned:" in line and not line.endswith(": -")]


def performed(calls: list[CallRecord], message_id: str) -> list[CallRecord]:
    return [c for c in calls if c.api == "reaction.add" and c.status == 200 and c.code == 0
            and c.path.endswith(f"/{message_id}/reactions")]


async def test_a_replica_frozen_past_its_session_makes_no_call_for_the_partitions_it_lost(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url)
    await create_relay_topics(to_config(data))
    kafka = data["kafka"]
    topic, group = kafka["intents_topics"][0], kafka["group_id"]
    a = await relay_for(tmp_path, data, A_ID, "a")
    b = await relay_for(tmp_path, data, B_ID, "b")
    first, later = reactions("p1", 200), reactions("p3", 40)
    async with Collector(kafka_bootstrap, kafka["results_topic"]) as results:
        try:
            await a.start()
            await produce(kafka_bootstrap, topic, first)
            await wait_until(lambda: len(results.by_id()) >= 30, 90, "A's first 30 results", a)

            a.send(signal.SIGSTOP)
            frozen_at = time.monotonic()  # the sandbox's clock (it runs in this process)
            await asyncio.sleep(0.5)  # answers to A's calls in flight reach its socket while it is stopped
            a_before = {c.path for c in sandbox.calls if c.app_id == A_ID and c.api == "reaction.add"}
            assert len(a_before) < len(first), "A had finished the workload before the freeze: nothing to lose"

            await b.start()  # joins; the group waits for A until A's session times out, then B owns everything
            await results.wait_for(len(first), timeout=180, what="phase-1 results")
            await wait_committed(kafka_bootstrap, group, topic, kafka["topic_partitions"], timeout=60)
            assert assigned_lines(b), b.log_tail()

            rejoined = len(assigned_lines(a))
            woken_at, woken_ms = time.monotonic(), time.time() * 1000
            a.send(signal.SIGCONT)
            # A learns it is out, abandons its old partitions (the revoke runs before it joins again), rejoins
            await wait_until(lambda: len(assigned_lines(a)) > rejoined, 120, "A to rejoin the group", a, b)
            after_wake = [c for c in sandbox.calls if c.app_id == A_ID and c.at >= woken_at
                          and c.api != "auth.tenant_access_token"]
            assert not after_wake, (f"A made {len(after_wake)} Feishu calls after waking, e.g. "
                                    f"{[c.path for c in after_wake[:3]]}\n{a.log_tail()}")

            # both replicas work normally afterwards
            await produce(kafka_bootstrap, topic, later)
            await results.wait_for(len(first) + len(later), timeout=120, what="all results")
        finally:
            await a.kill()
            await b.kill()

    by_id = results.by_id()
    assert set(by_id) == {i["id"] for i in first + later}
    # a reaction A had started when it froze is journaled: B does not repeat it but reports its outcome unknown
    unknown = {id for id, rs in by_id.items() if rs[-1]["status"] == "failed"}
    assert all(r["status"] == "ok" or (r["status"] == "failed" and "outcome unknown" in r["msg"])
               for rs in by_id.values() for r in rs), Counter(r["status"] for rs in by_id.values() for r in rs)
    assert all(id.startswith("p1-") for id in unknown), "an intent made after the wake ended outcome-unknown"
    late = [r for r in results.records if r.timestamp >= woken_ms and r.key.decode().startswith("p1-")]
    assert not late, f"{len(late)} results for lost partitions were written after the wake, e.g. {late[0].key!r}"

    calls = sandbox.calls
    lost_work = [c for c in calls if c.app_id == A_ID and c.at >= woken_at and "/om_p1_" in c.path]
    assert not lost_work, f"A called Feishu for {len(lost_work)} phase-1 records after waking"
    assert all(len(performed(calls, i["message_id"])) == 1 for i in later), "a phase-3 reaction was not done once"
    assert any(c.app_id == A_ID and c.at >= woken_at for c in calls), "A did no work after rejoining"
    # no reaction is done twice: what A had started before it froze is in the journal, so B never repeats it
    doubled = {i["id"]: len(performed(calls, i["message_id"])) for i in first
               if len(performed(calls, i["message_id"])) > 1}
    assert not doubled, f"reactions performed twice: {doubled}"
    by_message = {i["id"]: i["message_id"] for i in first}
    late_unknown = [id for id in unknown if any(c.at >= frozen_at for c in performed(calls, by_message[id]))]
    assert not late_unknown, f"outcome-unknown intents performed after the freeze: {late_unknown[:5]}"
    never = [i["id"] for i in first if not performed(calls, i["message_id"]) and i["id"] not in unknown]
    assert not never, f"intents reported done but never performed: {never[:5]}"
    print(f"\nfrozen replica: {len(a_before)} calls by A before the freeze, {len(unknown)} reported outcome-unknown "
          f"by B (A had started them), 0 performed twice, 0 calls by A after waking")
    assert sandbox.violations() == []


def previews(n_tokens: int, updates: int) -> list[dict[str, Any]]:
    """url_preview.update intents, each token's updates spread through the burst."""
    return [{"kind": "url_preview.update", "id": f"v{u}-{t}", "preview_tokens": [f"tok-{t}"]}
            for u in range(updates) for t in range(n_tokens)]


async def test_a_frozen_replica_holding_a_preview_burst_makes_no_preview_call_for_it_after_waking(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    """A reads a preview burst (3,000 intents: most wait in its coalescer, holding no task, when it is frozen);
    B takes the partitions over. Woken, A abandons the waiting intents, which leaves none in its coalescer, and
    a call of A's that was waiting to retry then carries nothing: no url_preview call from A once it is a member
    again (main retried such a call after the rejoin, putting pre-freeze content over B's), every intent gets
    its result, and the 5 s rule holds across the takeover (the sandbox's referee)."""
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url)
    await create_relay_topics(to_config(data))
    kafka = data["kafka"]
    topic, group = kafka["intents_topics"][0], kafka["group_id"]
    a = await relay_for(tmp_path, data, A_ID, "a")
    b = await relay_for(tmp_path, data, B_ID, "b")
    burst = previews(300, 10)

    def preview_calls(app_id: str, since: float = 0.0) -> list[CallRecord]:
        return [c for c in sandbox.calls if c.app_id == app_id and c.api == "url_preview.update" and c.at >= since]

    async with Collector(kafka_bootstrap, kafka["results_topic"]) as results:
        try:
            await a.start()
            await produce(kafka_bootstrap, topic, burst)
            await wait_until(lambda: len(preview_calls(A_ID)) >= 2, 90, "A's first preview calls", a)
            a.send(signal.SIGSTOP)
            await asyncio.sleep(0.5)
            assert len(results.records) < len(burst) // 2, "A had done most of the burst before the freeze"

            await b.start()
            await results.wait_for(len(burst), timeout=240, what="every preview result")
            await wait_committed(kafka_bootstrap, group, topic, kafka["topic_partitions"], timeout=60)
            rejoined = len(assigned_lines(a))
            woken_at = time.monotonic()
            a.send(signal.SIGCONT)
            await wait_until(lambda: len(assigned_lines(a)) > rejoined, 120, "A to rejoin the group", a, b)
            rejoined_at = time.monotonic()
            await asyncio.sleep(12)  # longer than the 5 s rule plus the claim window twice: a leaked intent's call
        finally:
            await a.kill()
            await b.kill()

    # a request A had begun writing when it froze (aiohttp writes the body in a task of its own) arrives on waking:
    # at most the calls it had in flight; none may be planned afterwards from the intents it abandoned
    in_flight = preview_calls(A_ID, woken_at)
    assert len(in_flight) <= 2, f"A made {len(in_flight)} preview calls after waking\n{a.log_tail()}"
    leaked = preview_calls(A_ID, rejoined_at)
    assert not leaked, f"A made {len(leaked)} preview calls after rejoining, e.g. {leaked[0].body}\n{a.log_tail()}"
    # (results A had begun writing when it froze land on waking, like its requests: the check before each write
    # cannot be atomic with it; B wrote one for each of those intents too, so they are not counted here)
    by_id = results.by_id()
    assert set(by_id) == {i["id"] for i in burst}
    assert {r["status"] for rs in by_id.values() for r in rs} <= {"ok", "superseded"}
    assert preview_calls(B_ID), "B did none of the burst: the freeze proved nothing"
    assert sandbox.violations() == [], [(c.at - woken_at, c.app_id, c.violation) for c in sandbox.violations()[:3]]
