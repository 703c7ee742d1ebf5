"""The membership lease with an injected clock; the gate's waiting; the aiokafka hook against a stand-in
coordinator built from aiokafka's own request classes (and a tripwire on the internals it relies on)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
from aiokafka.consumer.group_coordinator import CoordinatorGroupRebalance, GroupCoordinator
from aiokafka.protocol.group import HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, SyncGroupRequest

from relay.membership import Lease, Membership, MembershipLost, Standing, default_margin, watch

SESSION, REBALANCE, MARGIN = 6.0, 30.0, 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_is_valid_before_an_assignment() -> None:
    lease = Lease(SESSION, REBALANCE, MARGIN)
    assert lease.standing(0.0) is Standing.LOST
    assert not lease.heartbeat(1, 0.0, rebalancing=False), "a heartbeat is no assignment"
    assert lease.standing(0.0) is Standing.LOST


def test_an_assignment_is_valid_for_the_session_less_the_margin_from_when_the_sync_left() -> None:
    lease = Lease(SESSION, REBALANCE, MARGIN)
    lease.assigned(3, sent_at=10.0)
    assert lease.valid_until() == 10.0 + SESSION - MARGIN
    assert lease.standing(14.99) is Standing.VALID
    assert lease.standing(15.0) is Standing.UNCONFIRMED  # no answer since: wait for one, do not act


def test_a_heartbeat_renews_from_its_send_time_not_its_answer() -> None:
    lease = Lease(SESSION, REBALANCE, MARGIN)
    lease.assigned(3, sent_at=10.0)
    assert lease.heartbeat(3, sent_at=13.0, rebalancing=False)
    assert lease.valid_until() == 13.0 + SESSION - MARGIN
    # a slow answer for an older request (answered after a newer one) does not move the lease back
    assert lease.heartbeat(3, sent_at=12.0, rebalancing=False)
    assert lease.valid_until() == 13.0 + SESSION - MARGIN
    # frozen 20 s: the answer to the heartbeat sent just before the freeze arrives on waking and proves nothing now
    assert lease.heartbeat(3, sent_at=13.5, rebalancing=False)
    assert lease.standing(13.5 + 20) is Standing.UNCONFIRMED


def test_an_answer_for_another_generation_proves_nothing() -> None:
    lease = Lease(SESSION, REBALANCE, MARGIN)
    lease.assigned(4, sent_at=10.0)
    assert not lease.heartbeat(3, sent_at=14.0, rebalancing=False)
    assert lease.valid_until() == 10.0 + SESSION - MARGIN


def test_a_loss_is_immediate_and_only_a_new_assignment_ends_it() -> None:
    lease = Lease(SESSION, REBALANCE, MARGIN)
    lease.assigned(3, sent_at=10.0)
    lease.lose("UNKNOWN_MEMBER_ID")
    assert lease.standing(10.5) is Standing.LOST and lease.lost_reason == "UNKNOWN_MEMBER_ID"
    assert not lease.heartbeat(3, sent_at=11.0, rebalancing=False), "a heartbeat cannot undo a loss"
    assert lease.standing(11.5) is Standing.LOST
    lease.assigned(5, sent_at=12.0)
    assert lease.standing(12.5) is Standing.VALID and lease.generation == 5


def test_during_a_rebalance_the_lease_also_ends_with_the_rebalance_timeout() -> None:
    lease = Lease(SESSION, 20.0, MARGIN)
    lease.assigned(3, sent_at=10.0)
    assert lease.heartbeat(3, sent_at=12.0, rebalancing=False)  # the rebalance started after this one arrived
    for sent in (14.0, 17.0, 20.0, 23.0, 26.0, 29.0, 32.0):  # REBALANCE_IN_PROGRESS answers: still a member
        assert lease.heartbeat(3, sent_at=sent, rebalancing=True)
    assert lease.valid_until() == min(32.0 + SESSION, 12.0 + 20.0) - MARGIN
    assert lease.standing(30.5) is Standing.VALID
    assert lease.standing(31.0) is Standing.UNCONFIRMED  # the coordinator may drop us any moment now
    lease.assigned(4, sent_at=33.0)  # rejoined: a new generation, no rebalance in progress
    assert lease.valid_until() == 33.0 + SESSION - MARGIN


def test_the_margin_must_leave_a_lease() -> None:
    with pytest.raises(ValueError, match="margin"):
        Lease(SESSION, REBALANCE, SESSION)
    assert default_margin(6.0) == 1.0 and default_margin(2.0) == 0.5


async def test_the_gate_waits_while_unconfirmed_and_goes_on_when_a_heartbeat_renews() -> None:
    clock = Clock()
    member = Membership(SESSION, REBALANCE, margin=MARGIN, clock=clock)
    member.assigned(1, sent_at=clock.now)
    await member.wait()  # valid: at once
    assert member.check()
    clock.now += SESSION  # e.g. woken from SIGSTOP
    assert member.standing() is Standing.UNCONFIRMED and not member.check()
    waiter = asyncio.create_task(member.wait())
    await asyncio.sleep(0)
    assert not waiter.done(), "an unconfirmed member let a call through"
    member.heartbeat(1, sent_at=clock.now, rebalancing=False)
    await asyncio.wait_for(waiter, 1)
    assert member.check() and member.waits == 1


async def test_the_gate_raises_for_every_waiter_when_the_membership_is_lost() -> None:
    clock = Clock()
    member = Membership(SESSION, REBALANCE, margin=MARGIN, clock=clock)
    member.assigned(1, sent_at=clock.now)
    clock.now += SESSION
    waiters = [asyncio.create_task(member.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    member.lose("ILLEGAL_GENERATION")
    for waiter in waiters:
        with pytest.raises(MembershipLost, match="ILLEGAL_GENERATION"):
            await asyncio.wait_for(waiter, 1)
    with pytest.raises(MembershipLost):
        member.check()
    assert member.losses == 1


class Answer:
    def __init__(self, error_code: int) -> None:
        self.error_code = error_code


class StandInCoordinator:
    """What ``watch`` touches of aiokafka's GroupCoordinator: ``_send_req``, ``reset_generation``, ``generation``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.generation = 7
        self.member_id = "m-1"
        self.answers: list[int] = []
        self.sent: list[Any] = []
        self.resets = 0

    async def _send_req(self, request: Any) -> Answer:
        self.sent.append(request)
        self.clock.now += 0.5  # the answer takes a while: the lease counts from the send
        return Answer(self.answers.pop(0))

    def reset_generation(self) -> None:
        self.resets += 1
        self.generation = -1
        self.member_id = ""


