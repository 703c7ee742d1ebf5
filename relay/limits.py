"""The limiter: every Feishu call waits here for its app-wide bucket and, if any, its target's bucket.

:class:`Limiter` keys buckets by ``("app", app, api)`` and ``("target", app, target)`` and only sequences awaits
around the pure arithmetic of :mod:`relay.buckets`, with the clock and sleep injected.

A replica's ``share`` of the quota applies to app-wide buckets only: Feishu counts those over every replica of
the consumer group. A target (a chat, a user, a message) is reached through one ordering key, so one partition,
so one replica: its bucket is sized for the whole per-target limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from relay.buckets import DUE, BucketShape, SendLog, TokenBucket, Window, share_leaves_no_call, size_bucket, stricter

if TYPE_CHECKING:
    from relay.config import FeishuConfig

log = logging.getLogger(__name__)

__all__ = ["BucketShape", "Limiter", "LimiterStats", "TokenBucket", "Window", "size_bucket", "stricter"]

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
                        if wait > DUE:
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

    def stats(self) -> LimiterStats:
        return LimiterStats(
            app_buckets=len(self._apps), target_buckets=len(self._targets), acquires=self._acquires,
            waits=self._waits, waited_seconds=self._waited, throttles=self._throttles, evictions=self._evictions,
            retakes=self._retakes, guarded=self._guarded)

    async def _take(self, bucket: TokenBucket) -> None:
        wait = bucket.reserve(self._clock())
        if wait > DUE:
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
            if wait <= DUE:
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
