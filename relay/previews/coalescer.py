"""URL-preview updates: coalescing, the 1-per-5-s token rule (across replicas and owners), batching, per-intent results.

Feishu lets each preview token be updated once per 5 s and the batch API be called 5 times a second, with
1..10 tokens and 0..100 open_ids per call (docs/feishu-rules.md §5.4). Producers know none of this:
they emit a ``url_preview.update`` intent whenever their data changes, often many per second per token. Four
pieces turn that stream into the fewest calls Feishu accepts:

* :class:`~relay.previews.planner.PreviewPlanner` (pure, injected time, no I/O) keeps, per ``(app, token)``, the
  pending requests and the time of the last update; it decides which calls to make and which intent each call
  finishes. The rules (merging, spacing, packing, results) are in the docstring of :mod:`relay.previews.planner`.
* :class:`~relay.previews.memory.KafkaPreviewMemory` is the memory every replica shares: each attempt first writes
  a *claim* per token to a compacted Kafka topic, and every replica follows that topic live.
* :class:`~relay.previews.claims.ClaimArbiter` (pure) says, from the log alone, which claim on a token wins, so of
  two replicas racing for one token exactly one sends.
* :class:`PreviewCoalescer`, here, is the async shell: ``enqueue`` an intent and await its :class:`PreviewResult`;
  one background loop asks the planner for calls and runs each through the executor.

One attempt of a call, in order (the executor's hooks):

1. ``before_attempt`` (after the limiter's waits): the call's intents become *started* (a drain waits for them
   from here on); a claim per token is written and judged. A claim that loses or is not judged within
   ``previews.claim_window`` (X) puts the call's requests back (not failed): after a loss the token's next chance
   follows the winning claim, which the tail has already fed into the planner (plus a random jitter, so two
   losers do not race again); after a late claim, which may be in the log unread, it comes ``spacing + X`` later.
2. ``before_send`` (the instant the request is written: after a token refresh, a pooled connection, the limiter's
   send-time guard): more than X after the claim started, the request is not sent (requests back, as above);
   otherwise the planner stamps the tokens *now* and folds in covered requests read meanwhile.

Every record the tail reads (our claims, other replicas', a previous owner's) holds its token back in the planner
as if updated at ``read + X``, the latest its writer may have sent; records read at start-up count from their
own time instead. So a token is planned again ``spacing + X`` after the latest claim anyone made on it, and that
claim then wins (see :mod:`relay.previews.claims` for why two sent claims are ``>= spacing`` apart at Feishu).
With the defaults a busy token is updated every 5 + 0.15 + 0.5 = 5.65 s or a little more (interval + margin +
X); the requests of one token leave at least 5.15 s apart (interval + margin), the margin covering the network
between us and Feishu, so Feishu sees them at least its 5 s apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal, Protocol

import msgspec

from relay.calls import Call, url_preview_call
from relay.config import Config
from relay.errors import RelayError
from relay.intents import UrlPreviewUpdate
from relay.membership import MembershipLost
from relay.outcomes import Outcome, Verdict
from relay.previews.claims import ClaimArbiter
from relay.previews.memory import PreviewMemory
from relay.previews.planner import Finished, PlannedCall, PreviewPlanner, PreviewStatus

log = logging.getLogger(__name__)

# Calls decided but not yet let through by the executor's limiter. Small on purpose: a decision made early is
# frozen (its tokens and open_ids) while fresher requests arrive; 2 keeps one call ready behind the one sending.
MAX_WAITING_CALLS: Final = 2


class PreviewResult(msgspec.Struct, frozen=True, kw_only=True):
    """One url_preview intent's result (rules in :mod:`relay.previews.planner`): ``outcome``/``attempts`` of
    the call that finished it.

    ``reason`` is the relay's own reason when there is no Feishu answer to quote (``expired``); ``exhausted``
    says a ``failed`` call ran out of retries rather than being refused.
    """

    status: PreviewStatus
    superseded_by: str | None = None
    outcome: Outcome | None = None
    attempts: int = 0
    exhausted: bool = False
    reason: str | None = None


class PreviewsStopped(RelayError):
    """The coalescer stopped (or died) before this intent's result was known (its offset stays uncommitted)."""


