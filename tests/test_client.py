"""relay.client: typed intents keyed by their ordering key, send() acked by Kafka, send_and_wait() returning the
result record; against the real broker with the whole relay in process and the sandbox as Feishu."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from relay.asyncapi import EXAMPLES
from relay.client import RelayClient, encode
from relay.intents import Intent, MessageReply, MessageSend, PinAdd, decode_intent, ordering_key
from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import APP_ID, APP_SECRET, Collector, config_data, create_relay_topics, relay_in_process, to_config


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_every_kind_encodes_to_a_record_the_relay_decodes_back(kind: str) -> None:
    intent: Intent = decode_intent(msgspec.json.encode(EXAMPLES[kind]))
    key, value = encode(intent)
    assert decode_intent(value) == intent
    assert key == ordering_key(intent).encode()


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}))
    await box.start()
    yield box
    await box.stop()


@pytest.mark.integration
async def test_send_and_send_and_wait_through_the_relay(kafka_bootstrap: str, topic_prefix: str,
                                                       sandbox: Sandbox) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url))
    k = config.kafka
    await create_relay_topics(config)
    send = MessageSend(id="c-1", receive_id_type="chat_id", receive_id="oc_client", msg_type="text",
                       content={"text": "hi"})
    async with relay_in_process(config), \
            RelayClient(kafka_bootstrap, intents_topic=k.intents_topics[0], results_topic=k.results_topic) as relay, \
            Collector(kafka_bootstrap, k.intents_topics[0]) as intents, \
            Collector(kafka_bootstrap, k.results_topic) as results:
        metadata = await relay.send(send, headers=[("traceparent", b"00-1-2-01")])
        assert metadata.topic == k.intents_topics[0] and metadata.offset >= 0  # acknowledged by the broker
        result = await relay.send_and_wait(
            MessageReply(id="c-2", message_id="om_parent", chat_id="oc_client", msg_type="text",
                         content={"text": "ok"}), timeout=30)
        many = await asyncio.gather(*(relay.send_and_wait(PinAdd(id=f"c-pin-{i}", message_id=f"om_{i}"), timeout=30)
                                      for i in range(5)))
        await results.wait_for(7, 30)
        await intents.wait_for(7, 10)
    assert result.id == "c-2" and result.kind == "message.reply" and result.status in ("ok", "failed")
    assert result.attempts >= 1 and result.finished_at >= result.received_at
    assert [r.id for r in many] == [f"c-pin-{i}" for i in range(5)]
    assert {r.status for r in many} <= {"ok", "failed"} and all(r.kind == "pin.add" for r in many)
    keys = {msgspec.json.decode(r.value)["id"]: r.key for r in intents.records}
    assert keys["c-1"] == b"oc_client" and keys["c-2"] == b"om_parent" and keys["c-pin-3"] == b"om_3"
    (sent,) = results.by_id()["c-1"]
    assert sent["status"] == "ok" and sent["data"]["message_id"].startswith("om_")


@pytest.mark.integration
async def test_send_and_wait_times_out_without_a_relay(kafka_bootstrap: str, topic_prefix: str) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, "http://127.0.0.1:9"))
    await create_relay_topics(config)
    k = config.kafka
    async with RelayClient(kafka_bootstrap, intents_topic=k.intents_topics[0], results_topic=k.results_topic) as relay:
        with pytest.raises(TimeoutError, match="no result for c-late"):
            await relay.send_and_wait(PinAdd(id="c-late", message_id="om_1"), timeout=1.0)
