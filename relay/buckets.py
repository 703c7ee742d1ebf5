"""Pure arithmetic for Feishu's rate limits: windows, bucket sizing, the token bucket and the send log.

Feishu counts calls in sliding windows: the IM APIs admit at most 50 calls in *any* 1 s **and** 1000 in *any*
60 s, per app and API; a chat or user takes at most 5 calls in any 1 s; URL previews 5 in any 1 s. A token bucket
of rate ``r`` and burst ``b`` lets at most ``b + r*T`` calls through in any window of length ``T``, so
:func:`size_bucket` picks ``(r, b)`` that keep that bound under every window an API has, with a margin for the lag
between our clock and Feishu's (timer overshoot, event-loop lag, network variance).

    Window, BucketShape   a limit as Feishu states it; a bucket's rate and burst
    size_bucket           the fastest bucket that keeps every window (and share_leaves_no_call, stricter)
    TokenBucket           reservation-based bucket over an explicit ``now`` (like Go's ``x/time/rate``); a
                          penalty pauses and slows it and voids every reservation it handed out (``epoch``)
    SendLog               the hard check on *send* times, right before a request leaves

Two buckets (and two send logs) that turn out to limit one thing (two names of one chat) are merged:
:meth:`TokenBucket.absorb` and :meth:`SendLog.merge` count the other's use in the survivor.

Nothing here does I/O or reads a clock: every method takes ``now``, so tests never sleep. The async limiter that
owns the buckets is :mod:`relay.limits`.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import msgspec

# A reservation is "due" this close to its instant: asyncio fires timers up to one clock resolution early and
# float sums drift by ulps; a microsecond is nothing next to the jitter margin.
DUE: Final = 1e-6
# A penalized bucket never slows below this share of its nominal rate (repeated 429s halve it each time).
_MIN_SLOW: Final = 1 / 64

class Window(msgspec.Struct, frozen=True):
    """Feishu admits at most ``limit`` calls in any ``seconds``-long window."""

    limit: int
    seconds: float


class BucketShape(msgspec.Struct, frozen=True):
    """A token bucket's sustained ``rate`` (tokens per second) and ``burst`` (capacity, whole tokens)."""

    rate: float
    burst: int


def share_leaves_no_call(windows: Sequence[Window], share: float) -> Window | None:
    """The first of ``windows`` in which ``share`` of the limit floors to no call at all, else None."""
    for window in windows:
        if math.floor(window.limit * share + 1e-9) < 1:  # 0.1 * 30 must floor to 3, not 2
            return window
    return None


def size_bucket(
    windows: Sequence[Window],
    *,
    jitter: float,
    utilization: float,
    share: float = 1.0,
    time_scale: float = 1.0,
) -> BucketShape:
    """The fastest bucket that keeps every window, ``jitter`` seconds of lag included.

    Each window is first scaled: ``seconds / time_scale`` (sandbox tests run Feishu's clock faster) and
    ``floor(limit * share)`` (a replica's fraction of the app quota; the floor keeps the replicas' sum within it).

    A bucket ``(r, b)`` admits at most ``b + r*T`` calls whose *scheduled* instants fall in any window of length
    ``T``. A call reaches Feishu up to ``jitter`` seconds after its instant, so calls Feishu sees in a window of
    length ``T`` were scheduled within ``T + jitter``. Every window ``(limit, T)`` therefore needs::

        b + r * (T + jitter) <= limit

    The sustained rate is what the tightest window allows on average, less a margin:
    ``r = utilization * min(limit / T)``. The burst takes what the constraint leaves:
    ``b = floor(min(limit - r * (T + jitter)))``. For IM (50/1 s and 1000/60 s, jitter 0.15, utilization 0.975):
    ``r = 0.975 * 1000/60 = 16.25/s`` and ``b = floor(min(50 - 18.69, 1000 - 977.44)) = 22``; a backlog then sends
    22 at once and 16.25/s after, 97.7 % of the minute quota.

    A bucket needs ``b >= 1`` to admit anything, so when the formula leaves less, ``b = 1`` and the rate drops to
    the largest with ``1 + r * (T + jitter) <= limit`` in every window (5 in 1 s: ``r = 4 / 1.15 = 3.48/s``).
    A window of limit 1 would force ``r = 0`` under that bound; there the integer count is what matters: calls
    ``1/r`` apart never put two in a span of ``T + jitter`` when ``r * (T + jitter) < 1``, so
    ``r = utilization / (T + jitter)``.

    Raises ValueError when there is no window or the share leaves a window with no call at all.
    """
    if not windows:
        raise ValueError("size_bucket: at least one window is needed")
    scaled: list[tuple[int, float]] = []
    for window in windows:
        if window.seconds <= 0 or window.limit <= 0:
            raise ValueError(f"size_bucket: window {window.limit}/{window.seconds}s must be positive")
        if share_leaves_no_call((window,), share):
            raise ValueError(
                f"size_bucket: share {share} of {window.limit} calls per {window.seconds}s leaves no call")
        limit = math.floor(window.limit * share + 1e-9)  # 0.1 * 30 must floor to 3, not 2
        scaled.append((limit, window.seconds / time_scale))
    rate = utilization * min(limit / seconds for limit, seconds in scaled)
    burst = math.floor(min(limit - rate * (seconds + jitter) for limit, seconds in scaled) + 1e-9)
    if burst >= 1:
        return BucketShape(rate=rate, burst=burst)
    rate = min(rate, *((max(limit - 1, utilization) / (seconds + jitter)) for limit, seconds in scaled))
    return BucketShape(rate=rate, burst=1)


