"""Outbound itself, against small in-memory fakes of the consumer, producer, admin client and executor: lanes
(order per key), backpressure (exact caps per partition and overall, and the commit-metadata room), drain,
commits (the contiguous prefix plus the finished set), write failures and records that cannot be read.

The fakes are honest where it matters: the consumer hands out records the way aiokafka does (``max_records``
across partitions, pauses, a parse error that loses what the same call already took), the producer acknowledges
or refuses each record, and the admin client reads back what was committed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError, OffsetMetadataTooLargeError, TopicAuthorizationFailedError
from aiokafka.structs import OffsetAndMetadata

from relay.config import Config, parse_config
from relay.metrics import Metrics
from relay.offsets import decode_metadata, payload_budget
from relay.outbound import Outbound
from relay.outcomes import Attempted, Outcome, Verdict
from relay.results import record_size

TOPIC = "in"
RESULTS, DEAD = "results", "dlq"


class Rec(msgspec.Struct):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any = ()
    poison: bool = False  # the client raises when it parses this one


def intent(id: str, key: str, **extra: Any) -> bytes:
    return msgspec.json.encode({"kind": "message.send", "id": id, "receive_id_type": "chat_id",
                                "receive_id": key, "msg_type": "text", "content": {"text": "x"}, **extra})


class FakeConsumer:
    """Records per partition; getmany as aiokafka's (see the module doc)."""

    def __init__(self, partitions: int = 1) -> None:
        self.logs: dict[TopicPartition, list[Rec]] = {TopicPartition(TOPIC, p): [] for p in range(partitions)}
        self.position_: dict[TopicPartition, int] = dict.fromkeys(self.logs, 0)
        self.broken: set[TopicPartition] = set()  # a parse failed: the next call advances past what it took
        self.paused_: set[TopicPartition] = set()
        self.assigned: set[TopicPartition] = set()
        self.committed: dict[TopicPartition, tuple[int, str]] = {}
        self.commits: list[dict[TopicPartition, tuple[int, str]]] = []
        self.metadata_limit: int | None = None  # the broker's offset.metadata.max.bytes
        self.listener: Any = None
        self.on_handout: Callable[[], None] | None = None
        self._new = asyncio.Event()

    def append(self, partition: int, key: str | None, value: bytes | None, **kw: Any) -> Rec:
        tp = TopicPartition(TOPIC, partition)
        rec = Rec(TOPIC, partition, len(self.logs[tp]), key.encode() if key else None, value, **kw)
        self.logs[tp].append(rec)
        self._new.set()
        return rec

    def subscribe(self, topics: list[str], listener: Any) -> None:
        """Joins at once: every partition is assigned (from its committed offset), as aiokafka does in the
        background once subscribed."""
        self.listener = listener
        self._joining = asyncio.get_running_loop().create_task(self._join())

    async def _join(self) -> None:
        self.assigned = set(self.logs)
        for tp in self.logs:
            self.position_[tp] = self.committed.get(tp, (0, ""))[0]
        await self.listener.on_partitions_assigned(sorted(self.logs))

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_.difference_update(tps)

    async def position(self, tp: TopicPartition) -> int:
        return self.position_[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position_[tp] = offset
        self.broken.discard(tp)

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Rec]]:
        deadline = asyncio.get_running_loop().time() + timeout_ms / 1000
        while True:
            out = self._take(list(tps) or sorted(self.assigned), max_records or 500)
            if out:
                if self.on_handout is not None:
                    self.on_handout()
                return out
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return {}
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    def _take(self, tps: list[TopicPartition], budget: int) -> dict[TopicPartition, list[Rec]]:
        out: dict[TopicPartition, list[Rec]] = {}
        for tp in sorted(tps):
            if tp not in self.assigned or tp in self.paused_ or budget <= 0:
                continue
            log, start = self.logs[tp], self.position_[tp]
            if tp in self.broken:  # aiokafka: the next call on a failed iterator returns nothing and moves the
                self.broken.discard(tp)  # position past what the failed call had parsed (those are lost)
                while start < len(log) and not log[start].poison:
                    start += 1
                self.position_[tp] = start
                continue
            taken: list[Rec] = []
            for rec in log[start:start + budget]:
                if rec.poison:
                    self.broken.add(tp)
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
                taken.append(rec)
            if taken:
                out[tp] = taken
                self.position_[tp] = taken[-1].offset + 1
                budget -= len(taken)
        return out

    async def commit(self, offsets: dict[TopicPartition, tuple[int, str]]) -> None:
        await asyncio.sleep(0)
        if self.metadata_limit is not None and any(len(m) > self.metadata_limit for _, m in offsets.values()):
            raise OffsetMetadataTooLargeError()
        self.committed.update(offsets)
        self.commits.append(dict(offsets))


