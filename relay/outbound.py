"""The outbound consumer: intents in, Feishu calls made, one result per intent out.

Guarantees (proved by the kill/drain/rebalance tests in ``tests/test_outbound_resilience.py``):

* **Nothing lost.** A record's offset is committed only after its result (and dead letter, if any) is
  acknowledged by Kafka (``acks=all``). Offsets are committed as the contiguous finished prefix of each
  partition (``offsets.PartitionOffsets``); records already finished above that prefix travel in the commit
  metadata so the next owner skips them instead of calling Feishu again. Killed at any instant, the relay redoes
  at most the uncommitted tail; a drained stop (SIGTERM) or a rebalance redoes no call already made.
* **Order per key.** Records of one partition with the same ordering key run one after another (a *lane*: each
  job waits for the previous job of its key, which ends only once its result is written), so their calls are
  attempted in partition order and a later record of a key never finishes before an earlier one, on any
  failure path. The one exception: a record superseded by a later one of its lane (``relay.folding``) makes no
  call, and the next job goes as soon as that is decided, while its ``superseded`` result is being written.
  Different keys run concurrently: a key waiting on its own limit or on a retry never holds back
  the others. ``url_preview.update`` intents skip the lanes: they are merged by the preview coalescer; records
  that cannot be decoded have no ordering key.
* **Bounded work, exactly.** At most ``outbound.max_in_flight`` records are read but unfinished, and at most
  ``outbound.max_in_flight_per_partition`` of one partition: each partition is read on its own with
  ``max_records`` = the room it has left (and the global room), so neither cap is ever passed. A partition over
  its share is paused alone (resumed at half), so a hot key with a long backlog on its limit holds back only the
  keys that share its partition; past the global cap every partition pauses. A partition also pauses while its
  records finished above the commit point might no longer fit the commit metadata
  (``offsets.PartitionOffsets.metadata_room``), so a rebalance never repeats a finished record. Pauses are
  re-applied after a rebalance, since Kafka forgets them.
* **Previews are bounded by what they cost, not by the caps.** A ``url_preview.update`` intent holds no slot of
  the in-flight caps: the coalescer folds it into its token's pending state, and latest-wins can only merge what
  it has read, so a burst far larger than the caps must be in view (with 2,000 slots, 2,000 tokens x 20 updates
  left one update per token in view: ~4 calls per token instead of ~1). What a read preview costs is bounded
  instead by (1) its **tokens**: reading stops while ``previews.max_pending_tokens`` tokens have intents
  waiting or a call in flight (``PreviewPlanner.pending_tokens``; a round reads at most a tenth as many records
  as tokens are left, one record when fewer than 10 are, so the count passes the cap by 9 at most), each token
  one entry with at most 100 merged open_ids however many intents it folds; and (2) its **offset to commit**:
  the commit-metadata room above, which every record read counts against, previews included, holds each
  partition's unfinished records to about ``8 x payload_budget(outbound.commit_metadata_max_bytes)`` offsets
  (23,952 at the default 4,000). The per-intent part is its record, its job and its place in the planner (about
  1.6 KB besides the record, measured with tracemalloc): a waiting preview job has no task, one is made only
  once its intent's result is known. Sends keep their exact caps and their slots: a record is read only while
  the caps have room for one more, whatever its kind, and a send behind previews in its partition is read as
  soon as they are, not after their calls.
* **Stopping.** On SIGTERM and on partition revocation: jobs that have not made their first attempt are
  abandoned (their offsets stay uncommitted; nothing was sent); jobs that have are given ``drain_timeout`` to
  finish and write their results; then offsets are committed and state for those partitions dropped. A
  ``url_preview.update`` job has started once a call carrying it has claimed its tokens (it may be at Feishu);
  one that has not is withdrawn from the coalescer (no result, not failed) and redone by the next owner, which
  sees this replica's claims in the preview memory and keeps the 5 s rule across the handover.
* **No work for partitions this replica may have lost** (``relay.membership``). Kafka fences only the commits of a
  member it dropped; the relay fences its own calls and writes with a lease renewed by the coordinator's answers. A
  replica frozen past its session timeout (SIGSTOP, a paused VM), or cut off from the coordinator, makes no Feishu
  call (the executor's gate, right before each request is written) and writes no result or dead letter (checked
  before each write) until a heartbeat confirms it again; when the coordinator says it is out, every job of its
  partitions is abandoned, not drained: no call, no result, no commit (a revocation waits for that answer first,
  drains if it confirms us and abandons otherwise), and records fetched meanwhile are not dispatched (the position
  is moved back to them) until the membership is confirmed or partitions are assigned again. The new owner redoes
  those records; a call already made whose result was not written in time is made again by the new owner only if it
  is safe to repeat (next point). Proved by ``tests/test_frozen_replica.py`` (SIGSTOP/SIGCONT) and
  ``tests/test_outbound_membership.py``.
* **At most once for calls not safe to repeat** (``Call.repeatable`` false: reactions, urgent, batch_send, ...).
  With a journal (``relay.journal``), such a call's start is journaled before its first request and its result
  before the result is written; the next owner of a record it finds there writes that result (or, with only a
  start, ``failed`` / ``outcome-unknown``) instead of calling Feishu, whatever stopped the previous owner
  (proved with SIGKILL, a rebalance and answers lost after the operation in ``tests/test_outbound_faults.py``).

* **Writes that fail.** A result or dead letter is never dropped: its record's offset waits. A record too large
  for its topic is written cut and says so (``results.cut_result``, ``results.cut_dead_letter``); any other
  error is retried, backing off to ``outbound.backoff_cap``; one that cannot be retried (not authorized, too large
  even when cut, ...) or a write unacknowledged for ``outbound.write_alarm_after`` makes :meth:`Outbound.problem`
  say so (``/readyz`` answers 503 with it) until the write succeeds.
* **Commit metadata** is at most ``outbound.commit_metadata_max_bytes`` characters; a broker that refuses it
  (``OFFSET_METADATA_TOO_LARGE``: its ``offset.metadata.max.bytes`` is smaller) gets half as much, at once.

No record can stop a partition or the process: decoding failures (including values too deeply nested to read),
unknown kinds, broken field rules and unknown apps become ``rejected`` results plus dead letters, and a record the
Kafka client itself cannot parse (an invalid UTF-8 header name) becomes a dead letter naming its offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Final, Protocol

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    OffsetMetadataTooLargeError,
    OutOfOrderSequenceNumber,
)
from aiokafka.partitioner import DefaultPartitioner

from relay.calls import Call, build_call, card_sequence, unsendable
from relay.config import Config
from relay.errors import IntentError
from relay.executor import Executor
from relay.fetch import Fetcher, FetchFailed, FetchRefused
from relay.folding import Folding, overtaken
from relay.intents import (
    FileUpload,
    ImageUpload,
    Intent,
    MessageSend,
    SequencedCardIntent,
    UrlPreviewUpdate,
    decode_intent,
    ordering_key,
)
from relay.journal import REFRESH_SECONDS, DeadLetter, Entry, Finished, Journal
from relay.kafka import (
    BATCH_OVERHEAD,
    IDLE_FETCH_WAIT_MS,
    MAX_BATCH_SIZE,
    QUIET_FETCH_WAIT_MS,
    client_settings,
    max_message_bytes,
    paused_fetch_wait_ms,
    set_fetch_wait,
)
from relay.media import FILE_MAX_BYTES, IMAGE_MAX_BYTES, send_with_key, upload_for, upload_refusal
from relay.membership import Membership, MembershipLost, Standing, watch
from relay.metrics import Metrics, kind_label
from relay.offsets import JOURNAL_METADATA_ROOM, JournalPosition, OffsetRanges, PartitionOffsets, decode_metadata
from relay.outcomes import Attempted
from relay.previews.coalescer import PreviewCoalescer, PreviewsStopped, PreviewTicket
from relay.results import (
    OUTCOME_UNKNOWN,
    Headers,
    cut_dead_letter,
    cut_result,
    dead_letter_headers,
    dead_letter_reason,
    encode_result,
    forwarded_headers,
    from_attempt,
    make_result,
    one_line,
    record_size,
)

log = logging.getLogger(__name__)

# seconds between two looks, during a drain, for preview jobs that stopped being started (see Outbound._drain)
DRAIN_RECHECK = 0.25
# how long the consumer may take to leave its group and close at the end of run()
CONSUMER_STOP_SECONDS: Final = 30.0
_NOTHING: Final = OffsetRanges()
# after a record the client could not parse, its partition is read one record at a time for this many records
_CAREFUL_READS: Final = 500
# the most tokens one url_preview intent names (relay.intents.UrlPreviewUpdate: 1..10)
_TOKENS_PER_PREVIEW: Final = 10
# with no partition readable, the loop waits for progress (a job ended, a commit landed), looking again after this
_NO_ROOM_RECHECK: Final = 0.2
# the span over which the finishing rate is measured while partitions are paused (see paused_fetch_wait_ms)
_RATE_SPAN: Final = 1.0
# with nothing paused and nothing to read, the loop waits for records, a new assignment or the stop, looking again
# after this
_IDLE_RECHECK: Final = 5.0
# seconds without a record read, nothing in flight, after which the broker may hold the outbound fetches
# QUIET_FETCH_WAIT_MS instead of IDLE_FETCH_WAIT_MS (an idle relay: one fetch every 5 s, not every second; it
# was a third of the idle relay's event-loop turns, measured)
QUIET_AFTER = 10.0
# results and dead letters are sent in groups: a write waits up to this long for the others finishing with it
# (see Gather; the calls of one grant tick are answered within a few milliseconds of each other)
RESULT_GATHER: Final = 0.005
# an ``OFFSET_METADATA_TOO_LARGE`` halves the metadata cap down to this (a journal position still fits)
_MIN_METADATA_CAP: Final = 64


def intent_kind(intent: Intent) -> str:
    return str(type(intent).__struct_config__.tag)


class Record(Protocol):
    """The parts of an aiokafka ConsumerRecord the relay reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any


