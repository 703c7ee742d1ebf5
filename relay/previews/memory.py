"""The 5-second memory of URL-preview updates: "token T of app A was last updated at t", across restarts.

Feishu refuses a preview token updated twice within 5 s (seeds/url_preview_batch_update.md), and a relay that
crashed and restarted does not know what it sent just before. :class:`KafkaPreviewMemory` writes each token's
update time to a compacted Kafka topic, acknowledged before the attempt is sent, and reads the topic back at
start-up; :class:`PreviewMemory` is the Protocol the coalescer (:mod:`relay.previews`) uses, so tests can pass
an in-memory fake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

import msgspec

from relay.config import KafkaConfig

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

log = logging.getLogger(__name__)


class PreviewMemory(Protocol):
    """Where "token T of app A was last updated at wall-clock t" survives the process."""

    async def load(self) -> dict[tuple[str, str], float]:
        """Every remembered ``(app, token) -> wall-clock time`` (the latest one per token)."""
        ...

    async def record(self, app: str, tokens: Sequence[str], at: float) -> None:
        """Remember ``tokens`` as updated at wall-clock ``at``; returns once it is durable."""
        ...


class _MemoryValue(msgspec.Struct):
    """Value of a memory record; lenient so a newer relay's extra fields never break an older one."""

    updated_at: float


_encode_memory = msgspec.json.Encoder()
_decode_memory = msgspec.json.Decoder(_MemoryValue)
MEMORY_KEY_SEPARATOR: Final = "\x00"
# compact: one record per key survives, so the topic is bounded by the number of tokens, not of updates;
# delete after a day with hourly segments: a remembered update only matters for 5 s, so tokens nobody has
# touched for a day drop out instead of accumulating forever (the active segment is never deleted early).
MEMORY_TOPIC_CONFIG: Final = {
    "cleanup.policy": "compact,delete",
    "retention.ms": str(24 * 3600 * 1000),
    "segment.ms": str(3600 * 1000),
}


def memory_key(app: str, token: str) -> bytes:
    return f"{app}{MEMORY_KEY_SEPARATOR}{token}".encode()


class KafkaPreviewMemory:
    """The 5-second memory in a compacted Kafka topic (``kafka.preview_memory_topic``).

    Key ``<app>\\x00<token>``, value ``{"updated_at": <epoch seconds>}``, written with the relay's idempotent
    ``acks=all`` producer and awaited before the attempt is sent; read from the beginning to the end offsets
    at start-up with a plain ``assign()``-ed consumer (no group: every replica reads everything, commits nothing).

    Why a compacted topic: the relay already depends on Kafka and nothing else, so this adds no store to run,
    back up or secure; a write is as durable as a result record (all in-sync replicas) and so survives a crash
    of the process, of the host, or a move of the relay to another machine; compaction keeps one record per
    token, so a restart reads at most one record per token however many updates there were; and every replica
    sees every other replica's updates at its next start-up. Wall-clock time is stored because monotonic clocks
    do not survive a restart; an entry from the future (clock skew) is treated as "just now".
    """

    def __init__(self, cfg: KafkaConfig, producer: AIOKafkaProducer | None = None, *, topic: str | None = None,
                 load_timeout: float = 60.0) -> None:
        """``producer``: the relay's started ``acks=all`` producer to share (not stopped here); without one,
        :meth:`start` starts (and :meth:`stop` stops) a producer of its own."""
        self._cfg = cfg
        self.topic = topic or cfg.preview_memory_topic
        self._load_timeout = load_timeout
        self._producer = producer
        self._owned: AIOKafkaProducer | None = None
        self._topic_ready = False

    async def start(self) -> None:
        from relay.kafka import make_producer

        await self._ensure_topic()
        if self._producer is None:
            self._owned = self._producer = make_producer(self._cfg)
            await self._owned.start()

    async def stop(self) -> None:
        owned, self._owned = self._owned, None
        if owned is not None:
            self._producer = None
            await owned.stop()

    async def _ensure_topic(self) -> None:
        """Create the topic, compacted, when missing (and ``kafka.create_topics`` allows); once per instance."""
        from relay.kafka import ensure_topics

        if self._cfg.create_topics and not self._topic_ready:
            await ensure_topics(self._cfg, {self.topic: dict(MEMORY_TOPIC_CONFIG)})
        self._topic_ready = True

    async def record(self, app: str, tokens: Sequence[str], at: float) -> None:
        if self._producer is None:
            raise RuntimeError("KafkaPreviewMemory.record before start()")
        value = _encode_memory.encode(_MemoryValue(at))
        sent = [await self._producer.send(self.topic, value, key=memory_key(app, token)) for token in tokens]
        await asyncio.gather(*sent)

    async def load(self) -> dict[tuple[str, str], float]:
        from aiokafka import TopicPartition

        from relay.kafka import make_consumer

        if self._producer is None:
            raise RuntimeError("KafkaPreviewMemory.load without a producer: pass one or start() first")
        await self._ensure_topic()
        partitions: set[int] = await self._producer.partitions_for(self.topic)  # waits for the metadata
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        remembered: dict[tuple[str, str], float] = {}
        consumer = make_consumer(self._cfg, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end: dict[TopicPartition, int] = await consumer.end_offsets(tps)
            async with asyncio.timeout(self._load_timeout):
                todo = {tp for tp in tps if await consumer.position(tp) < end[tp]}
                while todo:
                    batch = await consumer.getmany(*todo, timeout_ms=500)
                    for records in batch.values():
                        for record in records:
                            self._read(record.key, record.value, remembered)
                    todo = {tp for tp in todo if await consumer.position(tp) < end[tp]}
        finally:
            await consumer.stop()
        log.info("preview memory: %d tokens remembered from %s", len(remembered), self.topic)
        return remembered

    @staticmethod
    def _read(key: bytes | None, value: bytes | None, into: dict[tuple[str, str], float]) -> None:
        if key is None or value is None:
            return  # a tombstone or a stranger's record: nothing to remember
        app, sep, token = key.decode("utf-8", "replace").partition(MEMORY_KEY_SEPARATOR)
        try:
            at = _decode_memory.decode(value).updated_at
        except msgspec.DecodeError:
            log.warning("preview memory: unreadable value under key %r, ignored", key[:80])
            return
        if sep and at > into.get((app, token), float("-inf")):
            into[(app, token)] = at