class FakeAdmin:
    def __init__(self, consumer: FakeConsumer) -> None:
        self.consumer = consumer

    async def describe_configs(self, resources: Any) -> list[Any]:
        return []  # no topic's max.message.bytes is known: the relay finds out by being refused

    async def list_consumer_group_offsets(self, group_id: str,
                                          partitions: list[TopicPartition]) -> dict[TopicPartition, Any]:
        return {tp: OffsetAndMetadata(*self.consumer.committed[tp]) for tp in partitions
                if tp in self.consumer.committed}


class FakeBatch:
    def __init__(self) -> None:
        self.record: tuple[bytes | None, bytes, Any] | None = None

    def append(self, *, key: bytes | None, value: bytes, timestamp: Any, headers: Any) -> object:
        self.record = (key, value, headers)
        return object()


class FakeProducer:
    def __init__(self) -> None:
        self.written: dict[str, list[tuple[bytes | None, bytes, Any]]] = {RESULTS: [], DEAD: []}
        self.max_size: dict[str, int] = {}  # topic -> max.message.bytes
        self.refuse: dict[str, Exception] = {}  # topic -> error for every write
        self.hold: dict[str, list[asyncio.Future[None]]] = {}  # topic -> acknowledgements kept back
        self.on_write: Callable[[str, bytes | None, bytes, Any], None] | None = None

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = ()) -> Any:
        return self._deliver(topic, key, value, headers)

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        assert batch.record is not None
        return self._deliver(topic, *batch.record)

    def _deliver(self, topic: str, key: bytes | None, value: bytes, headers: Any) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if topic in self.hold:
            self.hold[topic].append(future)
            future.add_done_callback(lambda _: self.written.setdefault(topic, []).append((key, value, headers)))
        elif topic in self.refuse:
            future.set_exception(self.refuse[topic])
        elif topic in self.max_size and record_size(key, value, headers) > self.max_size[topic]:
            future.set_exception(MessageSizeTooLargeError())
        else:
            self.written.setdefault(topic, []).append((key, value, headers))
            if self.on_write is not None:
                self.on_write(topic, key, value, headers)
            future.set_result(None)
        return future

    def results(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for key, value, _ in self.written[RESULTS]:
            out.setdefault((key or b"").decode(), []).append(msgspec.json.decode(value))
        return out


class FakeExecutor:
    """Every call succeeds; ``hold(id)`` keeps that intent's call waiting until ``release(id)``."""

    sending = 0  # Executor.sending: no call is ever on its way here, so a result write never waits to gather

    def __init__(self) -> None:
        self.calls: list[str] = []  # intent ids (the uuid of a message.send), in call order
        self.held: dict[str, asyncio.Event] = {}
        self.tenants: dict[str, str | None] = {}  # intent id -> the tenant it was called as

    def hold(self, *ids: str) -> None:
        for id in ids:
            self.held[id] = asyncio.Event()

    def release(self, *ids: str) -> None:
        for id in ids:
            self.held[id].set()

    def admissible(self, call: Any) -> None:
        return None

    async def execute(self, app: str, call: Any, *, expires_at: float | None = None,
                      before_attempt: Any = None, before_write: Any = None, tenant: str | None = None) -> Attempted:
        id = msgspec.json.decode(call.body)["uuid"]
        if before_attempt is not None:
            await before_attempt()
        self.calls.append(id)
        self.tenants[id] = tenant
        if id in self.held:
            await self.held[id].wait()
        return Attempted(Outcome(verdict=Verdict.OK, http_status=200, code=0, msg="success"), 1)


def config(apps: Sequence[dict[str, str]] = (), **outbound: Any) -> Config:
    return parse_config({
        "apps": list(apps),
        "kafka": {"intents_topics": [TOPIC], "results_topic": RESULTS, "dead_letter_topic": DEAD},
        "outbound": {"commit_interval": 0.01, "drain_timeout": 5.0, "backoff_base": 0.01, "backoff_cap": 0.05,
                     **outbound},
    }, env={})


class Harness:
    def __init__(self, consumer: FakeConsumer, apps: Sequence[dict[str, str]] = (), **outbound: Any) -> None:
        self.consumer = consumer
        self.producer = FakeProducer()
        self.executor = FakeExecutor()
        self.metrics = Metrics()
        known = ["default", *(app["name"] for app in apps)]
        self.outbound = Outbound(config(apps, **outbound), consumer, self.producer,  # type: ignore[arg-type]
                                 self.executor, self.metrics, known_apps=known,  # type: ignore[arg-type]
                                 admin=FakeAdmin(consumer))  # type: ignore[arg-type]
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert self.task is not None
            if self.task.done():
                self.task.result()
                raise AssertionError(f"outbound stopped before {what}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(consumer: FakeConsumer, apps: Sequence[dict[str, str]] = (),
                  **outbound: Any) -> AsyncIterator[Harness]:
    h = Harness(consumer, apps, **outbound)
    h.task = asyncio.create_task(h.outbound.run(h.stop))
    try:
        yield h
    finally:
        h.stop.set()
        await asyncio.wait_for(h.task, 30)


async def test_a_key_runs_in_partition_order_while_other_keys_pass_it() -> None:
    consumer = FakeConsumer()
    for id, key in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("a3", "A")):
        consumer.append(0, key, intent(id, key))
    async with running(consumer) as h:
        h.executor.hold("a1")
        await h.until(lambda: "b1" in h.producer.results(), "b1 finished")
        assert h.executor.calls == ["a1", "b1"], "a2 started before a1 finished"
        h.executor.release("a1")
        await h.until(lambda: len(h.producer.results()) == 4, "every result")
    assert h.executor.calls == ["a1", "b1", "a2", "a3"]
    assert [k for k, _, _ in h.producer.written[RESULTS]] == [b"b1", b"a1", b"a2", b"a3"]
    assert consumer.committed[TopicPartition(TOPIC, 0)] == (4, "")


