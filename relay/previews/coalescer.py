"""URL-preview updates: coalescing, the 1-per-5-s token rule (across restarts), batching and per-intent results.

Feishu lets each preview token be updated once per 5 s and the batch API be called 5 times a second, with
1..10 tokens and 0..100 open_ids per call (seeds/url_preview_batch_update.md). Producers know none of this:
they emit a ``url_preview.update`` intent whenever their data changes, often many per second per token. Three
pieces turn that stream into the fewest calls Feishu accepts:

* :class:`~relay.previews.planner.PreviewPlanner` (pure, injected time, no I/O) keeps, per ``(app, token)``, the
  pending requests and the time of the last update; it decides which calls to make and which intent each call
  finishes. The rules (merging, spacing, packing, results) are in the docstring of :mod:`relay.previews.planner`.
* :class:`~relay.previews.memory.KafkaPreviewMemory` remembers "token T was updated at t" in a compacted Kafka
  topic, written and acknowledged before each attempt is sent and read back at start-up, so a restarted relay
  never updates a token within 5 s of an update made just before a crash
  (:class:`~relay.previews.memory.PreviewMemory` is the Protocol; tests use an in-memory fake).
* :class:`PreviewCoalescer`, here, is the async shell: ``submit`` an intent, await its :class:`PreviewResult`;
  one background loop asks the planner for calls and runs each through the executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

import msgspec

from relay.calls import Call, url_preview_call
from relay.config import Config
from relay.errors import RelayError
from relay.intents import UrlPreviewUpdate
from relay.membership import MembershipLost
from relay.outcomes import Outcome, Verdict
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
    """The coalescer stopped before this intent's result was known (its offset stays uncommitted)."""


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
                      before_attempt: Callable[[], Awaitable[None]] | None = None) -> Attempts: ...


MakeCall = Callable[[Sequence[str], Sequence[str] | None], Call]


class PreviewCoalescer:
    """Turns concurrent url_preview intents into the fewest allowed calls; ``submit`` returns each result.

    The engine calls :meth:`submit` for every url_preview intent it reads (concurrently, outside the per-key
    lanes), records the result, then commits. One background loop asks the :class:`PreviewPlanner` for calls and
    starts each as its own task through the executor (several in flight; the executor's limiter holds them to
    5/s). Before each attempt the tokens' update time is written to the :class:`PreviewMemory` and acknowledged,
    then stamped in the planner, so neither a retry nor a restarted relay updates a token within the interval.

    :meth:`stop` abandons unfinished intents: their ``submit`` raises :class:`PreviewsStopped` and, their results
    never written, their offsets are not committed, so they are redone after the restart.
    """

    def __init__(self, executor: PreviewExecutor, memory: PreviewMemory, config: Config, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 margin: float | None = None, make_call: MakeCall | None = None) -> None:
        self._executor = executor
        self._memory = memory
        interval = config.previews.token_interval / config.feishu.time_scale
        # real-time jitter (event-loop lag, network variance) is not scaled down with the sandbox's time
        self.margin = config.feishu.limit_jitter if margin is None else margin
        self.spacing = interval + self.margin
        self.planner = PreviewPlanner(token_interval=interval, margin=self.margin)
        self._clock = clock
        self._wall = wall
        self._make_call: MakeCall = make_call or url_preview_call
        self._futures: dict[int, asyncio.Future[PreviewResult]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._waiting = 0  # calls started but not yet let through the limiter
        self.calls = 0

    async def start(self) -> None:
        """Load the memory (every token updated within the interval stays blocked), then start planning."""
        remembered = await self._memory.load()
        now, wall = self._clock(), self._wall()
        for (app, token), at in remembered.items():
            ago = max(0.0, wall - at)  # a stamp from the future (clock skew) counts as "just now"
            if ago < self.spacing:
                self.planner.remember(app, token, now - ago)
        self._loop_task = asyncio.create_task(self._run(), name="previews")

    async def stop(self) -> None:
        """Cancel the loop and every call in flight, then fail every waiting ``submit`` with PreviewsStopped."""
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        self._loop_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for future in self._futures.values():
            if not future.done():
                future.set_exception(PreviewsStopped("stopped before the preview update was made"))
        self._futures.clear()

    async def submit(self, intent: UrlPreviewUpdate, received_at: float) -> PreviewResult:
        """Queue ``intent`` (read at wall-clock ``received_at``) and return its result once known.

        The read order is the order of ``submit`` calls. Cancelling the caller withdraws the intent.
        """
        if self._loop_task is None:
            raise PreviewsStopped("the preview coalescer is not running")
        now = self._clock()
        expires_at = None
        if intent.expires_at is not None:
            expires_at = now + (intent.expires_at.timestamp() - self._wall())
        ref = self.planner.add(intent.id, intent.app, intent.preview_tokens, intent.open_ids, expires_at, now)
        future: asyncio.Future[PreviewResult] = asyncio.get_running_loop().create_future()
        self._futures[ref] = future
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            if self._futures.pop(ref, None) is not None:
                self.planner.withdraw(ref)
            raise

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

        def let_through() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                self._waiting -= 1
                self._wake.set()

        async def before_attempt() -> None:
            let_through()
            try:
                await self._memory.record(planned.app, planned.tokens, self._wall())
            finally:  # stamped even if the write failed: the attempt may still go out
                self.planner.on_attempt(planned.id, self._clock())

        expires_at = None
        if planned.expires_at is not None:
            expires_at = planned.expires_at - self._clock() + self._wall()
        try:
            call = self._make_call(planned.tokens, planned.open_ids)
            attempted = await self._executor.execute(planned.app, call, expires_at=expires_at,
                                                     min_retry_delay=self.spacing, before_attempt=before_attempt)
        except MembershipLost:
            # nothing was sent; the intents' jobs are being abandoned with their partitions (outbound), and
            # whatever is still waiting goes back to pending, told nothing
            let_through()
            self.planner.abort(planned.id, self._clock())
            return
        except Exception:
            log.exception("url preview call for app %s (%d tokens) raised; its intents go back to pending",
                          planned.app, len(planned.tokens))
            let_through()
            self.planner.abort(planned.id, self._clock())
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
