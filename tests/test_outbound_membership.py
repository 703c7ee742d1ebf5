"""Outbound under a lapsing group membership, with fakes for Kafka and Feishu and an injected lease clock: a
result waits for the coordinator's confirmation instead of being dropped (no stall); a lost membership abandons
the jobs (no call, no result, no commit); records fetched meanwhile are not dispatched but sought back."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiokafka import TopicPartition

from relay.backoff import RetryPolicy
from relay.calls import Call
from relay.executor import Executor
from relay.limits import Limiter
from relay.membership import Membership, Standing
from relay.metrics import Metrics
from relay.outbound import Outbound
from relay.outcomes import Outcome, Verdict
from tests.relaykit import config_data, to_config

TP = TopicPartition("t.intents", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Record(msgspec.Struct):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any = ()


def reaction(offset: int, id: str, message_id: str) -> Record:
    value = msgspec.json.encode({"kind": "reaction.add", "id": id, "message_id": message_id, "emoji_type": "SMILE"})
    return Record(TP.topic, TP.partition, offset, message_id.encode(), value)


class Consumer:
    """The parts of AIOKafkaConsumer that ``Outbound._consume`` and the listener use."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue[dict[TopicPartition, list[Record]]] = asyncio.Queue()
        self.commits: list[dict[TopicPartition, Any]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, Any]:
        try:
            return await asyncio.wait_for(self.batches.get(), timeout_ms / 1000)
        except TimeoutError:
            return {}

    async def position(self, tp: TopicPartition) -> int:
        return 0

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def pause(self, *tps: TopicPartition) -> None:
        pass

    def resume(self, *tps: TopicPartition) -> None:
        pass

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append(offsets)


class Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> Any:
        self.sent.append((topic, key))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class Feishu:
    """Answers each call once ``release`` is set; records the paths that were written."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.release = asyncio.Event()

    async def send(self, app: str, call: Call, admit: Callable[[], Awaitable[None]] | None = None, *,
                   tenant: str | None = None) -> Outcome:
        if admit is not None:
            await admit()
        self.written.append(call.path)
        await self.release.wait()
        return Outcome(verdict=Verdict.OK, http_status=200, code=0, msg="success", data={})


class Rig(msgspec.Struct, kw_only=True):
    clock: Clock
    membership: Membership
    consumer: Consumer
    producer: Producer
    feishu: Feishu
    metrics: Metrics
    outbound: Outbound


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    config = to_config(config_data("127.0.0.1:1", "t", "http://127.0.0.1:1"))
    clock = Clock()
    membership = Membership(6.0, 30.0, margin=1.0, clock=clock)
    feishu, consumer, producer, metrics = Feishu(), Consumer(), Producer(), Metrics()
    limiter = Limiter.from_config(config.feishu, clock=asyncio.get_running_loop().time, sleep=asyncio.sleep)
    executor = Executor(feishu, limiter, RetryPolicy(max_attempts=3, max_seconds=10, base=0.01, cap=0.1),
                        rng=random.Random(1), gate=membership)
    outbound = Outbound(config, consumer, producer, executor, metrics,  # type: ignore[arg-type]
                        known_apps=["default"], membership=membership)
    membership.assigned(1, sent_at=clock.now)
    await outbound.on_partitions_assigned([TP])
    stop = asyncio.Event()
    consuming = asyncio.create_task(outbound._consume(stop))
    yield Rig(clock=clock, membership=membership, consumer=consumer, producer=producer, feishu=feishu,
              metrics=metrics, outbound=outbound)
    stop.set()
    feishu.release.set()
    await asyncio.wait_for(consuming, 30)


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_result_waits_for_an_unconfirmed_membership_then_is_written_once(rig: Rig) -> None:
    await rig.consumer.batches.put({TP: [reaction(0, "r-0", "om_0")]})
    await until(lambda: len(rig.feishu.written) == 1, "the call")
    rig.clock.now += 10  # e.g. a freeze: no heartbeat answer for longer than the lease
    assert rig.membership.standing() is Standing.UNCONFIRMED
    rig.feishu.release.set()
    await asyncio.sleep(0.2)
    assert rig.producer.sent == [], "a result was written while the membership was unconfirmed"
    rig.membership.heartbeat(1, sent_at=rig.clock.now, rebalancing=False)  # still a member: carry on
    await until(lambda: len(rig.producer.sent) == 1, "the result")
    await until(lambda: rig.outbound.finished == 1, "the record to finish")
    assert rig.metrics.value("relay_outbound_abandoned_total") == 0


async def test_a_lost_membership_abandons_started_and_waiting_jobs_and_commits_nothing(rig: Rig) -> None:
    # two intents on one message: the second waits in the lane behind the first, whose call is on the wire
    await rig.consumer.batches.put({TP: [reaction(0, "r-0", "om_1"), reaction(1, "r-1", "om_1")]})
    await until(lambda: len(rig.feishu.written) == 1, "the first call")
    rig.membership.lose("UNKNOWN_MEMBER_ID")
    rig.feishu.release.set()  # its answer arrives after the loss
    await until(lambda: rig.metrics.value("relay_outbound_abandoned_total") == 2, "both jobs abandoned")
    assert rig.feishu.written == ["/open-apis/im/v1/messages/om_1/reactions"], "a call after the loss"
    assert rig.producer.sent == [], "a result after the loss"
    # records fetched now are not dispatched: the position goes back to them for whoever owns the partition
    await rig.consumer.batches.put({TP: [reaction(2, "r-2", "om_2")]})
    await until(lambda: rig.consumer.seeks == [(TP, 2)], "the seek back")
    assert len(rig.feishu.written) == 1
    await rig.outbound.on_partitions_revoked([TP])
    assert rig.consumer.commits == [], "a commit after the loss"
    assert rig.outbound.finished == 0


async def test_a_revocation_while_unconfirmed_waits_for_the_answer_then_drains_if_still_a_member(rig: Rig) -> None:
    await rig.consumer.batches.put({TP: [reaction(0, "r-0", "om_0")]})
    await until(lambda: len(rig.feishu.written) == 1, "the call")
    rig.clock.now += 10
    rig.feishu.release.set()
    revoking = asyncio.create_task(rig.outbound.on_partitions_revoked([TP]))
    await asyncio.sleep(0.2)
    assert not revoking.done() and rig.producer.sent == []
    rig.membership.heartbeat(1, sent_at=rig.clock.now, rebalancing=True)  # still a member: drain as usual
    await asyncio.wait_for(revoking, 10)
    assert len(rig.producer.sent) == 1 and len(rig.consumer.commits) == 1
    assert rig.metrics.value("relay_outbound_abandoned_total") == 0


async def test_a_revocation_while_unconfirmed_abandons_when_the_answer_says_out(rig: Rig) -> None:
    await rig.consumer.batches.put({TP: [reaction(0, "r-0", "om_0")]})
    await until(lambda: len(rig.feishu.written) == 1, "the call")
    rig.clock.now += 10
    revoking = asyncio.create_task(rig.outbound.on_partitions_revoked([TP]))
    await asyncio.sleep(0.2)
    rig.membership.lose("UNKNOWN_MEMBER_ID")
    await asyncio.wait_for(revoking, 10)  # no drain_timeout wait
    rig.feishu.release.set()
    await asyncio.sleep(0.1)
    assert rig.producer.sent == [] and rig.consumer.commits == []
    assert rig.metrics.value("relay_outbound_abandoned_total") == 1
