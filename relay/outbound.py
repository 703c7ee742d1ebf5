"""The outbound consumer: intents in, Feishu calls made, one result per intent out.

Guarantees (proved by the kill/drain/rebalance tests in ``tests/test_outbound_resilience.py``):

* **Nothing lost.** A record's offset is committed only after its result (and dead letter, if any) is
  acknowledged by Kafka (``acks=all``). Offsets are committed as the contiguous finished prefix of each
  partition (``offsets.PartitionOffsets``); records already finished above that prefix travel in the commit
  metadata so the next owner skips them instead of calling Feishu again. Killed at any instant, the relay redoes
  at most the uncommitted tail; a drained stop (SIGTERM) or a rebalance redoes no call already made.
* **Order per key.** Records of one partition with the same ordering key run one after another (a *lane*: each
  job waits for the previous job of its key), so their calls are attempted in partition order. Different keys
  run concurrently: a key waiting on its own limit or on a retry never holds back the others.
  ``url_preview.update`` intents skip the lanes: they are merged by the preview coalescer.
* **Bounded work.** At most ``outbound.max_in_flight`` records are read but unfinished, and at most
  ``outbound.max_in_flight_per_partition`` of one partition. A partition over its share is paused alone (resumed at
  half), so a hot key with a long backlog on its limit holds back only the keys that share its partition, and only
  once that partition's share is used; past the global cap every partition pauses. Pauses are re-applied after a
  rebalance, since Kafka forgets them.
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

Decoding failures, unknown kinds, broken field rules and unknown apps become ``rejected`` results plus dead
letters; they never stop a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

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
from relay.journal import DeadLetter, Entry, Finished, Journal
from relay.kafka import client_settings
from relay.media import FILE_MAX_BYTES, IMAGE_MAX_BYTES, send_with_key, upload_for, upload_refusal
from relay.membership import Membership, MembershipLost, Standing, watch
from relay.metrics import Metrics
from relay.offsets import JournalPosition, PartitionOffsets, decode_done, split_journal, with_journal
from relay.outcomes import Attempted
from relay.previews.coalescer import PreviewCoalescer, PreviewsStopped, PreviewTicket
from relay.results import (
    OUTCOME_UNKNOWN,
    Headers,
    dead_letter_headers,
    dead_letter_reason,
    encode_result,
    forwarded_headers,
    from_attempt,
    make_result,
)

log = logging.getLogger(__name__)

# seconds between two looks, during a drain, for preview jobs that stopped being started (see Outbound._drain)
DRAIN_RECHECK = 0.25


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
    job's ``preview`` ticket says more: see :meth:`Outbound._abandonable`)."""

    __slots__ = ("app", "id", "journaled", "kind", "offset", "preview", "received", "record", "started", "task",
                 "tp")

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


