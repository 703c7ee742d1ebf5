"""Records finished above a stuck one ride in the commit metadata across a rebalance, against the real broker
and the sandbox (in its own process): the next owner skips them, so no intent gets a second result."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import msgspec
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from relay.kafka import make_consumer, make_producer
from relay.metrics import Metrics
from relay.offsets import decode_metadata
from relay.outbound import Outbound
from relay.outcomes import Attempted, Outcome, Verdict
from tests.relaykit import (
    APP_ID,
    APP_SECRET,
    Collector,
    SandboxProcess,
    config_data,
    create_relay_topics,
    relay_in_process,
    to_config,
)

pytestmark = pytest.mark.integration

# Feishu's windows 1,000 times shorter at both ends (and no jitter margin, which time_scale does not divide):
# the relay runs as fast as its engine; the referee still refuses what Feishu would
SCALE = 1000.0


def send(id: str, receiver: str) -> dict[str, Any]:
    return {"kind": "message.send", "id": id, "receive_id_type": "chat_id", "receive_id": receiver,
            "msg_type": "text", "content": {"text": "x"}}


async def control(url: str, **body: Any) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/_sandbox/control", json=body) as resp:
        assert resp.status == 200, await resp.text()


async def produce_to(bootstrap: str, topic: str, partition: int, intents: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, msgspec.json.encode(i), key=i["receive_id"].encode(),
                                       partition=partition) for i in intents]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def committed(bootstrap: str, group: str, tp: TopicPartition) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=[tp])
        return offsets[tp].offset if tp in offsets else -1
    finally:
        await admin.close()


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_30000_finished_above_a_stuck_key_then_a_rebalance_no_intent_gets_a_second_result(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """One intent to a chat the sandbox throttles (it retries, in flight, across the rebalance) and 30,000 behind
    it on the same partition that finish. A bitset of them would need 5,000 characters, more than the broker
    keeps; run lengths take a few. A second relay joins; then the throttle lifts. One result per intent, and no
    send performed twice. (Five in six of the 30,000 are rejected for an unknown app: finished records like the
    others, with a result and a dead letter, but no HTTP call, which keeps the test within its time.)"""
    sandbox = SandboxProcess(apps={APP_ID: APP_SECRET}, time_scale=SCALE)
    url = await sandbox.start()
    try:
        config = to_config(config_data(
            kafka_bootstrap, topic_prefix, url, time_scale=SCALE, kafka={"topic_partitions": 2},
            feishu={"limit_jitter": 0.0},
            outbound={"max_attempts": 1_000_000, "max_retry_seconds": 3600.0, "drain_timeout": 1.0}))
        await create_relay_topics(config)
        await control(url, throttle=[{"target": "oc_stuck", "seconds": 3600 * SCALE}])
        stuck_tp = TopicPartition(config.kafka.intents_topics[0], 0)
        intents = [send("stuck", "oc_stuck"),
                   *({**send(f"n-{i}", f"oc_{i % 2000}"), "app": "default" if i % 6 == 0 else "elsewhere"}
                     for i in range(30_000))]
        await produce_to(kafka_bootstrap, stuck_tp.topic, stuck_tp.partition, intents)
        async with Collector(kafka_bootstrap, config.kafka.results_topic) as results:
            async with relay_in_process(config):
                await results.wait_for(30_000, timeout=300, what="results", distinct_ids=False)
                assert not any(r.key == b"stuck" for r in results.records)
                async with relay_in_process(config):  # joins the group: every partition is revoked, reassigned
                    await control(url, throttle=[{"target": "oc_stuck", "seconds": 0}])
                    await until(lambda: _at(kafka_bootstrap, config, stuck_tp), 120, "the whole partition committed")
            written = await end_offsets(kafka_bootstrap, config.kafka.results_topic)
            await until(lambda: _have(results, written), 60, "every result written read back")
        per_id = Counter(msgspec.json.decode(r.value)["id"] for r in results.records)
        calls = await sandbox.calls()
        stuck_calls = [c for c in calls if "receive:oc_stuck" in c.targets]
    finally:
        await sandbox.stop()
    assert len(per_id) == len(intents)
    twice = [id for id, n in per_id.items() if n > 1]
    assert not twice, f"{len(twice)} intents got a second result, e.g. {twice[:3]}"
    assert len(stuck_calls) > 1 and stuck_calls[0].code == 230020 and stuck_calls[-1].code == 0, \
        "the stuck intent was not in flight across the rebalance"
    assert per_id["stuck"] == 1
    sent = Counter(c.uuid for c in calls if c.uuid is not None and c.code == 0)
    assert len(sent) == 5_001 and max(sent.values()) == 1, "a send was performed twice"


async def _at(bootstrap: str, config: Any, tp: TopicPartition) -> bool:
    return await _at_end(bootstrap, config, tp, 30_001)


async def _have(results: Collector, written: int) -> bool:
    return len(results.records) >= written


async def end_offsets(bootstrap: str, topic: str) -> int:
    """Records on ``topic`` so far (one writer, no transactions: the end offsets add up to the count)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer.topics()  # loads the metadata of every topic
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


