"""Token buckets sized for Feishu's counting windows, and the limiter that owns them.

Feishu counts calls in sliding windows: the IM APIs admit at most 50 calls in *any* 1 s **and** 1000 in *any*
60 s, per app and API; a chat or user takes at most 5 calls in any 1 s; URL previews 5 in any 1 s (SPEC "Limits",
feishu-facts §2). A token bucket of rate ``r`` and burst ``b`` lets at most ``b + r*T`` calls through in any window
of length ``T``, so :func:`size_bucket` picks ``(r, b)`` that keep that bound under every window an API has, with a
margin for the lag between our clock and Feishu's (timer overshoot, event-loop lag, network variance).

:class:`TokenBucket` is pure arithmetic over a ``now`` argument (reservation based, like Go's ``x/time/rate``):
deterministic and testable without sleeping. :class:`Limiter` keys buckets by ``("app", app, api)`` and
``("target", app, target)`` and only sequences awaits around them, with the clock and sleep injected.

A replica's ``share`` of the quota applies to app-wide buckets only: Feishu counts those over every replica of
the consumer group. A target (a chat, a user, a message) is reached through one ordering key, so one partition,
so one replica: its bucket is sized for the whole per-target limit.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

import msgspec

if TYPE_CHECKING:
    from relay.config import FeishuConfig

log = logging.getLogger(__name__)

# A reservation is "due" this close to its instant: asyncio fires timers up to one clock resolution early and
# float sums drift by ulps; a microsecond is nothing next to the jitter margin.
_DUE: Final = 1e-6
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

    :meth:`penalize` is for when Feishu throttles us anyway: nothing is due before the pause ends, and the
    refill rate drops (to ``slow_factor`` of its current value) then recovers linearly to nominal over
    ``recovery`` seconds, so a bucket that was too fast finds its way back gently instead of hammering.

    Every method takes ``now``; times before the bucket's own clock are treated as that clock (never refilled
    twice).
    """

    __slots__ = ("_burst", "_last", "_rate", "_slow", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"TokenBucket: rate {rate} must be > 0 and burst {burst} >= 1")
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)  # as of self._last, which may lie ahead while paused
        self._last = now
        # (start, duration, factor): the rate is nominal * factor at start, rising linearly to nominal
        self._slow: tuple[float, float, float] | None = None

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
        if self.delay(now) > _DUE:
            return False
        self._tokens -= 1.0
        return True

    def penalize(self, now: float, pause: float, *, slow_factor: float = 0.5, recovery: float = 30.0) -> None:
        """Feishu said "too many": nothing is due before ``now + pause``, then the rate recovers from slow.

        Reservations already handed out keep their instants (a caller may already be sleeping on one); new ones
        queue after the pause, behind the debt. At most one token is waiting when the pause ends, so the bucket
        restarts with a single call, not a burst.
        """
        self._advance(now)
        start = max(self._last, now + max(pause, 0.0))
        factor = max(_MIN_SLOW, slow_factor * self._factor(now))
        self._tokens = min(self._tokens, 1.0)
        self._last = start
        self._slow = (start, recovery, factor) if recovery > 0 and factor < 1.0 else None

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


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
BucketKey = tuple[str, ...]


class LimiterStats(msgspec.Struct, frozen=True):
    """Counters for metrics: buckets alive, acquisitions, how many waited and how long, throttles seen."""

    app_buckets: int
    target_buckets: int
    acquires: int
    waits: int
    waited_seconds: float
    throttles: int
    evictions: int
    retakes: int
    guarded: int = 0  # sends held back by the send log (only after a stall)


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
    """When calls were actually sent, checked against the windows right before the next one goes.

    The token bucket bounds when calls are *granted*. A call granted on time but sent late — the event loop
    stalled (GC, a busy host), or it waited for a pooled connection — would go out together with the calls granted
    after it, and a stall of half a second flushes a burst that Feishu counts in one window. This log is the hard
    guarantee on *send* times: at most ``limit`` sends in any window of ``span`` seconds (the window plus the
    jitter margin). It costs a bisect per send and binds only after such a stall; the bucket keeps the pace.
    """

    __slots__ = ("_longest", "_spans", "_start", "_times")

    def __init__(self, spans: Sequence[tuple[int, float]]) -> None:
        self.spans = spans
        self._times: list[float] = []
        self._start = 0  # times before it are older than the longest span

    @property
    def spans(self) -> tuple[tuple[int, float], ...]:
        """(limit, span seconds) per window."""
        return self._spans

    @spans.setter
    def spans(self, spans: Sequence[tuple[int, float]]) -> None:
        self._spans = tuple(spans)
        self._longest = max((span for _, span in self._spans), default=0.0)

    def delay(self, now: float) -> float:
        """Seconds until a send keeps every window within its limit (0: send now)."""
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
            inside = len(times) - bisect.bisect_right(times, now - span, lo=start)
            if inside >= limit:  # the limit-th most recent send must leave the window first
                wait = max(wait, times[len(times) - limit] + span - now)
        return wait

    def record(self, now: float) -> None:
        if self._times and now < self._times[-1]:
            now = self._times[-1]  # a clock never runs backwards here; keep the list sorted
        self._times.append(now)

    def idle(self, now: float) -> bool:
        """No send within the longest span: forgetting this log changes nothing."""
        return not self._times or self._times[-1] <= now - self._longest


