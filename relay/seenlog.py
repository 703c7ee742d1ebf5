"""The inbound dedup memory shared by every replica and restart: a compacted Kafka topic, read whole and followed.

:class:`KafkaSeen` is the :class:`relay.dedup.SeenStore` of :mod:`relay.dedup`: a key an inbound request
published is written here (key: its 16-byte digest; value ``b"1"``; ``acks=all``) before the request is
answered, and every replica reads the topic from the beginning at start (before its HTTP server takes a
request) and then live, teaching its :class:`~relay.dedup.Dedup` every key the others published.

Why a compacted topic: one record per key survives however often an event came, and records older than
``inbound.dedup_ttl`` are deleted (``retention.ms``), so the topic holds at most what one replica's memory does,
and a start reads at most that. Why no new store: the relay depends on Kafka and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from relay.config import Config
from relay.dedup import Dedup

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

log = logging.getLogger(__name__)


def seen_topic_config(config: Config) -> dict[str, str]:
    """compact: one record per key; deleted after the dedup TTL: an older key would not be remembered anyway."""
    return {"cleanup.policy": "compact,delete", "retention.ms": str(int(config.inbound.dedup_ttl * 1000)),
            "segment.ms": str(3600 * 1000)}


class KafkaSeen:
    """Published keys out to ``kafka.dedup_topic``, the others' keys in to ``dedup`` (module doc)."""

    def __init__(self, config: Config, producer: AIOKafkaProducer, dedup: Dedup) -> None:
        self._config = config
        self.topic = config.kafka.dedup_topic
        self._producer = producer
        self._dedup = dedup
        self._consumer: AIOKafkaConsumer | None = None
        self._tail: asyncio.Task[None] | None = None
        self.read = 0

    async def add(self, digests: Sequence[bytes]) -> None:
        acks = [await self._producer.send(self.topic, b"1", key=digest) for digest in digests]
        await asyncio.gather(*acks)

    async def start(self, load_timeout: float = 300.0) -> None:
        """Read every key there now, then follow; only then is :meth:`add` handed to the dedup memory."""
        from aiokafka import TopicPartition

        from relay.kafka import FOLLOWER_FETCH_WAIT_MS, ensure_topics, make_consumer, read_to_end

        if self._config.kafka.create_topics:
            await ensure_topics(self._config.kafka, {self.topic: seen_topic_config(self._config)})
        partitions: set[int] = await self._producer.partitions_for(self.topic)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer = self._consumer = make_consumer(self._config.kafka, group_id=None, enable_auto_commit=False,
                                                  fetch_max_wait_ms=FOLLOWER_FETCH_WAIT_MS)
        await consumer.start()
        consumer.assign(tps)
        async with asyncio.timeout(load_timeout):
            await read_to_end(consumer, tps, self._apply)
        self._dedup.share(self)
        self._tail = asyncio.create_task(self._follow(consumer), name="dedup-tail")
        log.info("dedup: %d published keys read from %s; following it", self.read, self.topic)

    def wait(self) -> asyncio.Task[None]:
        assert self._tail is not None, "KafkaSeen.wait before start"
        return self._tail

    async def stop(self) -> None:
        tail, self._tail = self._tail, None
        if tail is not None:
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            for records in (await consumer.getmany(timeout_ms=10_000)).values():  # records end the wait
                self._apply(records)

    def _apply(self, records: list[Any]) -> None:
        digests = [r.key for r in records if r.key is not None and r.value is not None and len(r.key) == 16]
        self.read += len(digests)
        if digests:
            self._dedup.learn(digests)
