"""Three ``relay run`` processes in one group share one app's quota (``feishu.share_mode = "group"``), against
the real broker and one sandbox process enforcing Feishu's real limits (time scale 1).

A backlog on two APIs (message create to many chats plus four hot chats, and reactions) runs through:

- steady: 0 throttled calls, 0 limit violations (per chat included), and the three together use at least 95 %
  of the minute quota of each API over a minute once their shares have settled;
- one replica SIGKILLed mid-run: the survivors take its partitions and its share; every intent gets its result,
  no reaction (uuid-less) is performed twice, still 0 violations;
- a rolling restart with static membership (``kafka.group_instance_id``; SIGTERM one at a time, start it
  again): 0 throttled, one result per intent, no reaction performed twice.

These runs are long (minutes: a share grows only a horizon, Feishu's minute, after the others acknowledged
it): run them by name, once.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from relay.sandbox import CallRecord
from tests.relaykit import (
    APP_ID,
    APP_SECRET,
    Collector,
    RelayProcess,
    SandboxProcess,
    config_data,
    create_relay_topics,
    produce,
    to_config,
    to_toml,
)

pytestmark = pytest.mark.integration

HORIZON = 60.15  # relay.coordination.horizon at time scale 1
# enough of each API for three minutes at the quota after the shares settle (about a horizon after the start,
# later on a loaded machine): the minute measured must not reach the tail, where queues empty and shares shrink
SENDS, HOT, REACTIONS = 4500, 4 * 100, 4500
APIS = {"message.send": "im.message.create", "reaction.add": "im.message_reaction.create"}


def intents() -> list[dict[str, Any]]:
    """Sends to 300 chats and four hot chats interleaved, and reactions on distinct messages."""
    out: list[dict[str, Any]] = []
    for i in range(max(SENDS, REACTIONS)):
        if i < SENDS:
            out.append({"kind": "message.send", "id": f"s-{i}", "receive_id_type": "chat_id",
                        "receive_id": f"oc_{i % 300}", "msg_type": "text", "content": {"text": f"n {i}"}})
        if i < HOT:
            out.append({"kind": "message.send", "id": f"h-{i}", "receive_id_type": "chat_id",
                        "receive_id": f"oc_hot_{i % 4}", "msg_type": "text", "content": {"text": f"h {i}"}})
        if i < REACTIONS:
            out.append({"kind": "reaction.add", "id": f"r-{i}", "message_id": f"om_r_{i}", "emoji_type": "SMILE"})
    return out


def use_over_minute(calls: list[CallRecord], api: str, start: float) -> float:
    """Calls of ``api`` answered ok in ``[start, start + 60)``, as a share of its 1000 per minute."""
    return sum(1 for c in calls if c.api == api and start <= c.at < start + 60 and c.status == 200) / 1000


def performed_twice(calls: list[CallRecord]) -> dict[str, int]:
    done = Counter(c.path for c in calls if c.api == "reaction.add" and c.performed)
    return {path: n for path, n in done.items() if n > 1}


def settled_at(group: Group, started: float) -> float:
    """When every replica first used a third of both APIs' quotas (its ``quota shares now`` log lines), on the
    clock of ``started`` (monotonic, the sandbox's too): the group has settled once the last of them did."""
    offset = time.time() - time.monotonic()  # log lines carry the wall clock
    latest = started
    for relay in group.relays:
        for line in relay.log_path.read_text(errors="replace").splitlines():
            if "quota shares now" in line and all(re.search(rf"{api} 0\.3[3-9]", line) for api in APIS.values()):
                at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() - offset
                latest = max(latest, at)
                break
        else:
            raise AssertionError(f"{relay.log_path.name} never used a third of each quota")
    return latest


class Group:
    def __init__(self, tmp_path: Path, data: dict[str, Any], n: int, *, static: bool = False) -> None:
        self.relays: list[RelayProcess] = []
        for i in range(n):
            path = tmp_path / f"r{i}.toml"
            kafka = {**data["kafka"], **({"group_instance_id": f"replica-{i}"} if static else {})}
            path.write_text(to_toml({**data, "kafka": kafka}))
            self.relays.append(RelayProcess(path, tmp_path / f"r{i}.log"))

    def check_alive(self, *skip: RelayProcess) -> None:
        for relay in self.relays:
            if relay not in skip:
                assert relay.proc is not None and relay.proc.returncode is None, f"died:\n{relay.log_tail()}"

    async def kill_all(self) -> None:
        for relay in self.relays:
            await relay.kill()


async def run_group(tmp_path: Path, kafka_bootstrap: str, topic_prefix: str,
                    during: Callable[[Group, SandboxProcess, float], Awaitable[None]], *, static: bool = False
                    ) -> tuple[list[CallRecord], dict[str, list[dict[str, Any]]], float, Group]:
    """Start the sandbox and three relays, produce the backlog, run ``during``, wait for every result.

    Returns the calls the sandbox saw, the results by intent id, when the relays started, and the group (its
    stopped relays' logs say when the shares settled: :func:`settled_at`)."""
    sandbox = SandboxProcess(apps={APP_ID: APP_SECRET}, log_bodies=False, seed=1)
    await sandbox.start()
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url)
    data["kafka"]["topic_partitions"] = 6
    data["feishu"].update({"share_mode": "group"})
    await create_relay_topics(to_config(data))
    group = Group(tmp_path, data, 3, static=static)
    work = intents()
    try:
        async with Collector(kafka_bootstrap, data["kafka"]["results_topic"]) as results:
            await produce(kafka_bootstrap, data["kafka"]["intents_topics"][0], work)
            for relay in group.relays:
                await relay.start()
            started = time.monotonic()
            await during(group, sandbox, started)
            deadline = time.monotonic() + 600
            while len(results.by_id()) < len(work):
                group.check_alive(*[r for r in group.relays if r.proc and r.proc.returncode is not None])
                assert time.monotonic() < deadline, f"{len(results.by_id())} of {len(work)} results"
                await asyncio.sleep(1)
            await asyncio.sleep(2)  # a duplicate result would come now
            by_id = results.by_id()
        calls = await sandbox.calls()
    finally:
        await group.kill_all()
        await sandbox.stop()
    assert set(by_id) == {i["id"] for i in work}
    return calls, by_id, started, group