async def test_a_keys_next_job_starts_as_the_previous_one_ends_not_after_its_task_callbacks() -> None:
    """The lane's next job is woken by the previous job's own end (its turn), not by asyncio.wait on its task,
    which took two event-loop turns more per call with a predecessor."""
    consumer = FakeConsumer()
    for id in ("a1", "a2"):
        consumer.append(0, "A", intent(id, "A"))
    async with running(consumer) as h:
        h.executor.hold("a1")
        await h.until(lambda: h.executor.calls == ["a1"], "a1 called")
        await h.until(lambda: len(h.outbound._jobs[TopicPartition(TOPIC, 0)]) == 2, "a2 waiting behind a1")
        first = next(job.task for job in h.outbound._jobs[TopicPartition(TOPIC, 0)] if job.offset == 0)
        assert first is not None
        seen: list[list[str]] = []
        first.add_done_callback(lambda _: seen.append(list(h.executor.calls)))
        h.executor.release("a1")
        await h.until(lambda: len(h.producer.results()) == 2, "both results")
    assert seen == [["a1", "a2"]]  # a2 was called before a1's task callbacks ran


async def test_a_keys_next_job_goes_on_when_the_previous_was_cancelled_before_it_ran() -> None:
    consumer = FakeConsumer()
    async with running(consumer) as h:
        tp = TopicPartition(TOPIC, 0)
        await h.until(lambda: tp in consumer.assigned, "the partition assigned")
        # dispatched here, not read: the first job's task can be cancelled in the step that made it
        for offset, id in enumerate(("a1", "a2")):
            h.outbound._dispatch(tp, Rec(TOPIC, 0, offset, b"A", intent(id, "A")))  # type: ignore[arg-type]
        first = next(job for job in h.outbound._jobs[tp] if job.offset == 0)
        assert first.task is not None
        first.task.cancel()  # before it ever ran: its coroutine never reaches its end
        await h.until(lambda: "a2" in h.producer.results(), "a2's result")
    assert h.executor.calls == ["a2"]


