"""Group membership as a lease: may this replica still act for the partitions Kafka gave it?

Kafka fences a member that lost its partitions in one place only: the broker refuses its commits. Nothing fences
its Feishu calls or its result writes. A replica frozen past its session timeout (SIGSTOP, a paused VM, a swap
storm) is dropped from the group and another replica takes its partitions and redoes their uncommitted records;
when the frozen one wakes, everything it had in flight would carry on: reactions and urgent messages performed
twice (they have no idempotency key), results written for records another replica owns. So every Feishu call
(the executor's gate) and every result write (``outbound``) first asks this lease.

The lease (:class:`Lease`, pure, over the monotonic clock) is renewed only by evidence that the group coordinator
counted this member at some instant, and the instant taken is when the request *left*: the coordinator received
it later, so its session timer for us restarted no earlier than that. The evidence:

* a Heartbeat answered without error, or with REBALANCE_IN_PROGRESS (still a member while the group rebalances);
* a SyncGroup answered without error (partitions just assigned, a new generation).

Then ``valid_until = last proof sent + session_timeout - margin``. While a rebalance is in progress it is also at
most ``last stable proof + rebalance_timeout - margin``: the coordinator drops a member that has not rejoined
within the rebalance timeout of the rebalance's start, and that start came after the last heartbeat answered
without error. The clock (:func:`lease_clock`) is monotonic and keeps running while the process is stopped
(SIGSTOP) and, where the OS has ``CLOCK_BOOTTIME`` (Linux), while the machine is suspended: a woken replica
finds its lease already expired before any of its code runs. (A VM whose guest clock does not advance while
paused is covered only from its first heartbeat answer on.) The :class:`Standing`:

    VALID        now < valid_until: calls and result writes go.
    UNCONFIRMED  the proof is too old (a heartbeat failed or is late; the process was frozen). Calls and result
                 writes *wait* for the coordinator's next answer: one in this generation renews the lease (the
                 coordinator still counts us, so nobody else owns our partitions); otherwise it says we are out.
    LOST         aiokafka reset the generation (UNKNOWN_MEMBER_ID or ILLEGAL_GENERATION from a heartbeat, a sync
                 or a commit; we left the group), or a JoinGroup left (the old generation's partitions are gone),
                 or nothing was assigned yet. Calls and writes for the old partitions are abandoned, not drained:
                 no result, offset uncommitted, the new owner redoes them; until a SyncGroup assigns partitions.

Why UNCONFIRMED waits rather than abandons: a job abandoned on a partition we still own leaves its offset
uncommitted with nobody to redo it before the next rebalance, a stalled partition; waiting costs nothing when we
were out, since the answer saying so turns the wait into the abandon. Why a failed heartbeat or a dead coordinator
(NOT_COORDINATOR, a connection error) does not end the lease at once: it renews nothing, so the lease still
lapses (minus the margin) at the first instant the coordinator could have dropped us, which is all that is
sound to assume; and it is not LOST: aiokafka finds the new coordinator and carries on in the same generation
if it still knows us, so jobs abandoned then would stall their partitions the same way.

The margin (``min(1 s, session_timeout / 4)``) covers the gap between the last check and the bytes leaving (the
check is the executor's last step before the write; for a result, the produce round trip) and the coordinator's
own timer granularity; the next owner needs at least a JoinGroup/SyncGroup round and a fetch after our session
ends before its first call.
What no lease closes: a freeze in the instant between the last check and the bytes leaving, and a call made while
valid whose result could not be written before the lease ran out (the new owner redoes it, as after a kill).

Where it is asked: the executor's gate, right before each request is written (``wait`` first, before the
limiter's send-time guard, so a call that waited is spaced again; then ``check`` at the instant of writing);
``outbound`` before each result or dead letter, at revocation (drain only when VALID, abandon otherwise), after
each poll (nothing dispatched unless VALID; what was fetched is sought back) and before each commit (none while
LOST). ``app`` sends heartbeats every quarter of the session, so one late answer does not lapse the lease.

The evidence comes from aiokafka internals: aiokafka 0.14 has no public hook for heartbeat or sync answers.
:func:`watch` is the one place that touches them (see its docstring).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import aiokafka
from aiokafka import errors as kafka_errors

from relay.errors import RelayError

log = logging.getLogger(__name__)


class MembershipLost(RelayError):
    """This replica may no longer own its partitions: the call or write is abandoned (no result, no commit)."""


class Standing(enum.Enum):
    VALID = "valid"
    UNCONFIRMED = "unconfirmed"
    LOST = "lost"


def default_margin(session_timeout: float) -> float:
    return min(1.0, session_timeout / 4)


def lease_clock() -> float:
    """Monotonic seconds that also count time the machine was suspended (``CLOCK_BOOTTIME``) where available."""
    return time.clock_gettime(_CLOCK)


_CLOCK: int = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


class Lease:
    """The pure lease (module doc): evidence in, a :class:`Standing` at a given instant out. Times are monotonic."""

    __slots__ = ("generation", "lost_reason", "margin", "proof", "rebalance_timeout", "rebalancing",
                 "session_timeout", "stable_proof")

    def __init__(self, session_timeout: float, rebalance_timeout: float, margin: float) -> None:
        if not 0 <= margin < session_timeout:
            raise ValueError(f"margin {margin} must be in [0, session_timeout {session_timeout})")
        self.session_timeout = session_timeout
        self.rebalance_timeout = rebalance_timeout
        self.margin = margin
        self.generation: int | None = None  # the generation the proofs are for; None while LOST
        self.proof = -math.inf  # send time of the latest request whose answer counted us
        self.stable_proof = -math.inf  # ... of the latest whose answer also said no rebalance was in progress
        self.rebalancing = False
        self.lost_reason: str | None = "no partitions assigned yet"

    def assigned(self, generation: int, sent_at: float) -> None:
        """A SyncGroup sent at ``sent_at`` for ``generation`` was answered without error."""
        self.generation = generation
        self.proof = self.stable_proof = sent_at
        self.rebalancing = False
        self.lost_reason = None

    def heartbeat(self, generation: int, sent_at: float, *, rebalancing: bool) -> bool:
        """A heartbeat sent at ``sent_at`` for ``generation`` was answered as a member; True if that renewed us.

        An answer for another generation proves nothing about this one (a late answer across a rejoin).
        """
        if self.lost_reason is not None or generation != self.generation:
            return False
        self.proof = max(self.proof, sent_at)
        if rebalancing:
            self.rebalancing = True
        else:
            self.stable_proof = max(self.stable_proof, sent_at)
            self.rebalancing = False
        return True

    def lose(self, reason: str) -> None:
        """We are out of the generation the proofs were for (or it ended): nothing counts until ``assigned``."""
        self.generation = None
        self.lost_reason = reason
        self.rebalancing = False

    def valid_until(self) -> float:
        if self.lost_reason is not None:
            return -math.inf
        until = self.proof + self.session_timeout - self.margin
        if self.rebalancing:
            until = min(until, self.stable_proof + self.rebalance_timeout - self.margin)
        return until

    def standing(self, now: float) -> Standing:
        if self.lost_reason is not None:
            return Standing.LOST
        return Standing.VALID if now < self.valid_until() else Standing.UNCONFIRMED


class Membership:
    """The lease, its clock, and a wake-up for whoever waits on it.

    It is the executor's gate (:meth:`wait`, :meth:`check`) and what ``outbound`` asks before writing a result,
    fetching or dispatching. :func:`watch` feeds it (:meth:`assigned`, :meth:`heartbeat`, :meth:`lose`).
    """

    def __init__(self, session_timeout: float, rebalance_timeout: float, *, margin: float | None = None,
                 clock: Callable[[], float] = lease_clock) -> None:
        margin = default_margin(session_timeout) if margin is None else margin
        self.lease = Lease(session_timeout, rebalance_timeout, margin)
        self.clock = clock
        self._changed = asyncio.Event()
        self._waiting_logged = False
        self.on_assigned: list[Callable[[], None]] = []  # told at each SyncGroup answered (partitions given)
        self.losses = 0  # times the lease was lost while it held partitions
        self.waits = 0  # times a call or write had to wait for the coordinator's answer

    def standing(self) -> Standing:
        return self.lease.standing(self.clock())

    # evidence -----------------------------------------------------------------------------------------------

    def assigned(self, generation: int, sent_at: float) -> None:
        self.lease.assigned(generation, sent_at)
        log.info("member of generation %d: lease valid for %.1fs", generation, self.lease.valid_until() - sent_at)
        for hook in self.on_assigned:
            hook()
        self._notify()

    def heartbeat(self, generation: int, sent_at: float, *, rebalancing: bool) -> None:
        was = self.standing()
        if self.lease.heartbeat(generation, sent_at, rebalancing=rebalancing):
            if was is Standing.UNCONFIRMED and self.standing() is Standing.VALID:
                log.info("membership confirmed again by a heartbeat of generation %d", generation)
            self._notify()

    def lose(self, reason: str, *, expected: bool = False) -> None:
        """Out of the current generation. ``expected``: we are leaving or rejoining ourselves (no warning)."""
        if self.lease.lost_reason is None:
            if expected:
                log.info("generation ended (%s)", reason)
            else:
                self.losses += 1
                log.warning("membership lost (%s): no Feishu call and no result for this generation's "
                            "partitions; their jobs are abandoned for the next owner", reason)
        self.lease.lose(reason)
        self._notify()

    def _notify(self) -> None:
        self._waiting_logged = False
        self._changed.set()
        self._changed = asyncio.Event()

    # asking ----------------------------------------------------------------------------------------------

    async def changed(self, timeout: float | None = None) -> None:
        """Return on the next piece of evidence (or after ``timeout`` seconds)."""
        event = self._changed
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass

    async def wait(self) -> None:
        """Return once this replica may call Feishu or write a result; raise MembershipLost if it is out."""
        waited = False
        while (standing := self.standing()) is not Standing.VALID:
            if standing is Standing.LOST:
                raise MembershipLost(f"membership lost: {self.lease.lost_reason}")
            if not waited:
                waited = True
                self.waits += 1
            if not self._waiting_logged:
                self._waiting_logged = True
                log.warning("membership unconfirmed (last proof %.1fs ago, session %.1fs): calls and result writes "
                            "wait for the coordinator's answer", self.clock() - self.lease.proof,
                            self.lease.session_timeout)
            await self.changed()

    def check(self) -> bool:
        """Right before a request is written: True to send it, False to wait again (:meth:`wait`), or raise."""
        standing = self.standing()
        if standing is Standing.LOST:
            raise MembershipLost(f"membership lost: {self.lease.lost_reason}")
        return standing is Standing.VALID


# The aiokafka coordinator methods watch() wraps; they exist in aiokafka 0.14.0 (pinned in pyproject.toml).
_HOOKED = ("_send_req", "reset_generation")


def watch(consumer: aiokafka.AIOKafkaConsumer, membership: Membership) -> None:
    """Feed ``membership`` from ``consumer``'s group coordinator. Call after ``start()`` and before ``subscribe()``,
    so that the first JoinGroup/SyncGroup is seen.

    aiokafka 0.14 has no public heartbeat hook, so this wraps two methods of the coordinator *instance* (never the
    class; no other consumer is touched):

    * ``_send_req``: every request to the coordinator goes through it (heartbeats, JoinGroup, SyncGroup, commits).
      We note when a Heartbeat or SyncGroup left and for which generation, and read its answer's error code; a
      JoinGroup leaving ends the old generation. The answer itself is returned untouched.
    * ``reset_generation``: aiokafka's one place for "the coordinator no longer knows this member" (a heartbeat,
      sync, join or commit answered UNKNOWN_MEMBER_ID / ILLEGAL_GENERATION, or we left the group).

    If aiokafka changes these, this raises at start-up rather than letting the relay call Feishu unfenced.
    """
    coordinator: Any = getattr(consumer, "_coordinator", None)
    missing = [name for name in (*_HOOKED, "generation") if not hasattr(coordinator, name)]
    if coordinator is None or missing:
        raise RuntimeError(f"aiokafka {aiokafka.__version__}: the consumer's group coordinator lacks "
                           f"{missing or 'everything'}; relay.membership.watch needs aiokafka 0.14.0's internals")
    from aiokafka.protocol.group import HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, SyncGroupRequest

    send_req = coordinator._send_req
    reset_generation = coordinator.reset_generation

    async def watched_send_req(request: Any) -> Any:
        sent_at = membership.clock()
        generation = coordinator.generation  # the request was built from it just before this call
        if isinstance(request, JoinGroupRequest):
            membership.lose("joining a new generation", expected=True)
        elif isinstance(request, LeaveGroupRequest):
            membership.lose("leaving the group", expected=True)
        response = await send_req(request)
        if isinstance(request, HeartbeatRequest | SyncGroupRequest):
            error = kafka_errors.for_code(response.error_code)
            if isinstance(request, SyncGroupRequest):
                if error is kafka_errors.NoError:
                    membership.assigned(generation, sent_at)
            elif error is kafka_errors.NoError:
                membership.heartbeat(generation, sent_at, rebalancing=False)
            elif error is kafka_errors.RebalanceInProgressError:
                membership.heartbeat(generation, sent_at, rebalancing=True)
        return response

    def watched_reset_generation() -> None:
        membership.lose("the coordinator no longer knows this member")
        reset_generation()

    coordinator._send_req = watched_send_req
    coordinator.reset_generation = watched_reset_generation
