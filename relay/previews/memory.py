"""The memory of URL-preview updates, shared by every replica and owner: a compacted Kafka topic, followed live.

Feishu refuses a preview token updated twice within 5 s (docs/feishu-rules.md §5.4). The relay that
updates a token may be another replica (token B of ``[A, B]`` is read on A's partition, ``[B]`` on B's), the
previous owner of a partition (a rebalance, a drain), or this process before a crash. So every attempt is preceded
by a *claim* written to the memory topic, and every replica follows the topic from the beginning and then live:

* :meth:`KafkaPreviewMemory.follow` reads every record from the beginning (a plain ``assign()``-ed consumer: no
  group, every replica reads everything, commits nothing), hands each to a
  :class:`~relay.previews.claims.ClaimArbiter` (which says whether it wins) and to the caller's ``seen`` callback
  (which holds the token back in the planner), returns once it has read what was there at the call, and keeps
  reading in a task of its own, which only ends with an error (the coalescer watches it) or :meth:`stop`.
* :meth:`KafkaPreviewMemory.claim` writes one record per token (``acks=all``), then waits until that tail has read
  them: the answer is the arbiter's verdict, computed from the log as every other replica computes it.

Records: key ``<app>\\x00<token>`` (so every claim on one token is on one partition, in one order), value
``{"updated_at": <writer's epoch seconds>, "claim": "<writer>/<n>"}``; the time that counts is the record's
timestamp, the broker's clock when the topic has ``message.timestamp.type=LogAppendTime``
(:data:`MEMORY_TOPIC_CONFIG`; an existing topic without it is altered at start when the relay manages its topics).
On a ``CreateTime`` topic each writer's clock stamps its own claims: still one verdict per claim for every replica,
but clock skew between replicas eats into the spacing (a writer d seconds ahead may update a token d seconds too
early), so a loud warning is logged. ``updated_at`` is kept for older relays reading the topic.

Why a compacted topic: the relay already depends on Kafka and nothing else, so this adds no store to run, back up
or secure; a write is as durable as a result record (all in-sync replicas); compaction keeps the latest record per
token, which is all the arbiter needs, so a start-up reads at most one record per token however many updates there
were. Do not add partitions to the memory topic while relays run: a token's claims must stay on one partition.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
from aiokafka.errors import KafkaError

from relay.config import KafkaConfig
from relay.previews.claims import ClaimArbiter

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

log = logging.getLogger(__name__)

# (app, token, at): a record of the memory topic, stamped ``at`` (epoch seconds, the broker's clock if LogAppendTime)
Seen = Callable[[str, str, float], None]


class Claim(msgspec.Struct, frozen=True):
    """How a claim ended: ``won`` when every token's claim won; ``late`` when it was not judged in time."""

    won: bool
    late: bool = False


class PreviewMemory(Protocol):
    """Where every replica's preview claims meet, in one order per token (module doc)."""

    async def follow(self, arbiter: ClaimArbiter, seen: Seen) -> asyncio.Task[None]:
        """Feed every record from the beginning to ``arbiter`` and ``seen``; return once the records there at the
        call are read, with the task that keeps reading (it ends only with an error or when stopped)."""
        ...

    async def claim(self, app: str, tokens: Sequence[str], timeout: float) -> Claim:
        """Write one claim per token, durably, and return the arbiter's verdict once the tail has read them all;
        ``Claim(won=False, late=True)`` if that takes longer than ``timeout`` seconds or the write fails (a
        record may still have been written: it counts, for everyone, like any claim)."""
        ...


class _MemoryValue(msgspec.Struct):
    """Value of a memory record; lenient so a newer relay's extra fields never break an older one."""

    updated_at: float = 0.0
    claim: str | None = None


_encode_memory = msgspec.json.Encoder()
_decode_memory = msgspec.json.Decoder(_MemoryValue)
MEMORY_KEY_SEPARATOR: Final = "\x00"
LOG_APPEND_TIME: Final = 1  # RecordMetadata.timestamp_type / ConsumerRecord.timestamp_type
# compact: one record per key survives, so the topic is bounded by the number of tokens, not of updates;
# delete after a day with hourly segments: a remembered update only matters for seconds, so tokens nobody has
# touched for a day drop out instead of accumulating forever (the active segment is never deleted early);
# LogAppendTime: every claim stamped by the broker's one clock (module doc); a minute before compaction: a replica
# starting now reads every claim of the last minute, not only each token's latest, as the tail saw them.
MEMORY_TOPIC_CONFIG: Final = {
    "cleanup.policy": "compact,delete",
    "retention.ms": str(24 * 3600 * 1000),
    "segment.ms": str(3600 * 1000),
    "message.timestamp.type": "LogAppendTime",
    "min.compaction.lag.ms": str(60 * 1000),
}
# describe_configs: the entry's source, from DescribeConfigs v1 on (v0 says is_default instead)
_DYNAMIC_TOPIC_CONFIG: Final = 1