async def test_an_idle_relay_does_not_wake_to_commit_and_commits_the_next_finished_record() -> None:
    """The commit loop sleeps while nothing is finished (it used to wake, and look, every ``commit_interval``)."""
    consumer = FakeConsumer()
    consumer.append(0, "A", intent("a1", "A"))
    async with running(consumer) as h:
        rounds = 0
        commit = h.outbound._commit

        async def counted(tps: list[TopicPartition]) -> bool:
            nonlocal rounds
            rounds += 1
            return await commit(tps)

        h.outbound._commit = counted  # type: ignore[method-assign]
        await h.until(lambda: consumer.committed.get(TopicPartition(TOPIC, 0)) == (1, ""), "a1 committed")
        await asyncio.sleep(0.1)  # the round that committed a1 is over
        before = rounds
        await asyncio.sleep(0.5)  # fifty commit intervals with nothing finished
        assert rounds == before, f"{rounds - before} commit rounds while idle"
        consumer.append(0, "A", intent("a2", "A"))
        await h.until(lambda: consumer.committed.get(TopicPartition(TOPIC, 0)) == (2, ""), "a2 committed")


async def test_a_partition_assigned_while_the_idle_loop_waits_is_read_at_once() -> None:
    """The idle loop waits for records of the partitions it owns for up to seconds (outbound._IDLE_RECHECK): a new
    assignment ends that wait, so the new partition's records do not wait for it."""
    from relay.outbound import _IDLE_RECHECK

    first, later = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)

    class OnePartitionFirst(FakeConsumer):
        async def _join(self) -> None:
            self.assigned = {first}
            await self.listener.on_partitions_assigned([first])

    consumer = OnePartitionFirst(partitions=2)
    async with running(consumer) as h:
        await asyncio.sleep(0.3)  # idle: waiting on partition 0 alone
        consumer.append(1, "B", intent("b1", "B"))
        consumer.assigned.add(later)
        started = asyncio.get_running_loop().time()
        await consumer.listener.on_partitions_assigned([later])
        await h.until(lambda: "b1" in h.producer.results(), "b1 finished")
        took = asyncio.get_running_loop().time() - started
    assert took < _IDLE_RECHECK / 2, f"the new partition was read after {took:.2f}s"


@pytest.mark.parametrize(("per", "total"), [(7, 1000), (50, 80), (1, 2)])
async def test_the_in_flight_caps_are_never_passed(per: int, total: int) -> None:
    """Records read but not finished, counted by the fakes themselves at every hand-out: never above
    ``max_in_flight_per_partition`` for a partition nor ``max_in_flight`` overall (main read 500 at a time)."""
    consumer = FakeConsumer(partitions=3)
    ids: dict[str, TopicPartition] = {}
    for p in range(3):
        for i in range(300):
            id = f"p{p}-{i}"
            consumer.append(p, id, intent(id, f"k{i % 40}"))
            ids[id] = TopicPartition(TOPIC, p)
    handed: dict[TopicPartition, int] = dict.fromkeys(consumer.logs, 0)
    finished: dict[TopicPartition, int] = dict.fromkeys(consumer.logs, 0)
    worst = {"per": 0, "total": 0}

    def count_handout() -> None:
        for tp in consumer.logs:
            handed[tp] = consumer.position_[tp]
        outstanding = {tp: handed[tp] - finished[tp] for tp in consumer.logs}
        worst["per"] = max(worst["per"], *outstanding.values())
        worst["total"] = max(worst["total"], sum(outstanding.values()))

    consumer.on_handout = count_handout
    async with running(consumer, max_in_flight=total, max_in_flight_per_partition=per) as h:
        h.producer.on_write = lambda topic, key, value, headers: finished.__setitem__(
            ids[(key or b"").decode()], finished[ids[(key or b"").decode()]] + 1)
        await h.until(lambda: len(h.producer.results()) == 900, "every result", timeout=60)
    assert worst["per"] <= per and worst["total"] <= total, worst
    assert worst["per"] == min(per, total), "the caps were never reached: the test proves nothing"


