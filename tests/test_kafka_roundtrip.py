"""The real broker: produce, consume with a group and a manual commit, and resume from the commit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.relaykit import unclosed_resources

pytestmark = pytest.mark.integration


async def test_group_consume_with_manual_commit(
    kafka_bootstrap: str, new_topic: Callable[..., Awaitable[str]], topic_prefix: str
) -> None:
    topic = await new_topic("roundtrip", partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i % 3}".encode())
    finally:
        await producer.stop()

    group = f"{topic_prefix}.group"

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest")

    first = consumer()
    await first.start()
    seen: list[bytes] = []
    commits: dict[TopicPartition, int] = {}
    try:
        while len(seen) < 6:
            batch = await first.getmany(timeout_ms=2000, max_records=6 - len(seen))
            for tp, records in batch.items():
                seen.extend(r.value for r in records if r.value is not None)
                await first.commit({tp: records[-1].offset + 1})
                commits[tp] = records[-1].offset + 1
    finally:
        await first.stop()
    assert len(seen) == 6

    second = consumer()
    await second.start()
    rest: list[bytes] = []
    try:
        while len(seen) + len(rest) < 10:
            batch = await second.getmany(timeout_ms=2000)
            for records in batch.values():
                rest.extend(r.value for r in records if r.value is not None)
        committed = {tp: await second.committed(tp) for tp in commits}
    finally:
        await second.stop()
    # the second member resumes exactly after the first one's commits: nothing repeated, nothing lost
    assert sorted(seen + rest) == sorted(f"v{i}".encode() for i in range(10))
    assert not set(seen) & set(rest)
    assert committed == commits


async def test_ensure_topics_applies_replication_settings(kafka_bootstrap: str, topic_prefix: str) -> None:
    """``kafka.topic_replication_factor`` and ``kafka.topic_min_insync_replicas`` reach the topics created."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from relay.config import parse_config
    from relay.kafka import ensure_topics

    cfg = parse_config({"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_partitions": 2,
                                  "topic_replication_factor": 1, "topic_min_insync_replicas": 1}}, env={}).kafka
    name = f"{topic_prefix}.replicated"
    await ensure_topics(cfg, {name: {"retention.ms": "3600000"}})
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        entries = {entry[0]: entry[1] for entry in response.resources[0][4]}
    finally:
        await admin.close()
    assert entries["min.insync.replicas"] == "1" and entries["retention.ms"] == "3600000"


async def test_a_topic_the_broker_refuses_is_an_error_naming_it(kafka_bootstrap: str, topic_prefix: str) -> None:
    """The single local broker cannot hold 3 replicas: the relay must say so, not log "created" and go on."""
    from relay.config import parse_config
    from relay.errors import RelayError
    from relay.kafka import ensure_topics

    cfg = parse_config({"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_replication_factor": 3}},
                       env={}).kafka
    name = f"{topic_prefix}.three-replicas"
    with pytest.raises(RelayError) as caught:
        await ensure_topics(cfg, {name: {}})
    assert name in str(caught.value) and "replication" in str(caught.value).lower()


async def test_set_fetch_wait_changes_the_wait_of_the_next_fetches(
    kafka_bootstrap: str, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """relay.kafka.set_fetch_wait reaches into aiokafka (no public way): the fetches sent after it carry the new
    max wait. Sent fetches are seen at the connection, so an aiokafka that stops reading the attribute fails this."""
    import aiokafka.conn

    from relay.kafka import set_fetch_wait

    topic = await new_topic("fetchwait", partitions=1)
    waits: list[int] = []
    send = aiokafka.conn.AIOKafkaConnection.send

    def spy(conn: aiokafka.conn.AIOKafkaConnection, request: object, *args: object, **kwargs: object) -> object:
        if type(request).__name__ == "FetchRequest":
            waits.append(request._max_wait_ms)  # type: ignore[attr-defined]
        return send(conn, request, *args, **kwargs)  # type: ignore[arg-type]

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, fetch_max_wait_ms=300)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aiokafka.conn.AIOKafkaConnection, "send", spy)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, 0)])
            await consumer.getmany(timeout_ms=700)
            set_fetch_wait(consumer, 40)
            before = len(waits)
            await consumer.getmany(timeout_ms=1000)
        finally:
            await consumer.stop()
    assert 300 in waits[:before]
    # the fetch in flight at the change still waits 300 ms; every one after it 40 ms (several in 1 s)
    assert waits[before + 1:] and set(waits[before + 1:]) == {40}, waits


