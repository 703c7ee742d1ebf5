"""Calls without a uuid are performed at most once, against the real broker, the sandbox and the relay as a real
subprocess: answers lost AFTER the operation (the sandbox's ``lost`` and ``hang`` faults), a SIGKILL mid-stream
and a restart, a second relay joining mid-stream with a drain too short for the hung calls; and a token endpoint
down for a few seconds while intents are in flight."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from relay.sandbox import CallRecord, FaultKind, Sandbox, SandboxOptions
from tests.relaykit import APP_ID, APP_SECRET, Collector, RelayProcess, config_data, produce
from tests.test_outbound_resilience import wait_until, write_config

pytestmark = pytest.mark.integration

SCALE = 4.0
N = 120  # intents per kind


def workload(n: int = N) -> list[dict[str, Any]]:
    """Four uuid-less kinds, each intent's operation recognisable at the sandbox, and two repeatable kinds."""
    intents: list[dict[str, Any]] = []
    for i in range(n):
        intents += [
            {"kind": "reaction.add", "id": f"r-{i}", "message_id": f"om_r{i}", "emoji_type": "THUMBSUP"},
            {"kind": "message.urgent", "id": f"u-{i}", "message_id": f"om_u{i}", "channel": "sms",
             "user_id_list": ["ou_1"]},
            {"kind": "message.batch_send", "id": f"b-{i}", "msg_type": "text", "content": {"text": f"b-{i}"},
             "open_ids": ["ou_1"]},
            {"kind": "ephemeral.send", "id": f"e-{i}", "chat_id": f"oc_e{i % 30}", "open_id": f"ou_e{i}",
             "card": {"elements": [{"tag": "div", "text": f"e-{i}"}]}},
            {"kind": "message.send", "id": f"s-{i}", "receive_id_type": "chat_id", "receive_id": f"oc_s{i}",
             "msg_type": "text", "content": {"text": "x"}},
            {"kind": "card.patch", "id": f"p-{i}", "message_id": f"om_p{i}", "content": {"elements": []}},
        ]
    return intents


REPEATABLE = {"message.send", "card.patch"}


def intent_of(call: CallRecord) -> str | None:
    """The intent a sandbox call performs (the workload names it in the path or the body)."""
    body = call.body if isinstance(call.body, dict) else {}
    if call.api == "reaction.add" or call.api.startswith("message.urgent"):
        message = call.path.split("/")[5]  # /open-apis/im/v1/messages/<id>/...
        return f"{message[3]}-{message[4:]}"  # om_r7 -> r-7, om_u7 -> u-7
    if call.api == "message.batch_send":
        return str(body.get("content", {}).get("text"))
    if call.api == "ephemeral.send":
        return f"e-{str(body.get('open_id'))[4:]}"
    return None


def check_at_most_once(intents: list[dict[str, Any]], sandbox: Sandbox, results: Collector,
                       dead: Collector) -> Counter[str]:
    """The guarantees, whatever the faults and kills did; returns how each non-repeatable intent ended."""
    kinds = {i["id"]: i["kind"] for i in intents}
    by_id = results.by_id()
    assert set(by_id) == set(kinds), f"{len(set(kinds) - set(by_id))} intents without a result"
    performed: Counter[str] = Counter()
    lost: set[str] = set()
    for call in sandbox.calls:
        if (id := intent_of(call)) is not None:
            performed[id] += call.performed
            if call.fault in ("lost", "hang"):
                lost.add(id)
    twice = [id for id, n in performed.items() if n > 1]
    assert not twice, f"{len(twice)} uuid-less operations performed twice, e.g. {twice[:5]}"
    raw: dict[str, set[bytes]] = defaultdict(set)
    for record in results.records:
        if kinds[record.key.decode()] not in REPEATABLE:  # a repeatable one may be redone: a new result
            raw[record.key.decode()].add(record.value)
    differing = [id for id, values in raw.items() if len(values) > 1]
    assert not differing, f"uuid-less intents with two different results, e.g. {differing[:3]}"
    letters = {dict(r.headers)["relay.error"] for r in dead.records}
    unknown_letters = {r.key for r in dead.records if dict(r.headers)["relay.error"] == b"outcome-unknown"}
    ended: Counter[str] = Counter()
    for id, kind in kinds.items():
        result = by_id[id][0]
        if kind in REPEATABLE:
            assert result["status"] == "ok", result
            continue
        if result["status"] == "ok":
            assert performed[id] == 1, (id, performed[id])
            assert id not in lost, f"{id}: its answer was lost, yet it ended ok (a second call?)"
            ended["ok"] += 1
        else:
            assert result["status"] == "failed" and result["msg"].startswith("outcome unknown"), result
            ended["previous owner" if "previous owner" in result["msg"] else "lost answer"] += 1
    assert letters <= {b"outcome-unknown"}, letters
    assert len(unknown_letters) >= 1 and ended["lost answer"] >= 1, ended
    assert all(len(ids) <= 1 for ids in sandbox.messages_by_uuid.values()), "a uuid created two messages"
    assert sandbox.violations() == []
    return ended


