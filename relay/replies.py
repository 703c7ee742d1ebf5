"""Callbacks answered by the users' own services: request–reply over Kafka, within Feishu's 3 seconds.

Feishu wants a card click's toast or new card, or a link's preview, in the HTTP response to the callback, within
3 s, and never asks again. So the relay holding the request publishes the callback with three headers, and waits
(``inbound.reply_timeout`` from the request's arrival, default 2.5 s) for a service to write the answer:

    callback record (kafka.callbacks_topic)       reply record (the topic in relay.reply_topic)
      relay.correlation_id  <replica>.<n>           key and header relay.correlation_id: the same text
      relay.reply_topic     kafka.replies_topic     value: the answer JSON (relay.answers), nothing else
      relay.reply_deadline  Unix ms: later replies are dropped (a responder need not write one)

The handler (the webhook's, or any other inbound mode's) calls :meth:`Replies.open` before publishing, adds
``pending.headers`` to the record, and after the broker acknowledged it awaits :meth:`Replies.answer`, which
always returns an :class:`Answer` by the deadline: the service's answer when it came in time and is valid
(:func:`relay.answers.check_answer`), else the fallback (``{}`` or ``inbound.fallback_toast``) with the reason
counted and, for a malformed answer, logged. Never an exception, never a 500. A handler that gives up before
(the publish failed: no reply can come) calls :meth:`Replies.close`; either way the request is forgotten and
a reply to it from then on is dropped as late.

**Several replicas: every replica reads every partition of the replies topic, and keeps its own.** Each process
draws a random replica id at start; the correlation id begins with it, so a replica knows at a glance whether a
reply is its own (answer, or count it late / duplicate / unknown) or another replica's (skip it). Why not one
reply partition per replica: that needs the replicas to agree who owns which partition (a consumer group, whose
rebalances stall reads for seconds, longer than the whole budget) and caps the replicas at the partition count.
Reading everything costs each replica the reply traffic of all of them: small records at the rate people click,
far below what one consumer reads. A responder needs nothing but the two headers; any partition will do (the
client keys replies by correlation id).

The reader is assigned every partition the replies topic has at start and positioned at the end *before* the
relay answers its first callback: replies written earlier are never read (they answer requests of processes that
are gone), and a reply to a callback published afterwards is never skipped. It fetches with a short
``fetch_max_wait_ms`` (:data:`FETCH_MAX_WAIT_MS`, 20 ms): a reply may wait that long behind a fetch already in
flight (the constant's comment says when). The reader looks for partitions added to the replies topic every
:data:`PARTITION_CHECK_SECONDS` and reads a new one from its beginning (everything in it came after the reader
started); a reply landing there before it is noticed may come too late for its request, so add partitions
when clicks are few.

**Parked while nobody waits.** A reader fetching every 20 ms was most of an idle relay's CPU. After
:data:`PARK_AFTER` seconds with no request waiting, the reader pauses every partition (no fetch at all). The next
callback's handler awaits :meth:`Replies.ready` before it publishes: the reader moves to the end of each partition
(positions resolved by the broker) and resumes, one offsets round trip. Its reply is written after its callback
record, so it is after that end, and read. What lands while parked is never read: replies for requests that
ended at least :data:`PARK_AFTER` seconds ago, or other replicas' (so ``late`` and ``foreign`` are counted only
while the reader is awake). If moving to the end fails (the broker away), the reader resumes where it stopped.

Guarantee: one HTTP answer per callback, by the deadline; each reply is used at most once, only by the request
it names, only before that request's deadline. A reply lost on its way (responder down, broker slow) costs the
user the fallback answer, never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from relay.answers import Malformed, ToastType, check_answer, fallback
from relay.config import Config
from relay.errors import RelayError
from relay.kafka import make_consumer
from relay.metrics import Metrics

log = logging.getLogger(__name__)

CORRELATION_HEADER: Final = "relay.correlation_id"
REPLY_TOPIC_HEADER: Final = "relay.reply_topic"
DEADLINE_HEADER: Final = "relay.reply_deadline"

# the broker holds a fetch with nothing new this long. It answers a waiting fetch as soon as a reply lands in a
# partition the fetch asked for, but aiokafka sends one fetch per broker at a time, and a partition whose records
# were still being handed over when that fetch left is not in it: a reply landing there waits for the fetch
# to come back, up to this long (aiokafka's default 500 ms would be a fifth of the whole budget)
FETCH_MAX_WAIT_MS: Final = 20
# the reader parks (pauses its partitions) after this long with no request waiting (module doc)
PARK_AFTER: Final = 10.0
# moving to the end when a request wakes a parked reader gives up after this long (then it reads from where it was)
UNPARK_TIMEOUT: Final = 1.0
# how often the reader looks for partitions added to the replies topic (one metadata request)
PARTITION_CHECK_SECONDS: Final = 10.0
# correlation ids remembered after their request ended, to tell a late or second reply from a stray one
REMEMBERED: Final = 65536
# a topic created a moment ago may be missing from the metadata briefly
METADATA_TRIES: Final = 40
METADATA_RETRY_SECONDS: Final = 0.25

# the replies topic holds seconds of useful traffic: an hour is plenty to debug with, and bounds its size
REPLIES_TOPIC_CONFIG: Final = {"retention.ms": str(3600 * 1000)}

Source = Literal["reply", "timeout", "malformed", "unpublished", "duplicate"]


class Delivery(enum.Enum):
    """What became of one reply record (``relay_callback_replies_total{outcome}``)."""

    ANSWERED = "answered"  # handed to the request waiting for it
    LATE = "late"  # its request already ended without it (deadline passed): dropped
    DUPLICATE = "duplicate"  # its request already had an answer: dropped
    UNKNOWN = "unknown"  # this replica's id, but no request it remembers: dropped
    FOREIGN = "foreign"  # another replica's request: not ours to answer
    UNREADABLE = "unreadable"  # no correlation id (neither header nor key): dropped


@dataclass(slots=True, eq=False)
class Pending:
    """One request waiting for its reply. ``headers`` go on the callback record."""

    correlation_id: str
    event_type: str
    headers: list[tuple[str, bytes]]
    reply: asyncio.Future[bytes]


class Correlator:
    """The table of waiting requests and of recently ended ones (pure bookkeeping: no I/O, no clock).

    Correlation ids are ``<replica>.<sequence>``: unique within the process by the sequence, across processes by
    the replica id (64 random bits unless given).
    """

    __slots__ = ("_ended", "_pending", "_remember", "_sequence", "replica", "reply_topic")

    def __init__(self, reply_topic: str, *, replica: str | None = None, remember: int = REMEMBERED) -> None:
        self.replica = replica or secrets.token_hex(8)
        self.reply_topic = reply_topic
        self._sequence = itertools.count(1)
        self._pending: dict[str, Pending] = {}
        self._ended: OrderedDict[str, Delivery] = OrderedDict()  # correlation id -> what a reply now would be
        self._remember = remember

    def __len__(self) -> int:
        return len(self._pending)

    def open(self, event_type: str, deadline_ms: int) -> Pending:
        """Register a request; its reply is awaited on ``pending.reply``."""
        correlation = f"{self.replica}.{next(self._sequence)}"
        headers = [(CORRELATION_HEADER, correlation.encode()), (REPLY_TOPIC_HEADER, self.reply_topic.encode()),
                   (DEADLINE_HEADER, str(deadline_ms).encode())]
        pending = Pending(correlation, event_type, headers, asyncio.get_running_loop().create_future())
        self._pending[correlation] = pending
        return pending

    def deliver(self, correlation: str | None, value: bytes) -> Delivery:
        """Hand a reply to its request, or say why not."""
        if not correlation:
            return Delivery.UNREADABLE
        pending = self._pending.get(correlation)
        if pending is not None:
            if pending.reply.done():
                return Delivery.DUPLICATE
            pending.reply.set_result(value)
            return Delivery.ANSWERED
        replica, dot, _ = correlation.partition(".")
        if not dot or replica != self.replica:
            return Delivery.FOREIGN
        return self._ended.get(correlation, Delivery.UNKNOWN)

    def close(self, pending: Pending) -> None:
        """The request ended (answered, timed out, abandoned): a reply from now on is late or a duplicate."""
        if self._pending.pop(pending.correlation_id, None) is None:
            return
        answered = pending.reply.done() and not pending.reply.cancelled()
        if not pending.reply.done():
            pending.reply.cancel()
        self._ended[pending.correlation_id] = Delivery.DUPLICATE if answered else Delivery.LATE
        while len(self._ended) > self._remember:
            self._ended.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Answer:
    """The body to send Feishu, and where it came from (``source``) and why (``reason``, for a fallback)."""

    body: bytes
    source: Source
    reason: str | None = None


def record_correlation(key: bytes | None, headers: Sequence[tuple[str, bytes]]) -> str | None:
    """A reply record's correlation id: its ``relay.correlation_id`` header, else its key."""
    for name, value in headers:
        if name == CORRELATION_HEADER and value:
            return value.decode(errors="replace")
    return key.decode(errors="replace") if key else None


