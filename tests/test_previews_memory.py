"""The preview memory (claims, followed live) against the real Kafka broker, and a claim with the broker away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError

from relay.config import KafkaConfig
from relay.kafka import make_producer
from relay.previews.claims import ClaimArbiter
from relay.previews.memory import Claim, KafkaPreviewMemory

SPACING = 600.0  # the arbiter's window: long enough that no claim here wins by time passing
WINDOW = 0.5


def memory_config(bootstrap: str, topic: str, **kw: object) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=bootstrap, preview_memory_topic=topic, topic_partitions=3, **kw)  # type: ignore[arg-type]


async def topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    return {name: value for name, value, *_ in described[0].resources[0][4]}


class Follower:
    """A started memory followed into a list of what it saw."""

    def __init__(self, cfg: KafkaConfig) -> None:
        self.memory = KafkaPreviewMemory(cfg)
        self.arbiter = ClaimArbiter(spacing=SPACING, claim_window=WINDOW)
        self.seen: list[tuple[str, str, float]] = []
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Follower:
        await self.memory.start()
        self.task = await self.memory.follow(self.arbiter, lambda app, token, at: self.seen.append((app, token, at)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.memory.stop()


@pytest.fixture
async def cfg(kafka_bootstrap: str, topic_prefix: str) -> AsyncIterator[KafkaConfig]:
    yield memory_config(kafka_bootstrap, f"{topic_prefix}.memory")


@pytest.mark.integration
async def test_claims_survive_a_restart_on_a_compacted_topic_stamped_by_the_broker(cfg: KafkaConfig) -> None:
    async with Follower(cfg) as first:
        assert first.seen == []
        assert (await first.memory.claim("default", ["t1", "t2"], 10.0)).won
        assert not (await first.memory.claim("default", ["t1"], 10.0)).won  # within spacing + X of the first
        assert (await first.memory.claim("other", ["t1"], 10.0)).won  # another app's token
        # every record of the topic, ours included (the order across partitions is the tail's)
        assert sorted((app, token) for app, token, _ in first.seen) == [
            ("default", "t1"), ("default", "t1"), ("default", "t2"), ("other", "t1")]

    # a new process: only the topic carries the memory over (the app's way: its shared producer, no start())
    producer = make_producer(cfg)
    await producer.start()
    later = KafkaPreviewMemory(cfg, producer)
    try:
        arbiter = ClaimArbiter(spacing=SPACING, claim_window=WINDOW)
        seen: list[tuple[str, str, float]] = []
        await later.follow(arbiter, lambda app, token, at: seen.append((app, token, at)))
        assert sorted(seen) == sorted(first.seen)  # the same records, the same broker timestamps
        assert not (await later.claim("default", ["t2"], 10.0)).won  # judged as the first replica would
    finally:
        await later.stop()
        await producer.stop()

    entries = await topic_configs(cfg.bootstrap_servers, cfg.preview_memory_topic)
    assert entries["cleanup.policy"] == "compact,delete"
    assert entries["message.timestamp.type"] == "LogAppendTime"


@pytest.mark.integration
async def test_two_replicas_claiming_one_token_at_once_agree_on_exactly_one_winner(cfg: KafkaConfig) -> None:
    async with Follower(cfg) as one, Follower(cfg) as two:
        for n in range(10):
            token = f"race-{n}"
            other = [f"x-{n}", token] if n % 2 else [token]  # a call of two tokens, the other one free
            a, b = await asyncio.gather(one.memory.claim("default", [token], 10.0),
                                        two.memory.claim("default", other, 10.0))
            assert a.won != b.won, (n, a, b)
        await asyncio.sleep(0.5)  # let both tails read every record (they are judged already; this is for `seen`)
        assert sorted(one.seen) == sorted(two.seen) and len(one.seen) == 25  # 2 per round, 5 x-tokens


@pytest.mark.integration
async def test_an_existing_topic_stamped_with_create_time_is_switched_to_the_broker_clock(
        kafka_bootstrap: str, cfg: KafkaConfig) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(cfg.preview_memory_topic, num_partitions=3, replication_factor=1,
                                            topic_configs={"cleanup.policy": "compact", "retention.ms": "7200000"})])
    finally:
        await admin.close()
    async with Follower(cfg) as follower:
        assert (await follower.memory.claim("default", ["t"], 10.0)).won
    entries = await topic_configs(kafka_bootstrap, cfg.preview_memory_topic)
    assert entries["message.timestamp.type"] == "LogAppendTime"
    assert entries["cleanup.policy"] == "compact" and entries["retention.ms"] == "7200000"  # the rest kept


@pytest.mark.integration
async def test_a_topic_the_relay_does_not_manage_is_left_alone_with_a_warning(
        kafka_bootstrap: str, cfg: KafkaConfig, caplog: pytest.LogCaptureFixture) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(cfg.preview_memory_topic, num_partitions=1, replication_factor=1,
                                            topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()
    unmanaged = memory_config(kafka_bootstrap, cfg.preview_memory_topic, create_topics=False)
    async with Follower(unmanaged) as follower:
        assert (await follower.memory.claim("default", ["t"], 10.0)).won
    entries = await topic_configs(kafka_bootstrap, cfg.preview_memory_topic)
    assert entries["message.timestamp.type"] == "CreateTime"
    assert any("clock skew" in r.getMessage() and cfg.preview_memory_topic in r.getMessage() for r in caplog.records)


async def test_a_claim_that_cannot_be_written_is_late_not_an_error() -> None:
    class Away:
        async def send(self, *args: object, **kw: object) -> None:
            raise KafkaConnectionError("broker away")

    memory = KafkaPreviewMemory(KafkaConfig(), Away())  # type: ignore[arg-type]
    memory._tail = asyncio.get_running_loop().create_future()  # type: ignore[assignment]  # "following"
    assert await memory.claim("default", ["t"], 1.0) == Claim(won=False, late=True)
    assert memory._pending == {}