class HoldingExecutor:
    """Calls succeed at once, except those of the intents in ``held`` until ``release``: Feishu is not the point
    here, the commit metadata is (the consumer, the producer and the broker are real)."""

    sending = 0  # Executor.sending: no call is ever on its way here, so a result write never waits to gather

    def __init__(self, held: set[str]) -> None:
        self.held = held
        self.released = asyncio.Event()
        self.calls: list[str] = []

    def admissible(self, call: Any) -> None:
        return None

    async def execute(self, app: str, call: Any, *, expires_at: float | None = None,
                      before_attempt: Any = None, before_write: Any = None, tenant: str | None = None) -> Attempted:
        id = msgspec.json.decode(call.body)["uuid"]
        if before_attempt is not None:
            await before_attempt()
        self.calls.append(id)
        if id in self.held:
            await self.released.wait()
        return Attempted(Outcome(verdict=Verdict.OK, http_status=200, code=0, msg="success"), 1)


async def test_a_broker_refusing_the_commit_metadata_gets_less_and_the_partition_keeps_committing(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """``commit_metadata_max_bytes`` above the broker's ``offset.metadata.max.bytes`` (4096): OFFSET_METADATA_TOO_LARGE,
    which aiokafka does not retry, used to stop the partition's commits for good. 1,700 isolated unfinished
    records among 27,200 make metadata no encoding fits in 4,096 characters."""
    config = to_config(config_data(kafka_bootstrap, topic_prefix, "http://127.0.0.1:9", kafka={"topic_partitions": 1},
                                   outbound={"commit_metadata_max_bytes": 8000, "max_in_flight": 6000,
                                             "max_in_flight_per_partition": 5000}))
    await create_relay_topics(config)
    tp = TopicPartition(config.kafka.intents_topics[0], 0)
    intents = [send(f"i-{n}", f"oc_{n}") for n in range(27_200)]
    held = {i["id"] for n, i in enumerate(intents) if n % 16 == 0}
    await produce_to(kafka_bootstrap, tp.topic, 0, intents)
    producer = make_producer(config.kafka)
    await producer.start()
    executor = HoldingExecutor(held)
    metrics = Metrics()
    consumer = make_consumer(config.kafka, session_timeout_ms=6000, rebalance_timeout_ms=30000)
    outbound = Outbound(config, consumer, producer, executor, metrics, known_apps=["default"])  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(outbound.run(stop))
    try:
        async def refused_then_committed() -> bool:
            if task.done():
                task.result()
            if metrics.value("relay_outbound_metadata_refused_total") < 1:
                return False
            return bool(await _metadata(kafka_bootstrap, config.kafka.group_id, tp))

        await until(refused_then_committed, 120, "a refusal, then a commit with metadata")
        metadata = await _metadata(kafka_bootstrap, config.kafka.group_id, tp)
        assert 0 < len(metadata) <= 4096
        finished = set(decode_metadata(0, metadata).done)
        assert finished and not finished & {n for n in range(0, 27_200, 16)}, "a held record counted as finished"
        assert metrics.value("relay_outbound_metadata_cap") <= 4096
        executor.released.set()
        await until(lambda: _at_end(kafka_bootstrap, config, tp, 27_200), 120, "every record committed")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await producer.stop()


async def _metadata(bootstrap: str, group: str, tp: TopicPartition) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=[tp])
        return offsets[tp].metadata if tp in offsets else ""
    finally:
        await admin.close()


async def _at_end(bootstrap: str, config: Any, tp: TopicPartition, end: int) -> bool:
    return await committed(bootstrap, config.kafka.group_id, tp) == end