class TokenBucket:
    """A reservation-based token bucket over an explicit clock (pure arithmetic, no I/O).

    The bucket holds up to ``burst`` tokens and refills at ``rate`` per second. :meth:`reserve` always takes a
    token, letting the count go negative: the debt makes reservations queue first come, first served, each told
    when its token is due. A caller that is cancelled after reserving loses its token, which only under-uses.

    :meth:`penalize` is for when Feishu throttles us anyway: nothing is due before the pause ends, every
    reservation handed out before is void (:attr:`epoch` moves on; a holder compares it when its instant comes and
    before it sends, and reserves again), and the refill rate drops (to ``slow_factor`` of its current value) then
    recovers linearly to nominal over ``recovery`` seconds, so a bucket that was too fast finds its way back gently
    instead of hammering.

    Every method takes ``now``; times before the bucket's own clock are treated as that clock (never refilled
    twice).
    """

    __slots__ = ("_burst", "_epoch", "_last", "_rate", "_reshapes", "_slow", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"TokenBucket: rate {rate} must be > 0 and burst {burst} >= 1")
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)  # as of self._last, which may lie ahead while paused
        self._last = now
        # (start, duration, factor): the rate is nominal * factor at start, rising linearly to nominal
        self._slow: tuple[float, float, float] | None = None
        self._epoch = 0
        self._reshapes = 0

    @property
    def reshapes(self) -> int:
        """Moves on at every :meth:`reshape`: a reservation made before it is to be made again."""
        return self._reshapes

    def reshape(self, rate: float, burst: int, now: float) -> None:
        """A new rate and burst for the reservations to come *and* those waiting: the debt of the reservations
        handed out is forgiven and :attr:`reshapes` moves on, so that each holder not yet due reserves again
        (in turn, at the new rate); calls already granted (due) are not touched (:attr:`epoch` stays)."""
        self.set_shape(rate, burst, now)
        self._tokens = max(self._tokens, 0.0)
        self._reshapes += 1

    @property
    def epoch(self) -> int:
        """Moves on at every penalty that voids the reservations handed out before it (see :meth:`penalize`)."""
        return self._epoch

    @property
    def rate(self) -> float:
        """The nominal refill rate (tokens per second)."""
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (negative while reservations are queued)."""
        self._advance(now)
        return self._tokens

    def reserve(self, now: float) -> float:
        """Take one token; return how long to wait before the call (0 when it may go now)."""
        self._advance(now)
        self._tokens -= 1.0
        return self._due_in(now, -self._tokens)

    def delay(self, now: float) -> float:
        """How long until a token is free, without taking one."""
        self._advance(now)
        return self._due_in(now, 1.0 - self._tokens)

    def take(self, now: float) -> bool:
        """Take a token only if one is free now."""
        if self.delay(now) > DUE:
            return False
        self._tokens -= 1.0
        return True

    def refund(self, now: float) -> None:
        """A reservation whose caller gave up before its instant (cancelled: a revoked partition's job) returns
        its token while the bucket is in debt, so the next callers do not queue behind calls that never go.

        A refund puts the bucket in a state it could have reached without the reservation (fewer tokens owed,
        never above zero), so the bound ``burst + rate * T`` on the calls scheduled in any window holds; the
        reservations already made keep their instants (later than needed, never earlier).
        """
        self._advance(now)
        if self._tokens < 0:
            self._tokens = min(0.0, self._tokens + 1.0)

    def penalize(self, now: float, pause: float, *, slow_factor: float = 0.5, recovery: float = 30.0) -> None:
        """Feishu said "too many": nothing is due before ``now + pause``, then the rate recovers from slow.

        Every reservation handed out before is void, whatever its instant: :attr:`epoch` moves on, and a holder
        that finds it moved (when its instant comes, or right before it sends) must reserve again. Their debt is
        forgiven, since they queue anew; at most one token is waiting when the pause ends, so the bucket restarts
        with a single call and then the slowed rate, not with the queue released at once.

        ``slow_factor`` 1 keeps the current slowness: for a second answer of the same burst (a call that left
        before the first answer was read), which may extend the pause but must not slow the bucket again; if it
        extends nothing, nothing changes.
        """
        self._advance(now)
        end = now + max(pause, 0.0)
        if slow_factor >= 1.0 and end <= self._last:
            return
        start = max(self._last, end)
        factor = max(_MIN_SLOW, min(slow_factor, 1.0) * self._factor(now))
        self._tokens = min(max(self._tokens, 0.0), 1.0)
        self._last = start
        self._slow = (start, recovery, factor) if recovery > 0 and factor < 1.0 else None
        self._epoch += 1

    def absorb(self, other: TokenBucket, now: float) -> None:
        """Count ``other``'s use here too: both buckets turned out to limit one thing (two names of one chat).

        What ``other`` consumed (``burst - tokens``, its debt included) is taken from this bucket; a pause or a
        slow of ``other`` that outlasts this one's is adopted (voiding this bucket's reservations, as a penalty
        does). ``other`` is to be forgotten afterwards.
        """
        self._advance(now)
        other._advance(now)
        self._tokens = min(self._tokens, self._tokens - (other._burst - other._tokens))
        if other._last > self._last:
            self._tokens = min(max(self._tokens, 0.0), 1.0)
            self._last = other._last
            self._epoch += 1
        if other._slow is not None and (self._slow is None or other._factor(now) < self._factor(now)):
            self._slow = other._slow

    def set_shape(self, rate: float, burst: int, now: float | None = None) -> None:
        """Change rate and burst (a replica's share of the quota changed); ``now`` settles the refill so far."""
        if rate <= 0 or burst < 1:
            raise ValueError(f"TokenBucket: rate {rate} must be > 0 and burst {burst} >= 1")
        if now is not None:
            self._advance(now)
        self._rate = rate
        self._burst = burst
        self._tokens = min(self._tokens, float(burst))

    def is_full(self, now: float) -> bool:
        """Full, not paused and not slowed: forgetting the bucket and creating it again changes nothing."""
        self._advance(now)
        return self._tokens >= self._burst and self._slow is None and self._last <= now

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self._rate:.4g}, burst={self._burst}, tokens={self._tokens:.3g})"

    # The rate at time t is rate * g(t); g is piecewise linear (factor until start, ramp to 1, then 1), so its
    # integral and that integral's inverse have closed forms.

    def _factor(self, t: float) -> float:
        if self._slow is None:
            return 1.0
        start, duration, factor = self._slow
        u = t - start
        if u <= 0:
            return factor
        if u >= duration:
            return 1.0
        return factor + (1.0 - factor) * u / duration

    def _integral(self, u: float) -> float:
        """``∫ g`` from the slow's start to ``start + u`` (``u`` may be negative)."""
        assert self._slow is not None
        _, duration, factor = self._slow
        if u <= 0:
            return factor * u
        if u <= duration:
            return factor * u + (1.0 - factor) * u * u / (2.0 * duration)
        return duration * (1.0 + factor) / 2.0 + (u - duration)

    def _inverse(self, y: float) -> float:
        """The ``u`` with ``_integral(u) == y``."""
        assert self._slow is not None
        _, duration, factor = self._slow
        if y <= 0:
            return y / factor
        top = duration * (1.0 + factor) / 2.0
        if y <= top:
            a = (1.0 - factor) / (2.0 * duration)
            # u = (-f + sqrt(f^2 + 4ay)) / 2a, written to stay exact as a -> 0
            return 2.0 * y / (factor + math.sqrt(factor * factor + 4.0 * a * y))
        return duration + (y - top)

    def _advance(self, now: float) -> None:
        if now <= self._last:
            return
        if self._slow is None:
            gained = self._rate * (now - self._last)
        else:
            start = self._slow[0]
            gained = self._rate * (self._integral(now - start) - self._integral(self._last - start))
            if now >= start + self._slow[1]:
                self._slow = None
        self._tokens = min(float(self._burst), self._tokens + gained)
        self._last = now

    def _due_in(self, now: float, missing: float) -> float:
        """Seconds from ``now`` until ``missing`` more tokens have accrued after ``self._last``."""
        if missing <= 0:
            return max(0.0, self._last - now)
        if self._slow is None:
            return self._last + missing / self._rate - now
        start = self._slow[0]
        u = self._inverse(self._integral(self._last - start) + missing / self._rate)
        return start + u - now


