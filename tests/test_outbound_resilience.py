"""Outbound when things go wrong, against the real broker and the sandbox: the relay killed with SIGKILL,
stopped with SIGTERM, joined by a second relay; injected faults, permanent errors, expired tokens and intents,
poison records and bad intents."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import (
    APP_ID,
    APP_SECRET,
    Collector,
    RelayProcess,
    config_data,
    create_relay_topics,
    produce,
    relay_in_process,
    to_config,
    to_toml,
)

pytestmark = pytest.mark.integration

SCALE = 4.0


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=SCALE))
    await box.start()
    yield box
    await box.stop()


def send(id: str, receiver: str, text: str = "x") -> dict[str, Any]:
    return {"kind": "message.send", "id": id, "receive_id_type": "chat_id", "receive_id": receiver,
            "msg_type": "text", "content": {"text": text}}


def uuid_workload(n: int) -> list[dict[str, Any]]:
    """Sends, replies and forwards: every call carries uuid = intent id."""
    intents: list[dict[str, Any]] = []
    for i in range(n):
        if i % 3 == 0:
            intents.append(send(f"s-{i}", f"oc_{i % 150}"))
        elif i % 3 == 1:
            intents.append({"kind": "message.reply", "id": f"r-{i}", "message_id": f"om_{i % 200}",
                            "chat_id": f"oc_r{i % 80}", "msg_type": "text", "content": {"text": "ok"}})
        else:
            intents.append({"kind": "message.forward", "id": f"f-{i}", "message_id": "om_1",
                            "receive_id_type": "open_id", "receive_id": f"ou_{i % 150}"})
    return intents


async def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    """The config file of a relay subprocess, with its topics already created."""
    await create_relay_topics(to_config(data))
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(data))
    return path


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_sigkill_mid_stream_then_restart_loses_nothing_and_sends_once(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    intents = uuid_workload(1200)
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE)
    path = await write_config(tmp_path, data)
    relay = RelayProcess(path, tmp_path / "relay.log")
    async with Collector(kafka_bootstrap, data["kafka"]["results_topic"]) as results:
        await relay.start()
        try:
            await produce(kafka_bootstrap, data["kafka"]["intents_topics"][0], intents)
            kill_at = random.Random().randint(200, 800)
            await wait_until(lambda: len(results.records) >= kill_at, 90, f"{kill_at} results")
            await relay.kill()  # SIGKILL: no drain, no commit
            before_restart = len(sandbox.calls)
            await relay.start()
            await results.wait_for(len(intents), timeout=120, what="results")
        finally:
            await relay.kill()
    by_id = results.by_id()
    assert set(by_id) == {i["id"] for i in intents}, relay.log_tail()
    assert all(r["status"] == "ok" for rs in by_id.values() for r in rs)
    calls = [c for c in sandbox.calls if c.api in ("message.send", "message.reply", "message.forward")]
    assert all(c.uuid is not None and c.uuid in by_id for c in calls), "a call without uuid = intent id"
    assert len(calls) > len(intents) or before_restart < len(sandbox.calls)  # the restart really did work
    assert all(len(ids) <= 1 for ids in sandbox.messages_by_uuid.values()), "a uuid created two messages"
    assert sandbox.violations() == []


async def test_sigterm_drains_and_the_restart_repeats_no_call(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    intents = uuid_workload(900)
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE)
    path = await write_config(tmp_path, data)
    relay = RelayProcess(path, tmp_path / "relay.log")
    async with Collector(kafka_bootstrap, data["kafka"]["results_topic"]) as results:
        await relay.start()
        try:
            await produce(kafka_bootstrap, data["kafka"]["intents_topics"][0], intents)
            await wait_until(lambda: len(results.records) >= 300, 90, "300 results")
            relay.send(signal.SIGTERM)
            assert await relay.wait(60) == 0, relay.log_tail()
            stopped_with = len(results.records)
            assert stopped_with < len(intents), "the stream had already finished: nothing was drained"
            await relay.start()
            await results.wait_for(len(intents), timeout=120, what="results")
        finally:
            await relay.kill()
    by_id = results.by_id()
    assert set(by_id) == {i["id"] for i in intents}
    repeated = [id for id, rs in by_id.items() if len(rs) > 1]
    assert not repeated, f"{len(repeated)} intents were redone after a drained stop, e.g. {repeated[:3]}"
    per_uuid = Counter(c.uuid for c in sandbox.calls if c.uuid)
    assert max(per_uuid.values()) == 1, [u for u, n in per_uuid.items() if n > 1][:5]


async def test_a_second_relay_joining_mid_stream_loses_nothing_and_keeps_order(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox
) -> None:
    # 300 keys x 4 sends each; every key's sends must reach the sandbox in produce order
    intents = [send(f"k{k}-{j}", f"oc_{k}", text=str(j)) for j in range(4) for k in range(300)]
    # two replicas of one group share the app quota: each runs at half (static share, as configured today)
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE,
                                   kafka={"topic_partitions": 6}, feishu={"quota_share": 0.5}))
    await create_relay_topics(config)
    async with Collector(kafka_bootstrap, config.kafka.results_topic) as results, relay_in_process(config):
        await produce(kafka_bootstrap, config.kafka.intents_topics[0], intents)
        await wait_until(lambda: len(results.records) >= 200, 60, "200 results")
        async with relay_in_process(config):  # joins the group: a rebalance mid-stream
            await results.wait_for(len(intents), timeout=120, what="results")
    by_id = results.by_id()
    assert set(by_id) == {i["id"] for i in intents}
    assert all(r["status"] == "ok" for rs in by_id.values() for r in rs)
    order: dict[str, list[int]] = defaultdict(list)
    for call in sorted(sandbox.calls, key=lambda c: c.at):
        if call.api == "message.send" and call.uuid and not call.deduped:
            key, seq = call.uuid.split("-")
            order[key].append(int(seq))
    assert all(seqs == sorted(seqs) for seqs in order.values()), "a key's sends left partition order"
    assert sandbox.violations() == []


async def test_injected_faults_still_end_ok(kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox) -> None:
    sandbox.set_faults(fault_rate=0.1)  # 500/502/503 answers, code 1500, dropped connections
    intents = [send(f"s-{i}", f"oc_{i % 100}") for i in range(300)] + [
        {"kind": "card.patch", "id": f"p-{i}", "message_id": f"om_{i}", "content": {"elements": []}}
        for i in range(200)]
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE))
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results:
        await produce(kafka_bootstrap, config.kafka.intents_topics[0], intents)
        await results.wait_for(len(intents), timeout=120, what="results")
    by_id = {k: v[0] for k, v in results.by_id().items()}
    assert Counter(r["status"] for r in by_id.values()) == {"ok": len(intents)}
    faults = [c for c in sandbox.calls if c.fault]
    assert len(faults) >= 20, "the fault injection did not happen"
    assert max(r["attempts"] for r in by_id.values()) >= 2
    assert all(len(ids) <= 1 for ids in sandbox.messages_by_uuid.values())
    assert sandbox.violations() == []


async def test_permanent_error_expired_token_expired_intent_and_poison(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox
) -> None:
    sandbox.fail_target("receive:oc_bad", 230001)
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE))
    topic = config.kafka.intents_topics[0]
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results, \
            Collector(kafka_bootstrap, config.kafka.dead_letter_topic) as dead:
        await produce(kafka_bootstrap, topic, [send("warm", "oc_w"), send("bad", "oc_bad"),
                                               {**send("late", "oc_late"), "expires_at": past}])
        await results.wait_for(3, timeout=30)
        token_requests = sandbox.token_requests
        sandbox.expire_tokens()  # every cached token is now invalid: 99991663 on the next call
        await produce(kafka_bootstrap, topic, [send(f"t-{i}", f"oc_t{i}") for i in range(100)])
        await results.wait_for(103, timeout=60)
        # a poison record keyed like the sends behind it (same partition): it is dead-lettered, they flow
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"\xff not json", key=b"oc_p")
            for i in range(5):
                await producer.send_and_wait(topic, _json(send(f"after-{i}", "oc_p")), key=b"oc_p")
        finally:
            await producer.stop()
        await results.wait_for(108, timeout=60)
        await dead.wait_for(2, timeout=30, distinct_ids=False)

    by_id = {k: v[0] for k, v in results.by_id().items()}
    bad = by_id["bad"]
    assert (bad["status"], bad["code"], bad["attempts"]) == ("failed", 230001, 1)
    assert by_id["late"]["status"] == "expired" and by_id["late"]["attempts"] == 0
    assert not [c for c in sandbox.calls if c.uuid == "late"], "an expired intent was sent"
    assert all(by_id[f"t-{i}"]["status"] == "ok" for i in range(100))
    assert sandbox.token_requests == token_requests + 1, "expired token: more than one refresh"
    assert all(by_id[f"after-{i}"]["status"] == "ok" for i in range(5))
    headers = [dict(r.headers) for r in dead.records]
    assert {h["relay.error"] for h in headers} == {b"feishu", b"decode"}
    feishu = next(h for h in headers if h["relay.error"] == b"feishu")
    assert b"230001" in feishu["relay.reason"] and feishu["relay.source.topic"] == topic.encode()


def _json(value: dict[str, Any]) -> bytes:
    return msgspec.json.encode(value)


BAD_INTENTS: list[tuple[bytes, str | None, bytes, str]] = [
    # (value, readable id, relay.error, a word the reason must contain)
    (b"", None, b"decode", "empty"),
    (b"{not json", None, b"decode", "JSON"),
    (b"[1, 2]", None, b"decode", "object"),
    (b'"a string"', None, b"decode", "object"),
    (b'{"kind": "message.explode", "id": "b-1"}', "b-1", b"invalid", "kind"),
    (b'{"kind": "message.send", "id": "b-2", "receive_id_type": "chat_id", "msg_type": "text",'
     b' "content": {"text": "x"}}', "b-2", b"invalid", "receive_id"),
    (b'{"kind": "message.send", "id": "b-3", "receive_id_type": "chat_id", "receive_id": 5,'
     b' "msg_type": "text", "content": {"text": "x"}}', "b-3", b"invalid", "receive_id"),
    (b'{"kind": "message.send", "id": "' + b"x" * 51 + b'", "receive_id_type": "chat_id", "receive_id": "oc",'
     b' "msg_type": "text", "content": {"text": "x"}}', None, b"invalid", "id"),
    (b'{"kind": "message.send", "id": "b-5", "receive_id_type": "phone", "receive_id": "oc",'
     b' "msg_type": "text", "content": {"text": "x"}}', "b-5", b"invalid", "receive_id_type"),
    (b'{"kind": "message.recall", "id": "b-6", "message_id": "om_1", "colour": "red"}', "b-6", b"invalid",
     "colour"),
    (b'{"kind": "message.recall", "id": "b-7", "message_id": "om_1", "expires_at": "2030-01-01T00:00:00"}',
     "b-7", b"invalid", "expires_at"),
    (b'{"kind": "message.recall", "id": "b-8", "message_id": "om_1", "app": "nope"}', "b-8", b"invalid", "app"),
    (b'{"kind": "url_preview.update", "id": "b-9", "preview_tokens": []}', "b-9", b"invalid", "preview_tokens"),
]


async def test_bad_intents_are_rejected_with_a_reason(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox
) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE))
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results, \
            Collector(kafka_bootstrap, config.kafka.dead_letter_topic) as dead:
        await produce(kafka_bootstrap, config.kafka.intents_topics[0], [value for value, *_ in BAD_INTENTS])
        await dead.wait_for(len(BAD_INTENTS), timeout=30, distinct_ids=False)
        await results.wait_for(sum(1 for _, id, *_ in BAD_INTENTS if id), timeout=30)
    letters = {r.value: dict(r.headers) for r in dead.records}
    by_id = {k: v[0] for k, v in results.by_id().items()}
    for value, id, error, word in BAD_INTENTS:
        headers = letters[value]
        assert headers["relay.error"] == error, (value, headers)
        reason = headers["relay.reason"].decode()
        assert word.lower() in reason.lower(), (value, reason)
        assert "\n" not in reason
        assert not value or value.decode(errors="replace") not in reason, "the reason quotes the raw body"
        if id is not None:
            assert by_id[id]["status"] == "rejected" and word.lower() in by_id[id]["msg"].lower()
    assert not sandbox.calls, "a bad intent reached Feishu"


async def test_an_internal_error_fails_its_intent_and_the_partition_moves_on(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    import relay.outbound

    real_build_call = relay.outbound.build_call

    def build_call(intent: Any) -> Any:
        if intent.id == "boom":
            raise RuntimeError("a bug")
        return real_build_call(intent)

    monkeypatch.setattr(relay.outbound, "build_call", build_call)
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE))
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results, \
            Collector(kafka_bootstrap, config.kafka.dead_letter_topic) as dead:
        await produce(kafka_bootstrap, config.kafka.intents_topics[0],
                      [send("boom", "oc_x"), send("after", "oc_x")])
        await results.wait_for(2, timeout=30)
        await dead.wait_for(1, timeout=30, distinct_ids=False)
    by_id = {k: v[0] for k, v in results.by_id().items()}
    assert by_id["boom"]["status"] == "failed" and by_id["boom"]["msg"].startswith("internal error: RuntimeError")
    assert by_id["after"]["status"] == "ok"
    (letter,) = dead.records
    assert dict(letter.headers)["relay.error"] == b"internal"


async def test_an_api_call_rate_this_replica_cannot_send_is_rejected(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox
) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE,
                                   feishu={"quota_share": 0.5}))
    slow = {"kind": "api.call", "id": "slow", "method": "GET", "path": "/open-apis/im/v1/chats",
            "rate": {"per_second": 1}}
    fine = {**slow, "id": "fine", "rate": {"per_second": 10}}
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results:
        await produce(kafka_bootstrap, config.kafka.intents_topics[0], [slow, fine])
        await results.wait_for(2, timeout=30)
    by_id = {k: v[0] for k, v in results.by_id().items()}
    assert by_id["slow"]["status"] == "rejected" and "quota_share" in by_id["slow"]["msg"]
    assert by_id["fine"]["status"] == "ok"
