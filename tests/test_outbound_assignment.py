"""An assignment on the real broker: reading what the previous owner finished (the committed metadata, the
journal) never costs the relay its group membership, however many partitions it is given."""
from __future__ import annotations

import logging

import pytest

from tests.relaykit import (
    APP_ID,
    APP_SECRET,
    Collector,
    SandboxProcess,
    config_data,
    produce,
    relay_in_process,
    to_config,
)

pytestmark = pytest.mark.integration

PARTITIONS = 24
SCALE = 4.0


async def test_a_relay_given_24_partitions_keeps_its_membership_and_delivers(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka heartbeats only after the assignment callback returns. Reading 24 partitions' journal took the
    callback about 12 s, twice the kit's 6 s session: the coordinator dropped the member before its first
    heartbeat, every time, and no intent got a result."""
    box = SandboxProcess(apps={APP_ID: APP_SECRET}, time_scale=SCALE)
    await box.start()
    intents = [{"kind": "message.send", "id": f"a-{i}", "receive_id_type": "chat_id", "receive_id": f"oc_{i}",
                "msg_type": "text", "content": {"text": str(i)}} for i in range(10 * PARTITIONS)]
    try:
        config = to_config(config_data(kafka_bootstrap, topic_prefix, box.url, time_scale=SCALE,
                                       kafka={"topic_partitions": PARTITIONS}))
        assert config.kafka.journal_topic and config.outbound.session_timeout_ms == 6000
        with caplog.at_level(logging.INFO):
            async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results:
                await produce(kafka_bootstrap, config.kafka.intents_topics[0], intents)
                await results.wait_for(len(intents), timeout=90, what="results")
    finally:
        await box.stop()

    by_id = results.by_id()
    assert set(by_id) == {i["id"] for i in intents}
    assert all(len(r) == 1 and r[0]["status"] == "ok" for r in by_id.values())
    lost = [r.getMessage() for r in caplog.records if "membership lost" in r.getMessage()]
    assert lost == []
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("partitions ready:")]
    assert len(ready) == 1 and ready[0].count("[") == PARTITIONS  # read once, all of them, then released