class StandInConsumer:
    def __init__(self, coordinator: StandInCoordinator) -> None:
        self._coordinator = coordinator


async def test_the_hook_reads_heartbeat_and_sync_answers_and_the_generation_reset() -> None:
    clock = Clock()
    member = Membership(SESSION, REBALANCE, margin=MARGIN, clock=clock)
    coordinator = StandInCoordinator(clock)
    watch(StandInConsumer(coordinator), member)  # type: ignore[arg-type]

    coordinator.answers = [0]
    await coordinator._send_req(JoinGroupRequest("g", 6000, 30000, "", None, "consumer", []))
    assert member.standing() is Standing.LOST, "a JoinGroup ends the old generation"
    coordinator.answers = [0]
    sync_sent = clock.now
    await coordinator._send_req(SyncGroupRequest("g", 7, "m-1", None, []))
    assert member.standing() is Standing.VALID
    assert member.lease.valid_until() == sync_sent + SESSION - MARGIN

    clock.now += 3
    coordinator.answers = [0]
    sent = clock.now
    await coordinator._send_req(HeartbeatRequest("g", 7, "m-1"))
    assert member.lease.valid_until() == sent + SESSION - MARGIN

    clock.now += 3
    coordinator.answers = [27]  # REBALANCE_IN_PROGRESS: still counted
    rebalancing_sent = clock.now
    await coordinator._send_req(HeartbeatRequest("g", 7, "m-1"))
    assert member.lease.rebalancing and member.lease.proof == rebalancing_sent

    coordinator.answers = [16]  # NOT_COORDINATOR: no proof, no loss (aiokafka looks for the new coordinator)
    await coordinator._send_req(HeartbeatRequest("g", 7, "m-1"))
    assert member.lease.proof == rebalancing_sent and member.lease.lost_reason is None

    coordinator.reset_generation()  # what aiokafka does on UNKNOWN_MEMBER_ID / ILLEGAL_GENERATION anywhere
    assert coordinator.resets == 1, "the wrapped method must still run"
    assert member.standing() is Standing.LOST and member.losses == 1

    coordinator.answers = [0]
    await coordinator._send_req(LeaveGroupRequest("g", ""))
    assert member.losses == 1, "leaving on purpose is no loss to warn about"