class Job:
    """One record being handled. ``started``: a call was attempted or the result is being written (a preview
    job's ``preview`` ticket says more: see :meth:`Outbound._abandonable`). ``task`` runs it; a preview job has
    none while its intent waits in the coalescer (a pending preview costs its job, not a task: module doc), only
    once its result is known and is being written."""

    __slots__ = ("app", "counted", "id", "journaled", "kind", "offset", "preview", "received", "record", "started",
                 "task", "tp")

    def __init__(self, tp: TopicPartition, record: Record, received: float) -> None:
        self.tp = tp
        self.record = record
        self.offset = record.offset
        self.received = received
        self.started = False
        self.journaled = False  # its start is in the journal: its result must be too, before it is written
        self.task: asyncio.Task[None] | None = None
        self.id: str | None = None
        self.kind: str | None = None
        self.app: str | None = None
        self.preview: PreviewTicket | None = None
        self.counted = True  # it holds a slot of the in-flight caps (every job but a url_preview one: module doc)


class Unreadable:
    """A record the Kafka client could not parse: only where it is, for its dead letter."""

    __slots__ = ("offset", "partition", "topic")

    key: bytes | None = None
    value: bytes | None = None
    headers: Any = ()

    def __init__(self, tp: TopicPartition, offset: int) -> None:
        self.topic, self.partition, self.offset = tp.topic, tp.partition, offset


class Bare:
    """A record without its headers: what an internal error is reported with when the full report fails."""

    __slots__ = ("key", "offset", "partition", "topic", "value")

    headers: Any = ()

    def __init__(self, record: Record) -> None:
        self.topic, self.partition, self.offset = record.topic, record.partition, record.offset
        self.key, self.value = record.key, record.value


class Write:
    """One result or dead letter not yet acknowledged: since when, and the error that keeps failing it."""

    __slots__ = ("error", "since", "stuck", "what")

    def __init__(self, what: str, since: float) -> None:
        self.what = what
        self.since = since
        self.error: str | None = None
        self.stuck = False  # the error cannot be retried into success: an operator must act


class Gather:
    """Lets the callers that arrive within ``window`` seconds of the first go on together, in one event-loop turn,
    in the order they came; at once, with those already waiting, when ``coming()`` says no other is on its way.

    For result writes: results to different partitions finishing a few milliseconds apart went as one produce
    request each (about one per call at quota, measured, with a linger: aiokafka lingers each partition's batch on
    its own timer), each a handful of event-loop turns for the request, its answer and its callbacks. Sent in one
    turn, their batches are ready together and share a request (the producer has no linger: relay.kafka).
    ``coming`` is the outbound's "is a Feishu request still being made?": once the last answer of a grant tick's
    calls is in, waiting out the window would only wake the process once more for the same group (0.3 blocking
    wake-ups per call at one app's quota, counted).
    """

    __slots__ = ("_timer", "_waiters", "coming", "window")

    def __init__(self, window: float, coming: Callable[[], bool] | None = None) -> None:
        self.window = window
        self.coming = coming
        self._waiters: list[asyncio.Future[None]] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def wait(self) -> None:
        if self.window <= 0:
            return
        last = self.coming is not None and not self.coming()  # no other is on its way
        if self._waiters is None:
            if last:
                return  # alone: nothing to gather
            self._waiters = []
            self._timer = asyncio.get_running_loop().call_later(self.window, self._release, self._waiters)
        elif last:  # the last of its group: all go on in the next turn
            self._release(self._waiters)
            await asyncio.sleep(0)  # behind the others, who came first
            return
        waiter = asyncio.get_running_loop().create_future()  # one each: a cancelled caller cancels only its own
        self._waiters.append(waiter)
        await waiter

    def _release(self, waiters: list[asyncio.Future[None]]) -> None:
        if self._waiters is waiters:
            self._waiters = None
            if self._timer is not None:
                self._timer.cancel()  # a no-op when it is the timer that fired
                self._timer = None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class _TooLarge(Exception):
    """A record its topic's known ``max.message.bytes`` cannot take even cut (never sent: see ``_send``)."""


def _unparsable(err: Exception) -> bool:
    """An error of the Kafka client *parsing* a fetched record, not of Kafka itself (module doc)."""
    return isinstance(err, CorruptRecordException) or not isinstance(err, KafkaError)


