"""Outbound's preview job path with fakes: when a preview job counts as started for a drain, and what bounds the
preview intents read (their tokens, not the in-flight caps)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiokafka import TopicPartition

from relay.config import Config, OutboundConfig
from relay.intents import UrlPreviewUpdate
from relay.metrics import Metrics
from relay.outbound import Job, Outbound
from relay.previews.coalescer import PreviewResult, PreviewTicket
from tests.test_outbound import FakeConsumer, Harness, intent


class FakeRecord:
    topic = "intents"
    partition = 0
    key = None
    value = None
    headers = ()

    def __init__(self, offset: int) -> None:
        self.offset = offset


class FakePreviews:
    """The coalescer as a drain sees it: which tickets are started (a call carrying them has claimed)."""

    def __init__(self) -> None:
        self.started: set[int] = set()
        self.withdrawn: list[int] = []

    def withdraw_unstarted(self, ticket: Any) -> bool:
        if ticket in self.started:
            return False
        self.withdrawn.append(ticket)
        return True


def outbound(previews: FakePreviews, drain_timeout: float) -> Outbound:
    config = Config(outbound=OutboundConfig(drain_timeout=drain_timeout))
    return Outbound(config, None, None, None, Metrics(), known_apps=[], previews=previews)  # type: ignore[arg-type]


def job(out: Outbound, tp: TopicPartition, offset: int, ticket: int, until: asyncio.Event) -> Job:
    j = Job(tp, FakeRecord(offset), 0.0)
    j.preview = ticket  # type: ignore[assignment]  # the fake coalescer's tickets are ints
    j.task = asyncio.create_task(until.wait())
    out._jobs.setdefault(tp, set()).add(j)
    return j


async def test_a_drain_waits_for_started_preview_jobs_and_withdraws_the_others() -> None:
    tp = TopicPartition("intents", 0)
    previews = FakePreviews()
    out = outbound(previews, drain_timeout=20.0)
    finish = asyncio.Event()
    waiting, claimed = job(out, tp, 0, 1, asyncio.Event()), job(out, tp, 1, 2, finish)
    previews.started.add(2)
    drain = asyncio.create_task(out._drain([tp]))
    await asyncio.sleep(0.05)
    assert previews.withdrawn == [1] and waiting.task is not None and waiting.task.cancelled()
    assert not drain.done()  # waits for the claimed one
    finish.set()
    async with asyncio.timeout(5):
        await drain
    assert claimed.task is not None and claimed.task.done() and not claimed.task.cancelled()


async def test_a_preview_job_whose_claim_was_given_up_during_the_drain_is_handed_over_then() -> None:
    tp = TopicPartition("intents", 0)
    previews = FakePreviews()
    out = outbound(previews, drain_timeout=20.0)
    j = job(out, tp, 0, 1, asyncio.Event())
    previews.started.add(1)  # claimed when the drain starts
    drain = asyncio.create_task(out._drain([tp]))
    await asyncio.sleep(0.05)
    assert not drain.done() and previews.withdrawn == []
    previews.started.discard(1)  # its call's claim lost: nothing was sent
    async with asyncio.timeout(5):  # long before drain_timeout (20 s)
        await drain
    assert previews.withdrawn == [1] and j.task is not None and j.task.cancelled()


# --- a preview burst larger than the in-flight caps (the whole loop, fake consumer and coalescer) ----------------


def preview(id: str, *tokens: str) -> bytes:
    return msgspec.json.encode({"kind": "url_preview.update", "id": id, "preview_tokens": list(tokens)})


class HeldCoalescer:
    """A coalescer that holds every result until ``release()`` (from then on, answers at once);
    ``pending_tokens`` as the planner counts them (distinct tokens of the intents still waiting);
    ``most_tokens`` the largest count ever reached."""

    def __init__(self) -> None:
        self.enqueued: dict[int, UrlPreviewUpdate] = {}
        self.tickets: dict[int, PreviewTicket] = {}
        self.finished: set[int] = set()
        self.forgotten: list[int] = []
        self.started: set[int] = set()  # a call carrying them has claimed (a drain waits for them)
        self.released = False
        self.most_tokens = 0

    @property
    def pending_tokens(self) -> int:
        return len({t for ref, i in self.enqueued.items() if not self.tickets[ref].future.done()
                    and ref not in self.forgotten for t in i.preview_tokens})

    def enqueue(self, intent: UrlPreviewUpdate, received_at: float) -> PreviewTicket:
        ref = len(self.enqueued)
        self.enqueued[ref] = intent
        ticket = self.tickets[ref] = PreviewTicket(ref, asyncio.get_running_loop().create_future())
        if self.released:
            self._answer(ticket)
        self.most_tokens = max(self.most_tokens, self.pending_tokens)
        return ticket

    def release(self) -> None:
        self.released = True
        for ticket in self.tickets.values():
            if not ticket.future.done() and ticket.ref not in self.forgotten:
                self._answer(ticket)

    def _answer(self, ticket: PreviewTicket) -> None:
        self.finished.add(ticket.ref)
        ticket.future.set_result(PreviewResult(status="ok", attempts=1))

    def withdraw_unstarted(self, ticket: PreviewTicket) -> bool:
        if ticket.future.done() or ticket.ref in self.started:
            return False
        self.forgotten.append(ticket.ref)
        return True

    def forget(self, ticket: PreviewTicket) -> None:  # idempotent, as the coalescer's
        if ticket.ref not in self.forgotten and not ticket.future.done():
            self.forgotten.append(ticket.ref)


@contextlib.asynccontextmanager
async def with_previews(consumer: FakeConsumer, coalescer: HeldCoalescer, previews: dict[str, Any] | None = None,
                        **outbound: Any) -> AsyncIterator[Harness]:
    h = Harness(consumer, **outbound)
    if previews:
        h.outbound._config = msgspec.structs.replace(
            h.outbound._config, previews=msgspec.structs.replace(h.outbound._config.previews, **previews))
    h.outbound._previews = coalescer  # type: ignore[assignment]
    h.task = asyncio.create_task(h.outbound.run(h.stop))
    try:
        yield h
    finally:
        h.stop.set()
        await asyncio.wait_for(h.task, 30)


async def test_a_preview_burst_far_larger_than_the_in_flight_caps_is_read_whole_while_sends_keep_their_caps() -> None:
    """max_in_flight 10, 5 a partition; 600 preview intents (30 tokens x 20 updates) around 40 sends, all
    waiting: every preview is read (a pending preview costs its token, not a slot), the sends still stop
    at exactly the caps. Main read 10 and stopped: latest-wins had nothing in view to merge."""
    consumer = FakeConsumer(partitions=2)
    sends: list[str] = []
    for i in range(600):
        consumer.append(i % 2, f"tok-{i % 30}", preview(f"v{i}", f"tok-{i % 30}"))
        if i % 15 == 0:
            id = f"s{i}"
            consumer.append(i % 2, f"chat-{i % 7}", intent(id, f"chat-{i % 7}"))
            sends.append(id)
    coalescer = HeldCoalescer()
    async with with_previews(consumer, coalescer, max_in_flight=10, max_in_flight_per_partition=5) as h:
        h.executor.hold(*sends)
        await h.until(lambda: len(h.executor.calls) == 10, "the sends up to the global cap", timeout=5)
        await h.until(lambda: len(coalescer.enqueued) > 0, "previews read", timeout=5)
        h.executor.release(*sends)
        await h.until(lambda: len(coalescer.enqueued) == 600, "every preview read, none finished", timeout=10)
        assert not coalescer.finished and len(h.producer.results()) == 40
        coalescer.release()
        await h.until(lambda: len(h.producer.results()) == 640, "every result")
        await h.until(lambda: all(consumer.committed.get(tp, (0, ""))[0] == len(log)
                                  for tp, log in consumer.logs.items()), "everything committed")
    assert coalescer.most_tokens == 30


async def test_the_sends_of_a_partition_stay_capped_while_previews_pile_up_around_them() -> None:
    """The in-flight caps count sends exactly, previews or not between them: held sends never pass
    max_in_flight_per_partition, and the previews behind them wait with them (Kafka order)."""
    consumer = FakeConsumer(partitions=1)
    sends = []
    for i in range(100):
        consumer.append(0, f"tok-{i % 4}", preview(f"v{i}", f"tok-{i % 4}"))
        id = f"s{i}"
        consumer.append(0, f"chat-{i}", intent(id, f"chat-{i}"))
        sends.append(id)
    coalescer = HeldCoalescer()
    async with with_previews(consumer, coalescer, max_in_flight=50, max_in_flight_per_partition=6) as h:
        h.executor.hold(*sends)
        await h.until(lambda: len(h.executor.calls) == 6, "the sends up to the partition's cap", timeout=5)
        await asyncio.sleep(0.1)
        assert len(h.executor.calls) == 6 and len(coalescer.enqueued) in (6, 7)
        h.executor.release(*sends)
        coalescer.release()
        await h.until(lambda: len(h.producer.results()) == 200, "every result")


async def test_previews_are_read_up_to_max_pending_tokens_then_their_partitions_wait() -> None:
    """Each intent a new token: reading stops within one intent's tokens (10) of
    ``previews.max_pending_tokens``, and goes on once they finish."""
    consumer = FakeConsumer(partitions=2)
    for i in range(300):
        consumer.append(i % 2, f"tok-{i}", preview(f"v{i}", f"tok-{i}", f"other-{i}"))
    coalescer = HeldCoalescer()
    async with with_previews(consumer, coalescer, {"max_pending_tokens": 41}) as h:
        await h.until(lambda: coalescer.pending_tokens >= 40, "previews read up to the budget", timeout=5)
        await asyncio.sleep(0.1)
        assert 40 <= coalescer.pending_tokens <= 41 + 9, coalescer.pending_tokens
        coalescer.release()
        await h.until(lambda: len(h.producer.results()) == 300, "every result")
    assert coalescer.most_tokens <= 41 + 9


async def test_a_waiting_preview_job_has_no_task_nor_slot_and_an_abandon_withdraws_it() -> None:
    """A pending preview costs its job and its planner entry, not a task: one is made once its result is known.
    Abandoned (a lost membership) while it waits, it is withdrawn from the coalescer, so no call carries it."""
    coalescer = HeldCoalescer()
    h = Harness(FakeConsumer())
    out = h.outbound
    out._previews = coalescer  # type: ignore[assignment]
    tp = TopicPartition("in", 0)
    out._dispatch(tp, FakeRecordWith(0, preview("v0", "tok")))
    (waiting,) = out._jobs[tp]
    assert waiting.task is None and not waiting.counted and out._inflight == 0
    await out._abandon([tp])
    assert coalescer.forgotten == [0] and not out._jobs[tp]
    out._dispatch(tp, FakeRecordWith(1, preview("v1", "tok")))
    (later,) = out._jobs[tp]
    coalescer.release()
    await asyncio.sleep(0)  # the result's callback makes the task
    assert later.task is not None
    await later.task
    assert not out._jobs[tp] and [k for k, _, _ in h.producer.written["results"]] == [b"v1"]


async def test_a_drain_writes_the_result_of_a_started_waiting_preview_and_hands_the_others_over() -> None:
    """Three preview jobs without tasks at a drain: one not started (withdrawn and dropped at once), one started
    whose result comes during the drain (written, then the drain ends), one started that never answers (cut off
    at drain_timeout and withdrawn)."""
    coalescer = HeldCoalescer()
    h = Harness(FakeConsumer(), drain_timeout=1.0)
    out = h.outbound
    out._previews = coalescer  # type: ignore[assignment]
    tp = TopicPartition("in", 0)
    for i in range(3):
        out._dispatch(tp, FakeRecordWith(i, preview(f"v{i}", f"tok{i}")))
    coalescer.started.update({1, 2})
    drain = asyncio.create_task(out._drain([tp]))
    await asyncio.sleep(0.05)
    assert coalescer.forgotten == [0] and len(out._jobs[tp]) == 2 and not drain.done()
    coalescer._answer(coalescer.tickets[1])
    async with asyncio.timeout(10):
        await drain
    assert [k for k, _, _ in h.producer.written["results"]] == [b"v1"]
    assert sorted(coalescer.forgotten) == [0, 2] and not out._jobs[tp]


class FakeRecordWith(FakeRecord):
    topic = "in"

    def __init__(self, offset: int, value: bytes) -> None:
        super().__init__(offset)
        self.value = value  # type: ignore[assignment]