class _NotSent(Exception):
    """An attempt must not be sent: its claim ``lost`` to an earlier one, was ``late`` (X passed, see the module
    doc), or an intent it carries was ``withdrawn`` before it claimed."""

    def __init__(self, why: str, kind: Literal["lost", "late", "withdrawn"]) -> None:
        super().__init__(why)
        self.kind = kind


class Attempts(Protocol):
    """What the executor reports about one call (``relay.executor.Attempted``)."""

    @property
    def outcome(self) -> Outcome | None: ...
    @property
    def attempts(self) -> int: ...
    @property
    def expired(self) -> bool: ...
    @property
    def exhausted(self) -> bool: ...


class PreviewExecutor(Protocol):
    """``relay.executor.Executor`` as this module uses it."""

    async def execute(self, app: str, call: Call, *, expires_at: float | None = None,
                      min_retry_delay: float = 0.0,
                      before_attempt: Callable[[], Awaitable[None]] | None = None,
                      before_send: Callable[[], Awaitable[None]] | None = None) -> Attempts: ...


MakeCall = Callable[[Sequence[str], Sequence[str] | None], Call]


class PreviewTicket:
    """One enqueued intent: its planner ref and the future of its result."""

    __slots__ = ("future", "ref")

    def __init__(self, ref: int, future: asyncio.Future[PreviewResult]) -> None:
        self.ref = ref
        self.future = future