def stricter(*window_sets: Sequence[Window]) -> tuple[Window, ...]:
    """One set of windows that keeps every given set: per window length, the smallest limit (sorted by length).

    A bucket sized for the result admits no more than a bucket sized for any one of the sets would, in every
    window of every set.
    """
    tightest: dict[float, int] = {}
    for windows in window_sets:
        for window in windows:
            limit = tightest.get(window.seconds)
            if limit is None or window.limit < limit:
                tightest[window.seconds] = window.limit
    return tuple(Window(limit, seconds) for seconds, limit in sorted(tightest.items()))


class SendLog:
    """When calls may reach Feishu, checked against the windows right before the next one goes.

    The token bucket bounds when calls are *granted*. A call granted on time but sent late — the event loop
    stalled (GC, a busy host), or it waited for a pooled connection — would go out together with the calls granted
    after it, and a stall of half a second flushes a burst that Feishu counts in one window. And Feishu counts a
    call when it *arrives*, some instant between its send and its answer: a request that travels longer (a
    congested path, a loop that stalled after the send was recorded) arrives after calls sent later.

    So a call counts in every window from :meth:`record` (about to be sent) until :meth:`release` (its answer came,
    or it was given up), and then until ``span`` seconds after the release. Sending now is allowed when fewer than
    ``limit`` calls count. Then no window of *arrivals* holds more than ``limit``, whatever the travel times: take
    the call of a window sent last, at ``s``; every other call of that window was sent before it and arrived after
    ``s - span``, so its answer came after ``s - span`` (or has not come): it counted when the last one was let go,
    and fewer than ``limit`` did. What it costs: each call holds its place one round trip longer than the window.
    It costs a bisect per send and binds only after such a stall, or while ``limit`` calls are in flight at once.
    """

    __slots__ = ("_into", "_longest", "_open", "_spans", "_start", "_times", "answer", "head", "waiters")

    def __init__(self, spans: Sequence[tuple[int, float]]) -> None:
        self.spans = spans
        # the limiter's callers held back by this log (relay.limits.Limiter.admit): whether one heads them, the
        # future that head awaits an answer on, and the others' futures, in order
        self.head = False
        self.answer: Any = None
        self.waiters: deque[Any] = deque()
        self._times: list[float] = []  # releases, in order
        self._start = 0  # releases before it are older than the longest span
        self._open = 0  # recorded, not yet released
        self._into: SendLog | None = None  # merged into that log: releases go there

    @property
    def spans(self) -> tuple[tuple[int, float], ...]:
        """(limit, span seconds) per window."""
        return self._spans

    @spans.setter
    def spans(self, spans: Sequence[tuple[int, float]]) -> None:
        self._spans = tuple(spans)
        self._longest = max((span for _, span in self._spans), default=0.0)

    @property
    def open(self) -> int:
        """Calls recorded and not yet released (in flight)."""
        return self._open

    def delay(self, now: float) -> float:
        """Seconds until a send keeps every window within its limit (0: send now; ``inf``: only the release of a
        call in flight can make room)."""
        longest = self._longest
        times, start = self._times, self._start
        while start < len(times) and times[start] <= now - longest:
            start += 1
        if start > 1024 and start * 2 > len(times):  # compact now and then, not on every send
            del times[:start]
            start = 0
        self._start = start
        wait = 0.0
        for limit, span in self._spans:
            first = bisect.bisect_right(times, now - span, lo=start)
            inside = len(times) - first + self._open
            if inside >= limit:  # the release that must leave the window first
                leave = first + inside - limit
                wait = max(wait, times[leave] + span - now if leave < len(times) else math.inf)
        return wait

    def merge(self, other: SendLog) -> None:
        """Take ``other``'s calls: both logs turned out to count one limit (two names of one chat). Its calls in
        flight are released here from now on."""
        times = sorted(self._times[self._start:] + other._times[other._start:])
        self._times, self._start = times, 0
        self._open += other._open
        other._open = 0
        other._into = self

    @property
    def root(self) -> SendLog:
        """The log this one's calls count in: itself, or the one it was merged into."""
        log = self
        while log._into is not None:
            log = log._into
        return log

    def record(self) -> None:
        """A call is about to be sent: it counts from now until its :meth:`release`."""
        self._open += 1

    def release(self, now: float) -> None:
        """A recorded call was answered (or given up) at ``now``: it counts until ``now + span``."""
        log = self.root
        log._open = max(0, log._open - 1)
        times = log._times
        if times and now < times[-1]:
            now = times[-1]  # a clock never runs backwards here; keep the list sorted
        times.append(now)

    def idle(self, now: float) -> bool:
        """Nothing in flight and no release within the longest span: forgetting this log changes nothing."""
        return self._open == 0 and (not self._times or self._times[-1] <= now - self._longest)