class Outbound(ConsumerRebalanceListener):
    def __init__(self, config: Config, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                 executor: Executor, metrics: Metrics, *, known_apps: Iterable[str],
                 previews: PreviewCoalescer | None = None, membership: Membership | None = None,
                 journal: Journal | None = None, fetcher: Fetcher | None = None,
                 wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic, admin: AIOKafkaAdminClient | None = None,
                 new_producer: Callable[[], AIOKafkaProducer] | None = None) -> None:
        """``membership``: the group-membership lease that fences calls and writes (module doc); None in tests
        without a group coordinator. ``journal``: the write-ahead journal of calls not safe to repeat.
        ``admin`` reads the previous owner's commit metadata and topic limits; None: ``run`` makes one from the
        config. ``new_producer`` makes a replacement for a producer a refused batch broke (see ``_send``); the
        replacements are this object's to stop, ``producer`` stays its owner's."""
        self._config = config
        self._out = config.outbound
        self._consumer = consumer
        self._producer = producer
        self._executor = executor
        self._metrics = metrics
        self._apps = frozenset(known_apps)
        self._store_apps = frozenset(app.name for app in config.apps if app.type == "store")
        self._previews = previews
        self._membership = membership
        self._journal = journal
        self._fetcher = fetcher  # downloads the bytes of an upload given by url (relay.fetch)
        self._wall = wall
        self._clock = clock
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._skip: dict[TopicPartition, OffsetRanges] = {}
        self._jobs: dict[TopicPartition, set[Job]] = {}
        self._lanes: dict[tuple[TopicPartition, str], asyncio.Task[None]] = {}
        self._folding = Folding()  # latest-wins among the records waiting in a lane (relay.folding)
        # a job's turn in its lane, when that ends before its task does: a superseded job's turn ends once it is
        # decided, before its result is written, so the next job need not wait for that write (_perform)
        self._turns: dict[asyncio.Task[None], asyncio.Future[None]] = {}
        self._inflight = 0
        self._inflight_by_tp: dict[TopicPartition, int] = {}
        self._all_paused = False  # the global cap was reached; cleared at half
        self._paused: set[TopicPartition] = set()
        self._fetch_wait = IDLE_FETCH_WAIT_MS  # the consumer's fetch_max_wait_ms now (make_consumer's default)
        # records finished a second, measured over a second or two (inf: not known); from when, and the count then
        self._finish_rate, self._rate_at, self._rate_finished = math.inf, clock(), 0
        self._last_read = clock()  # when records were last taken (or partitions assigned or revoked)
        self._admin = admin
        self._rebalancing = False  # between revoke and assign: no periodic commits
        self._periodic: asyncio.Task[bool] | None = None  # the periodic commit in flight
        self._progress = asyncio.Event()  # a job ended: room may have opened
        self._reassigned = asyncio.Event()  # partitions were revoked or assigned: an idle wait looks again
        # a paused partition may be read again (its in-flight count fell to half, the global cap's to half, or a
        # commit landed): a wait for records on the others looks again
        self._resumable = asyncio.Event()
        # a record was finished since the last periodic commit: an idle relay's commit loop sleeps until one is
        self._finished_since = asyncio.Event()
        self._careful: dict[TopicPartition, int] = {}  # partition -> single-record reads left (see _read)
        self._round = 0  # rotates which partition is read first, so none starves under the global cap
        self._writes: dict[Write, None] = {}  # results and dead letters being written, oldest first
        # results and dead letters finishing together are sent together
        self._gather = Gather(RESULT_GATHER, coming=lambda: executor.sending > 0)
        self._reports_failing = 0  # internal errors whose report cannot be built (see _internal_failure)
        self._metadata_cap = self._out.commit_metadata_max_bytes  # halved by OFFSET_METADATA_TOO_LARGE
        # the journal position's suffix needs room beside the finished set (offsets.JOURNAL_METADATA_ROOM)
        self._journal_room = JOURNAL_METADATA_ROOM if journal is not None else 0
        # assigned partitions whose previous owner's finished records and journal are still being read: paused and
        # never read, dispatched or committed until _load ends (on_partitions_assigned says why it is a task)
        self._unloaded: set[TopicPartition] = set()
        self._loader: asyncio.Task[None] | None = None
        self._partitioner = DefaultPartitioner()
        self._limits: dict[str, tuple[int | None, float]] = {}  # topic -> (max.message.bytes, when asked)
        self._limits_lock = asyncio.Lock()
        self._new_producer = new_producer
        self._renewed: list[AIOKafkaProducer] = []  # producers made here, the current one last
        self._renewing: asyncio.Task[None] | None = None
        self._renewed_at = -math.inf
        self._stopping: set[asyncio.Task[None]] = set()  # replaced producers being stopped
        self.finished = 0  # records finished (result acknowledged), for progress lines and tests

    # lifetime -----------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain, commit and leave the group."""
        own_admin = self._admin is None
        admin = self._admin = self._admin or AIOKafkaAdminClient(**client_settings(self._config.kafka))
        if own_admin:
            await admin.start()
        try:
            await self._consumer.start()  # not subscribed yet: returns without joining the group
            try:
                if self._membership is not None:
                    watch(self._consumer, self._membership)  # before the first JoinGroup, so its SyncGroup counts
                self._consumer.subscribe(self._config.kafka.intents_topics, listener=self)
                await self._consume(stop)
            finally:
                await asyncio.wait_for(self._consumer.stop(), CONSUMER_STOP_SECONDS)
        finally:
            if own_admin:
                await admin.close()
            for producer in self._renewed:
                with contextlib.suppress(KafkaError):
                    await producer.stop()
            await asyncio.gather(*self._stopping, return_exceptions=True)  # their errors do not matter now
        log.info("outbound stopped: %d records finished", self.finished)

    @property
    def in_flight(self) -> int:
        """Records read and not finished yet (the demand a replica publishes, with the lag: relay.coordination)."""
        return self._inflight

    def problem(self) -> str | None:
        """Why records cannot finish right now, for ``/readyz`` (None when all is well); see the module doc."""
        now = self._clock()
        stuck = [w for w in self._writes if w.stuck]
        late = [w for w in self._writes if now - w.since >= self._out.write_alarm_after]
        if stuck or late:
            first = (stuck or late)[0]
            why = first.error or f"no acknowledgement for {now - first.since:.0f}s"
            return f"{first.what} fails ({len(stuck or late)} record(s) waiting): {why}"
        if self._reports_failing:
            return f"{self._reports_failing} internal error(s) cannot be reported; their keys wait (see the log)"
        return None

    async def _consume(self, stop: asyncio.Event) -> None:
        committer = asyncio.create_task(self._commit_loop(), name="relay-committer")
        stopped = asyncio.ensure_future(stop.wait())  # every wait below also ends on it: the drain starts at once
        try:
            while not stop.is_set():
                if self._standing() is Standing.VALID:
                    await self._fetch(stopped)
                    continue
                # polled also while the membership is not valid: aiokafka leaves the group and will not rejoin
                # after max_poll_interval without a poll. Nothing is dispatched until it is confirmed
                try:
                    self._unread(await self._consumer.getmany(timeout_ms=200, max_records=1))
                except Exception as err:
                    if not _unparsable(err):
                        raise  # (a record the client cannot parse is met again, and handled, once valid)
                assert self._membership is not None
                await self._membership.changed(timeout=0.2)
        finally:
            stopped.cancel()
            committer.cancel()
            await self._stop_loading()
            with contextlib.suppress(BaseException):  # its own errors are logged in the loop
                await committer
            if self._periodic is not None and not self._periodic.done():
                self._periodic.cancel()  # no retry of a stale periodic commit after the final one
                await asyncio.wait([self._periodic])
            owned = list(self._offsets)
            if self._standing() is Standing.LOST:
                await self._abandon(owned)
            else:
                await self._drain(owned)
                await self._commit(owned)
            self._forget(owned)

    def _standing(self) -> Standing:
        return Standing.VALID if self._membership is None else self._membership.standing()

    async def _decided(self, limit: float) -> Standing:
        """The membership once the coordinator has answered (not UNCONFIRMED), or as it is after ``limit`` s."""
        deadline = self._clock() + limit
        while (standing := self._standing()) is Standing.UNCONFIRMED and (left := deadline - self._clock()) > 0:
            assert self._membership is not None
            await self._membership.changed(timeout=left)
        return standing

    def _unread(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Seek back over records fetched while the membership is not valid: they are fetched again once it is
        confirmed, or (lost) read by the partition's next owner from the committed offset."""
        for tp, records in batch.items():
            with contextlib.suppress(IllegalStateError):  # already revoked: the new assignment starts afresh
                self._consumer.seek(tp, records[0].offset)

    # rebalance listener (runs in aiokafka's coordinator task, between fetches) -----------------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # a periodic commit still retrying (aiokafka retries after a retriable error, outside its commit lock)
        # could land after ours and move an offset back: stop it first. A request already on the wire is shielded
        # inside aiokafka and completes under its lock before ours is sent; only its retry is prevented.
        self._rebalancing = True
        self._reassigned.set()
        self._awake()
        await self._stop_loading()
        if self._periodic is not None and not self._periodic.done():
            self._periodic.cancel()
            await asyncio.wait([self._periodic])
        owned = [tp for tp in revoked if tp in self._offsets]
        if not owned:
            return
        # a late heartbeat answer decides (the heartbeat goes on during this callback); nothing is sent meanwhile
        if (standing := await self._decided(self._out.drain_timeout)) is not Standing.VALID:
            # we may be out already and another replica may own these: no call, no result, no commit from here
            log.warning("membership %s at revocation: abandoning instead of draining", standing.value)
            await self._abandon(owned)
        else:
            await self._drain(owned)
            await self._commit(owned)
        self._forget(owned)
        log.info("partitions revoked: %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in owned))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        """Hold the new partitions and read what their previous owner finished (``_load``) in a task of its own.

        aiokafka starts heartbeating only once this callback returns, so a callback that outlives
        ``session_timeout_ms`` has the coordinator drop the member, and its next assignment fares no better: the
        committed metadata and the journal of two dozen partitions took some 12 s to read, and such a relay never
        made a call (measured). The partitions stay paused, unread and uncommitted until their load ends."""
        # aiokafka hands out records of the new partitions once they are assigned: hold them synchronously, before
        # the first await, until we know which records the previous owner already finished
        if assigned:
            self._consumer.pause(*assigned)
        for tp in assigned:
            self._offsets.setdefault(tp, PartitionOffsets())
            self._jobs.setdefault(tp, set())
        self._rebalancing = False
        self._awake()
        if assigned:
            self._unloaded.update(assigned)
            self._loader = asyncio.create_task(self._load(list(assigned)), name="relay-assignment-load")
        self._metrics.set("relay_outbound_assigned_partitions", len(self._consumer.assignment()),
                          help="intent partitions this replica owns")
        log.info("partitions assigned: %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in assigned) or "-")

    async def _load(self, assigned: list[TopicPartition]) -> None:
        """Read what ``assigned``'s previous owner finished, then release them: the ones not paused for
        backpressure resume (pauses do not survive a rebalance). A revocation cancels it (``_stop_loading``)."""
        delay = 0.5
        while True:
            try:
                await self._load_finished(assigned)
                break
            except Exception:  # a bug or an input nobody foresaw: the partitions must not be read unloaded
                log.exception("reading what the previous owner finished failed; partitions stay paused, retrying "
                              "in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        loaded = set(assigned) & self._unloaded
        self._unloaded -= loaded
        if resume := (loaded & self._consumer.assignment()) - self._paused:
            self._consumer.resume(*resume)
        self._progress.set()  # the read loop may be waiting for room: there is some now
        self._resumable.set()
        self._reassigned.set()  # or idle on the partitions it could read before: these are readable now
        log.info("partitions ready: %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(
            loaded, key=lambda tp: (tp.topic, tp.partition))) or "-")

    async def _stop_loading(self) -> None:
        """Cancel an assignment's load still running (a revocation, the stop): its partitions stay unread."""
        loader, self._loader = self._loader, None
        if loader is not None and not loader.done():
            loader.cancel()
            await asyncio.wait([loader])

    async def _load_finished(self, assigned: list[TopicPartition]) -> None:
        """Records a previous owner finished above its commit point: skip them (see ``offsets``); and the
        journal entries of calls it started but did not commit (``relay.journal``)."""
        if not assigned or self._admin is None:
            return
        try:
            committed = await self._admin.list_consumer_group_offsets(self._config.kafka.group_id,
                                                                      partitions=assigned)
        except KafkaError as err:
            log.warning("could not read committed metadata (%s); finished records may be redone", err)
            committed = {}
        positions: dict[TopicPartition, tuple[int, JournalPosition | None]] = {tp: (0, None) for tp in assigned}
        for tp, meta in committed.items():
            previous = decode_metadata(meta.offset, meta.metadata)
            positions[tp] = (meta.offset, previous.journal)
            done = previous.done
            if done:
                self._skip[tp] = done
                log.info("%s[%d]: skipping %d records finished by the previous owner", tp.topic, tp.partition,
                         len(done))
        if self._journal is not None:  # before any record is released: a failure here must not let one through
            await self._load_journal(positions)

    async def _load_journal(self, positions: dict[TopicPartition, tuple[int, JournalPosition | None]]) -> None:
        """Read the journal for newly assigned partitions, retrying until it is read (they stay paused)."""
        assert self._journal is not None
        delay = 0.5
        while True:
            try:
                await self._journal.load(positions)
                return
            except (KafkaError, TimeoutError) as err:
                log.error("reading the journal failed (%s); partitions stay paused, retrying in %.1fs", err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # dispatch -----------------------------------------------------------------------------------------

    async def _fetch(self, stopped: asyncio.Future[Any]) -> None:
        """One round: read each partition up to the room it has left, or wait for room or records."""
        self._reassigned.clear()
        self._resumable.clear()
        rooms = self._backpressure()
        left = min(self._out.max_in_flight - self._inflight, self._preview_room())
        # records, a new assignment, the stop, or room for a paused partition end the wait (_resumable); the
        # timeout is a backstop (an idle relay woke every second for nothing, and a 20 ms poll while a partition
        # was paused made 50 rounds a second at quota once the others' backlogs were read: 5 per call)
        wait = _NO_ROOM_RECHECK if self._paused else _IDLE_RECHECK
        if not rooms or left <= 0:
            # nothing may be read. With every partition paused (or loading), room comes when one may resume or
            # the assignment changes; under the global cap or the preview budget, when a job ends or a commit
            # lands (progress: each job's end woke this loop while all were paused). The timeout is a backstop
            # (a 20 ms poll here woke a relay at quota 50 times a second for nothing)
            if rooms:
                self._progress.clear()
                waits = [asyncio.ensure_future(self._progress.wait())]
            else:
                waits = [asyncio.ensure_future(self._resumable.wait()),
                         asyncio.ensure_future(self._reassigned.wait())]
            await asyncio.wait([*waits, stopped], timeout=_NO_ROOM_RECHECK, return_when=asyncio.FIRST_COMPLETED)
            for pending in waits:
                pending.cancel()
            return
        order = list(rooms)
        self._round += 1
        first = self._round % len(order)
        read = 0
        order = order[first:] + order[:first]
        for tp in order:
            if read >= left:
                break
            read += await self._read(tp, min(rooms[tp], left - read))
        if not read:
            calm = [tp for tp in order if tp not in self._careful]
            if calm:
                if (not self._inflight and self._fetch_wait == IDLE_FETCH_WAIT_MS
                        and self._clock() - self._last_read >= QUIET_AFTER):
                    self._wait_fetches(QUIET_FETCH_WAIT_MS)
                await self._read_any(calm, int(wait * 1000), stopped)
            else:  # only partitions being read one by one: wait on one of them (rare, and short)
                await self._read(order[0], 1, timeout_ms=20)

    def _preview_room(self) -> int:
        """Records that may be read now with the coalescer's pending tokens sure to stay within
        ``previews.max_pending_tokens`` (each record may be a preview of up to 10 new tokens); at least one while
        any budget is left, so the overshoot is 9 tokens at most."""
        if self._previews is None:
            return self._out.max_in_flight
        left = self._config.previews.max_pending_tokens - self._previews.pending_tokens
        self._metrics.set("relay_previews_pending_tokens", self._previews.pending_tokens,
                          help="url_preview tokens with intents waiting or a call in flight")
        return 0 if left <= 0 else max(1, left // _TOKENS_PER_PREVIEW)

    async def _read(self, tp: TopicPartition, room: int, *, timeout_ms: int = 0) -> int:
        """Take up to ``room`` buffered records of ``tp`` (aiokafka returns at most ``max_records``); how many.

        A record the client cannot parse raises out of ``getmany``, and the records parsed before it in that call
        are neither returned nor safe to skip: read again from the position (it has not moved), one record at a
        time; then the one that fails is the culprit, at the position: dead-letter it and seek past it.
        """
        careful = self._careful.get(tp, 0)
        try:
            batch = await self._consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1 if careful else room)
        except Exception as err:
            if not _unparsable(err):
                raise
            return await self._skip_unparsable(tp, err, careful > 0)
        records = batch.get(tp, [])
        if not self._take({tp: records} if records else {}):
            return 0
        if careful and records:
            if careful > 1:
                self._careful[tp] = careful - 1
            else:
                del self._careful[tp]
        return len(records)

    async def _read_any(self, tps: list[TopicPartition], timeout_ms: int, stopped: asyncio.Future[Any]) -> None:
        """Wait for records of any of ``tps``, taking one: one record fits any room, and a parse failure then
        costs no other partition's records (aiokafka moves a partition's position as it drains it). After one,
        which partition failed is unknown: each is read again from its position, one record, on its own."""
        reading = asyncio.ensure_future(self._consumer.getmany(*tps, timeout_ms=timeout_ms, max_records=1))
        reassigned = asyncio.ensure_future(self._reassigned.wait())
        waits: list[asyncio.Future[Any]] = [reading, stopped, reassigned]
        if self._paused:  # room for a paused partition ends the wait too
            waits.append(asyncio.ensure_future(self._resumable.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits[2:]:
            wait.cancel()
        if not reading.done():  # stopping or reassigned: aiokafka's wait is cancellable, and it had taken nothing
            reading.cancel()
            await asyncio.wait([reading])
            return
        try:
            batch = reading.result()
        except Exception as err:
            if not _unparsable(err):
                raise
            for tp in tps:  # a failed partition would otherwise skip what it had parsed (see _read)
                with contextlib.suppress(IllegalStateError):
                    self._consumer.seek(tp, await self._consumer.position(tp))
                    self._careful[tp] = max(self._careful.get(tp, 0), 1)
            return
        self._take(batch)

    def _wait_fetches(self, wait_ms: int) -> None:
        """Let the broker hold the consumer's next fetches up to ``wait_ms`` (relay.kafka: paused, idle, quiet)."""
        if wait_ms != self._fetch_wait:
            set_fetch_wait(self._consumer, wait_ms)
            self._fetch_wait = wait_ms
            self._metrics.set("relay_outbound_fetch_wait_seconds", wait_ms / 1000,
                              help="how long the broker may hold an outbound fetch with nothing new")

    def _awake(self) -> None:
        """Records were read, or the assignment changes: the quiet wait ends (the next fetch is held 1 s)."""
        self._last_read = self._clock()
        if self._fetch_wait == QUIET_FETCH_WAIT_MS:
            self._wait_fetches(IDLE_FETCH_WAIT_MS)

    def _take(self, batch: dict[TopicPartition, list[Any]]) -> bool:
        """Dispatch fetched records; unless the membership stopped being valid during the fetch: then they are
        read again later (``_unread``) and False."""
        if batch:
            self._awake()
        if batch and self._standing() is not Standing.VALID:
            self._unread(batch)
            return False
        for tp, records in batch.items():
            for record in records:
                self._dispatch(tp, record)
        return True

    async def _skip_unparsable(self, tp: TopicPartition, err: Exception, careful: bool) -> int:
        try:
            position = await self._consumer.position(tp)
            if not careful:
                self._consumer.seek(tp, position)  # drop what the failed call parsed; read it again one by one
                self._careful[tp] = _CAREFUL_READS
                return 0
            self._consumer.seek(tp, position + 1)
        except IllegalStateError:
            return 0  # revoked meanwhile: the next owner meets it
        log.error("%s[%d]@%d: the Kafka client cannot parse this record (%s: %s); dead-lettering it", tp.topic,
                  tp.partition, position, type(err).__name__, err)
        reason = IntentError(f"record cannot be read by the Kafka client ({type(err).__name__}: "
                             f"{one_line(str(err), 200)})", error="decode")
        job = Job(tp, Unreadable(tp, position), self._wall())
        self._offsets.setdefault(tp, PartitionOffsets()).add(position)
        self._start(job, self._reject(job, job.record, reason, job.received), None)
        return 1

    def _backpressure(self) -> dict[TopicPartition, int]:
        """Pause and resume partitions; the room (records it may take now) of each partition left readable."""
        assigned = self._consumer.assignment()
        cap, per = self._out.max_in_flight, self._out.max_in_flight_per_partition
        if self._inflight >= cap:
            self._all_paused = True
        elif self._all_paused and self._inflight <= cap // 2:
            self._all_paused = False
        rooms: dict[TopicPartition, int] = {}
        wanted: set[TopicPartition] = set()
        full = 0
        for tp in assigned:
            if tp in self._unloaded:
                continue  # paused by on_partitions_assigned until _load releases it
            n = self._inflight_by_tp.get(tp, 0)
            room = per - n
            offsets = self._offsets.get(tp)
            if offsets is not None and room > 0:
                fits = offsets.metadata_room(room, self._skip.get(tp, _NOTHING), reserve=self._journal_room,
                                             cap=self._metadata_cap)
                full += fits <= 0
                room = min(room, fits)
            if self._all_paused or room <= 0 or (tp in self._paused and n > per // 2):
                wanted.add(tp)
            else:
                rooms[tp] = room
        if pause := wanted - self._paused:
            self._consumer.pause(*pause)
        if resume := (self._paused - wanted) & assigned:
            self._consumer.resume(*resume)
        if wanted:
            now = self._clock()
            if now - self._rate_at >= _RATE_SPAN:
                # over a longer span (no round meanwhile) the average says nothing of the rate now: not known
                stale = now - self._rate_at > 2 * _RATE_SPAN
                self._finish_rate = math.inf if stale else (self.finished - self._rate_finished) / (now - self._rate_at)
                self._rate_at, self._rate_finished = now, self.finished
            refill = 0 if full else (cap // 2 if self._all_paused else per // 2)  # in flight when one resumes
            self._wait_fetches(paused_fetch_wait_ms(self._finish_rate, refill))
        elif self._paused:
            self._wait_fetches(IDLE_FETCH_WAIT_MS)
        self._paused = wanted
        self._metrics.set("relay_outbound_in_flight", self._inflight, help="records read but not finished")
        self._metrics.set("relay_outbound_paused_partitions", len(wanted), help="partitions paused for backpressure")
        self._metrics.set("relay_outbound_metadata_full_partitions", full,
                          help="partitions paused because more finished records might not fit the commit metadata")
        return rooms

    def _dispatch(self, tp: TopicPartition, record: Record) -> None:
        offsets = self._offsets.setdefault(tp, PartitionOffsets())
        offsets.add(record.offset)
        skip = self._skip.get(tp)
        if skip and record.offset in skip:
            offsets.done(record.offset)
            self._finished_since.set()
            return
        received = self._wall()
        job = Job(tp, record, received)
        lane: tuple[TopicPartition, str] | None = None
        turn: asyncio.Future[None] | None = None
        coro: Coroutine[Any, Any, None]
        try:
            intent = decode_intent(record.value)
            key = ordering_key(intent)
        except IntentError as err:
            coro = self._reject(job, record, err, received)
        except Exception as err:  # decode_intent raises only IntentError: a bug, or an input nobody foresaw
            log.exception("%s[%d]@%d: decoding failed unexpectedly", tp.topic, tp.partition, record.offset)
            unread = IntentError(f"value cannot be decoded ({type(err).__name__})", error="decode")
            coro = self._reject(job, record, unread, received)
        else:
            job.id, job.kind, job.app = intent.id, intent_kind(intent), intent.app
            entry = self._journal.recovered(tp, record.offset) if self._journal is not None else None
            if entry is not None:  # a previous owner started its call: never call again
                lane = (tp, key)
                coro = self._recover(job, record, entry, received, self._lanes.get(lane))
            elif isinstance(intent, UrlPreviewUpdate) and self._previews is not None:
                problem = self._app_problem(intent)
                if problem is None:
                    if self._enqueue(job, intent, received):
                        self._start(job, None, None)  # no task until its result is known (_preview_ready)
                        return
                    coro = self._preview(job, record)  # the coalescer is not running: abandoned
                else:
                    coro = self._reject(job, record, problem, received)
            else:
                lane = (tp, key)
                self._folding.add(lane, record.offset, intent)
                turn = asyncio.get_running_loop().create_future()
                coro = self._perform(job, record, intent, received, self._lanes.get(lane), lane, turn)
        self._start(job, coro, lane)
        if turn is not None and job.task is not None:
            self._turns[job.task] = turn

    def _enqueue(self, job: Job, intent: UrlPreviewUpdate, received: float) -> bool:
        """Hand a preview intent to the coalescer now, in the read loop's own step, so the next read already sees
        its token counted (``_preview_room``); False if the coalescer is not running."""
        assert self._previews is not None
        try:
            ticket = self._previews.enqueue(intent, received)
        except PreviewsStopped:
            return False
        job.preview, job.counted = ticket, False
        ticket.future.add_done_callback(functools.partial(self._preview_ready, job))
        return True

    def _start(self, job: Job, coro: Coroutine[Any, Any, None] | None,
               lane: tuple[TopicPartition, str] | None) -> None:
        """Count the job in; run ``coro`` as its task (None: a preview job waiting for its result)."""
        tp = job.tp
        self._jobs.setdefault(tp, set()).add(job)
        if job.counted:
            self._inflight += 1
            self._inflight_by_tp[tp] = self._inflight_by_tp.get(tp, 0) + 1
        if coro is None:
            return
        task = self._run(job, coro)
        if lane is not None:
            self._lanes[lane] = task
            task.add_done_callback(functools.partial(self._lane_done, lane))

    def _run(self, job: Job, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = job.task = asyncio.create_task(self._run_job(job, coro))
        task.add_done_callback(functools.partial(self._job_done, job.preview, coro))
        return task

    def _preview_ready(self, job: Job, future: asyncio.Future[Any]) -> None:
        """The intent's result is known (or the coalescer stopped): write it, unless the job was dropped meanwhile
        (withdrawn, abandoned, or its partition forgotten). Idempotent: a drain may call it first."""
        if job.task is None and not future.cancelled() and job in self._jobs.get(job.tp, ()):
            self._run(job, self._preview(job, job.record))

    def _drop(self, job: Job) -> None:
        """Forget a preview job that has no task (withdrawn or abandoned while it waited)."""
        jobs = self._jobs.get(job.tp)
        if jobs is not None:
            jobs.discard(job)

    def _app_problem(self, intent: Intent) -> IntentError | None:
        """Why ``intent`` cannot go for its app (unknown; a store app's without ``tenant_key``, a custom app's
        with one), or None."""
        why = None
        if intent.app not in self._apps:
            why = f"app: {intent.app!r} is not a configured app"
        elif intent.app in self._store_apps and intent.tenant_key is None:
            why = f"tenant_key: required for an intent of store app {intent.app!r} (the tenant to call Feishu as)"
        elif intent.app not in self._store_apps and intent.tenant_key is not None:
            why = f"tenant_key: app {intent.app!r} is a custom app (one tenant); tenant_key is only for store apps"
        elif intent.app in self._store_apps and isinstance(intent, UrlPreviewUpdate) and self._previews is not None:
            # the coalescer batches preview tokens per app, not per tenant
            why = f"kind: url_preview.update is not supported for store app {intent.app!r} yet"
        if why is None:
            return None
        return IntentError(why, id=intent.id, kind=intent_kind(intent), app=intent.app)

    def _job_done(self, ticket: PreviewTicket | None, coro: Coroutine[Any, Any, None], task: asyncio.Task[None]
                  ) -> None:
        """A job cancelled before it ever ran (abandoned right after the read) never ran its coroutine: close it
        (a no-op for one that ran); a preview one also left its intent in the coalescer, where a call could still
        carry it: withdraw it (a no-op once its result is known)."""
        coro.close()
        if ticket is not None and task.cancelled() and self._previews is not None:
            self._previews.forget(ticket)

    def _lane_done(self, lane: tuple[TopicPartition, str], task: asyncio.Task[None]) -> None:
        self._turns.pop(task, None)
        if self._lanes.get(lane) is task:
            del self._lanes[lane]

    async def _run_job(self, job: Job, coro: Awaitable[None]) -> None:
        try:
            try:
                await coro
            except asyncio.CancelledError:
                raise  # abandoned: its offset stays uncommitted and it is redone by the next owner
            except MembershipLost:
                self._count_abandoned(1)  # abandoned like a cancelled job: another replica may own it now
                return
            except Exception as err:
                # a bug, not an outcome: report it as this intent's failure rather than freeze the partition
                log.exception("%s[%d]@%d: unexpected error", job.tp.topic, job.tp.partition, job.offset)
                try:
                    await self._internal_failure(job, err)
                except MembershipLost:
                    self._count_abandoned(1)
                    return
            offsets = self._offsets.get(job.tp)
            if offsets is not None:
                offsets.done(job.offset)
                self._finished_since.set()
            self.finished += 1
        finally:
            # the lane's next job goes on in the next turn, after the rest of this step (not through this task's
            # done callbacks and asyncio.wait: two turns more per call with a predecessor)
            turn = self._turns.get(job.task) if job.task is not None else None
            if turn is not None and not turn.done():
                turn.set_result(None)
            if job.counted:
                self._inflight -= 1
                left = self._inflight_by_tp.get(job.tp, 0) - 1
                if left > 0:
                    self._inflight_by_tp[job.tp] = left
                else:
                    self._inflight_by_tp.pop(job.tp, None)
                if self._paused and ((left <= self._out.max_in_flight_per_partition // 2 and job.tp in self._paused)
                                     or (self._all_paused and self._inflight <= self._out.max_in_flight // 2)):
                    self._resumable.set()  # _backpressure would resume it now
            jobs = self._jobs.get(job.tp)
            if jobs is not None:
                jobs.discard(job)
            self._progress.set()

    # the three kinds of job -----------------------------------------------------------------------------

    async def _perform(self, job: Job, record: Record, intent: Intent, received: float,
                       previous: asyncio.Task[None] | None, lane: tuple[TopicPartition, str],
                       turn: asyncio.Future[None]) -> None:
        """``turn`` is set when this job is decided superseded: the next job of the lane may then go before this
        one's result is written (it made no call); otherwise when its job ends (``_run_job``), and the next job waits
        for that (a job cancelled before it ran is done before its successor's first step)."""
        try:
            if previous is not None and not previous.done():  # order per key; its outcome is its own
                before = self._turns.get(previous)
                if before is None:  # a recovered job's (it has no turn)
                    await asyncio.wait([previous])
                elif not before.done():
                    # cancelling this job cancels ``before`` too: every set_result on a turn checks done() first
                    await before
            problem = self._app_problem(intent)
            if problem is not None:
                await self._reject(job, record, problem, received)
                return
            superseded_by = self._folding.superseded_by(lane, record.offset)
            if superseded_by is not None:  # a later update waiting behind it replaces it whole (relay.folding)
                self._folding.done(lane, record.offset)
                if not turn.done():  # (a successor cancelled while waiting for it cancelled it)
                    turn.set_result(None)  # it makes no call: the lane goes on while its result is written
                job.started = True
                fields = {"attempts": 0, "superseded_by": superseded_by,
                          "msg": f"superseded by {superseded_by}, a later full update of the same target"}
                await self._finish(record, intent.id, job.kind, intent.app, "superseded", fields, None, received)
                return
            refusal = unsendable(intent, key=record.key, offset=record.offset,
                                 max_upload_bytes=self._out.max_upload_bytes)
            if refusal is not None:
                await self._reject(job, record, IntentError(refusal, id=intent.id, kind=job.kind, app=intent.app),
                                   received)
                return
            if isinstance(intent, ImageUpload | FileUpload) and intent.url is not None:
                fetched = await self._download(job, record, intent, received)
                if fetched is None:
                    return
                intent = fetched
            if isinstance(intent, MessageSend) and intent.upload is not None:
                uploaded = await self._upload_first(job, record, intent, received)
                if uploaded is None:
                    return
                intent = uploaded
            await self._call(job, record, intent, received)
        finally:
            self._folding.done(lane, record.offset)

    async def _download(self, job: Job, record: Record, intent: ImageUpload | FileUpload,
                        received: float) -> ImageUpload | FileUpload | None:
        """The upload with the bytes its ``url`` holds; None once a refusal (rejected) or failure is written."""
        assert intent.url is not None
        job.started = True  # a download is under way: not abandoned unstarted (it is no Feishu call)
        try:
            if self._fetcher is None:
                raise FetchRefused("url: this relay downloads no files (no fetcher)")
            limit = IMAGE_MAX_BYTES if isinstance(intent, ImageUpload) else FILE_MAX_BYTES
            fetched = msgspec.structs.replace(intent, data=await self._fetcher.fetch(intent.url, limit), url=None)
            refusal = upload_refusal(fetched, limit)
            if refusal is not None:
                raise FetchRefused(refusal)
        except FetchRefused as err:
            await self._reject(job, record, IntentError(str(err), id=intent.id, kind=job.kind, app=intent.app),
                               received)
            return None
        except FetchFailed as err:
            await self._finish(record, intent.id, job.kind, intent.app, "failed", {"msg": str(err), "attempts": 0},
                               "fetch", received)
            return None
        return fetched

    async def _upload_first(self, job: Job, record: Record, send: MessageSend,
                            received: float) -> MessageSend | None:
        """A ``message.send`` with ``upload``: download, upload, and the message with the key as its content; None
        once the intent's result is written instead (the download or upload refused or failed: ``msg`` says
        which step). The upload is journaled like any call not safe to repeat, so a new owner does not repeat it."""
        upload = await self._download(job, record, upload_for(send), received)
        if upload is None:
            return None
        attempted = await self._attempt(job, record, upload, build_call(upload), received)
        if attempted is None:
            return None
        status, dl_error, fields = from_attempt(attempted)
        outcome = attempted.outcome
        message = send_with_key(send, outcome.data) if status == "ok" and outcome is not None else None
        if message is None:
            if status == "ok":
                status, dl_error = "failed", "feishu"
            fields["msg"] = f"upload: {fields.get('msg')}"
            await self._finish(record, send.id, job.kind, send.app, status, fields, dl_error, received, journal=job)
        return message

    async def _attempt(self, job: Job, record: Record, intent: Intent, call: Call,
                       received: float) -> Attempted | None:
        """``call`` performed for ``intent`` to its end (journaled first when not safe to repeat); None once a
        rejection is written instead (a call this replica's quota share leaves no room for)."""
        expires_at = intent.expires_at.timestamp() if intent.expires_at is not None else None

        async def started() -> None:
            job.started = True

        journal_start = None
        if self._journal is not None and not call.repeatable:
            journal = self._journal

            async def journal_start() -> None:  # once a token and a connection are had (executor doc)
                if not job.journaled:
                    await journal.started(job.tp, job.offset, intent.id)
                    job.journaled = True

        unsendable = self._executor.admissible(call)
        if unsendable is not None:  # e.g. an api.call rate this replica's quota_share leaves no call of
            err = IntentError(f"rate: {unsendable}", id=intent.id, kind=job.kind, app=intent.app)
            await self._reject(job, record, err, received)
            return None
        attempted = await self._executor.execute(intent.app, call, expires_at=expires_at, before_attempt=started,
                                                 before_write=journal_start, tenant=intent.tenant_key)
        job.started = True
        return attempted

    async def _call(self, job: Job, record: Record, intent: Intent, received: float) -> None:
        if isinstance(intent, SequencedCardIntent):
            call = build_call(intent, sequence=card_sequence(record.offset))  # checked by unsendable
        else:
            call = build_call(intent)
        attempted = await self._attempt(job, record, intent, call, received)
        if attempted is None:
            return
        status, dl_error, fields = from_attempt(attempted)
        if status == "failed" and overtaken(intent, fields.get("code")):
            status, dl_error = "superseded", None  # a later update of its card is at Feishu already (folding)
            fields["msg"] = f"superseded: a later update of the card was performed first ({fields.get('msg')})"
        fields["tenant_key"] = intent.tenant_key
        await self._finish(record, intent.id, job.kind, intent.app, status, fields, dl_error,
                           received, journal=job)

    async def _preview(self, job: Job, record: Record) -> None:
        """Write the result of the intent ``_enqueue`` handed to the coalescer, once known (``_preview_ready``).

        Until then the job has no task: per intent, a pending preview holds its record, its job and its place in
        the planner (module doc)."""
        try:
            if job.preview is None:
                raise PreviewsStopped("the preview coalescer is not running")
            done = job.preview.future.result()
        except PreviewsStopped:
            raise asyncio.CancelledError from None  # abandoned like any job stopped before its call
        received = job.received
        job.started = True
        fields: dict[str, Any] = {"attempts": done.attempts, "superseded_by": done.superseded_by}
        outcome = done.outcome
        if outcome is not None:
            fields.update(code=outcome.code, msg=outcome.msg, data=outcome.data, http_status=outcome.http_status,
                          log_id=outcome.log_id)
        if done.reason and (outcome is None or done.status in ("expired", "failed")):
            fields["msg"] = done.reason
        dl_error = None
        if done.status == "failed":
            dl_error = "retries-exhausted" if done.exhausted else "feishu"
        await self._finish(record, job.id, job.kind, job.app, done.status, fields, dl_error, received)

    async def _reject(self, job: Job, record: Record, err: IntentError, received: float) -> None:
        job.started = True
        fields = {"msg": err.reason, "attempts": 0}
        await self._finish(record, err.id, err.kind, err.app, "rejected", fields, err.error, received)

    async def _internal_failure(self, job: Job, err: Exception) -> None:
        """A ``failed`` result and a dead letter (``relay.error=internal``); returns only once they are written.

        The writes themselves never raise (``_send``; MembershipLost aside, which abandons the job), so what can
        fail is building the report: then it is built again from the record without its headers, backing off, and
        ``problem`` says so meanwhile. The job holds its lane all along: a later record of the key never overtakes
        an unreported failure.
        """
        job.started = True
        record: Record = job.record
        fields = {"msg": one_line(f"internal error: {type(err).__name__}: {err}"), "attempts": 0}
        delay, counted = 0.1, False
        try:
            while True:
                try:
                    await self._finish(record, job.id, job.kind, job.app, "failed", fields, "internal", job.received,
                                       journal=job)
                    return
                except MembershipLost:
                    raise
                except Exception:
                    log.exception("%s[%d]@%d: could not report the error; its key waits", job.tp.topic,
                                  job.tp.partition, job.offset)
                if not counted:
                    counted = True
                    self._reports_failing += 1
                record, fields = Bare(job.record), {"msg": f"internal error: {type(err).__name__}", "attempts": 0}
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._out.backoff_cap)
        finally:
            if counted:
                self._reports_failing -= 1

    # writing results --------------------------------------------------------------------------------

    async def _recover(self, job: Job, record: Record, entry: Entry, received: float,
                       previous: asyncio.Task[None] | None) -> None:
        """The record's call was started by a previous owner (its journal entry): write its result, never call."""
        if previous is not None:
            await asyncio.wait([previous])  # results in key order, like any job
        job.started = True
        assert job.id is not None
        if isinstance(entry, Finished):
            letter = entry.dead_letter
            await self._write(record, job.id, bytes(entry.result), letter.error if letter else None,
                              letter.reason if letter else "")
            summary = msgspec.json.decode(entry.result)
            fields = {"attempts": summary.get("attempts"), "code": summary.get("code"),
                      "log_id": summary.get("log_id")}
            self._finished(record, job.id, job.kind, job.app, str(summary.get("status")), fields, received,
                           "re-emitted")
            return
        job.journaled = True  # its result goes to the journal first, so a later owner writes the same bytes
        fields = {"attempts": 0, "msg": "outcome unknown: a previous owner of this partition started the call and "
                  "stopped before its result was written; it may have been performed, so it was not repeated"}
        await self._finish(record, job.id, job.kind, job.app, "failed", fields, OUTCOME_UNKNOWN, received,
                           journal=job)

    async def _finish(self, record: Record, id: str | None, kind: str | None, app: str | None, status: str,
                      fields: dict[str, Any], dl_error: str | None, received: float,
                      journal: Job | None = None) -> None:
        """Write the result and dead letter; for a ``journal``-ed job, journal them first (``relay.journal``)."""
        if self._membership is not None:
            await self._membership.wait()  # raises MembershipLost: the record may be another replica's now
        now = self._wall()  # (each write, and each retry of one, asks again in _send)
        value: bytes | None = None
        if id is not None:
            value = encode_result(make_result(id=id, kind=kind, app=app, status=status, received_at=received,
                                              finished_at=now, **fields))
        reason = dead_letter_reason(dl_error, fields) if dl_error is not None else ""
        if journal is not None and journal.journaled and id is not None and value is not None:
            assert self._journal is not None
            letter = DeadLetter(dl_error, reason) if dl_error is not None else None
            await self._journal.finished(journal.tp, journal.offset, id, value, letter)
        await self._write(record, id, value, dl_error, reason)
        self._finished(record, id, kind, app, status, fields, received)

    async def _write(self, record: Record, id: str | None, value: bytes | None, dl_error: str | None,
                     reason: str) -> None:
        """The result record (when the id is known) and the dead letter (when due), awaited together."""
        headers: Headers = [(k, v) for k, v in (record.headers or ())]
        kafka = self._config.kafka
        sends: list[Awaitable[Any]] = []
        if id is not None and value is not None:
            forwarded = forwarded_headers(headers, kafka.forward_headers)
            sends.append(self._send(kafka.results_topic, id.encode(), value, forwarded,
                                    cut=functools.partial(self._cut_result, id.encode(), value, forwarded)))
        if dl_error is not None:
            letter = record.value or b""
            own = dead_letter_headers((), error=dl_error, reason=reason, topic=record.topic,
                                      partition=record.partition, offset=record.offset)
            sends.append(self._send(kafka.dead_letter_topic, record.key, letter, [*own, *headers],
                                    cut=functools.partial(cut_dead_letter, record.key, letter, own, headers)))
        if len(sends) == 1:
            await sends[0]  # the common case: no gather (and no extra task) per record
        else:
            await asyncio.gather(*sends)

    def _finished(self, record: Record, id: str | None, kind: str | None, app: str | None, status: str,
                  fields: dict[str, Any], received: float, note: str = "") -> None:
        """The metrics and the one log line of a finished record (its fields, never its content)."""
        latency = self._wall() - received  # read -> result acknowledged
        self._metrics.intent_finished(kind, status, latency)
        if not log.isEnabledFor(logging.INFO):
            return  # not even the line's fields are built (a dict per record)
        kind = kind_label(kind)  # the producer's own word only when it is a kind (it may be anything)
        log.info("%s[%d]@%d id=%.80r kind=%s app=%.40r status=%s attempts=%s code=%s log_id=%s latency_ms=%.0f%s",
                 record.topic, record.partition, record.offset, id, kind, app, status, fields.get("attempts"),
                 fields.get("code"), fields.get("log_id"), latency * 1000, f" ({note})" if note else "",
                 extra={"topic": record.topic, "partition": record.partition, "offset": record.offset,
                        "intent_id": id and id[:80], "kind": kind, "app": app and app[:80], "status": status,
                        "attempts": fields.get("attempts"), "code": fields.get("code"),
                        "log_id": fields.get("log_id"), "latency_ms": round(latency * 1000, 1),
                        **({"note": note} if note else {})})

    def lag(self) -> dict[tuple[str, int], int]:
        """Per owned partition: records not yet finished (its high watermark minus its commit point), from the
        first record read after the assignment (before it, the commit point is not known here)."""
        lags: dict[tuple[str, int], int] = {}
        for tp, offsets in list(self._offsets.items()):
            high, point = self._consumer.highwater(tp), offsets.commit_point()
            if high is not None and point is not None:
                lags[(tp.topic, tp.partition)] = max(0, high - point)
        return lags

    @staticmethod
    def _cut_result(key: bytes, value: bytes, headers: Headers, budget: int) -> tuple[bytes | None, bytes, Headers]:
        cut_value, cut_headers = cut_result(value, headers, budget)
        return key, cut_value, cut_headers

    async def _send(self, topic: str, key: bytes | None, value: bytes, headers: Headers,
                    cut: Callable[[int], tuple[bytes | None, bytes, Headers]] | None = None) -> None:
        """Produce and wait for the broker's acknowledgement; raises nothing but CancelledError (module doc).

        Nothing the broker would refuse for its size is sent when the topic's ``max.message.bytes`` is known:
        aiokafka's idempotent producer does not take back the sequence numbers of a refused batch, so every later
        batch to that partition would fail (``OutOfOrderSequenceNumber``). A record over the limit is cut to fit
        (``cut(budget)``); to a topic whose limit is below the producer's batch size every record goes as a batch
        of its own. When the limit is unknown, a ``MessageSizeTooLarge`` (aiokafka's own check, or the broker's)
        sends the record alone, then cut, halving. Any other error is retried, backing off; one that cannot
        succeed by retrying marks the write stuck (``problem``) until it does. An error that is not Kafka's (the
        client refused the record's shape) is retried with the smallest cut, which has none of the original
        headers.
        """
        write = Write(f"writing to {topic}", self._clock())
        self._writes[write] = None
        delay, alone = 0.1, False
        try:
            while True:
                if self._membership is not None:
                    await self._membership.wait()  # also before a retry: it may come after a freeze (MembershipLost)
                failure: Exception
                try:
                    limit = await self._topic_limit(topic, fresh=write.stuck)
                    size = record_size(key, value, headers)
                    if limit is not None and size + BATCH_OVERHEAD > limit:
                        smaller = cut(limit - BATCH_OVERHEAD) if cut is not None else None
                        if smaller is not None and record_size(*smaller) < size:
                            key, value, headers = self._cut(topic, size, smaller)
                            continue
                        raise _TooLarge(f"{size} bytes even cut; {topic} takes {limit}")
                    if alone or (limit is not None and limit < MAX_BATCH_SIZE + BATCH_OVERHEAD):
                        future = await self._send_alone(topic, key, value, headers)
                    else:
                        if write.error is None:  # a retry goes at once
                            await self._gather.wait()
                        future = await self._producer.send(topic, value, key=key, headers=headers)
                    await future
                    return
                except _TooLarge as err:
                    failure = err
                except MessageSizeTooLargeError as err:
                    failure = err
                    if not alone:
                        alone = True  # a neighbour in its batch may have been the large one
                        continue
                    smaller = cut(size // 2) if cut is not None else None
                    if smaller is not None and record_size(*smaller) < size:
                        key, value, headers = self._cut(topic, size, smaller)
                        continue
                except OutOfOrderSequenceNumber as err:
                    # an earlier batch to this partition was refused (too large, invalid timestamp, ...): aiokafka
                    # kept its sequence numbers, so this producer can never write to the partition again
                    failure = err
                    if await self._renew_producer():
                        continue
                except KafkaError as err:
                    failure = err
                except Exception as err:
                    log.exception("writing to %s failed unexpectedly", topic)
                    failure = err
                    smallest = cut(0) if cut is not None else None
                    if smallest is not None and record_size(*smallest) < record_size(key, value, headers):
                        key, value, headers = smallest
                        continue
                retriable = isinstance(failure, KafkaError) and failure.retriable
                write.error, write.stuck = f"{type(failure).__name__}: {one_line(str(failure), 200)}", not retriable
                self._metrics.inc("relay_outbound_write_errors_total", help="failed result/dead-letter writes",
                                  topic=topic, retriable=str(retriable).lower())
                # never dropped: the record's offset waits. A write that cannot succeed by retrying needs an
                # operator: an error in the log and a reason on /readyz, retried slowly until fixed
                log.log(logging.WARNING if retriable else logging.ERROR, "writing to %s failed (%s); retrying in %.1fs",
                        topic, write.error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._out.backoff_cap)
        finally:
            del self._writes[write]

    async def _renew_producer(self) -> bool:
        """Replace the producer (a fresh producer id starts its sequences over); False when not possible now.

        At most once per ``outbound.backoff_cap``: a topic that keeps refusing breaks each new producer again. The
        old one is stopped in the background (what it still holds is delivered or fails back to its sender).
        """
        if self._new_producer is None:
            return False
        if self._renewing is None:
            if self._clock() - self._renewed_at < self._out.backoff_cap:
                return False
            self._renewing = asyncio.create_task(self._swap_producer(self._new_producer))
        renewing = self._renewing
        await asyncio.wait([renewing])
        if self._renewing is renewing:
            self._renewing = None
        return not renewing.cancelled() and renewing.exception() is None

    async def _swap_producer(self, make: Callable[[], AIOKafkaProducer]) -> None:
        producer = make()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        old, self._producer = self._producer, producer
        self._renewed_at = self._clock()
        self._renewed.append(producer)
        log.warning("a refused batch broke the producer's sequence numbers; writing with a new producer")
        self._metrics.inc("relay_outbound_producer_renewals_total",
                          help="producers replaced after a refused batch broke their sequence numbers")
        if old in self._renewed:  # ours to stop; the first one is its owner's
            self._renewed.remove(old)
            task = asyncio.create_task(old.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def _cut(self, topic: str, size: int, smaller: tuple[bytes | None, bytes, Headers]
             ) -> tuple[bytes | None, bytes, Headers]:
        self._metrics.inc("relay_outbound_truncated_total", topic=topic,
                          help="results and dead letters cut to fit their topic")
        log.warning("a record of %d bytes is too large for %s; writing it cut to %d bytes", size, topic,
                    record_size(*smaller))
        return smaller

    async def _topic_limit(self, topic: str, *, fresh: bool) -> int | None:
        """The topic's ``max.message.bytes`` (None when the broker does not say); asked again, at most once a
        second, while a write is stuck (an operator may be raising it)."""
        known = self._limits.get(topic)
        if known is not None and not (fresh and self._clock() - known[1] >= 1.0):
            return known[0]
        async with self._limits_lock:  # one question at a time: the first writes all ask at once
            known = self._limits.get(topic)
            if known is None or (fresh and self._clock() - known[1] >= 1.0):
                limits = await max_message_bytes(self._admin, [topic]) if self._admin is not None else {}
                known = self._limits[topic] = (limits.get(topic), self._clock())
        return known[0]

    async def _send_alone(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> Awaitable[Any]:
        """Send one record as a batch of its own (the partition ``send`` would pick for its key)."""
        batch = self._producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
            raise MessageSizeTooLargeError(f"a record of {record_size(key, value, headers)} bytes fits no batch")
        partitions = sorted(await self._producer.partitions_for(topic))
        partition = self._partitioner(key, partitions, partitions)
        future: Awaitable[Any] = await self._producer.send_batch(batch, topic, partition=partition)
        return future

    # commits ------------------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        """Every ``commit_interval`` while records are being finished; asleep while none is (an idle relay
        wakes for nothing), except every :data:`relay.journal.REFRESH_SECONDS` with a journal, whose known end
        moves with other partitions' calls: an idle partition still commits a recent journal position. A commit
        that did not land is tried again at the next interval."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if self._journal is None else REFRESH_SECONDS):
                    await self._finished_since.wait()
            await asyncio.sleep(self._out.commit_interval)
            self._finished_since.clear()  # what finishes from here on is for the next round
            if self._rebalancing:
                self._finished_since.set()
                continue  # the revoke listener commits what it owns; nothing stale may land after it
            self._periodic = asyncio.create_task(self._commit(list(self._offsets)))
            await asyncio.wait([self._periodic])  # returns, never raises, also when revocation cancels it
            err = None if self._periodic.cancelled() else self._periodic.exception()
            if err is not None:
                log.error("periodic commit failed; retrying at the next interval", exc_info=err)
            if self._periodic.cancelled() or err is not None or not self._periodic.result():
                self._finished_since.set()  # what did not land is tried again at the next interval

    async def _commit(self, tps: list[TopicPartition]) -> bool:
        """Commit what ``tps`` finished; False if some of it could not be committed (it stays to commit)."""
        if self._standing() is Standing.LOST:
            return False  # the broker would refuse it (or, after a reset generation, take it from a non-member)
        while True:
            cap = self._metadata_cap
            moves: dict[TopicPartition, tuple[int, str]] = {}
            for tp in tps:
                offsets = self._offsets.get(tp)
                point = offsets.commit_point() if offsets is not None else None
                if offsets is None or point is None:
                    continue
                # the journal position rides in the metadata (relay.journal), kept whatever else is cut
                journal = self._journal.position(tp, point) if self._journal is not None else None
                move = offsets.uncommitted(also_done=self._skip.get(tp, _NOTHING), journal=journal, cap=cap)
                if move is not None:
                    moves[tp] = move
            if not moves:
                return True
            try:
                await self._consumer.commit(moves)
            except OffsetMetadataTooLargeError:
                # the broker's offset.metadata.max.bytes is smaller than our cap: aiokafka does not retry this,
                # and the same metadata would be refused forever. Halve the cap and commit again, now
                longest = max(len(metadata) for _, metadata in moves.values())
                self._metrics.inc("relay_outbound_metadata_refused_total",
                                  help="commits refused with OFFSET_METADATA_TOO_LARGE (the cap was halved)")
                if longest <= _MIN_METADATA_CAP:
                    log.error("the broker refuses commit metadata of %d characters; commits fail", longest)
                    return False
                self._metadata_cap = max(_MIN_METADATA_CAP, min(cap, longest) // 2)
                self._metrics.set("relay_outbound_metadata_cap", self._metadata_cap,
                                  help="characters of commit metadata in use (outbound.commit_metadata_max_bytes)")
                log.warning("the broker refused commit metadata of %d characters (OFFSET_METADATA_TOO_LARGE); "
                            "using at most %d from now on: set outbound.commit_metadata_max_bytes to the broker's "
                            "offset.metadata.max.bytes or less", longest, self._metadata_cap)
                continue
            except (CommitFailedError, IllegalStateError, KafkaError) as err:
                # ownership moved (a rebalance) or the broker is away: the next owner re-reads from the last commit
                log.warning("commit of %d partition(s) failed: %s", len(moves), err)
                return False
            for tp, (point, metadata) in moves.items():
                committed = self._offsets.get(tp)
                if committed is not None:
                    committed.committed, committed.committed_metadata = point, metadata
                if self._journal is not None:
                    self._journal.committed(tp, point)
            self._progress.set()  # committed records leave the commit metadata: a full partition may read again
            self._resumable.set()
            return True

    async def _drain(self, tps: list[TopicPartition]) -> None:
        """Abandon jobs that have not started; give started ones ``drain_timeout`` to finish.

        A preview job can stop being started while it waits (its call gave up its claim unsent: lost, or too
        late); it is handed over then, at the next look (every :data:`DRAIN_RECHECK` s), rather than sent here.
        """
        jobs = [job for tp in tps for job in self._jobs.get(tp, ())]
        abandoned = [job for job in jobs if self._abandonable(job)]
        for job in abandoned:
            self._cancel(job)
        waiting = {job: None for job in jobs if not (job.task is not None and job.task.done()) and job not in abandoned}
        if not waiting and not abandoned:
            return
        finished = 0
        deadline = self._clock() + self._out.drain_timeout
        while waiting and (left := deadline - self._clock()) > 0:
            previews = any(job.preview is not None for job in waiting)
            await asyncio.wait([self._awaited(job) for job in waiting],
                               timeout=min(left, DRAIN_RECHECK) if previews else left)
            for job in list(waiting):
                if job.task is None and job.preview is not None and job.preview.future.done():
                    self._preview_ready(job, job.preview.future)  # its result: write it (if not done already)
                if job.task is not None and job.task.done():
                    finished += 1
                    del waiting[job]
                elif job.preview is not None and self._abandonable(job):
                    self._cancel(job)
                    abandoned.append(job)
                    del waiting[job]
        for job in waiting:
            self._cancel(job)
        if cancelled := [job.task for job in [*abandoned, *waiting] if job.task is not None]:
            await asyncio.wait(cancelled, timeout=5)
        log.info("drained %d partition(s): %d abandoned before a call, %d finished, %d cut off", len(tps),
                 len(abandoned), finished, len(waiting))

    def _abandonable(self, job: Job) -> bool:
        """Not started, so nothing of it can be at Feishu: a preview job is withdrawn from the coalescer here, in
        the same step as the check, so no call can claim for it before it is dropped."""
        if job.started:
            return False
        if job.preview is not None and self._previews is not None:
            return self._previews.withdraw_unstarted(job.preview)
        return job.task is not None

    @staticmethod
    def _awaited(job: Job) -> asyncio.Future[Any]:
        """What a drain waits on: the job's task, or, for a preview job without one yet, its intent's result."""
        if job.task is not None:
            return job.task
        assert job.preview is not None
        return job.preview.future

    def _cancel(self, job: Job) -> None:
        """Cancel the job's task; a preview job without one is withdrawn from the coalescer and dropped."""
        if job.task is not None:
            job.task.cancel()
            return
        if job.preview is not None and self._previews is not None:
            self._previews.forget(job.preview)
        self._drop(job)

    async def _abandon(self, tps: list[TopicPartition]) -> None:
        """Cancel every job of ``tps``, started or not: no call, no result; their offsets stay uncommitted."""
        jobs = [job for tp in tps for job in self._jobs.get(tp, ()) if job.task is None or not job.task.done()]
        for job in jobs:
            self._cancel(job)
        if tasks := [job.task for job in jobs if job.task is not None]:
            await asyncio.wait(tasks, timeout=5)
        self._count_abandoned(len(jobs))
        log.info("abandoned %d job(s) of %d partition(s) for their next owner", len(jobs), len(tps))

    def _count_abandoned(self, n: int) -> None:
        self._metrics.inc("relay_outbound_abandoned_total", n,
                          help="jobs abandoned because this replica's group membership lapsed (no call, no result)")

    def _forget(self, tps: list[TopicPartition]) -> None:
        gone = set(tps)
        self._paused -= gone
        self._unloaded -= gone
        for tp in gone:
            self._offsets.pop(tp, None)
            self._jobs.pop(tp, None)
            self._skip.pop(tp, None)
            self._careful.pop(tp, None)
        if self._journal is not None:
            self._journal.forget(gone)
        self._folding.forget(gone)
        for lane in [lane for lane in self._lanes if lane[0] in gone]:
            del self._lanes[lane]