async def test_a_follower_that_read_its_topic_whole_lets_the_broker_hold_its_fetches_and_still_reads_at_once(
    kafka_bootstrap: str, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """read_to_end leaves the follower's fetches at FOLLOWING_FETCH_WAIT_MS (an idle follower asks every 5 s), and a
    record written later is read at once: the broker answers a held fetch when records arrive."""
    from relay.config import KafkaConfig
    from relay.kafka import FOLLOWER_FETCH_WAIT_MS, FOLLOWING_FETCH_WAIT_MS, make_consumer, make_producer, read_to_end

    topic = await new_topic("following", partitions=1)
    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    producer = make_producer(cfg)
    await producer.start()
    consumer = make_consumer(cfg, group_id=None, fetch_max_wait_ms=FOLLOWER_FETCH_WAIT_MS)
    await consumer.start()
    try:
        await producer.send_and_wait(topic, b"before", key=b"k")
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        seen: list[bytes] = []
        await read_to_end(consumer, [tp], lambda records: seen.extend(r.value for r in records))
        assert seen == [b"before"]
        assert consumer._fetcher._fetch_max_wait_ms == FOLLOWING_FETCH_WAIT_MS
        await asyncio.sleep(1.5)  # a held fetch is in flight now
        await producer.send_and_wait(topic, b"after", key=b"k")
        sent = time.monotonic()
        batch = await consumer.getmany(tp, timeout_ms=10_000)
        took = time.monotonic() - sent
    finally:
        await consumer.stop()
        await producer.stop()
    assert [r.value for r in batch[tp]] == [b"after"]
    assert took < FOLLOWING_FETCH_WAIT_MS / 1000 - 1, f"read {took:.2f}s after it was written"


async def test_the_relays_consumers_fetch_routine_looks_for_work_every_fetcher_timeout(
    kafka_bootstrap: str, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """relay.kafka.Consumer sets aiokafka's Fetcher ``_fetcher_timeout`` after start (no public way): the routine's
    wait with nothing in flight is that long. An aiokafka that renames the attribute fails this."""
    from relay.config import KafkaConfig
    from relay.kafka import FETCHER_TIMEOUT, make_consumer

    topic = await new_topic("fetchertimeout", partitions=1)
    consumer = make_consumer(KafkaConfig(bootstrap_servers=kafka_bootstrap), group_id=None)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.getmany(timeout_ms=300)
        consumer.pause(TopicPartition(topic, 0))  # nothing to fetch: the routine waits its timeout
        fetcher = consumer._fetcher
        assignment = consumer._subscription.subscription.assignment
        _, _, timeout, _, _ = fetcher._get_actions_per_node(assignment)
    finally:
        await consumer.stop()
    assert timeout == FETCHER_TIMEOUT != 0.2  # aiokafka's own default


async def test_the_relays_consumer_stopped_in_the_turn_it_started_closes_without_an_error(
    kafka_bootstrap: str, new_topic: Callable[..., Awaitable[str]]
) -> None:
    """aiokafka's consumer without a group raises CancelledError from a stop() right after start() and leaves its
    connections open (aio-libs/aiokafka#647); the relay's parts stop at once when a later part fails to start."""
    from relay.config import KafkaConfig
    from relay.kafka import make_consumer

    topic = await new_topic("stopatonce", partitions=1)
    unclosed_resources()
    for assign in (False, True):
        consumer = make_consumer(KafkaConfig(bootstrap_servers=kafka_bootstrap), group_id=None)
        await consumer.start()
        if assign:
            consumer.assign([TopicPartition(topic, 0)])
        await consumer.stop()
        del consumer
    assert unclosed_resources() == []


async def test_the_relays_consumer_whose_start_fails_is_closed_before_the_error_reaches_its_caller() -> None:
    """No broker at the address: start() raises, and nothing of the consumer is left open for its caller to stop."""
    from aiokafka.errors import KafkaConnectionError

    from relay.config import KafkaConfig
    from relay.kafka import make_consumer

    unclosed_resources()
    consumer = make_consumer(KafkaConfig(bootstrap_servers="127.0.0.1:9"), group_id=None)
    with pytest.raises(KafkaConnectionError):
        await consumer.start()
    assert consumer._closed is True
    del consumer
    assert unclosed_resources() == []


async def test_the_relays_consumer_cancelled_while_it_starts_is_closed(kafka_bootstrap: str) -> None:
    from relay.config import KafkaConfig
    from relay.kafka import make_consumer

    unclosed_resources()
    for turns in range(1, 7):  # cancelled at each point of the bootstrap in turn, once it has begun
        consumer = make_consumer(KafkaConfig(bootstrap_servers=kafka_bootstrap), group_id=None)
        starting = asyncio.create_task(consumer.start())
        for _ in range(turns):
            await asyncio.sleep(0)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert consumer._closed is True
        del consumer, starting
    assert unclosed_resources() == []
