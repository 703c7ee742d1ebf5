"""The dedup memory shared through the real broker: a redelivery landing on another replica, or on a process
started after the first copy was published, is answered as a duplicate and not published again."""

from __future__ import annotations

import asyncio
import time

import pytest

from relay.dedup import Dedup, Outcome
from relay.kafka import make_producer
from relay.seenlog import KafkaSeen
from tests.relaykit import config_data, to_config

pytestmark = pytest.mark.integration


async def test_a_redelivery_to_another_replica_or_after_a_restart_is_a_duplicate(kafka_bootstrap: str,
                                                                                   topic_prefix: str) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, "http://127.0.0.1:1"))
    producer = make_producer(config.kafka)
    await producer.start()
    published: list[str] = []

    def publisher(name: str):  # type: ignore[no-untyped-def]
        async def publish() -> None:
            published.append(name)
        return publish

    def replica() -> tuple[Dedup, KafkaSeen]:
        dedup = Dedup(config.inbound.dedup_ttl, 1000, time.time)
        return dedup, KafkaSeen(config, producer, dedup)

    seens: list[KafkaSeen] = []
    try:
        (a, a_seen), (b, b_seen) = replica(), replica()
        seens += [a_seen, b_seen]
        await a_seen.start()
        await b_seen.start()
        keys = ["event:ev_1", "message:om_1"]
        assert await a.publish_once(keys, publisher("a"), 5) is Outcome.PUBLISHED
        for _ in range(100):  # b's tail reads what a wrote (a wrote it before answering)
            if b_seen.read >= 2:
                break
            await asyncio.sleep(0.05)
        # Feishu redelivers to b, even under a new event id for the same message
        assert await b.publish_once(["event:ev_2", "message:om_1"], publisher("b"), 5) is Outcome.DUPLICATE
        c, c_seen = replica()  # a replica (or a restart) starting now reads it from the topic
        seens.append(c_seen)
        await c_seen.start()
        assert await c.publish_once(keys, publisher("c"), 5) is Outcome.DUPLICATE
        assert await c.publish_once(["event:ev_3"], publisher("c"), 5) is Outcome.PUBLISHED
        assert published == ["a", "c"]
    finally:
        for seen in seens:
            await seen.stop()
        await producer.stop()