def faulty_sandbox(scale: float = SCALE, rate: float = 0.1, kinds: tuple[FaultKind, ...] = ("lost", "hang"),
                   ) -> Sandbox:
    # by default about one call in ten loses its answer after the operation; 30-130 ms answers keep calls in flight
    return Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=scale, fault_rate=rate, fault_kinds=kinds,
                                  hang_seconds=3.0, latency=0.03, latency_jitter=0.1))


def relay_config(bootstrap: str, prefix: str, url: str, scale: float = SCALE, **outbound: Any) -> dict[str, Any]:
    return config_data(bootstrap, prefix, url, time_scale=scale,
                       feishu={"request_timeout": 1.0, "connect_timeout": 0.5}, outbound=outbound)


async def test_lost_answers_and_a_sigkill_never_repeat_a_call_without_uuid(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    sandbox = faulty_sandbox()
    await sandbox.start()
    intents = workload()
    data = relay_config(kafka_bootstrap, topic_prefix, sandbox.url)
    path = await write_config(tmp_path, data)
    relay = RelayProcess(path, tmp_path / "relay.log")
    try:
        async with Collector(kafka_bootstrap, data["kafka"]["results_topic"]) as results, \
                Collector(kafka_bootstrap, data["kafka"]["dead_letter_topic"]) as dead:
            await relay.start()
            try:
                await produce(kafka_bootstrap, data["kafka"]["intents_topics"][0], intents)
                await wait_until(lambda: len(results.records) >= len(intents) // 3, 90, "a third of the results")
                await relay.kill()  # SIGKILL mid-stream: calls in flight, results written but not committed
                killed_with = len(results.by_id())
                assert killed_with < len(intents), "the stream had already finished"
                await relay.start()
                await results.wait_for(len(intents), timeout=120, what="results")
                await asyncio.sleep(1.0)  # re-emitted duplicates, if any, land too
            finally:
                await relay.kill()
            ended = check_at_most_once(intents, sandbox, results, dead)
    finally:
        await sandbox.stop()
    print(f"uuid-less intents: {dict(ended)}")
    # the kill really cut calls off: the restart found them in the journal and did not call again
    assert ended["previous owner"] >= 1, (ended, relay.log_tail())
    assert ended["ok"] >= sum(ended.values()) // 4, ended  # not vacuous: faults and the kill hit some, not all


async def test_a_second_relay_joining_while_calls_hang_never_repeats_them(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    # Feishu's real rates (scale 1) at half a quota each: ~6 s of work, so the second relay joins mid-stream
    # one call in five hangs past the relay's 1 s timeout: at any instant ~20 uuid-less calls hang
    sandbox = faulty_sandbox(scale=1.0, rate=0.2, kinds=("hang",))
    await sandbox.start()
    intents = workload(150)
    # a drain shorter than a hung call: the revoked owner cuts it off, the new owner finds it in the journal
    data = relay_config(kafka_bootstrap, topic_prefix, sandbox.url, scale=1.0, drain_timeout=0.3)
    data["feishu"]["quota_share"] = 0.5
    data["kafka"]["topic_partitions"] = 6
    path = await write_config(tmp_path, data)
    first = RelayProcess(path, tmp_path / "first.log")
    second = RelayProcess(path, tmp_path / "second.log")
    try:
        async with Collector(kafka_bootstrap, data["kafka"]["results_topic"]) as results, \
                Collector(kafka_bootstrap, data["kafka"]["dead_letter_topic"]) as dead:
            await first.start()
            try:
                await produce(kafka_bootstrap, data["kafka"]["intents_topics"][0], intents)
                await wait_until(lambda: len(results.records) >= len(intents) // 4, 90, "a quarter of the results")
                await second.start()  # joins the group: a rebalance while calls are in flight
                await results.wait_for(len(intents), timeout=120, what="results")
                await asyncio.sleep(1.0)
                first.send(signal.SIGTERM)
                second.send(signal.SIGTERM)
                assert await first.wait(60) == 0, first.log_tail()
                assert await second.wait(60) == 0, second.log_tail()
            finally:
                await first.kill()
                await second.kill()
            ended = check_at_most_once(intents, sandbox, results, dead)
    finally:
        await sandbox.stop()
    assert "partitions revoked" in (tmp_path / "first.log").read_text(), "no rebalance happened"
    print(f"uuid-less intents: {dict(ended)}")
    # the drain cut hung calls off: the new owner found them in the journal and did not call again
    assert ended["previous owner"] >= 1, ended


async def test_a_short_token_outage_fails_no_intent_and_a_wrong_secret_fails_fast(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    sandbox = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=SCALE, latency=0.02))
    await sandbox.start()
    # few attempts: a token outage must not use them up (each failed-refresh hold used to cost one per intent)
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE,
                       outbound={"max_attempts": 3, "max_retry_seconds": 60.0})
    data["apps"].append({"name": "wrong", "app_id": "cli_wrong", "app_secret": "not-it"})
    path = await write_config(tmp_path, data)
    relay = RelayProcess(path, tmp_path / "relay.log")
    topic = data["kafka"]["intents_topics"][0]
    try:
        async with Collector(kafka_bootstrap, data["kafka"]["results_topic"]) as results:
            await relay.start()
            try:
                await produce(kafka_bootstrap, topic, [{"kind": "reaction.add", "id": "warm", "message_id": "om_w",
                                                        "emoji_type": "OK"}])
                await results.wait_for(1, timeout=60, what="the warm-up result")
                sandbox.expire_tokens()  # every call needs a new token ...
                sandbox.set_token_outage(True)  # ... and the token endpoint is down
                intents = [{"kind": "reaction.add", "id": f"t-{i}", "message_id": f"om_t{i}", "emoji_type": "OK"}
                           for i in range(200)]
                wrong = {"kind": "reaction.add", "id": "wrong-secret", "app": "wrong", "message_id": "om_x",
                         "emoji_type": "OK"}
                await produce(kafka_bootstrap, topic, [*intents, wrong])
                await wait_until(lambda: sum(c.fault == "token_outage" for c in sandbox.calls) >= 5, 60,
                                 "five failed token requests (> max_attempts holds)")
                sandbox.set_token_outage(False)
                await results.wait_for(len(intents) + 2, timeout=90, what="results")
            finally:
                await relay.kill()
    finally:
        await sandbox.stop()
    by_id = {k: v[0] for k, v in results.by_id().items()}
    statuses = Counter(by_id[f"t-{i}"]["status"] for i in range(200))
    assert statuses == {"ok": 200}, (statuses, [by_id[f"t-{i}"]["msg"] for i in range(3)])
    # API requests only: at most the stale token's 99991663 and the call that worked, however long the outage
    attempts = Counter(by_id[f"t-{i}"]["attempts"] for i in range(200))
    assert max(attempts) <= 2, attempts
    refused = by_id["wrong-secret"]
    assert (refused["status"], refused["code"]) == ("failed", 10014) and refused["attempts"] == 0
    assert refused["msg"].startswith("tenant_access_token:"), refused
    performed = Counter(c.path for c in sandbox.calls if c.api == "reaction.add" and c.performed)
    assert max(performed.values()) == 1