def test_the_hook_fails_loudly_when_aiokafka_changes() -> None:
    class Bare:
        _coordinator = object()

    with pytest.raises(RuntimeError, match=r"_send_req.*reset_generation"):
        watch(Bare(), Membership(SESSION, REBALANCE))  # type: ignore[arg-type]


def test_the_aiokafka_internals_the_hook_relies_on_are_still_there() -> None:
    # a tripwire for an aiokafka upgrade: heartbeats, joins and syncs go through the coordinator's _send_req, and
    # an unrecognised member goes through reset_generation
    for method in ("_send_req", "reset_generation", "_do_heartbeat"):
        assert callable(getattr(GroupCoordinator, method, None)), method
    assert "self._send_req(request)" in inspect.getsource(GroupCoordinator._do_heartbeat)
    assert "self.reset_generation()" in inspect.getsource(GroupCoordinator._do_heartbeat)
    rebalance = inspect.getsource(CoordinatorGroupRebalance)
    assert rebalance.count("self._coordinator._send_req(request)") == 2  # JoinGroup and SyncGroup


# --- the gate's users: url-preview calls go through the same executor ------------------------------------


class PreviewFeishu:
    def __init__(self) -> None:
        self.written: list[bytes | None] = []

    async def send(self, app: str, call: Any, admit: Any = None, *, tenant: str | None = None) -> Any:
        from relay.outcomes import Outcome, Verdict

        if admit is not None:
            await admit()
        self.written.append(call.body)
        return Outcome(verdict=Verdict.OK, http_status=200, code=0, msg="success", data={})


async def test_a_preview_call_stopped_by_a_lost_membership_goes_back_to_pending_and_tells_nobody() -> None:
    import random
    import time

    from relay.backoff import RetryPolicy
    from relay.config import Config, FeishuConfig
    from relay.executor import Executor
    from relay.intents import UrlPreviewUpdate
    from relay.limits import Limiter
    from relay.previews.coalescer import PreviewCoalescer
    from tests.test_previews_coalescer import SharedLog

    member = Membership(SESSION, REBALANCE, margin=MARGIN)  # the real monotonic clock
    feishu = PreviewFeishu()
    limiter = Limiter(jitter=0.0, utilization=0.975, clock=time.monotonic, sleep=asyncio.sleep)
    executor = Executor(feishu, limiter, RetryPolicy(max_attempts=3, max_seconds=10, base=0.01, cap=0.1),
                        rng=random.Random(1), gate=member)
    coalescer = PreviewCoalescer(executor, SharedLog().replica(), Config(feishu=FeishuConfig(time_scale=50.0)))
    await coalescer.start()
    try:
        member.lose("UNKNOWN_MEMBER_ID")
        intent = UrlPreviewUpdate(id="u-1", preview_tokens=["tok_1"])
        result = asyncio.create_task(coalescer.submit(intent, time.time()))
        await asyncio.sleep(0.3)
        assert coalescer.calls >= 1, "the call was not even tried"
        assert feishu.written == [] and not result.done(), "a lost member sent a preview or reported a result"
        member.assigned(2, sent_at=member.clock())  # partitions again: what is still pending goes out
        done = await asyncio.wait_for(result, 10)
        assert done.status == "ok" and len(feishu.written) == 1
    finally:
        await coalescer.stop()


def test_heartbeats_go_every_quarter_session_so_one_late_answer_does_not_lapse_the_lease() -> None:
    from relay.app import heartbeat_interval_ms

    assert heartbeat_interval_ms(6000) == 1500 and heartbeat_interval_ms(10000) == 2500
    assert heartbeat_interval_ms(45000) == 3000  # aiokafka's default is the most
    margin = default_margin(6.0)
    assert 6.0 - margin - 1.5 >= 3.0, "less than 3 s of slack for a heartbeat answer"
