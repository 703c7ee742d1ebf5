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
  finish and write their results; then offsets are committed and state for those partitions dropped.

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

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from relay.calls import build_call
from relay.config import Config
from relay.errors import IntentError
from relay.executor import Executor
from relay.intents import Intent, UrlPreviewUpdate, decode_intent, ordering_key
from relay.kafka import client_settings
from relay.metrics import Metrics
from relay.offsets import OffsetRanges, PartitionOffsets, decode_metadata
from relay.previews.coalescer import PreviewCoalescer, PreviewsStopped
from relay.results import (
    Headers,
    dead_letter_headers,
    dead_letter_reason,
    encode_result,
    forwarded_headers,
    from_attempt,
    make_result,
)

log = logging.getLogger(__name__)


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
    """One record being handled. ``started``: a call was attempted or the result is being written."""

    __slots__ = ("app", "id", "kind", "offset", "received", "record", "started", "task", "tp")

    def __init__(self, tp: TopicPartition, record: Record, received: float) -> None:
        self.tp = tp
        self.record = record
        self.offset = record.offset
        self.received = received
        self.started = False
        self.task: asyncio.Task[None] | None = None
        self.id: str | None = None
        self.kind: str | None = None
        self.app: str | None = None


class Outbound(ConsumerRebalanceListener):
    def __init__(self, config: Config, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                 executor: Executor, metrics: Metrics, *, known_apps: Iterable[str],
                 previews: PreviewCoalescer | None = None, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._out = config.outbound
        self._consumer = consumer
        self._producer = producer
        self._executor = executor
        self._metrics = metrics
        self._apps = frozenset(known_apps)
        self._previews = previews
        self._wall = wall
        self._clock = clock
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._skip: dict[TopicPartition, OffsetRanges] = {}
        self._jobs: dict[TopicPartition, set[Job]] = {}
        self._lanes: dict[tuple[TopicPartition, str], asyncio.Task[None]] = {}
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
            self._consumer.subscribe(self._config.kafka.intents_topics, listener=self)
            await self._consumer.start()
            try:
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
                self._backpressure()
                # while anything is paused, come back soon to resume it as work finishes
                batch = await self._consumer.getmany(timeout_ms=20 if self._paused else 200, max_records=500)
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
            await self._drain(owned)
            await self._commit(owned)
            self._forget(owned)

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
        """Records a previous owner finished above its commit point: skip them (see ``offsets``)."""
        if not assigned or self._admin is None:
            return
        try:
            committed = await self._admin.list_consumer_group_offsets(self._config.kafka.group_id,
                                                                      partitions=assigned)
        except KafkaError as err:
            log.warning("could not read committed metadata (%s); finished records may be redone", err)
            return
        for tp, meta in committed.items():
            done = decode_metadata(meta.offset, meta.metadata).done
            if done:
                self._skip[tp] = done
                log.info("%s[%d]: skipping %d records finished by the previous owner", tp.topic, tp.partition,
                         len(done))

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
            offsets.done(record.offset)
            return
        received = self._wall()
        job = Job(tp, record, received)
        lane: tuple[TopicPartition, str] | None = None
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
            if isinstance(intent, UrlPreviewUpdate) and self._previews is not None:
                coro = self._preview(job, record, intent, received)
            else:
                lane = (tp, ordering_key(intent))
                coro = self._perform(job, record, intent, received, self._lanes.get(lane))
        task = asyncio.create_task(self._run_job(job, coro))
        job.task = task
        self._jobs.setdefault(tp, set()).add(job)
        self._inflight += 1
        self._inflight_by_tp[tp] = self._inflight_by_tp.get(tp, 0) + 1
        if lane is not None:
            self._lanes[lane] = task
            task.add_done_callback(functools.partial(self._lane_done, lane))

    def _lane_done(self, lane: tuple[TopicPartition, str], task: asyncio.Task[None]) -> None:
        if self._lanes.get(lane) is task:
            del self._lanes[lane]

    async def _run_job(self, job: Job, coro: Awaitable[None]) -> None:
        try:
            try:
                await coro
            except asyncio.CancelledError:
                raise  # abandoned: its offset stays uncommitted and it is redone by the next owner
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
                       previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # order per key; its outcome (even a cancellation) is its own
        expires_at = intent.expires_at.timestamp() if intent.expires_at is not None else None

        async def started() -> None:
            job.started = True

        call = build_call(intent)
        unsendable = self._executor.admissible(call)
        if unsendable is not None:  # e.g. an api.call rate this replica's quota_share leaves no call of
            err = IntentError(f"rate: {unsendable}", id=intent.id, kind=job.kind, app=intent.app)
            await self._reject(job, record, err, received)
            return
        attempted = await self._executor.execute(intent.app, call, expires_at=expires_at, before_attempt=started)
        job.started = True
        status, dl_error, fields = from_attempt(attempted)
        await self._finish(record, intent.id, job.kind, intent.app, status, fields, dl_error,
                           received)

    async def _preview(self, job: Job, record: Record, intent: UrlPreviewUpdate, received: float) -> None:
        assert self._previews is not None
        try:
            done = await self._previews.submit(intent, received)
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
            await self._finish(job.record, job.id, job.kind, job.app, "failed", fields, "internal", job.received)
        except Exception:
            log.exception("%s[%d]@%d: could not report the error; the record stays uncommitted", job.tp.topic,
                          job.tp.partition, job.offset)
            return False
        return True

    # writing results --------------------------------------------------------------------------------

    async def _finish(self, record: Record, id: str | None, kind: str | None, app: str | None, status: str,
                      fields: dict[str, Any], dl_error: str | None, received: float) -> None:
        now = self._wall()
        headers: Headers = [(k, v) for k, v in (record.headers or ())]
        kafka = self._config.kafka
        sends: list[Awaitable[Any]] = []
        if id is not None:
            result = make_result(id=id, kind=kind, app=app, status=status, received_at=received, finished_at=now,
                                 **fields)
            sends.append(self._send(kafka.results_topic, id.encode(), encode_result(result),
                                    forwarded_headers(headers, kafka.forward_headers)))
        if dl_error is not None:
            reason = dead_letter_reason(dl_error, fields)
            sends.append(self._send(kafka.dead_letter_topic, record.key, record.value or b"",
                                    dead_letter_headers(headers, error=dl_error, reason=reason,
                                                        topic=record.topic, partition=record.partition,
                                                        offset=record.offset)))
        if len(sends) == 1:
            await sends[0]  # the common case: no gather (and no extra task) per record
        else:
            await asyncio.gather(*sends)
        latency = self._wall() - received  # read -> result acknowledged
        self._metrics.inc("relay_intents_total", help="intents finished, by kind and status",
                          kind=kind or "unknown", status=status)
        self._metrics.observe("relay_intent_seconds", latency, help="read to result written", status=status)
        log.info("%s[%d]@%d id=%s kind=%s status=%s attempts=%s code=%s log_id=%s latency_ms=%.0f",
                 record.topic, record.partition, record.offset, id, kind, status, fields.get("attempts"),
                 fields.get("code"), fields.get("log_id"), latency * 1000)

    async def _send(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> None:
        """Produce and wait for the broker's acknowledgement, retrying until it comes (or we are cancelled)."""
        delay = 0.1
        while True:
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
        moves = {tp: move for tp in tps if (o := self._offsets.get(tp)) is not None
                 and (move := o.uncommitted(also_done=self._skip.get(tp, ()))) is not None}
        if not moves:
            return
        try:
            await self._consumer.commit(moves)
        except (CommitFailedError, IllegalStateError, KafkaError) as err:
            # ownership moved (a rebalance) or the broker is away: the next owner re-reads from the last commit
            log.warning("commit of %d partition(s) failed: %s", len(moves), err)
            return
        for tp, (point, metadata) in moves.items():
            offsets = self._offsets.get(tp)
            if offsets is not None:
                offsets.committed, offsets.committed_metadata = point, metadata

    async def _drain(self, tps: list[TopicPartition]) -> None:
        """Abandon jobs that have not started; give started ones ``drain_timeout`` to finish."""
        jobs = [job for tp in tps for job in self._jobs.get(tp, ())]
        abandoned = [job for job in jobs if not job.started and job.task is not None]
        for job in abandoned:
            assert job.task is not None
            job.task.cancel()
        running = [job.task for job in jobs if job.task is not None and not job.task.done()]
        if not running:
            return
        done, pending = await asyncio.wait(running, timeout=self._out.drain_timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        log.info("drained %d partition(s): %d abandoned before a call, %d finished, %d cut off", len(tps),
                 len(abandoned), len(done) - len(abandoned), len(pending))

    def _forget(self, tps: list[TopicPartition]) -> None:
        gone = set(tps)
        self._paused -= gone
        for tp in gone:
            self._offsets.pop(tp, None)
            self._jobs.pop(tp, None)
            self._skip.pop(tp, None)
        for lane in [lane for lane in self._lanes if lane[0] in gone]:
            del self._lanes[lane]