async def test_a_partition_pauses_while_more_finished_records_might_not_fit_the_metadata() -> None:
    """A stuck first record, isolated stuck ones behind it (the most runs) and the rest finishing, with the
    metadata capped at 64 characters (the smallest): the partition stops reading before its finished set could
    outgrow the metadata, so a takeover at that instant repeats no finished record."""
    consumer = FakeConsumer()
    consumer.append(0, "stuck", intent("stuck", "stuck"))
    for i in range(3000):
        consumer.append(0, f"k{i}", intent(f"n{i}", f"k{i}"))
    async with running(consumer, commit_metadata_max_bytes=64, drain_timeout=0.2) as first:
        first.executor.hold("stuck", *(f"n{i}" for i in range(0, 3000, 11)))
        await first.until(lambda: first.metrics.value("relay_outbound_metadata_full_partitions") == 1, "a pause")
        await asyncio.sleep(0.1)  # it stays paused: nothing more is read while the held calls wait
        read = consumer.position_[TopicPartition(TOPIC, 0)]
        assert 10 < read <= 8 * payload_budget(64) + 1, read  # a bitset of that many bytes holds the rest
        for offsets in consumer.commits:
            assert len(offsets[TopicPartition(TOPIC, 0)][1]) <= 64
    done_first = set(first.producer.results())
    assert done_first and consumer.committed[TopicPartition(TOPIC, 0)][0] == 0
    async with running(consumer) as second:  # the takeover: nothing held now
        await second.until(lambda: consumer.committed[TopicPartition(TOPIC, 0)][0] == 3001, "everything")
    repeated = done_first & set(second.executor.calls)
    assert not repeated, f"finished before the takeover and called again: {sorted(repeated)[:5]}"
    assert done_first | set(second.producer.results()) == {"stuck", *(f"n{i}" for i in range(3000))}


async def test_drain_finishes_started_calls_abandons_the_rest_and_commits_the_finished_set() -> None:
    consumer = FakeConsumer()
    consumer.append(0, "A", intent("a1", "A"))  # 0: started, held: finishes during the drain
    consumer.append(0, "A", intent("a2", "A"))  # 1: waits for a1: never started, abandoned
    consumer.append(0, "B", intent("b1", "B"))  # 2: finished before the stop
    consumer.append(0, "C", intent("c1", "C"))  # 3: started, held past the drain: cut off
    async with running(consumer, drain_timeout=0.3) as h:
        h.executor.hold("a1", "c1")
        await h.until(lambda: "b1" in h.producer.results() and len(h.executor.calls) == 3, "b1 and the calls")
        h.stop.set()
        await asyncio.sleep(0.05)
        h.executor.release("a1")
        await asyncio.wait_for(h.task, 10)
    assert h.executor.calls == ["a1", "b1", "c1"], "a2 was started though it was never due"
    assert set(h.producer.results()) == {"a1", "b1"}
    point, metadata = consumer.committed[TopicPartition(TOPIC, 0)]
    assert point == 1 and set(decode_metadata(1, metadata).done) == {2}

    # the next owner reads the metadata: it redoes a2 and c1 only, in order, and nothing finished twice
    async with running(consumer) as second:
        await second.until(lambda: consumer.committed[TopicPartition(TOPIC, 0)][0] == 4, "the commit point")
    assert second.executor.calls == ["a2", "c1"]
    assert set(second.producer.results()) == {"a2", "c1"}


async def test_offset_metadata_too_large_halves_the_cap_and_the_partition_commits() -> None:
    consumer = FakeConsumer()
    consumer.metadata_limit = 150  # a broker whose offset.metadata.max.bytes is below our cap
    consumer.append(0, "stuck", intent("stuck", "stuck"))
    for i in range(2000):
        consumer.append(0, f"k{i}", intent(f"n{i}", f"k{i}"))
    async with running(consumer) as h:  # the default cap (4,000) is above this broker's
        h.executor.hold("stuck", *(f"n{i}" for i in range(0, 2000, 5)))
        await h.until(lambda: h.metrics.value("relay_outbound_metadata_refused_total") >= 1 and bool(consumer.commits)
                      and len(consumer.commits[-1][TopicPartition(TOPIC, 0)][1]) > 0,
                      "commits with metadata after a refusal")
        point, metadata = consumer.committed[TopicPartition(TOPIC, 0)]
        assert point == 0 and 0 < len(metadata) <= 150
        assert h.metrics.value("relay_outbound_metadata_cap") <= 150
        h.executor.release(*h.executor.held)
        await h.until(lambda: consumer.committed[TopicPartition(TOPIC, 0)][0] == 2001, "the end committed")