def memory_key(app: str, token: str) -> bytes:
    return f"{app}{MEMORY_KEY_SEPARATOR}{token}".encode()


class _Pending:
    __slots__ = ("future", "left", "won")

    def __init__(self, tokens: int) -> None:
        self.left = tokens
        self.won = True
        self.future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def judge(self, won: bool) -> None:
        self.won = self.won and won
        self.left -= 1
        if self.left <= 0 and not self.future.done():
            self.future.set_result(self.won)


class KafkaPreviewMemory:
    """The memory in a compacted Kafka topic (``kafka.preview_memory_topic``), followed live; see the module doc."""

    def __init__(self, cfg: KafkaConfig, producer: AIOKafkaProducer | None = None, *, topic: str | None = None,
                 load_timeout: float = 60.0, wall: Callable[[], float] = time.time) -> None:
        """``producer``: the relay's started ``acks=all`` producer to share (not stopped here); without one,
        :meth:`start` starts (and :meth:`stop` stops) a producer of its own."""
        self._cfg = cfg
        self.topic = topic or cfg.preview_memory_topic
        self._load_timeout = load_timeout
        self._wall = wall
        self._producer = producer
        self._owned: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tail: asyncio.Task[None] | None = None
        self._topic_ready = False
        self._writer = uuid.uuid4().hex[:12]
        self._claims = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._warned_create_time = False
        self.read = 0  # records read (tests, logs)

    async def start(self) -> None:
        from relay.kafka import make_producer

        await self._ensure_topic()
        if self._producer is None:
            self._owned = self._producer = make_producer(self._cfg)
            await self._owned.start()

    async def stop(self) -> None:
        """Stop following (cancel and await the tail), then stop the consumer and any producer of our own."""
        tail, self._tail = self._tail, None
        if tail is not None:
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        owned, self._owned = self._owned, None
        if owned is not None:
            self._producer = None
            await owned.stop()

    # -- the topic -------------------------------------------------------------------------------------------

    async def _ensure_topic(self) -> None:
        """Create the topic when missing (``kafka.create_topics``), then make sure it stamps with the broker's
        clock: altered when the relay manages its topics, else a loud warning. Once per instance."""
        if self._topic_ready:
            return
        from aiokafka.admin import AIOKafkaAdminClient

        from relay.kafka import client_settings, ensure_topics

        if self._cfg.create_topics:
            await ensure_topics(self._cfg, {self.topic: dict(MEMORY_TOPIC_CONFIG)})
        admin = AIOKafkaAdminClient(**client_settings(self._cfg))
        await admin.start()
        try:
            await self._ensure_log_append_time(admin)
        finally:
            await admin.close()
        self._topic_ready = True

    async def _ensure_log_append_time(self, admin: Any) -> None:
        from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

        resource = ConfigResource(ConfigResourceType.TOPIC, self.topic)
        try:
            described = await admin.describe_configs([resource])
            entries = described[0].resources[0][4]
        except Exception as err:  # no DescribeConfigs permission, an old broker: keep going, say what it costs
            self._warn_create_time(f"its config could not be read ({type(err).__name__}: {err})")
            return
        kind = next((e[1] for e in entries if e[0] == "message.timestamp.type"), None)
        if kind == "LogAppendTime":
            return
        if not self._cfg.create_topics:
            self._warn_create_time(f"message.timestamp.type={kind} and kafka.create_topics is off")
            return
        # AlterConfigs replaces the topic's whole dynamic config: send what is set on it now, plus ours
        dynamic = {e[0]: e[1] for e in entries
                   if (not e[3] if isinstance(e[3], bool) else e[3] == _DYNAMIC_TOPIC_CONFIG) and e[1] is not None}
        dynamic["message.timestamp.type"] = "LogAppendTime"
        try:
            answer = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, self.topic, dynamic)])
            errors = [r for a in answer for r in a.resources if r[0] != 0]
            if errors:
                raise RuntimeError(f"error code {errors[0][0]}: {errors[0][1]}")
        except Exception as err:
            self._warn_create_time(f"message.timestamp.type={kind} and altering it failed ({err})")
            return
        log.warning("preview memory: %s had message.timestamp.type=%s; set to LogAppendTime", self.topic, kind)

    def _warn_create_time(self, why: str) -> None:
        self._warned_create_time = True
        log.warning("preview memory: %s: %s. Preview claims are then stamped by each replica's own clock: clock skew "
                    "between replicas lets a token be updated that much earlier than Feishu's 5 s (set "
                    "message.timestamp.type=LogAppendTime on the topic)", self.topic, why)

    # -- following -------------------------------------------------------------------------------------------

    async def follow(self, arbiter: ClaimArbiter, seen: Seen) -> asyncio.Task[None]:
        from aiokafka import TopicPartition

        from relay.kafka import FOLLOWER_FETCH_WAIT_MS, make_consumer, read_to_end

        if self._producer is None:
            raise RuntimeError("KafkaPreviewMemory.follow without a producer: pass one or start() first")
        if self._tail is not None:
            raise RuntimeError("KafkaPreviewMemory.follow called twice")
        await self._ensure_topic()
        partitions: set[int] = await self._producer.partitions_for(self.topic)  # waits for the metadata
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer = self._consumer = make_consumer(self._cfg, group_id=None, enable_auto_commit=False,
                                                  fetch_max_wait_ms=FOLLOWER_FETCH_WAIT_MS)
        await consumer.start()
        consumer.assign(tps)

        def take(records: list[Any]) -> None:
            for record in records:
                self._apply(record, arbiter, seen)

        async with asyncio.timeout(self._load_timeout):
            await read_to_end(consumer, tps, take)
        log.info("preview memory: %d records of %d tokens read from %s; following it", self.read, len(arbiter),
                 self.topic)
        self._tail = asyncio.create_task(self._follow(consumer, arbiter, seen), name="preview-memory")
        return self._tail

    async def _follow(self, consumer: AIOKafkaConsumer, arbiter: ClaimArbiter, seen: Seen) -> None:
        latest = 0.0
        last_prune = time.monotonic()
        while True:
            # records end the wait; without any there is nothing to do but the minutely prune
            batch = await consumer.getmany(timeout_ms=10_000)
            for records in batch.values():
                for record in records:
                    latest = max(latest, self._apply(record, arbiter, seen))
            if time.monotonic() - last_prune > 60.0:
                arbiter.prune(latest)  # by the records' own clock: no skew with this host
                last_prune = time.monotonic()

    def _apply(self, record: Any, arbiter: ClaimArbiter, seen: Seen) -> float:
        """One record, in log order: judged, seen, and its writer told if that is us; returns its time."""
        key, value = record.key, record.value
        if key is None or value is None:
            return 0.0  # a tombstone or a stranger's record: nothing to remember
        app, sep, token = key.decode("utf-8", "replace").partition(MEMORY_KEY_SEPARATOR)
        if not sep:
            return 0.0
        self.read += 1
        at = float(record.timestamp) / 1000.0
        won = arbiter.read((app, token), at)
        seen(app, token, at)
        try:
            claim = _decode_memory.decode(value).claim
        except msgspec.DecodeError:
            log.warning("preview memory: unreadable value under key %r, counted as a claim", key[:80])
            return at
        pending = self._pending.get(claim) if claim is not None else None
        if pending is not None:
            pending.judge(won)
        return at

    # -- claiming --------------------------------------------------------------------------------------------

    async def claim(self, app: str, tokens: Sequence[str], timeout: float) -> Claim:
        producer = self._producer
        if producer is None or self._tail is None:
            raise RuntimeError("KafkaPreviewMemory.claim before follow()")
        claim = f"{self._writer}/{next(self._claims)}"
        pending = self._pending[claim] = _Pending(len(tokens))
        try:
            value = _encode_memory.encode(_MemoryValue(self._wall(), claim))
            async with asyncio.timeout(timeout):
                acks = [await producer.send(self.topic, value, key=memory_key(app, token)) for token in tokens]
                for meta in await asyncio.gather(*acks):
                    if meta.timestamp_type != LOG_APPEND_TIME and not self._warned_create_time:
                        self._warn_create_time("the broker stamps its records with CreateTime")
                won = await pending.future
        except TimeoutError:
            return Claim(won=False, late=True)
        except KafkaError as err:  # the broker is away: not sent now, claimed again later
            log.warning("preview memory: a claim on %d token(s) could not be written: %s", len(tokens), err)
            return Claim(won=False, late=True)
        finally:
            del self._pending[claim]
        return Claim(won=won)