class PreviewCoalescer:
    """Turns concurrent url_preview intents into the fewest allowed calls; each intent gets its result.

    The engine calls :meth:`enqueue` for every url_preview intent it reads (outside the per-key lanes), awaits
    :meth:`result`, records it, then commits. On a drain it asks :meth:`withdraw_unstarted` for each unfinished one:
    an intent no call has claimed for is withdrawn (no result; redone by the next owner), a started one is waited
    for like any started job. One background loop asks the :class:`PreviewPlanner` for calls and starts each as
    its own task through the executor (several in flight; the executor's limiter holds them to 5/s); each attempt
    claims its tokens first (module doc).

    :meth:`wait` returns when the coalescer is stopped and raises the error if its loop or the memory's tail died;
    then every waiting intent fails with :class:`PreviewsStopped` (abandoned, redone after the restart), as on
    :meth:`stop`.
    """

    def __init__(self, executor: PreviewExecutor, memory: PreviewMemory, config: Config, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 margin: float | None = None, claim_window: float | None = None,
                 make_call: MakeCall | None = None, rng: random.Random | None = None) -> None:
        self._executor = executor
        self._memory = memory
        interval = config.previews.token_interval / config.feishu.time_scale
        # real-time jitter (event-loop lag, network variance) and Kafka round trips are not scaled with the sandbox
        self.margin = config.feishu.limit_jitter if margin is None else margin
        self.claim_window = config.previews.claim_window if claim_window is None else claim_window
        self.spacing = interval + self.margin
        self.planner = PreviewPlanner(token_interval=interval, margin=self.margin)
        self.arbiter = ClaimArbiter(spacing=self.spacing, claim_window=self.claim_window)
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._make_call: MakeCall = make_call or url_preview_call
        self._futures: dict[int, asyncio.Future[PreviewResult]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._tail: asyncio.Task[None] | None = None
        self._following = False  # the memory's start-up read is over: records seen now are fresh
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self._error: BaseException | None = None
        self._waiting = 0  # calls started but not yet let through the limiter
        self.calls = 0
        self.claims = 0  # claims judged (one per attempt that got that far)
        self.claim_seconds = 0.0  # their total time from writing to verdict: the price of the memory
        self.claims_lost = 0  # attempts not sent on their claim (lost the race, or X passed)

    async def start(self) -> None:
        """Read the memory (every token claimed within the window stays blocked), keep following it, start planning."""
        self._tail = await self._memory.follow(self.arbiter, self._seen)
        self._following = True
        self._tail.add_done_callback(self._part_ended)
        self._loop_task = asyncio.create_task(self._run(), name="previews")
        self._loop_task.add_done_callback(self._part_ended)

    async def stop(self) -> None:
        """Cancel the loop and every call in flight, then fail every waiting intent with PreviewsStopped."""
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        self._loop_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_waiting("stopped before the preview update was made")
        self._ended.set()

    async def wait(self) -> None:
        """Until :meth:`stop`; raises the error that killed the planning loop or the memory's tail."""
        await self._ended.wait()
        if self._error is not None:
            raise self._error

    def _part_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._ended.is_set():
            return
        err = task.exception() or RuntimeError(f"{task.get_name()} ended")
        self._error = RuntimeError(f"{task.get_name()}: {type(err).__name__}: {err}")
        self._error.__cause__ = err
        log.error("url previews stopped: %s", self._error)  # the traceback: whoever awaits wait()
        for other in (self._loop_task, self._tail):
            if other is not None and other is not task:
                other.cancel()
        self._fail_waiting(f"the preview coalescer died: {self._error}")
        self._ended.set()

    def _fail_waiting(self, why: str) -> None:
        for future in self._futures.values():
            if not future.done():
                future.set_exception(PreviewsStopped(why))
                future.exception()  # retrieved: its caller may be gone
        self._futures.clear()

    # -- intents -------------------------------------------------------------------------------------------

    def enqueue(self, intent: UrlPreviewUpdate, received_at: float) -> PreviewTicket:
        """Queue ``intent`` (read at wall-clock ``received_at``); the read order is the order of calls."""
        if self._loop_task is None or self._error is not None:
            raise PreviewsStopped("the preview coalescer is not running")
        now = self._clock()
        expires_at = None
        if intent.expires_at is not None:
            expires_at = now + (intent.expires_at.timestamp() - self._wall())
        ref = self.planner.add(intent.id, intent.app, intent.preview_tokens, intent.open_ids, expires_at, now)
        future: asyncio.Future[PreviewResult] = asyncio.get_running_loop().create_future()
        self._futures[ref] = future
        self._wake.set()
        return PreviewTicket(ref, future)

    async def result(self, ticket: PreviewTicket) -> PreviewResult:
        """The intent's result once known. Cancelling the caller withdraws the intent (started or not)."""
        try:
            return await asyncio.shield(ticket.future)
        except asyncio.CancelledError:
            if self._futures.pop(ticket.ref, None) is not None:
                self.planner.withdraw(ticket.ref)
            raise

    def forget(self, ticket: PreviewTicket) -> None:
        """Withdraw the intent, started or not, if it is still waiting: its job was cancelled before it awaited
        :meth:`result` (which withdraws on cancellation itself)."""
        if self._futures.pop(ticket.ref, None) is not None:
            self.planner.withdraw(ticket.ref)

    @property
    def pending_tokens(self) -> int:
        """Tokens with intents waiting or a call in flight (``PreviewPlanner.pending_tokens``)."""
        return self.planner.pending_tokens

    async def submit(self, intent: UrlPreviewUpdate, received_at: float) -> PreviewResult:
        """:meth:`enqueue` then :meth:`result`."""
        return await self.result(self.enqueue(intent, received_at))

    def withdraw_unstarted(self, ticket: PreviewTicket) -> bool:
        """Withdraw the intent unless it is started (a call carrying it has claimed or been sent, or its result is
        known); True if withdrawn. Synchronous, so no call can claim for it between the check and the withdrawal."""
        if ticket.future.done() or self.planner.started(ticket.ref):
            return False
        if self._futures.pop(ticket.ref, None) is not None:
            self.planner.withdraw(ticket.ref)
        return True

    # -- the memory ------------------------------------------------------------------------------------------

    def _seen(self, app: str, token: str, at: float) -> None:
        """A record of the memory (anyone's claim on ``token`` stamped ``at``): hold the token back (module doc)."""
        now = self._clock()
        if self._following:
            read = now  # its writer sent, if at all, by X after writing it, so by X after now
        else:
            read = now - max(0.0, self._wall() - at)  # from the record's age; a stamp from the future = just now
            if read + self.claim_window + self.spacing <= now:
                return  # long past: nothing to hold back
        self.planner.remember(app, token, read + self.claim_window)

    # -- the loop ----------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        last_prune = self._clock()
        while True:
            now = self._clock()
            self._resolve(self.planner.expire(now), None)
            while self._waiting < MAX_WAITING_CALLS:
                planned = self.planner.next_call(now)
                if planned is None:
                    break
                self._waiting += 1
                self.calls += 1
                task = asyncio.create_task(self._perform(planned), name=f"previews-call-{planned.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if now - last_prune > 10 * self.spacing:
                self.planner.prune(now)
                last_prune = now
            wake = self.planner.next_wakeup(spacing=self._waiting < MAX_WAITING_CALLS)
            self._wake.clear()  # no await since the state was read above, so no wake-up is lost
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if wake is None else max(0.0, wake - self._clock())):
                    await self._wake.wait()

    async def _perform(self, planned: PlannedCall) -> None:
        waiting = True
        claimed_at: float | None = None

        def let_through() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                self._waiting -= 1
                self._wake.set()

        async def before_attempt() -> None:
            nonlocal claimed_at
            let_through()
            claimed_at = None
            # from here its request may reach Feishu: a drain waits for its intents
            if not self.planner.on_claim(planned.id):
                raise _NotSent("an intent it carried was withdrawn (a drain) before it claimed, or all of them were",
                               "withdrawn")
            started = self._clock()
            claim = await self._memory.claim(planned.app, planned.tokens, self.claim_window)
            self.claims += 1
            self.claim_seconds += self._clock() - started
            if claim.late:
                raise _NotSent("its claim was not written and judged within previews.claim_window", "late")
            if not claim.won:
                raise _NotSent("another claim on one of its tokens came first", "lost")
            claimed_at = started

        async def before_send() -> None:
            now = self._clock()
            if claimed_at is None or now - claimed_at > self.claim_window:
                raise _NotSent("its request could not leave within previews.claim_window of its claim", "late")
            self.planner.on_attempt(planned.id, now)

        expires_at = None
        if planned.expires_at is not None:
            expires_at = planned.expires_at - self._clock() + self._wall()
        try:
            call = self._make_call(planned.tokens, planned.open_ids)
            attempted = await self._executor.execute(
                planned.app, call, expires_at=expires_at, min_retry_delay=self.spacing + self.claim_window,
                before_attempt=before_attempt, before_send=before_send)
        except MembershipLost:
            # nothing was sent; the intents' jobs are being abandoned with their partitions (outbound), and
            # whatever is still waiting goes back to pending, told nothing; a claim it may have made counts for
            # every replica, so the token waits it out like a late one
            let_through()
            self.planner.abort(planned.id, self._clock(), hold=self.spacing + self.claim_window)
            self._wake.set()
            return
        except _NotSent as unsent:
            # not failed: its requests wait for the token's next chance, after the winning (or our late) claim
            log.info("url preview call %d for app %s (%d tokens) not sent: %s", planned.id, planned.app,
                     len(planned.tokens), unsent)
            let_through()
            now = self._clock()
            if unsent.kind == "withdrawn":  # nothing was claimed: the rest is planned again at once
                self.planner.abort(planned.id, now, hold=0.0)
            elif unsent.kind == "lost":  # the winner holds the token; a random wait after it: no second race
                self.claims_lost += 1
                self.planner.abort(planned.id, now, hold=0.0, jitter=self._rng.uniform(0.0, self.claim_window))
            else:  # late: its claim may be in the log, unread yet, and counts; no claim can win before it passed
                self.claims_lost += 1
                self.planner.abort(planned.id, now, hold=self.spacing + self.claim_window)
            self._wake.set()
            return
        except Exception:
            log.exception("url preview call for app %s (%d tokens) raised; its intents go back to pending",
                          planned.app, len(planned.tokens))
            let_through()
            self.planner.abort(planned.id, self._clock())
            self._wake.set()
            return
        let_through()
        outcome = attempted.outcome
        delivered = (not attempted.expired and outcome is not None
                     and outcome.verdict in (Verdict.OK, Verdict.PARTIAL))
        reason = None
        if attempted.expired:
            reason = "expires_at passed before the update"
        elif not delivered and outcome is not None:
            reason = f"{outcome.code} {outcome.msg}"
        finished = self.planner.complete(planned.id, self._clock(), delivered=delivered,
                                         expired=attempted.expired, reason=reason)
        self._wake.set()  # its tokens may have requests that arrived meanwhile: they wait only for the spacing now
        log.debug("url preview call %d: %d tokens, %d intents finished, delivered=%s", planned.id,
                  len(planned.tokens), len(finished), delivered)
        self._resolve(finished, attempted)

    def _resolve(self, finished: list[Finished], attempted: Attempts | None) -> None:
        for done in finished:
            future = self._futures.pop(done.ref, None)
            if future is None or future.done():
                continue
            future.set_result(PreviewResult(
                status=done.status, superseded_by=done.superseded_by,
                outcome=None if attempted is None else attempted.outcome,
                attempts=0 if attempted is None else attempted.attempts,
                exhausted=attempted is not None and attempted.exhausted and done.status == "failed",
                reason=done.reason,
            ))