async def test_a_record_the_client_cannot_parse_is_dead_lettered_and_its_partition_moves_on() -> None:
    consumer = FakeConsumer(partitions=2)
    consumer.append(0, "A", intent("a0", "A"))
    consumer.append(0, "A", intent("a1", "A"))
    consumer.append(0, "X", b"whatever", poison=True)  # offset 2: an invalid UTF-8 header name, say
    consumer.append(0, "A", intent("a3", "A"))
    consumer.append(1, "B", intent("b0", "B"))
    async with running(consumer) as h:
        await h.until(lambda: len(h.producer.results()) == 4 and h.producer.written[DEAD], "results and a letter")
        await h.until(lambda: consumer.committed.get(TopicPartition(TOPIC, 0), (0, ""))[0] == 4, "the commit")
    assert sorted(h.producer.results()) == ["a0", "a1", "a3", "b0"], "a record before the poison was lost"
    ((_key, value, headers),) = h.producer.written[DEAD]
    letter = dict(headers)
    assert letter["relay.error"] == b"decode" and letter["relay.source.offset"] == b"2"
    assert b"UnicodeDecodeError" in letter["relay.reason"] and value == b""


async def test_a_record_the_client_cannot_parse_arriving_while_the_loop_waits_is_dead_lettered_too() -> None:
    consumer = FakeConsumer(partitions=3)
    async with running(consumer) as h:
        await asyncio.sleep(0.05)  # idle: waiting for records of any partition, which meets the poison first
        consumer.append(0, "X", b"whatever", poison=True)
        consumer.append(0, "C", intent("c1", "C"))
        consumer.append(1, "B", intent("b0", "B"))
        await h.until(lambda: len(h.producer.results()) == 2 and h.producer.written[DEAD], "results and a letter")
    ((_key, _value, headers),) = h.producer.written[DEAD]
    assert dict(headers)["relay.source.partition"] == b"0" and dict(headers)["relay.source.offset"] == b"0"


async def test_a_store_app_intent_needs_a_tenant_key_and_a_custom_app_intent_refuses_one() -> None:
    consumer = FakeConsumer()
    consumer.append(0, "A", intent("custom-with", "A", tenant_key="t1"))
    consumer.append(0, "B", intent("store-without", "B", app="shop"))
    consumer.append(0, "C", intent("store-with", "C", app="shop", tenant_key="t1"))
    consumer.append(0, "D", intent("custom-without", "D"))
    shop = {"name": "shop", "type": "store", "app_id": "cli_shop", "app_secret": "s"}
    async with running(consumer, [shop]) as h:
        await h.until(lambda: len(h.producer.results()) == 4, "four results")
    results = {id: found[0] for id, found in h.producer.results().items()}
    assert results["custom-with"]["status"] == "rejected"
    assert results["custom-with"]["msg"].startswith("tenant_key: app 'default' is a custom app")
    assert results["store-without"]["status"] == "rejected"
    assert results["store-without"]["msg"].startswith("tenant_key: required for an intent of store app 'shop'")
    assert results["store-with"]["status"] == "ok" and results["store-with"]["tenant_key"] == "t1"
    assert results["custom-without"]["status"] == "ok" and results["custom-without"]["tenant_key"] is None
    assert h.executor.tenants == {"store-with": "t1", "custom-without": None}
    assert {dict(headers)["relay.error"] for _, _, headers in h.producer.written[DEAD]} == {b"invalid"}


async def test_a_value_too_deeply_nested_is_rejected_and_the_next_record_of_its_key_flows() -> None:
    consumer = FakeConsumer()
    deep = b'{"kind":"api.call","id":"deep","method":"POST","path":"/open-apis/x","rate":{"per_second":5},' \
           b'"body":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    consumer.append(0, "A", deep)
    consumer.append(0, "A", intent("after", "A"))
    async with running(consumer) as h:
        await h.until(lambda: "after" in h.producer.results(), "the record behind it")
    ((_, _, headers),) = h.producer.written[DEAD]
    assert dict(headers)["relay.error"] == b"decode" and b"nested" in dict(headers)["relay.reason"]