async def test_three_replicas_share_the_quota_without_throttling(kafka_bootstrap: str, topic_prefix: str,
                                                                  tmp_path: Path) -> None:
    async def during(group: Group, sandbox: SandboxProcess, started: float) -> None:
        pass

    calls, by_id, started, group = await run_group(tmp_path, kafka_bootstrap, topic_prefix, during)
    assert [c for c in calls if c.violation] == []
    assert sum(c.throttled for c in calls) == 0
    assert all(len(rs) == 1 and rs[0]["status"] == "ok" for rs in by_id.values())
    settled = settled_at(group, started)
    # a replica's share grows a horizon after the others acknowledged it: the three settle about a horizon after
    # they start (later if the group's assignment took a while); a steady group must not take two
    assert started + HORIZON <= settled <= started + 2 * HORIZON, f"settled {settled - started:.0f}s after the start"
    sends, reactions = (use_over_minute(calls, api, settled) for api in APIS)
    print(f"\nthree replicas: settled {settled - started:.0f}s after the start; quota use over the minute from then: "
          f"message.send {sends:.3f}, reaction.add {reactions:.3f}")
    assert sends >= 0.95 and reactions >= 0.95


async def test_a_replica_killed_mid_run_loses_nothing_and_repeats_nothing(kafka_bootstrap: str, topic_prefix: str,
                                                                           tmp_path: Path) -> None:
    async def during(group: Group, sandbox: SandboxProcess, started: float) -> None:
        await asyncio.sleep(HORIZON + 20)
        await group.relays[1].kill()  # SIGKILL

    calls, by_id, started, _ = await run_group(tmp_path, kafka_bootstrap, topic_prefix, during)
    assert [c for c in calls if c.violation] == []
    assert sum(c.throttled for c in calls) == 0
    assert performed_twice(calls) == {}
    statuses = Counter(r["status"] for rs in by_id.values() for r in rs)
    assert all(r["status"] == "ok" or "outcome unknown" in r.get("msg", "") for rs in by_id.values() for r in rs), \
        statuses
    killed = started + HORIZON + 20
    for begin in (killed - 60, killed + 10, killed + 70, killed + 130):
        sends, reactions = (use_over_minute(calls, api, begin) for api in APIS)
        print(f"\nkill: minute from {begin - started:.0f}s: message.send {sends:.3f}, reaction.add {reactions:.3f}")


async def test_a_rolling_restart_throttles_nothing_and_writes_one_result_each(kafka_bootstrap: str,
                                                                               topic_prefix: str,
                                                                               tmp_path: Path) -> None:
    async def during(group: Group, sandbox: SandboxProcess, started: float) -> None:
        await asyncio.sleep(20)
        for relay in group.relays:
            relay.send(signal.SIGTERM)
            assert await relay.wait(60) == 0, relay.log_tail()
            await relay.start()
            await asyncio.sleep(10)

    calls, by_id, _, _ = await run_group(tmp_path, kafka_bootstrap, topic_prefix, during, static=True)
    assert [c for c in calls if c.violation] == []
    assert sum(c.throttled for c in calls) == 0
    assert {id: len(rs) for id, rs in by_id.items() if len(rs) > 1} == {}
    assert performed_twice(calls) == {}
