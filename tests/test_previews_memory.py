"""The 5-second memory of URL-preview updates against the real Kafka broker."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from relay.config import KafkaConfig
from relay.kafka import make_producer
from relay.previews.memory import KafkaPreviewMemory


@pytest.mark.integration
async def test_kafka_memory_survives_a_restart_and_is_compacted(kafka_bootstrap: str, topic_prefix: str) -> None:
    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap, preview_memory_topic=f"{topic_prefix}.memory",
                      topic_partitions=3)
    first = KafkaPreviewMemory(cfg)
    await first.start()  # creates the topic, compacted
    try:
        assert await first.load() == {}
        await first.record("default", ["t1", "t2"], 1000.0)
        await first.record("default", ["t1"], 2000.0)
        await first.record("other", ["t1"], 1500.0)
    finally:
        await first.stop()

    # a new process: only the topic carries the memory over (the app's way: its shared producer, no start())
    producer = make_producer(cfg)
    await producer.start()
    try:
        remembered = await KafkaPreviewMemory(cfg, producer).load()
    finally:
        await producer.stop()
    assert remembered == {("default", "t1"): 2000.0, ("default", "t2"): 1000.0, ("other", "t1"): 1500.0}

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, cfg.preview_memory_topic)])
    finally:
        await admin.close()
    entries = {name: value for name, value, *_ in described[0].resources[0][4]}
    assert entries["cleanup.policy"] == "compact,delete"
