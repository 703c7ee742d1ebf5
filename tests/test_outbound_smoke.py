"""The relay end to end, in-process: intents on the real broker, calls at the sandbox, results back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import APP_ID, APP_SECRET, Collector, config_data, produce, relay_in_process, to_config

pytestmark = pytest.mark.integration


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}))
    await box.start()
    yield box
    await box.stop()


async def test_one_send_gets_one_ok_result(kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url))
    intent = {"kind": "message.send", "id": "n-1", "receive_id_type": "chat_id", "receive_id": "oc_1",
              "msg_type": "text", "content": {"text": "hi"}}
    async with relay_in_process(config) as metrics:
        await produce(kafka_bootstrap, config.kafka.intents_topics[0], [intent, b"not json"],
                      headers=[("traceparent", b"00-abc-def-01")])
        async with Collector(kafka_bootstrap, config.kafka.results_topic) as results, \
                Collector(kafka_bootstrap, config.kafka.dead_letter_topic) as dead:
            await results.wait_for(1, 30)
            await dead.wait_for(1, 30, distinct_ids=False)
        token_requests = metrics.value("relay_feishu_token_requests_total")
        throttled = metrics.value("relay_feishu_throttled_total")
        sent_ok = metrics.value("relay_intents_total", kind="message.send", status="ok")
    (result,) = results.by_id()["n-1"]
    assert result["status"] == "ok", result
    assert result["data"]["message_id"].startswith("om_")
    assert dict(results.records[0].headers) == {"traceparent": b"00-abc-def-01"}
    sends = sandbox.calls_for("message.send")
    assert len(sends) == 1 and sends[0].uuid == "n-1"
    assert token_requests == 1 and throttled == 0 and sent_ok == 1
    (poison,) = dead.records
    assert poison.value == b"not json"
    assert dict(poison.headers)["relay.error"] == b"decode"