class _Entry:
    __slots__ = ("bucket", "lock", "log", "users", "windows")

    def __init__(self, bucket: TokenBucket, windows: tuple[Window, ...], log: SendLog) -> None:
        self.bucket = bucket
        self.log = log
        self.windows = windows
        self.lock = asyncio.Lock()  # target buckets only: one caller of a target at a time (see acquire)
        self.users = 0


class Limiter:
    """Every Feishu call waits here first: the app-wide bucket of its API and, if any, its target's bucket.

    Buckets are created on first use from the windows the caller passes (sized by :func:`size_bucket` with this
    limiter's jitter, utilization and time scale; app-wide buckets at this replica's ``share``, target buckets at
    the whole limit). App buckets live as long as the limiter (a few per configured app); a target's bucket is
    forgotten once it is idle and full, which is indistinguishable from keeping it, so memory follows the targets
    active in the last second or so, not all targets ever seen.

    Target buckets are keyed by (app, target), not by API: Feishu's 5/s for a chat counts message create, reply
    and forward together (facts §2.3), so the callers give every API that reaches the same recipient the same
    target string (see :mod:`relay.calls`). When calls of one target bring different windows, the bucket keeps
    the stricter of all it has seen (:func:`stricter`, per window length the smaller limit): the first caller
    creates it from its windows, a later caller with other windows re-sizes it for both. Under-use for a target
    reached by APIs with different per-target limits is the price; over-use never happens.

    Retries take tokens like first attempts (SPEC). :meth:`throttled` slows the bucket Feishu complained about.
    """

    def __init__(
        self,
        *,
        jitter: float,
        utilization: float,
        share: float = 1.0,
        time_scale: float = 1.0,
        clock: Clock,
        sleep: Sleep,
        default_pause: float = 1.0,
        slow_factor: float = 0.5,
        recovery: float = 30.0,
    ) -> None:
        """``default_pause`` (when Feishu gives no reset) and ``recovery`` are Feishu durations: divided by
        ``time_scale`` like the windows."""
        self._jitter = jitter
        self._utilization = utilization
        self._share = share
        self._time_scale = time_scale
        self._clock = clock
        self._sleep = sleep
        self._default_pause = default_pause / time_scale
        self._slow_factor = slow_factor
        self._recovery = recovery / time_scale
        self._shapes: dict[tuple[tuple[Window, ...], float], BucketShape] = {}
        self._apps: dict[BucketKey, _Entry] = {}
        self._targets: OrderedDict[BucketKey, _Entry] = OrderedDict()  # least recently used first
        self._target_windows: dict[tuple[str, str], tuple[Window, ...]] = {}  # (app, api) -> its last windows
        self._acquires = 0
        self._waits = 0
        self._waited = 0.0
        self._throttles = 0
        self._evictions = 0
        self._retakes = 0
        self._guarded = 0  # sends the send log held back (after an event-loop stall)

    @classmethod
    def from_config(cls, feishu: FeishuConfig, *, clock: Clock, sleep: Sleep) -> Limiter:
        """A limiter with the ``[feishu]`` section's quota_share, limit_jitter, limit_utilization, time_scale."""
        return cls(jitter=feishu.limit_jitter, utilization=feishu.limit_utilization, share=feishu.quota_share,
                   time_scale=feishu.time_scale, clock=clock, sleep=sleep)

    @property
    def share(self) -> float:
        return self._share

    def shape(self, windows: Sequence[Window], *, target: bool = False) -> BucketShape:
        """The bucket this limiter sizes for ``windows``: app-wide at its share, a ``target``'s at the whole."""
        share = 1.0 if target else self._share
        key = (tuple(windows), share)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = size_bucket(
                key[0], jitter=self._jitter, utilization=self._utilization, share=share,
                time_scale=self._time_scale)
        return shape

    def admissible(self, api: str, api_windows: Sequence[Window], target_windows: Sequence[Window] = ()) -> str | None:
        """Why a call with these windows can never be admitted here (one line), or None when it can.

        A call is not admissible when it has no app-wide window, or when this replica's share of one of its
        app-wide windows leaves no call (``floor(limit * share) == 0``); :meth:`acquire` raises ValueError for
        such a call, so check first.
        """
        if not api_windows:
            return f"{api} has no rate limit window"
        window = share_leaves_no_call(api_windows, self._share)
        if window is not None:
            return (f"{api}: quota_share {self._share:g} of {window.limit} calls per {window.seconds:g} s leaves "
                    f"no call at this replica (needs a share of at least {1 / window.limit:.3g})")
        for shape_windows, target in ((api_windows, False), (target_windows, True)):
            if shape_windows:
                try:
                    self.shape(shape_windows, target=target)
                except ValueError as err:
                    return f"{api}: {err}"
        return None

    def bucket(self, key: BucketKey) -> TokenBucket | None:
        """The live bucket under ``key`` (``("app", app, api)`` or ``("target", app, target)``), if any."""
        entry = self._apps.get(key) or self._targets.get(key)
        return entry.bucket if entry else None

    async def acquire(
        self,
        app: str,
        api: str,
        api_windows: Sequence[Window],
        target: str | None = None,
        target_windows: Sequence[Window] = (),
    ) -> float:
        """Wait until a call of ``api`` by ``app`` (to ``target``, if given) may go; return the seconds waited.

        The target comes first: a caller waits for its target's token *before* it reserves an app-wide token,
        so a key held back by its own chat does not burn app quota meanwhile. The target's token is then taken
        when the call actually goes, after the app wait: a token taken earlier and spent after a long app-wide
        queue would let a chat's calls bunch up (several target tokens taken 0.29 s apart, all sent together
        when the app queue drains). One caller per target holds the target's lock through both waits, so the
        token it waited for is still there; only a penalty arriving meanwhile sends it round again, and the app
        token it took is then lost (under-use, never over-use).

        Raises ValueError for windows no bucket can keep (see :meth:`admissible`). Cancellation is safe at every
        await: a reservation already made is simply not used.
        """
        start = self._clock()
        app_entry = self._app_entry(app, api, api_windows)
        if target is None:
            await self._take(app_entry.bucket)
        else:
            windows = tuple(target_windows)
            if not windows:
                raise ValueError(f"acquire: target {target!r} of {api} needs its windows")
            self._target_windows[(app, api)] = windows
            entry = self._target_entry(("target", app, target), windows)
            entry.users += 1
            try:
                async with entry.lock:
                    while True:
                        wait = entry.bucket.delay(self._clock())
                        if wait > _DUE:
                            await self._sleep(wait)
                        await self._take(app_entry.bucket)
                        if entry.bucket.take(self._clock()):
                            break
                        self._retakes += 1
            finally:
                entry.users -= 1
        waited = self._clock() - start
        self._acquires += 1
        if waited > 0:
            self._waits += 1
            self._waited += waited
        return waited

    def throttled(self, app: str, api: str, target: str | None = None, retry_after: float | None = None) -> None:
        """Feishu throttled a call: slow the bucket it counts against.

        Give ``target`` for a per-target refusal (230020: that chat or user is over 5/s, perhaps because other
        bots share it), none for an app-wide one (HTTP 429 / 99991400). The target's bucket is the one every API
        reaching that target shares. Nothing is due for ``retry_after`` seconds (Feishu's
        ``x-ogw-ratelimit-reset``; a default pause without one), then the bucket's rate recovers gradually.
        """
        now = self._clock()
        pause = self._default_pause if retry_after is None else retry_after
        self._throttles += 1
        entry: _Entry | None
        if target is not None:
            key: BucketKey = ("target", app, target)
            windows = self._target_windows.get((app, api))
            entry = self._targets.get(key) or (self._target_entry(key, windows) if windows else None)
        else:
            entry = self._apps.get(("app", app, api))
        if entry is None:
            log.warning("throttled %s %s target=%s but no bucket was ever used for it", app, api, target)
            return
        entry.bucket.penalize(now, pause, slow_factor=self._slow_factor, recovery=self._recovery)

    def set_share(self, share: float) -> None:
        """Re-size the app-wide buckets for a new share of the app quota (replicas joined or left the group).

        Target buckets keep their size: a target lives on one replica whatever the share.
        """
        self._share = share
        now = self._clock()
        for entry in self._apps.values():
            shape = self.shape(entry.windows)
            entry.bucket.set_shape(shape.rate, shape.burst, now)
            entry.log.spans = tuple(self._spans(entry.windows, target=False))

    def stats(self) -> LimiterStats:
        return LimiterStats(
            app_buckets=len(self._apps), target_buckets=len(self._targets), acquires=self._acquires,
            waits=self._waits, waited_seconds=self._waited, throttles=self._throttles, evictions=self._evictions,
            retakes=self._retakes, guarded=self._guarded)

    async def _take(self, bucket: TokenBucket) -> None:
        wait = bucket.reserve(self._clock())
        if wait > _DUE:
            await self._sleep(wait)

    def _app_entry(self, app: str, api: str, windows: Sequence[Window]) -> _Entry:
        key: BucketKey = ("app", app, api)
        entry = self._apps.get(key)
        if entry is None:
            entry = self._apps[key] = self._new_entry(tuple(windows), target=False)
        return entry

    def _target_entry(self, key: BucketKey, windows: tuple[Window, ...]) -> _Entry:
        now = self._clock()
        entry = self._targets.get(key)
        if entry is None:
            entry = self._targets[key] = self._new_entry(stricter(windows), target=True)
        else:
            self._targets.move_to_end(key)
            if windows != entry.windows:  # another API reaching the same target: keep the stricter of both
                merged = stricter(entry.windows, windows)
                if merged != entry.windows:
                    shape = self.shape(merged, target=True)
                    entry.bucket.set_shape(shape.rate, shape.burst, now)
                    entry.windows = merged
                    entry.log.spans = tuple(self._spans(merged, target=True))
        self._evict(now, 2)
        return entry

    def _new_entry(self, windows: tuple[Window, ...], *, target: bool) -> _Entry:
        shape = self.shape(windows, target=target)
        return _Entry(TokenBucket(shape.rate, shape.burst, self._clock()), windows,
                      SendLog(self._spans(windows, target=target)))

    def _spans(self, windows: Sequence[Window], *, target: bool) -> list[tuple[int, float]]:
        """The send log's (limit, span) per window: this replica's share of the limit (app-wide windows only),
        over the scaled window plus the jitter margin, like the bucket's sizing."""
        share = 1.0 if target else self._share
        return [(max(1, math.floor(w.limit * share)), w.seconds / self._time_scale + self._jitter) for w in windows]

    async def admit(self, app: str, api: str, api_windows: Sequence[Window], target: str | None = None,
                    target_windows: Sequence[Window] = ()) -> None:
        """Right before the request leaves (after :meth:`acquire` and after a pooled connection is held): wait
        until sending now keeps the app's and the target's windows, and record the send. See :class:`SendLog`."""
        entries = [self._app_entry(app, api, api_windows)]
        if target is not None:
            key: BucketKey = ("target", app, target)
            entries.append(self._targets.get(key) or self._target_entry(key, tuple(target_windows)))
        while True:
            now = self._clock()
            wait = max(entry.log.delay(now) for entry in entries)
            if wait <= _DUE:
                for entry in entries:
                    entry.log.record(now)
                return
            self._guarded += 1
            await self._sleep(wait)

    def _evict(self, now: float, budget: int) -> None:
        """Look at the ``budget`` least recently used targets: forget the idle full ones, requeue the rest.

        Each call adds at most one target and looks at two, so idle targets go at least as fast as new ones come;
        a busy or penalized one moves to the back instead of blocking the scan.
        """
        for _ in range(min(budget, len(self._targets) - 1)):
            key, entry = next(iter(self._targets.items()))
            if entry.users == 0 and entry.bucket.is_full(now) and entry.log.idle(now):
                del self._targets[key]
                self._evictions += 1
            else:
                self._targets.move_to_end(key)