class Replies:
    """The reply reader and the request table of one process (see the module docstring).

    Wiring: ``replies = Replies(config, metrics); await replies.start()`` before the server answers callbacks;
    ``await replies.stop()`` after it stopped. ``run_task`` ends only if the reader died (watch it).
    """

    def __init__(self, config: Config, metrics: Metrics, *, consumer: AIOKafkaConsumer | None = None,
                 replica: str | None = None, partition_check: float = PARTITION_CHECK_SECONDS,
                 park_after: float = PARK_AFTER, clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = config.inbound
        self._topic = config.kafka.replies_topic
        self._metrics = metrics
        self._correlator = Correlator(self._topic, replica=replica)
        self._consumer = consumer or make_consumer(config.kafka, group_id=None, auto_offset_reset="latest",
                                                   fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
        self._started = False
        self._partitions: list[TopicPartition] = []
        self._partition_check = partition_check
        self._clock = clock
        self._park_after = park_after
        self._parked = False
        self._idle_since = clock()  # when the table last changed (a request opened or ended)
        self._unparking: asyncio.Task[None] | None = None
        self._assigning = asyncio.Lock()  # an unpark and a change of the assignment never overlap
        self.run_task: asyncio.Task[None] | None = None
        metrics.collect(self._export)

    def _export(self, metrics: Metrics) -> None:
        metrics.set("relay_callback_waiting", len(self._correlator), help="callbacks waiting for their reply")
        metrics.set("relay_callback_reply_partitions", len(self._partitions),
                    help="partitions of kafka.replies_topic this replica reads")
        metrics.set("relay_callback_replies_parked", int(self._parked),
                    help="1 while the reply reader is parked (no request has waited for a while: no fetches)")

    @property
    def replica(self) -> str:
        return self._correlator.replica

    async def start(self) -> None:
        """Start the reader on every partition of the replies topic, at its end, positions resolved."""
        await self._consumer.start()
        self._started = True
        partitions: set[int] | None = None
        for _ in range(METADATA_TRIES):
            cluster = await self._consumer._client.fetch_all_metadata()  # no public way for an unassigned consumer
            partitions = cluster.partitions_for_topic(self._topic)
            if partitions:
                break
            await asyncio.sleep(METADATA_RETRY_SECONDS)
        if not partitions:
            raise RelayError(f"kafka.replies_topic {self._topic!r} does not exist (set kafka.create_topics, or "
                             "create it)")
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now: a reply written after this is read
            await self._consumer.position(tp)
        self._partitions = tps
        self.run_task = asyncio.create_task(self._read(), name="callback-replies")
        log.info("callback replies: replica %s reading %d partition(s) of %s", self.replica, len(tps), self._topic)

    async def stop(self) -> None:
        if self._unparking is not None:
            self._unparking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._unparking
        if self.run_task is not None:
            self.run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.run_task
            self.run_task = None
        if self._started:
            self._started = False
            await self._consumer.stop()

    async def _read(self) -> None:
        checked = self._clock()
        while True:
            if self._clock() - checked >= self._partition_check:
                checked = self._clock()
                async with self._assigning:
                    await self._follow_new_partitions()
            self._park_if_idle()
            # awake, come back every second to park once idle; parked, only the partition check is due (a request
            # that wakes the reader resumes the partitions, and the records that come end the wait)
            wait = self._partition_check if self._parked else min(1.0, self._partition_check)
            batch = await self._consumer.getmany(timeout_ms=int(1000 * wait))
            for records in batch.values():
                for record in records:
                    correlation = record_correlation(record.key, record.headers)
                    outcome = self._correlator.deliver(correlation, record.value or b"")
                    self._metrics.inc("relay_callback_replies_total", help="reply records read, by what became of "
                                      "them", outcome=outcome.value)
                    if outcome in (Delivery.LATE, Delivery.DUPLICATE, Delivery.UNKNOWN, Delivery.UNREADABLE):
                        log.info("callback reply %.80s dropped: %s", correlation, outcome.value)

    @property
    def parked(self) -> bool:
        return self._parked

    def _park_if_idle(self) -> None:
        if (self._parked or self._unparking is not None or len(self._correlator)
                or self._clock() - self._idle_since < self._park_after):
            return
        self._consumer.pause(*self._partitions)
        self._parked = True
        log.debug("callback replies: parked (no request for %.0fs)", self._park_after)

    async def ready(self) -> None:
        """Await before publishing a callback: the reader is awake, so the reply to it will be read."""
        if not self._parked:
            return
        if self._unparking is None:
            self._unparking = asyncio.create_task(self._unpark(), name="callback-replies-unpark")
        await asyncio.shield(self._unparking)

    async def _unpark(self) -> None:
        try:
            async with self._assigning:
                try:
                    async with asyncio.timeout(UNPARK_TIMEOUT):
                        await self._consumer.seek_to_end(*self._partitions)
                        for tp in self._partitions:
                            await self._consumer.position(tp)
                except (TimeoutError, KafkaError) as err:
                    log.warning("callback replies: could not move to the end of %s (%s); reading on from where the "
                                "reader stopped", self._topic, str(err) or type(err).__name__)
                self._consumer.resume(*self._partitions)
                self._parked = False
                self._idle_since = self._clock()
        finally:
            self._unparking = None

    async def _follow_new_partitions(self) -> None:
        """Read partitions added to the replies topic since the last look, each from its beginning."""
        await self._consumer._client.force_metadata_update()
        known = {tp.partition for tp in self._partitions}
        found = self._consumer._client.cluster.partitions_for_topic(self._topic) or set()
        new = [TopicPartition(self._topic, p) for p in sorted(found - known)]
        if not new:
            return
        # assign() replaces the assignment and forgets positions: keep the old partitions where they are
        positions = {tp: await self._consumer.position(tp) for tp in self._partitions}
        self._consumer.assign([*self._partitions, *new])
        for tp, offset in positions.items():
            self._consumer.seek(tp, offset)
        await self._consumer.seek_to_beginning(*new)
        self._partitions = [*self._partitions, *new]
        if self._parked:  # a new assignment is not paused
            self._consumer.pause(*self._partitions)
        log.info("callback replies: reading %d new partition(s) of %s from their beginning", len(new), self._topic)

    def open(self, event_type: str, deadline_ms: int) -> Pending:
        """Register a callback before publishing it; put ``pending.headers`` on its record.

        ``deadline_ms`` (Unix ms) travels in ``relay.reply_deadline`` so a responder can skip a dead request.
        The caller must end with :meth:`answer` or :meth:`close`, and await :meth:`ready` before publishing.
        """
        self._idle_since = self._clock()
        return self._correlator.open(event_type, deadline_ms)

    def close(self, pending: Pending) -> None:
        """Forget a request without waiting (its publish failed): a reply to it counts as late."""
        self._correlator.close(pending)
        self._idle_since = self._clock()

    def fallback(self, event_type: str) -> bytes:
        return fallback(event_type, self._cfg.fallback_toast, self._cfg.fallback_toast_type)

    async def answer(self, pending: Pending, timeout: float) -> Answer:
        """The answer for ``pending`` within ``timeout`` seconds: the reply when valid, else the fallback."""
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                reply = await asyncio.shield(pending.reply)
        except TimeoutError:
            return Answer(self.fallback(pending.event_type), "timeout")
        finally:
            self.close(pending)
        try:
            return Answer(check_answer(pending.event_type, reply, self._cfg.max_answer_bytes), "reply")
        except Malformed as err:
            log.warning("callback %s %s: malformed reply, answered the fallback (%s)", pending.event_type,
                        pending.correlation_id, err.reason)
            return Answer(self.fallback(pending.event_type), "malformed", err.reason)


def fallback_for(config: Config, event_type: str) -> bytes:
    """The fallback answer without a :class:`Replies` (``inbound.callback_replies = false``)."""
    toast_type: ToastType = config.inbound.fallback_toast_type
    return fallback(event_type, config.inbound.fallback_toast, toast_type)
