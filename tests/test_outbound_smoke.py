"""The relay end to end, in-process: intents on the real broker, calls at the sandbox, results back."""

from __future__ import annotations

import asyncio
import time
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


async def test_a_quiet_relay_lets_the_broker_hold_its_fetches_and_an_intent_still_ends_the_wait_at_once(
        kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """After QUIET_AFTER with nothing read, the outbound fetches may be held 5 s (an idle relay asks every 5 s, not
    every second); an intent that arrives still ends the held fetch at once, and the wait goes back to 1 s."""
    import relay.outbound
    from relay.kafka import IDLE_FETCH_WAIT_MS, QUIET_FETCH_WAIT_MS, set_fetch_wait

    waits: list[int] = []

    def recording(consumer: object, wait_ms: int) -> None:
        waits.append(wait_ms)
        set_fetch_wait(consumer, wait_ms)  # type: ignore[arg-type]

    monkeypatch.setattr(relay.outbound, "QUIET_AFTER", 2.0)
    monkeypatch.setattr(relay.outbound, "set_fetch_wait", recording)
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url))
    intent = {"kind": "message.send", "id": "q-1", "receive_id_type": "chat_id", "receive_id": "oc_1",
              "msg_type": "text", "content": {"text": "hi"}}
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results:
        for _ in range(100):
            if waits[-1:] == [QUIET_FETCH_WAIT_MS]:
                break
            await asyncio.sleep(0.1)
        assert waits[-1:] == [QUIET_FETCH_WAIT_MS], waits
        # the fetch held 1 s when the wait changed has come back: a quiet one is held now, 3.5 s of it left
        await asyncio.sleep(IDLE_FETCH_WAIT_MS / 1000 + 0.5)
        produced = time.monotonic()
        await produce(kafka_bootstrap, config.kafka.intents_topics[0], [intent])
        await results.wait_for(1, 30)
        took = time.monotonic() - produced
    assert results.by_id()["q-1"][0]["status"] == "ok"
    assert waits[waits.index(QUIET_FETCH_WAIT_MS) + 1] == IDLE_FETCH_WAIT_MS  # reading again: held 1 s at most
    # the held fetch ended when the record arrived, not when its 5 s were up (3.5 s or more after the write; a
    # generous bound for one call and one result write on a loaded machine)
    assert took < 3.0, f"result {took:.2f}s after the intent was written"