class Outbound(ConsumerRebalanceListener):
    def __init__(self, config: Config, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                 executor: Executor, metrics: Metrics, *, known_apps: Iterable[str],
                 previews: PreviewCoalescer | None = None, membership: Membership | None = None,
                 journal: Journal | None = None, fetcher: Fetcher | None = None,
                 wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``membership``: the group-membership lease that fences calls and writes (module doc); None in tests
        without a group coordinator. ``journal``: the write-ahead journal of calls not safe to repeat."""
        self._config = config
        self._out = config.outbound
        self._consumer = consumer
        self._producer = producer
        self._executor = executor
        self._metrics = metrics
        self._apps = frozenset(known_apps)
        self._previews = previews
        self._membership = membership
        self._journal = journal
        self._fetcher = fetcher  # downloads the bytes of an upload given by url (relay.fetch)
        self._wall = wall
        self._clock = clock
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._skip: dict[TopicPartition, set[int]] = {}
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
        self._admin: AIOKafkaAdminClient | None = None
        self._rebalancing = False  # between revoke and assign: no periodic commits
        self._periodic: asyncio.Task[None] | None = None  # the periodic commit in flight
        self.finished = 0  # records finished (result acknowledged), for progress lines and tests

    # lifetime -----------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain, commit and leave the group."""
        self._admin = AIOKafkaAdminClient(**client_settings(self._config.kafka))
        await self._admin.start()
        try:
            await self._consumer.start()  # not subscribed yet: returns without joining the group
            try:
                if self._membership is not None:
                    watch(self._consumer, self._membership)  # before the first JoinGroup, so its SyncGroup counts
                self._consumer.subscribe(self._config.kafka.intents_topics, listener=self)
                await self._consume(stop)
            finally:
                await asyncio.wait_for(self._consumer.stop(), 30)
        finally:
            await self._admin.close()
        log.info("outbound stopped: %d records finished", self.finished)

    async def _consume(self, stop: asyncio.Event) -> None:
        committer = asyncio.create_task(self._commit_loop(), name="relay-committer")
        try:
            while not stop.is_set():
                valid = self._standing() is Standing.VALID
                if valid:
                    self._backpressure()
                # while anything is paused, come back soon to resume it as work finishes. Polled also while the
                # membership is not valid: aiokafka leaves the group and will not rejoin after max_poll_interval
                # without a poll
                batch = await self._consumer.getmany(timeout_ms=20 if valid and self._paused else 200,
                                                     max_records=500)
                if batch and self._standing() is not Standing.VALID:
                    self._unread(batch)  # nothing is dispatched until the membership is confirmed
                    assert self._membership is not None
                    await self._membership.changed(timeout=0.2)
                    continue
                for tp, records in batch.items():
                    for record in records:
                        self._dispatch(tp, record)
        finally:
            committer.cancel()
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
        # aiokafka hands out records of the new partitions while this callback awaits: hold them (synchronously,
        # before the first await) until we know which records the previous owner already finished
        if assigned:
            self._consumer.pause(*assigned)
        for tp in assigned:
            self._offsets.setdefault(tp, PartitionOffsets())
            self._jobs.setdefault(tp, set())
        try:
            await self._load_finished(assigned)
        finally:
            self._rebalancing = False
            # pauses do not survive a rebalance: those wanted for backpressure stay, the rest resume
            if resume := set(assigned) - self._paused:
                self._consumer.resume(*resume)
        self._metrics.set("relay_outbound_assigned_partitions", len(self._consumer.assignment()),
                          help="intent partitions this replica owns")
        log.info("partitions assigned: %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in assigned) or "-")

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
            metadata, position = split_journal(meta.metadata)
            positions[tp] = (meta.offset, position)
            done = decode_done(meta.offset, metadata)
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

    def _backpressure(self) -> None:
        assigned = self._consumer.assignment()
        cap, per = self._out.max_in_flight, self._out.max_in_flight_per_partition
        if self._inflight >= cap:
            self._all_paused = True
        elif self._all_paused and self._inflight <= cap // 2:
            self._all_paused = False
        if self._all_paused:
            wanted = set(assigned)
        else:
            wanted = {tp for tp in assigned
                      if (n := self._inflight_by_tp.get(tp, 0)) >= per or (tp in self._paused and n > per // 2)}
        if pause := wanted - self._paused:
            self._consumer.pause(*pause)
        if resume := (self._paused - wanted) & assigned:
            self._consumer.resume(*resume)
        self._paused = wanted
        self._metrics.set("relay_outbound_in_flight", self._inflight, help="records read but not finished")
        self._metrics.set("relay_outbound_paused_partitions", len(wanted), help="partitions paused for backpressure")

    def _dispatch(self, tp: TopicPartition, record: Record) -> None:
        offsets = self._offsets.setdefault(tp, PartitionOffsets())
        offsets.add(record.offset)
        skip = self._skip.get(tp)
        if skip and record.offset in skip:
            skip.discard(record.offset)
            offsets.done(record.offset)
            return
        received = self._wall()
        job = Job(tp, record, received)
        lane: tuple[TopicPartition, str] | None = None
        turn: asyncio.Future[None] | None = None
        coro: Coroutine[Any, Any, None]
        try:
            intent = decode_intent(record.value)
            if intent.app not in self._apps:
                raise IntentError(f"app: {intent.app!r} is not a configured app", id=intent.id,
                                  kind=intent_kind(intent), app=intent.app)
        except IntentError as err:
            coro = self._reject(job, record, err, received)
        else:
            job.id, job.kind, job.app = intent.id, intent_kind(intent), intent.app
            entry = self._journal.recovered(tp, record.offset) if self._journal is not None else None
            if entry is not None:  # a previous owner started its call: never call again
                lane = (tp, ordering_key(intent))
                coro = self._recover(job, record, entry, received, self._lanes.get(lane))
            elif isinstance(intent, UrlPreviewUpdate) and self._previews is not None:
                coro = self._preview(job, record, intent, received)
            else:
                lane = (tp, ordering_key(intent))
                self._folding.add(lane, record.offset, intent)
                turn = asyncio.get_running_loop().create_future()
                coro = self._perform(job, record, intent, received, self._lanes.get(lane), lane, turn)
        task = asyncio.create_task(self._run_job(job, coro))
        job.task = task
        self._jobs.setdefault(tp, set()).add(job)
        self._inflight += 1
        self._inflight_by_tp[tp] = self._inflight_by_tp.get(tp, 0) + 1
        if lane is not None:
            self._lanes[lane] = task
            task.add_done_callback(functools.partial(self._lane_done, lane))
            if turn is not None:
                self._turns[task] = turn

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
                if not await self._internal_failure(job, err):
                    return
            offsets = self._offsets.get(job.tp)
            if offsets is not None:
                offsets.done(job.offset)
            self.finished += 1
        finally:
            self._inflight -= 1
            left = self._inflight_by_tp.get(job.tp, 0) - 1
            if left > 0:
                self._inflight_by_tp[job.tp] = left
            else:
                self._inflight_by_tp.pop(job.tp, None)
            jobs = self._jobs.get(job.tp)
            if jobs is not None:
                jobs.discard(job)

    # the three kinds of job -----------------------------------------------------------------------------

    async def _perform(self, job: Job, record: Record, intent: Intent, received: float,
                       previous: asyncio.Task[None] | None, lane: tuple[TopicPartition, str],
                       turn: asyncio.Future[None]) -> None:
        """``turn`` ends when the next job of the lane may go: when this one is done, or decided superseded."""
        try:
            if previous is not None:  # order per key; its outcome (even a cancellation) is its own
                await asyncio.wait([self._turns.get(previous) or previous])
            superseded_by = self._folding.superseded_by(lane, record.offset)
            if superseded_by is not None:  # a later update waiting behind it replaces it whole (relay.folding)
                self._folding.done(lane, record.offset)
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
                fetched = await self._fetch(job, record, intent, received)
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
            if not turn.done():
                turn.set_result(None)

    async def _fetch(self, job: Job, record: Record, intent: ImageUpload | FileUpload,
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
        upload = await self._fetch(job, record, upload_for(send), received)
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
                                                 before_write=journal_start)
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
        await self._finish(record, intent.id, job.kind, intent.app, status, fields, dl_error,
                           received, journal=job)

    async def _preview(self, job: Job, record: Record, intent: UrlPreviewUpdate, received: float) -> None:
        assert self._previews is not None
        try:
            job.preview = self._previews.enqueue(intent, received)
            done = await self._previews.result(job.preview)
        except PreviewsStopped:
            raise asyncio.CancelledError from None  # abandoned like any job stopped before its call
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
        await self._finish(record, intent.id, job.kind, intent.app, done.status, fields, dl_error,
                           received)

    async def _reject(self, job: Job, record: Record, err: IntentError, received: float) -> None:
        job.started = True
        fields = {"msg": err.reason, "attempts": 0}
        await self._finish(record, err.id, err.kind, err.app, "rejected", fields, err.error, received)

    async def _internal_failure(self, job: Job, err: Exception) -> bool:
        """A ``failed`` result and a dead letter (``relay.error=internal``); False if even that fails."""
        job.started = True
        fields = {"msg": f"internal error: {type(err).__name__}: {err}", "attempts": 0}
        try:
            await self._finish(job.record, job.id, job.kind, job.app, "failed", fields, "internal", job.received,
                               journal=job)
        except MembershipLost:
            return False
        except Exception:
            log.exception("%s[%d]@%d: could not report the error; the record stays uncommitted", job.tp.topic,
                          job.tp.partition, job.offset)
            return False
        return True

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
            self._finished(record, job.id, job.kind, str(summary.get("status")), fields, received, "re-emitted")
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
        self._finished(record, id, kind, status, fields, received)

    async def _write(self, record: Record, id: str | None, value: bytes | None, dl_error: str | None,
                     reason: str) -> None:
        """The result record (when the id is known) and the dead letter (when due), awaited together."""
        headers: Headers = [(k, v) for k, v in (record.headers or ())]
        kafka = self._config.kafka
        sends: list[Awaitable[Any]] = []
        if id is not None and value is not None:
            sends.append(self._send(kafka.results_topic, id.encode(), value,
                                    forwarded_headers(headers, kafka.forward_headers)))
        if dl_error is not None:
            sends.append(self._send(kafka.dead_letter_topic, record.key, record.value or b"",
                                    dead_letter_headers(headers, error=dl_error, reason=reason,
                                                        topic=record.topic, partition=record.partition,
                                                        offset=record.offset)))
        if len(sends) == 1:
            await sends[0]  # the common case: no gather (and no extra task) per record
        else:
            await asyncio.gather(*sends)

    def _finished(self, record: Record, id: str | None, kind: str | None, status: str, fields: dict[str, Any],
                  received: float, note: str = "") -> None:
        """The metrics and the one log line of a finished record."""
        latency = self._wall() - received  # read -> result acknowledged
        self._metrics.inc("relay_intents_total", help="intents finished, by kind and status",
                          kind=kind or "unknown", status=status)
        self._metrics.observe("relay_intent_seconds", latency, help="read to result written", status=status)
        log.info("%s[%d]@%d id=%s kind=%s status=%s attempts=%s code=%s log_id=%s latency_ms=%.0f%s",
                 record.topic, record.partition, record.offset, id, kind, status, fields.get("attempts"),
                 fields.get("code"), fields.get("log_id"), latency * 1000, f" ({note})" if note else "")

    async def _send(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> None:
        """Produce and wait for the broker's acknowledgement, retrying until it comes (or we are cancelled)."""
        delay = 0.1
        while True:
            if self._membership is not None:
                await self._membership.wait()  # also before a retry: it may come after a freeze (MembershipLost)
            try:
                future = await self._producer.send(topic, value, key=key, headers=headers)
                await future
                return
            except KafkaError as err:
                # never dropped: the record's offset waits. A non-retriable error (too large, not authorized)
                # needs an operator, so it is logged as an error and counted rather than retried quietly.
                self._metrics.inc("relay_outbound_write_errors_total", help="failed result/dead-letter writes",
                                  topic=topic, retriable=str(err.retriable).lower())
                level = logging.WARNING if err.retriable else logging.ERROR
                log.log(level, "writing to %s failed (%s); retrying in %.1fs", topic, err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0 if err.retriable else 30.0)

    # commits ------------------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self._out.commit_interval)
            if self._rebalancing:
                continue  # the revoke listener commits what it owns; nothing stale may land after it
            self._periodic = asyncio.create_task(self._commit(list(self._offsets)))
            await asyncio.wait([self._periodic])  # returns, never raises, also when revocation cancels it
            if not self._periodic.cancelled() and (err := self._periodic.exception()) is not None:
                log.error("periodic commit failed; retrying at the next interval", exc_info=err)

    async def _commit(self, tps: list[TopicPartition]) -> None:
        if self._standing() is Standing.LOST:
            return  # the broker would refuse it (or, after a reset generation, take it from a non-member)
        moves = {tp: move for tp in tps if (o := self._offsets.get(tp)) is not None
                 and (move := o.uncommitted(also_done=self._skip.get(tp, ()))) is not None}
        if not moves:
            return
        wire = moves
        if self._journal is not None:  # the journal position rides in the metadata (relay.journal)
            wire = {tp: (point, with_journal(metadata, self._journal.position(tp, point)))
                    for tp, (point, metadata) in moves.items()}
        try:
            await self._consumer.commit(wire)
        except (CommitFailedError, IllegalStateError, KafkaError) as err:
            # ownership moved (a rebalance) or the broker is away: the next owner re-reads from the last commit
            log.warning("commit of %d partition(s) failed: %s", len(moves), err)
            return
        for tp, (point, metadata) in moves.items():
            offsets = self._offsets.get(tp)
            if offsets is not None:
                offsets.committed, offsets.committed_metadata = point, metadata
            if self._journal is not None:
                self._journal.committed(tp, point)

    async def _drain(self, tps: list[TopicPartition]) -> None:
        """Abandon jobs that have not started; give started ones ``drain_timeout`` to finish.

        A preview job can stop being started while it waits (its call gave up its claim unsent: lost, or too
        late); it is handed over then, at the next look (every :data:`DRAIN_RECHECK` s), rather than sent here.
        """
        jobs = [job for tp in tps for job in self._jobs.get(tp, ())]
        abandoned = [job for job in jobs if self._abandonable(job)]
        for job in abandoned:
            assert job.task is not None
            job.task.cancel()
        waiting = {job.task: job for job in jobs
                   if job.task is not None and not job.task.done() and job not in abandoned}
        if not waiting and not abandoned:
            return
        finished = 0
        deadline = self._clock() + self._out.drain_timeout
        while waiting and (left := deadline - self._clock()) > 0:
            previews = any(job.preview is not None for job in waiting.values())
            await asyncio.wait(list(waiting), timeout=min(left, DRAIN_RECHECK) if previews else left)
            for task, job in list(waiting.items()):
                if task.done():
                    finished += 1
                    del waiting[task]
                elif job.preview is not None and self._abandonable(job):
                    task.cancel()
                    abandoned.append(job)
                    del waiting[task]
        for task in waiting:
            task.cancel()
        if cancelled := [job.task for job in abandoned if job.task is not None] + list(waiting):
            await asyncio.wait(cancelled, timeout=5)
        log.info("drained %d partition(s): %d abandoned before a call, %d finished, %d cut off", len(tps),
                 len(abandoned), finished, len(waiting))

    def _abandonable(self, job: Job) -> bool:
        """Not started, so nothing of it can be at Feishu: a preview job is withdrawn from the coalescer here, in
        the same step as the check, so no call can claim for it before its task is cancelled."""
        if job.started or job.task is None:
            return False
        if job.preview is not None and self._previews is not None:
            return self._previews.withdraw_unstarted(job.preview)
        return True

    async def _abandon(self, tps: list[TopicPartition]) -> None:
        """Cancel every job of ``tps``, started or not: no call, no result; their offsets stay uncommitted."""
        tasks = [job.task for tp in tps for job in self._jobs.get(tp, ()) if job.task is not None
                 and not job.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self._count_abandoned(len(tasks))
        log.info("abandoned %d job(s) of %d partition(s) for their next owner", len(tasks), len(tps))

    def _count_abandoned(self, n: int) -> None:
        self._metrics.inc("relay_outbound_abandoned_total", n,
                          help="jobs abandoned because this replica's group membership lapsed (no call, no result)")

    def _forget(self, tps: list[TopicPartition]) -> None:
        gone = set(tps)
        self._paused -= gone
        for tp in gone:
            self._offsets.pop(tp, None)
            self._jobs.pop(tp, None)
            self._skip.pop(tp, None)
        if self._journal is not None:
            self._journal.forget(gone)
        self._folding.forget(gone)
        for lane in [lane for lane in self._lanes if lane[0] in gone]:
            del self._lanes[lane]
