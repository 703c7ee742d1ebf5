"""Results and dead letters that Kafka will not take, against the real broker and the sandbox: a dead letter
larger than its topic allows is written cut; a result topic that refuses every write (or never acknowledges)
turns ``/readyz`` to 503 with the reason, keeps its key waiting, and recovers in order once fixed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import (
    APP_ID,
    APP_SECRET,
    Collector,
    config_data,
    create_relay_topics,
    free_port,
    relay_in_process,
    to_config,
)

pytestmark = pytest.mark.integration

SCALE = 4.0


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=SCALE))
    await box.start()
    yield box
    await box.stop()


def send(id: str, receiver: str) -> dict[str, Any]:
    return {"kind": "message.send", "id": id, "receive_id_type": "chat_id", "receive_id": receiver,
            "msg_type": "text", "content": {"text": id}}


async def create_topic(bootstrap: str, name: str, **configs: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1, topic_configs=configs)])
    finally:
        await admin.close()


async def set_topic(bootstrap: str, name: str, **configs: str) -> None:
    """Replace the topic's settings (the others go back to their defaults) and wait until the broker says so."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs=configs)])
        watched = {"max.message.bytes": configs.get("max.message.bytes", "2097152"),
                   "message.timestamp.before.max.ms": configs.get("message.timestamp.before.max.ms",
                                                                  "9223372036854775807")}
        for _ in range(100):
            (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
            (resource,) = response.to_object()["resources"]
            now = {e["config_names"]: e["config_value"] for e in resource["config_entries"]}
            if all(now.get(k) == v for k, v in watched.items()):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{name}: the broker never showed {watched}")
    finally:
        await admin.close()


async def until_refused(bootstrap: str, topic: str) -> None:
    """Until the broker applies a topic's new settings (a while after it reports them), probe writes pass."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")  # not idempotent: a refusal breaks nothing
    await producer.start()
    try:
        for _ in range(100):
            try:
                await producer.send_and_wait(topic, b"p" * 200, key=b"probe")
            except KafkaError:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{topic} still takes every write")
    finally:
        await producer.stop()


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                max_request_size=2 << 20)
    await producer.start()
    try:
        for key, value, headers in records:  # one at a time: the order is the test's
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return resp.status, await resp.json()


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_a_dead_letter_or_result_larger_than_its_topic_allows_is_written_cut(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox
) -> None:
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE,
                       kafka={"forward_headers": ["bulk"]})
    config = to_config(data)
    # managed topics, smaller than the relay would make them (it leaves existing topics alone)
    await create_topic(kafka_bootstrap, config.kafka.dead_letter_topic, **{"max.message.bytes": "20000"})
    await create_topic(kafka_bootstrap, config.kafka.results_topic, **{"max.message.bytes": "4000"})
    await create_relay_topics(config)
    topic = config.kafka.intents_topics[0]
    big_invalid = msgspec.json.encode({**send("big", "oc_a"), "colour": "x" * 100_000})  # unknown field
    bulky = [("traceparent", b"00-1-2-01"), ("bulk", b"b" * 10_000)]  # forwarded onto the result: too large
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results, \
            Collector(kafka_bootstrap, config.kafka.dead_letter_topic) as dead:
        await produce(kafka_bootstrap, topic, [
            (b"oc_a", big_invalid, [("h", b"v")]),
            (b"oc_a", msgspec.json.encode(send("bulky", "oc_a")), bulky),
            (b"oc_a", msgspec.json.encode(send("after", "oc_a")), []),
        ])
        await results.wait_for(3, timeout=60)
        await dead.wait_for(1, timeout=30, distinct_ids=False)
    (letter,) = dead.records
    headers = dict(letter.headers)
    assert headers["relay.error"] == b"invalid" and b"colour" in headers["relay.reason"]
    assert headers["relay.truncated"] == str(len(big_invalid)).encode()
    assert headers["relay.source.offset"] == b"0" and headers["h"] == b"v"
    assert big_invalid.startswith(letter.value) and 10_000 < len(letter.value) < 20_000
    by_id = {k: v[0] for k, v in results.by_id().items()}
    assert by_id["big"]["status"] == "rejected" and by_id["after"]["status"] == "ok"
    assert by_id["bulky"]["status"] == "ok" and by_id["bulky"]["data"] is None  # written without them, and says so
    bulky_record = next(r for r in results.records if r.key == b"bulky")
    assert dict(bulky_record.headers)["relay.truncated"].isdigit()
    assert [c.uuid for c in sandbox.calls_for("message.send")] == ["bulky", "after"]


@pytest.mark.parametrize("fault", ["too-small", "refusing"])
async def test_an_unwritable_results_topic_turns_readyz_503_and_recovers_in_order_once_fixed(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``too-small``: the topic takes 100 bytes, less than any result even cut (the relay knows its limit and
    sends nothing it would refuse). ``refusing``: the broker refuses every record's timestamp (INVALID_TIMESTAMP,
    not retriable); a refused batch also breaks the idempotent producer's sequence numbers for that partition
    (OUT_OF_ORDER_SEQUENCE_NUMBER ever after), so recovering needs a new producer."""
    if fault == "refusing":
        # message.timestamp.before.max.ms = 0 refuses a record stamped before the broker's clock, not one stamped
        # in its current millisecond, as a producer without a linger may send it on loopback: every record of this
        # process (the relay's among them) is stamped a second back
        unstamped = AIOKafkaProducer.send

        async def stamped_a_second_back(self: AIOKafkaProducer, topic: str, value: Any = None, key: Any = None,
                                        partition: Any = None, timestamp_ms: int | None = None,
                                        headers: Any = None) -> Any:
            stamp = int(time.time() * 1000) - 1000 if timestamp_ms is None else timestamp_ms
            return await unstamped(self, topic, value, key, partition, stamp, headers)

        monkeypatch.setattr(AIOKafkaProducer, "send", stamped_a_second_back)
    port = free_port()
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=SCALE, http={"enabled": True,
                       "port": port})
    config = to_config(data)
    await create_topic(kafka_bootstrap, config.kafka.results_topic)
    await create_relay_topics(config)
    topic = config.kafka.intents_topics[0]
    async with relay_in_process(config) as metrics, \
            Collector(kafka_bootstrap, config.kafka.results_topic) as results:
        # results on both partitions first: the broker then knows the producer's sequence numbers there
        await produce(kafka_bootstrap, topic, [(b"oc_w", msgspec.json.encode(send(f"w-{i}", "oc_w")), [])
                                               for i in range(8)])
        await results.wait_for(8, timeout=30)
        assert {r.partition for r in results.records} == {0, 1}
        results.records.clear()
        broken = {"max.message.bytes": "100"} if fault == "too-small" else {"message.timestamp.before.max.ms": "0"}
        await set_topic(kafka_bootstrap, config.kafka.results_topic, **broken)
        await until_refused(kafka_bootstrap, config.kafka.results_topic)
        await produce(kafka_bootstrap, topic,
                      [(b"oc_k", msgspec.json.encode(send(f"k-{i}", "oc_k")), []) for i in range(3)])

        async def not_ready() -> bool:
            status, body = await readyz(port)
            return status == 503 and config.kafka.results_topic in body.get("reason", "")

        await wait_until(not_ready, 30, "/readyz to report the results topic")
        await asyncio.sleep(1.0)  # the write keeps being retried meanwhile; the key's next call must wait
        assert [c.uuid for c in sandbox.calls_for("message.send")][8:] == ["k-0"]
        assert not [r for r in results.records if r.key != b"probe"]
        assert metrics.value("relay_outbound_write_errors_total", topic=config.kafka.results_topic,
                             retriable="false") >= 1
        await set_topic(kafka_bootstrap, config.kafka.results_topic)  # fixed: every setting back to its default
        await wait_until(lambda: _keys(results, {b"k-0", b"k-1", b"k-2"}), 60, "the three results")

        async def ready() -> bool:
            return (await readyz(port))[0] == 200

        await wait_until(ready, 30, "/readyz to recover")
        if fault == "refusing":
            assert metrics.value("relay_outbound_producer_renewals_total") >= 1
    assert [r.key for r in results.records if r.key != b"probe"] == [b"k-0", b"k-1", b"k-2"]
    assert [c.uuid for c in sandbox.calls_for("message.send")][8:] == ["k-0", "k-1", "k-2"]


async def _keys(collector: Collector, keys: set[bytes]) -> bool:
    return keys <= {r.key for r in collector.records}