async def test_a_dead_letter_and_a_result_too_large_for_their_topics_are_written_cut() -> None:
    consumer = FakeConsumer()
    huge = b'{"kind":"message.send","id":"big","receive_id_type":"chat_id","receive_id":"A","msg_type":"text",' \
           b'"content":{"text":"' + b"x" * 50_000 + b'"},"colour":1}'  # invalid (unknown field): dead-lettered
    consumer.append(0, "A", huge, headers=[("traceparent", b"00-1-2-01"), ("bulk", b"y" * 5000)])
    consumer.append(0, "A", intent("after", "A"))
    async with running(consumer) as h:
        h.producer.max_size = {DEAD: 3000, RESULTS: 400}
        original = FakeExecutor.execute

        async def big_data(self: FakeExecutor, app: str, call: Any, **kw: Any) -> Attempted:
            await original(self, app, call, **kw)
            return Attempted(Outcome(verdict=Verdict.OK, http_status=200, code=0, msg="success",
                                     data={"blob": "z" * 10_000}), 1)

        h.executor.execute = big_data.__get__(h.executor)  # type: ignore[method-assign]
        await h.until(lambda: {"big", "after"} <= set(h.producer.results()) and h.producer.written[DEAD], "writes")
    ((key, value, headers),) = h.producer.written[DEAD]
    letter = dict(headers)
    assert record_size(key, value, headers) <= 3000
    assert letter["relay.error"] == b"invalid" and letter["relay.truncated"] == str(len(huge)).encode()
    assert huge.startswith(value) and len(value) > 1000, "a prefix of the value, as much as fits"
    assert letter["relay.source.offset"] == b"0" and letter["traceparent"] == b"00-1-2-01"
    after = h.producer.results()["after"][0]
    assert after["status"] == "ok" and after["data"] is None
    (written,) = [(k, v, hs) for k, v, hs in h.producer.written[RESULTS] if k == b"after"]
    assert b"relay.truncated" in {name.encode() for name, _ in written[2]}
    assert record_size(*written) <= 400
    assert h.metrics.value("relay_outbound_truncated_total", topic=DEAD) >= 1


async def test_a_write_that_cannot_succeed_is_reported_retried_and_holds_its_key() -> None:
    consumer = FakeConsumer()
    consumer.append(0, "A", intent("a1", "A"))
    consumer.append(0, "A", intent("a2", "A"))
    async with running(consumer) as h:
        h.producer.refuse[RESULTS] = TopicAuthorizationFailedError(RESULTS)
        await h.until(lambda: h.outbound.problem() is not None, "a problem reported")
        problem = h.outbound.problem()
        assert problem is not None and "results" in problem and "TopicAuthorizationFailed" in problem
        await asyncio.sleep(0.2)  # retried meanwhile, slowly: a2 must not start before a1's result is written
        assert h.executor.calls == ["a1"]
        assert h.metrics.value("relay_outbound_write_errors_total", topic=RESULTS, retriable="false") >= 2
        del h.producer.refuse[RESULTS]  # fixed
        await h.until(lambda: len(h.producer.results()) == 2, "both results")
        assert h.outbound.problem() is None
    assert h.executor.calls == ["a1", "a2"] and [k for k, _, _ in h.producer.written[RESULTS]] == [b"a1", b"a2"]


async def test_a_write_never_acknowledged_is_reported_after_write_alarm_after() -> None:
    consumer = FakeConsumer()
    consumer.append(0, "A", intent("a1", "A"))
    consumer.append(0, "A", intent("a2", "A"))
    async with running(consumer, write_alarm_after=0.2) as h:
        h.producer.hold[RESULTS] = []
        await h.until(lambda: bool(h.producer.hold[RESULTS]), "a1's write")
        assert h.outbound.problem() is None, "reported before write_alarm_after"
        await h.until(lambda: h.outbound.problem() is not None, "the alarm")
        problem = h.outbound.problem()
        assert problem is not None and "no acknowledgement" in problem and RESULTS in problem
        assert h.executor.calls == ["a1"]
        for future in h.producer.hold.pop(RESULTS):
            future.set_result(None)
        await h.until(lambda: len(h.producer.results()) == 2, "both results")
        assert h.outbound.problem() is None
    assert h.executor.calls == ["a1", "a2"]


