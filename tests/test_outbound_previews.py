"""Outbound's preview job path with fakes: when a preview job counts as started for a drain."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from relay.config import Config, OutboundConfig
from relay.metrics import Metrics
from relay.outbound import Job, Outbound


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
