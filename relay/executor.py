"""Performs one Feishu call to its end: limits, attempts, token refresh, retries, expiry.

For each attempt, in this order: check ``expires_at``; wait for the per-target then the app-wide bucket
(retries take tokens like first attempts); check ``expires_at`` again (the wait may have been long); run the
caller's ``before_attempt`` hook; send — and right before the request leaves (a tenant token had and a pooled
connection held): the executor's ``gate`` (may this process call Feishu at all? ``relay.membership``: is it still
a member of its group?) may make it wait; then the caller's ``before_write`` hook (the journal's "started" entry:
as late as possible, so a call stopped while waiting for a token, a connection or the gate is not reported as
maybe performed); then the limiter's send-time guard (``Limiter.admit``) holds it if a stall (or those waits) made
it late enough to bunch with later calls, or sends it back to queue if a throttle voided its grant meanwhile
(``Requeue``: the sender releases the connection while it waits, then admits again from the gate); then the
caller's ``before_send`` hook; then, last, the gate is asked about this very instant (if it says "not now", back
to waiting, the guard and the hook, so the hook may run for a request that then waits or is not sent: its effect
must allow that). An exception from the gate or a hook stops the call before anything is written and propagates.
Then branch on the classified outcome:

    OK / PARTIAL / PERMANENT   done
    REFRESH                    the client dropped the token; retry at once, once (a second REFRESH is final)
    RETRY, maybe performed,    done, ``unknown``: the request may have been performed at Feishu (an answer
      call not repeatable        lost after it was written, a gateway 5xx, code 1500: ``relay.outcomes``), and
                                 sending it again could buzz, react or broadcast twice (``Call.repeatable``)
    RETRY                      tell the limiter when Feishu throttled us (that bucket pauses and slows), then
                               wait the jittered backoff (at least ``x-ogw-ratelimit-reset`` and at least
                               ``min_retry_delay``) unless the policy's attempts or total time are used up

An outcome with ``token_unavailable`` (no tenant token, so no API request was made) is not an attempt: during a
token-endpoint outage calls wait out the client's hold and try again, bounded by the policy's total time only,
so a few seconds of token trouble do not use up every in-flight intent's attempts. A permanent token answer
(a wrong ``app_secret``) ends the call at once like any PERMANENT.

The result says how many attempts (API requests) were made and why the call stopped. Nothing here raises for an
expected answer; cancellation propagates (the caller decides what an abandoned call means).

A call whose windows the limiter cannot keep at this replica's quota share (an ``api.call`` at 3/s with a share
of 0.25: no call at all per replica) is not admissible: :meth:`Executor.admissible` says why, and the caller
rejects the intent instead of executing it (``execute`` would raise ValueError from the limiter).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from relay.backoff import RetryPolicy
from relay.calls import Call
from relay.limits import Grant, Limiter
from relay.metrics import Metrics
from relay.outcomes import Attempted, Outcome, Verdict

log = logging.getLogger(__name__)

# Feishu's IM frequency-limit code for a per-target limit (docs/feishu-rules.md §2.3, §4); 429/99991400 are app-wide
PER_TARGET_LIMIT_CODE = 230020


Admit = Callable[[], Awaitable[None]]


class Sender(Protocol):
    async def send(self, app: str, call: Call, admit: Admit | None = None, *, tenant: str | None = None) -> Outcome:
        """One attempt (as ``tenant`` of a store app, when given); ``admit`` is awaited right before the request
        leaves (the limiter's send-time guard).

        ``admit`` raises :class:`~relay.limits.Requeue` when a throttle voided the call's grant: release what is
        held (a pooled connection), ``await`` its ``wait()``, and call ``admit`` again."""
        ...


class Gate(Protocol):
    """May this process call Feishu now (``relay.membership.Membership``)? Asked right before each request."""

    async def wait(self) -> None:
        """Return once calls may go (at once if they may now); raise to stop the call."""
        ...

    def check(self) -> bool:
        """At the instant of writing: True to send, False if not now (the executor waits again), or raise."""
        ...


class Executor:
    def __init__(self, sender: Sender, limiter: Limiter, policy: RetryPolicy, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None, gate: Gate | None = None, metrics: Metrics | None = None) -> None:
        """``gate`` is asked right before every request is written; it raises to stop the call (module doc).
        ``metrics`` records each limiter wait, by API."""
        self._sender = sender
        self._limiter = limiter
        self._policy = policy
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._gate = gate
        self._metrics = metrics
        self.sending = 0  # attempts between the limiter's grant and their answer (or failure): calls on their way

    def admissible(self, call: Call) -> str | None:
        """Why ``call`` can never go at this replica (one line, for a ``rejected`` result), or None when it can.

        Not admissible: no app-wide window, or this replica's quota share of one of ``call.api_windows`` leaves
        no call (``floor(limit * share) == 0``). Per-target windows are never shared, so they always admit.
        Check before :meth:`execute`, which raises ValueError for such a call.
        """
        return self._limiter.admissible(call.api, call.api_windows, call.target_windows)

    async def execute(self, app: str, call: Call, *, expires_at: float | None = None,
                      min_retry_delay: float = 0.0,
                      before_attempt: Callable[[], Awaitable[None]] | None = None,
                      before_write: Callable[[], Awaitable[None]] | None = None,
                      before_send: Callable[[], Awaitable[None]] | None = None,
                      tenant: str | None = None) -> Attempted:
        """Perform ``call`` for ``app`` (as its ``tenant``, a store app's tenant_key: its quota and token are that
        tenant's, see :mod:`relay.limits`); ``expires_at`` is a wall-clock (epoch) instant.

        ``before_attempt`` runs after the limiter's waits, before each attempt; ``before_write`` once a token and a
        connection are had (after the gate's wait), before the send-time guard; ``before_send`` right before each
        request is written (after the guard; only the gate's last check follows), the instant an attempt leaves.
        """
        attempts = 0  # API requests made
        unsent = 0  # tries answered without a request (no tenant token): not attempts (module doc)
        refreshed = False
        first = self._clock()
        outcome: Outcome | None = None
        while True:
            if expires_at is not None and self._wall() >= expires_at:
                return Attempted(outcome, attempts, expired=True)
            waiting = self._clock()
            grant = await self._limiter.acquire(app, call.api, call.api_windows, call.target, call.target_windows,
                                                learns=call.learns, tenant=tenant)
            if self._metrics is not None:
                self._metrics.limiter_waited(call.api, self._clock() - waiting)
            if expires_at is not None and self._wall() >= expires_at:
                return Attempted(outcome, attempts, expired=True)
            if before_attempt is not None:
                await before_attempt()
            admit = functools.partial(self._admit, grant, before_write, before_send)
            self.sending += 1
            try:
                outcome = await self._sender.send(app, call, admit, tenant=tenant)
            finally:
                self.sending -= 1
                self._limiter.answered(grant)  # its place in the send logs expires from now (SendLog)
            if outcome.token_unavailable:
                unsent += 1
            else:
                attempts += 1
            verdict = outcome.verdict
            if verdict is Verdict.OK:
                self._limiter.learn(grant, outcome.data)  # which chat the target is (relay.targets)
            if verdict is Verdict.REFRESH:
                if refreshed:
                    return Attempted(outcome, attempts)
                refreshed = True
                continue
            if verdict is not Verdict.RETRY:
                return Attempted(outcome, attempts)
            if outcome.maybe_performed and not call.repeatable:
                return Attempted(outcome, attempts, unknown=True)
            if outcome.throttled:
                per_target = outcome.code == PER_TARGET_LIMIT_CODE and call.target is not None
                self._limiter.throttled(app, call.api, call.target if per_target else None, outcome.retry_after,
                                        grant=grant, tenant=tenant)
            backoff = unsent if outcome.token_unavailable else attempts  # each grows on its own
            delay = max(self._policy.delay(backoff, self._rng, outcome.retry_after), min_retry_delay)
            if not self._policy.allows(attempts, first, self._clock(), delay):
                return Attempted(outcome, attempts, exhausted=True)
            if outcome.token_unavailable:  # relay.feishu logs the token trouble once per hold, not per call
                log.debug("retrying %s for app %s in %.2fs: no tenant token", call.api, app, delay)
            else:  # a retry or a throttle is worth a line: the first sign of a limit set too high or a sick Feishu
                why = "throttled" if outcome.throttled else "retriable answer"
                log.warning("retrying %s for app %s in %.2fs (attempt %d, %s: %s %s)", call.api, app, delay,
                            attempts, why, outcome.code, outcome.msg,
                            extra={"app": app, "api": call.api, "attempts": attempts, "retry_in": round(delay, 3),
                                   "reason": why, "code": outcome.code, "log_id": outcome.log_id})
            await self._sleep(delay)

    async def _admit(self, grant: Grant, before_write: Callable[[], Awaitable[None]] | None,
                     before_send: Callable[[], Awaitable[None]] | None) -> None:
        """Right before the request is written: the gate's wait, the caller's ``before_write``, the send-time guard,
        the caller's ``before_send``, and last the gate's check of this instant (module doc)."""
        if self._gate is not None:
            await self._gate.wait()
        if before_write is not None:
            await before_write()
        while True:
            await self._limiter.admit(grant)
            if before_send is not None:
                await before_send()
            if self._gate is None or self._gate.check():
                return
            await self._gate.wait()