async def test_an_internal_error_that_cannot_be_reported_holds_its_key_until_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.outbound

    real_build_call, real_make_result = relay.outbound.build_call, relay.outbound.make_result
    refusals = {"left": 3}
    problems: list[str | None] = []
    harness: list[Harness] = []

    def build_call(intent: Any) -> Any:
        if intent.id == "boom":
            raise RuntimeError("a bug")
        return real_build_call(intent)

    def make_result(**fields: Any) -> Any:
        if fields["id"] == "boom" and refusals["left"]:
            refusals["left"] -= 1
            problems.append(getattr(harness[0].outbound, "problem", lambda: None)())
            raise TypeError("the report cannot be built")
        return real_make_result(**fields)

    monkeypatch.setattr(relay.outbound, "build_call", build_call)
    monkeypatch.setattr(relay.outbound, "make_result", make_result)
    consumer = FakeConsumer()
    consumer.append(0, "A", intent("boom", "A"))
    consumer.append(0, "A", intent("after", "A"))
    async with running(consumer) as h:
        harness.append(h)
        boom_reported_first: list[bool] = []
        execute = h.executor.execute

        async def watched(app: str, call: Any, **kw: Any) -> Attempted:
            boom_reported_first.append("boom" in h.producer.results())
            return await execute(app, call, **kw)

        h.executor.execute = watched  # type: ignore[method-assign]
        await h.until(lambda: "after" in h.producer.results(), "the record behind it")
    assert boom_reported_first == [True], "'after' was called while 'boom' had no result"
    boom = h.producer.results()["boom"][0]
    assert boom["status"] == "failed" and boom["msg"].startswith("internal error: RuntimeError")
    assert [k for k, _, _ in h.producer.written[RESULTS]] == [b"boom", b"after"]
    assert any(p and "internal error" in p for p in problems), "nothing said the report was failing"


def stream(id: str, content: str, card: str = "c1") -> bytes:
    return msgspec.json.encode({"kind": "card.stream", "id": id, "card_id": card, "element_id": "md",
                                "content": content})


async def test_stream_updates_read_behind_a_call_are_superseded_by_the_last_which_is_sent() -> None:
    consumer = FakeConsumer()
    consumer.append(0, "c1", stream("s0", "a"))
    async with running(consumer) as h:
        h.executor.hold("s0")
        await h.until(lambda: h.executor.calls == ["s0"], "the first update at Feishu")
        for i, text in enumerate(["ab", "abc", "abcd"], start=1):
            consumer.append(0, "c1", stream(f"s{i}", text))
        consumer.append(0, "other", stream("bad-key", "x"))  # keyed by something else than its card_id
        await h.until(lambda: h.outbound._inflight == 5, "every update read")
        h.executor.release("s0")
        await h.until(lambda: len(h.producer.results()) == 5, "every result")
    results = {id: rs[0] for id, rs in h.producer.results().items()}
    assert h.executor.calls == ["s0", "s3"]
    assert [(results[f"s{i}"]["status"], results[f"s{i}"]["superseded_by"]) for i in range(4)] == [
        ("ok", None), ("superseded", "s3"), ("superseded", "s3"), ("ok", None)]
    assert results["bad-key"]["status"] == "rejected" and results["bad-key"]["msg"].startswith("key: ")


def test_the_broker_holds_fetches_long_while_paused_only_if_a_resumed_partition_cannot_run_dry() -> None:
    """A resumed partition waits for the fetch in flight: the 1 s hold only while the calls in flight when it
    resumes last at least 2 s at the recent rate (one app's quota), else 100 ms (a fast fan-out; a partition
    paused for its commit metadata, which may resume with nothing in flight; a rate not measured yet)."""
    from relay.kafka import IDLE_FETCH_WAIT_MS, PAUSED_FETCH_WAIT_MS, paused_fetch_wait_ms

    assert paused_fetch_wait_ms(16.25, 250) == IDLE_FETCH_WAIT_MS
    assert paused_fetch_wait_ms(125.0, 250) == IDLE_FETCH_WAIT_MS
    assert paused_fetch_wait_ms(126.0, 250) == PAUSED_FETCH_WAIT_MS
    assert paused_fetch_wait_ms(3000.0, 1000) == PAUSED_FETCH_WAIT_MS
    assert paused_fetch_wait_ms(1.0, 0) == PAUSED_FETCH_WAIT_MS
    assert paused_fetch_wait_ms(float("inf"), 250) == PAUSED_FETCH_WAIT_MS
