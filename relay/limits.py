"""The async limiter: every Feishu call waits here before it goes, and is checked again right before it leaves.

It keys app-wide buckets by ``("app", app, api)``, for a store app's tenant ``("app", app, api, tenant)`` (Feishu
counts limits per API x app x tenant: each tenant of a store app has its own quota), and per-target buckets by
``("target", app, target)`` (the target resolved through what Feishu's answers taught, :mod:`relay.targets`) and
only sequences awaits around the pure arithmetic of :mod:`relay.buckets`, with the clock and sleep injected.

    acquire    wait for the target's token, then the API's: returns a :class:`Grant`, the leave to send one call
    admit      right before the request is written: the grant is still good (no throttle since), and the send
               logs have room; records the send
    answered   the call's answer came (or it was given up): its place in the send logs starts to expire
    throttled  Feishu said "too many": pause and slow that bucket, voiding every grant it handed out
    learn      a create/reply/forward answer named the chat: every name of that chat shares one bucket from now

A replica's ``share`` of the quota applies to app-wide buckets only: Feishu counts those over every replica of
the consumer group. It is fixed (``feishu.quota_share``) or follows the group (:meth:`Limiter.set_share`, fed by
:mod:`relay.coordination` with what :mod:`relay.shares` derives; a share too small to leave an API one call in a
window holds that API's calls until it grows). A target (a chat, a user, a message) is reached through one
ordering key, so one partition, so one replica: its bucket is sized for the whole per-target limit, and after a
rebalance a new target bucket starts one target window late (:meth:`Limiter.hold_targets`), after the previous
owner's last call. (Two *names* or two *keys* of one target may sit on two replicas; within one replica they
share, see :mod:`relay.targets`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec

from relay.buckets import DUE, BucketShape, SendLog, TokenBucket, Window, share_leaves_no_call, size_bucket, stricter
from relay.targets import Aliases

if TYPE_CHECKING:
    from relay.config import FeishuConfig

log = logging.getLogger(__name__)

__all__ = ["BucketShape", "Grant", "Limiter", "LimiterStats", "Requeue", "TokenBucket", "Window", "size_bucket",
           "stricter"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
BucketKey = tuple[str, ...]

# app-wide buckets alive at once, all apps together, before a new API is refused (config feishu.max_api_buckets)
MAX_API_BUCKETS: Final = 1024
# target names remembered as being one chat (config feishu.target_memory)
TARGET_MEMORY: Final = 100_000
# bucket shapes cached (a few per API; api.call rates are whatever producers give)
_MAX_SHAPES: Final = 4096


def _app_key(app: str, api: str, tenant: str | None) -> BucketKey:
    """An app-wide bucket's key: per (app, API), and per tenant for a store app's tenant (module doc)."""
    return ("app", app, api) if tenant is None else ("app", app, api, tenant)


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
    voided: int = 0  # grants a throttle voided before they were sent (queued again)
    aliases: int = 0  # target names known to be one chat
    forgotten_apis: int = 0  # idle, full app-wide buckets forgotten to make room


class _Entry:
    __slots__ = ("api", "bucket", "given", "lock", "log", "users", "windows")

    def __init__(self, bucket: TokenBucket, windows: tuple[Window, ...], log: SendLog, api: str = "") -> None:
        self.api = api  # app-wide buckets: the API (its share, set_shares); "" for a target's
        self.bucket = bucket
        self.log = log
        self.windows = windows  # the stricter of all windows its callers gave
        self.given = windows  # the last windows object a caller gave (a fast path: usually the same object)
        self.lock = asyncio.Lock()  # target buckets only: one caller of a target at a time (see acquire)
        self.users = 0  # callers waiting on it: never forgotten meanwhile


class Grant:
    """Leave to send one call, from :meth:`Limiter.acquire` until :meth:`Limiter.admit` lets it leave.

    It remembers the buckets it was granted by and their :attr:`TokenBucket.epoch`: a throttle on either voids it
    (the call queues again), and a throttle answered to a call sent under an older epoch is known to belong to a
    burst already paid for (see :meth:`Limiter.throttled`).
    """

    __slots__ = ("_app", "_app_epoch", "_sent", "_target", "_target_epoch", "api", "api_windows", "app", "learns",
                 "target", "target_windows", "tenant", "waited")

    def __init__(self, app: str, api: str, api_windows: tuple[Window, ...], target: str | None,
                 target_windows: tuple[Window, ...], learns: bool) -> None:
        self.app = app
        self.api = api
        self.api_windows = api_windows
        self.target = target
        self.target_windows = target_windows
        self.learns = learns
        self.waited = 0.0  # seconds acquire waited
        self.tenant: str | None = None  # a store app's tenant: its app-wide buckets are that tenant's
        self._app: _Entry | None = None
        self._app_epoch = 0
        self._target: _Entry | None = None
        self._target_epoch = 0
        self._sent: list[SendLog] = []  # the logs admit recorded this call in, until answered


class Requeue(Exception):
    """Raised by :meth:`Limiter.admit`: a throttle voided this grant; release the connection, ``await wait()``
    (the grant queues again), then call ``admit`` again."""

    def __init__(self, limiter: Limiter, grant: Grant) -> None:
        super().__init__("a throttle voided the grant: queue again")
        self._limiter = limiter
        self._grant = grant

    async def wait(self) -> None:
        await self._limiter._grant(self._grant)


class Limiter:
    """Every Feishu call waits here first: the app-wide bucket of its API and, if any, its target's bucket.

    Buckets are created on first use from the windows the caller passes (sized by :func:`size_bucket` with this
    limiter's jitter, utilization and time scale; app-wide buckets at this replica's ``share``, target buckets at
    the whole limit). Whenever callers of one bucket bring different windows, the bucket keeps the stricter of all
    it has seen (:func:`stricter`, per window length the smaller limit), whichever came first: under-use for the
    laxer caller is the price, over-use never happens. That holds for both kinds:

    - App-wide, keyed by the API name: an ``api.call`` to a built-in API carries that API's name
      (:mod:`relay.calls`), so it shares the built-in's bucket, and its ``rate`` can only tighten it.
      At most ``max_api_buckets`` live at once: past that, the least recently used *forgettable* one (idle, full,
      no send within its longest window: recreating it changes nothing but the windows it remembered) is
      forgotten to make room; they are forgotten only then, so the strictest rate of an API stays remembered as
      long as room allows. An API no bucket exists for is not :meth:`admissible` while the cap is full of
      buckets in use (so the memory stays bounded by ``max_api_buckets`` per configured app even then).
    - Per target, keyed by (app, target), not by API: Feishu's 5/s for a chat counts message create, reply and
      forward together (docs/feishu-rules.md §2.3), so the callers give every API that reaches the same recipient
      the same target string (see :mod:`relay.calls`), and the limiter resolves that string to the chat it is
      known to count in (:mod:`relay.targets`). A target's bucket is forgotten once it is idle and full, which is
      indistinguishable from keeping it, so memory follows the targets active in the last second or so.

    A throttle stops the bucket at once: nothing is sent on it before Feishu's reset, not by callers asleep on a
    reservation, nor by those already granted and waiting for a connection (:meth:`admit` finds their grant void);
    they all queue again at the slowed rate. Retries take tokens like first attempts (docs/feishu-rules.md §2.4).
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
        max_api_buckets: int = MAX_API_BUCKETS,
        target_memory: int = TARGET_MEMORY,
        dynamic: bool = False,
        tick: float = 0.0,
    ) -> None:
        """``default_pause`` (when Feishu gives no reset) and ``recovery`` are Feishu durations: divided by
        ``time_scale`` like the windows. ``dynamic``: the share follows the group (:meth:`set_share`,
        :mod:`relay.shares`) and starts at 0, so a call is admissible when the whole quota leaves it one."""
        if max_api_buckets < 1:
            raise ValueError(f"Limiter: max_api_buckets {max_api_buckets} must be >= 1")
        if tick < 0:
            raise ValueError(f"Limiter: tick {tick} must be >= 0")
        # not with shares that follow the group: they reshape the buckets every few beats, and a reshape makes
        # every queued call reserve again, so calls sleeping towards a tick were sent back to the queue before it
        # came (three replicas used 0.87 of the quota instead of 0.975, measured)
        self._tick = 0.0 if dynamic else tick
        self._jitter = jitter
        self._utilization = utilization
        self._dynamic = dynamic
        self._share = 0.0 if dynamic else share  # every API's, unless _api_shares names it
        self._api_shares: dict[str, float] = {}
        self._waiting_api: dict[str, int] = {}  # calls waiting for an API's app-wide token
        self._share_changed = asyncio.Event()
        self._reserved_sleeps: set[asyncio.Timeout] = set()  # calls sleeping towards a token (_sleep_reserved)
        self.on_throttle: Callable[[str, str, float | None], None] | None = None  # app-wide throttles (app, api, pause)
        self._waiting = 0  # acquires in progress (the demand a replica publishes)
        self._targets_held_until = -math.inf  # target buckets made before then start then (hold_targets)
        self._time_scale = time_scale
        # a target's windows -> (stricter windows, shape, send-log spans): targets always count whole (share 1)
        self._target_made: dict[tuple[Window, ...], tuple[tuple[Window, ...], BucketShape,
                                                          tuple[tuple[int, float], ...]]] = {}
        self._clock = clock
        self._sleep = sleep
        self._default_pause = default_pause / time_scale
        self._slow_factor = slow_factor
        self._recovery = recovery / time_scale
        self._max_api_buckets = max_api_buckets
        self._shapes: dict[tuple[tuple[Window, ...], float], BucketShape] = {}
        self._apps: OrderedDict[BucketKey, _Entry] = OrderedDict()  # least recently used first
        self._api_users: dict[str, int] = {}  # api -> how many apps have a bucket for it
        self._targets: OrderedDict[BucketKey, _Entry] = OrderedDict()  # least recently used first
        self._target_windows: dict[tuple[str, str], tuple[Window, ...]] = {}  # (app, api) -> its last windows
        self._aliases = Aliases(target_memory)
        self._acquires = 0
        self._waits = 0
        self._waited = 0.0
        self._throttles = 0
        self._evictions = 0
        self._retakes = 0
        self._guarded = 0  # sends the send log held back (after an event-loop stall)
        self._voided = 0
        self._forgotten = 0

    @classmethod
    def from_config(cls, feishu: FeishuConfig, *, clock: Clock, sleep: Sleep) -> Limiter:
        """A limiter with the ``[feishu]`` section's quota_share, limit_jitter, limit_utilization, time_scale,
        max_api_buckets, target_memory and grant_tick."""
        return cls(jitter=feishu.limit_jitter, utilization=feishu.limit_utilization, share=feishu.quota_share,
                   time_scale=feishu.time_scale, clock=clock, sleep=sleep, max_api_buckets=feishu.max_api_buckets,
                   target_memory=feishu.target_memory, dynamic=feishu.share_mode == "group",
                   tick=feishu.grant_tick)

    @property
    def share(self) -> float:
        return self._share

    @property
    def waiting(self) -> int:
        """Calls waiting in :meth:`acquire` now."""
        return self._waiting

    def share_of(self, api: str) -> float:
        """This replica's share of ``api``'s app-wide quota."""
        return self._api_shares.get(api, self._share)

    def waiting_by_api(self) -> dict[str, int]:
        """Calls waiting for each API's app-wide token now (their target's token, if any, already had)."""
        return {api: n for api, n in self._waiting_api.items() if n > 0}

    def set_shares(self, share: float, by_api: dict[str, float]) -> None:
        """Like :meth:`set_share`, with ``by_api`` overriding ``share`` for the APIs it names."""
        by_api = {api: min(1.0, max(0.0, s)) for api, s in by_api.items()}
        share = min(1.0, max(0.0, share))
        if share == self._share and by_api == self._api_shares:
            return
        self._share = share
        self._api_shares = by_api
        self._resize()

    def set_share(self, share: float) -> None:
        """This replica's share of every app-wide quota is now ``share`` (in [0, 1]; :mod:`relay.shares`).

        Every app-wide bucket and send log is resized at once: a smaller share lowers the rate, the burst (the
        tokens saved are cut to it) and the send log's limit on the sends already made, so it binds the very next
        send; a call granted before and not yet sent is held by that send log. While the share leaves an API no
        call in one of its windows, its calls wait (none is sent, none is refused). The caller grows a share only
        once the old shares can no longer overlap a window (:class:`relay.shares.ShareBook`).
        """
        share = min(1.0, max(0.0, share))
        if share == self._share and not self._api_shares:
            return
        self._share = share
        self._api_shares = {}
        self._resize()

    def _resize(self) -> None:
        now = self._clock()
        for entry in self._apps.values():
            share = self.share_of(entry.api)
            if share_leaves_no_call(entry.windows, share) is None:
                shape = self.shape(entry.windows, api=entry.api)
                if (shape.rate, shape.burst) != (entry.bucket.rate, entry.bucket.burst):
                    entry.bucket.reshape(shape.rate, shape.burst, now)  # the queued calls reserve again
            entry.log.spans = tuple(self._spans(entry.windows, target=False, api=entry.api))
            self._wake(entry.log)  # a grown share may have made room without an answer
        self._share_changed.set()
        self._share_changed = asyncio.Event()
        if self._reserved_sleeps:  # end those sleeps: the calls reserve again at the new rate
            sleeps, self._reserved_sleeps = self._reserved_sleeps, set()  # a timeout is rescheduled only once
            now = asyncio.get_running_loop().time()
            for sleep in sleeps:
                sleep.reschedule(now)

    def shape(self, windows: Sequence[Window], *, target: bool = False, api: str = "") -> BucketShape:
        """The bucket this limiter sizes for ``windows``: app-wide at ``api``'s share, a ``target``'s at the
        whole."""
        share = 1.0 if target else self.share_of(api)
        if share_leaves_no_call(windows, share) is not None and self._dynamic:
            share = 1.0  # its calls wait for a larger share (set_share); the bucket is resized then
        key = (tuple(windows), share)
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= _MAX_SHAPES:  # api.call rates are the producers': keep the cache bounded
                self._shapes.clear()
            shape = self._shapes[key] = size_bucket(
                key[0], jitter=self._jitter, utilization=self._utilization, share=share,
                time_scale=self._time_scale)
        return shape

    def admissible(self, api: str, api_windows: Sequence[Window], target_windows: Sequence[Window] = ()) -> str | None:
        """Why a call with these windows can never be admitted here (one line), or None when it can.

        A call is not admissible when it has no app-wide window, when this replica's share of one of its
        app-wide windows leaves no call (``floor(limit * share) == 0``): :meth:`acquire` raises ValueError for
        such a call, so check first; or when ``api`` has no bucket yet and ``max_api_buckets`` buckets are in use
        (none idle and full), which only a producer naming ids in api.call path templates reaches.
        """
        if not api_windows:
            return f"{api} has no rate limit window"
        window = share_leaves_no_call(api_windows, 1.0 if self._dynamic else self._share)
        if window is not None:
            return (f"{api}: quota_share {self._share:g} of {window.limit} calls per {window.seconds:g} s leaves "
                    f"no call at this replica (needs a share of at least {1 / window.limit:.3g})")
        for shape_windows, target in ((api_windows, False), (target_windows, True)):
            if shape_windows:
                try:
                    self.shape(shape_windows, target=target)
                except ValueError as err:
                    return f"{api}: {err}"
        if api not in self._api_users and not self._make_room():
            return (f"{api}: {len(self._apps)} app-wide buckets in use, the most feishu.max_api_buckets allows "
                    f"(an api.call path with ids in it instead of :params makes one per id)")
        return None

    def bucket(self, key: BucketKey) -> TokenBucket | None:
        """The live bucket under ``key`` (``("app", app, api)`` or ``("target", app, target)``), if any; a target
        is resolved to the chat it is known to count in."""
        if key[0] == "target":
            key = ("target", key[1], self._aliases.resolve(key[1], key[2]))
        entry = self._apps.get(key) or self._targets.get(key)
        return entry.bucket if entry else None

    def resolve(self, app: str, target: str) -> str:
        """The key ``target`` is counted under (its chat once an answer named it; see :mod:`relay.targets`)."""
        return self._aliases.resolve(app, target)

    async def acquire(
        self,
        app: str,
        api: str,
        api_windows: Sequence[Window],
        target: str | None = None,
        target_windows: Sequence[Window] = (),
        *,
        learns: bool = False,
        tenant: str | None = None,
    ) -> Grant:
        """Wait until a call of ``api`` by ``app`` (to ``target``, if given) may go; the grant says how long.

        The target comes first: a caller waits for its target's token *before* it reserves an app-wide token, so a
        key held back by its own chat does not burn app quota meanwhile; unless no app-wide token is free before
        the target's anyway (the app's queue is longer), when it reserves at once and sleeps once. The target's
        token is then taken when the call actually goes, after the app wait: a token taken earlier and spent after
        a long app-wide queue would let a chat's calls bunch up (several target tokens taken 0.29 s apart, all
        sent together when the app queue drains). One caller per target holds the target's lock through both
        waits, so the token it waited for is still there; only a penalty arriving meanwhile, or the target turning
        out to be another name of a chat, sends it round again, and the app token it took is then lost (under-use,
        never over-use). A reservation a penalty voided while its caller slept on it is made again, behind the
        pause.

        ``learns``: the call's answer names the chat of its target (:meth:`learn`). Raises ValueError for windows
        no bucket can keep (see :meth:`admissible`). Cancellation is safe at every await: a reservation already
        made is simply not used.
        """
        start = self._clock()
        if target is not None and not target_windows:
            raise ValueError(f"acquire: target {target!r} of {api} needs its windows")
        grant = Grant(app, api, tuple(api_windows), target, tuple(target_windows), learns)
        grant.tenant = tenant
        self._waiting += 1
        try:
            await self._grant(grant)
        finally:
            self._waiting -= 1
        grant.waited = waited = self._clock() - start
        self._acquires += 1
        if waited > 0:
            self._waits += 1
            self._waited += waited
        return grant

    async def admit(self, grant: Grant) -> None:
        """Right before the request leaves (after :meth:`acquire` and after a pooled connection is held).

        Raises :class:`Requeue` when a throttle voided the grant since it was made (see :meth:`_live`): the
        caller releases its connection, awaits :meth:`Requeue.wait` (the call queues again, as :meth:`acquire`
        would) and calls ``admit`` again. Waiting for a token while holding a
        connection would keep the connections from the calls granted meanwhile, which then could not go: the
        connections all held by calls queued for late tokens, the calls holding early tokens waiting for a
        connection. Otherwise wait until sending now keeps the app's and the target's windows (a short wait,
        only after a stall or with a window's whole limit in flight), and record the send until :meth:`answered`.
        See :class:`SendLog`.

        Callers held back by one send log queue on it, first come first served, and only the first of them (its
        head) looks at the windows: it sleeps until the room it waits for comes, or until an answer comes when
        the windows are full of calls in flight; once it goes (or goes another way: another log holds it, its
        grant is void, it is cancelled) the next one becomes the head. Every caller looking again on every
        answer found the room taken and waited again: about five wake-ups per call while 48 calls were in
        flight in the engine benchmark, and with many answers together each waiter slept towards the same
        instant, once per answer.
        """
        heads: SendLog | None = None  # the log this caller is the head of
        try:
            while True:
                live = self._live(grant)
                share = self.share_of(grant.api)  # a whole share (one replica) always leaves a call
                if live is None or (share < 1.0 and share_leaves_no_call(live[0].windows, share) is not None):
                    self._voided += 1
                    raise Requeue(self, grant)
                app_log = live[0].log
                target_log = live[1].log if live[1] is not None else None
                now = self._clock()
                wait, full = app_log.delay(now), app_log
                if target_log is not None and (target_wait := target_log.delay(now)) > wait:
                    wait, full = target_wait, target_log
                if wait <= DUE:
                    app_log.record()
                    grant._sent.append(app_log)
                    if target_log is not None:
                        target_log.record()
                        grant._sent.append(target_log)
                    return
                self._guarded += 1
                full = full.root
                if heads is not full:
                    if heads is not None:
                        self._leave(heads)
                        heads = None
                    if full.head or full.waiters:  # the callers before this one go first
                        await self._queue(full)
                        heads = full
                        continue
                    full.head, heads = True, full
                if math.isinf(wait):  # the windows are full of calls in flight: only an answer makes room
                    await self._await_answer(full)
                else:
                    await self._sleep(wait)
        finally:
            if heads is not None:
                self._leave(heads)

    @staticmethod
    async def _queue(log: SendLog) -> None:
        """Wait behind ``log``'s head until this caller is made the head."""
        made: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        log.waiters.append(made)
        try:
            await made
        except asyncio.CancelledError:
            if made.done() and not made.cancelled():  # made the head, then cancelled before it ran
                log.head = False
                Limiter._promote(log)
            else:
                with contextlib.suppress(ValueError):
                    log.waiters.remove(made)
            raise

    @staticmethod
    async def _await_answer(log: SendLog) -> None:
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        log.answer = answer
        try:
            await answer
        finally:
            if log.answer is answer:
                log.answer = None

    def _leave(self, log: SendLog) -> None:
        """The head of ``log`` goes; the next one heads it now, unless only an answer can make room (then the
        answer makes it the head)."""
        log.head = False
        if log.waiters and not math.isinf(log.delay(self._clock())):
            self._promote(log)

    @staticmethod
    def _promote(log: SendLog) -> None:
        """Make the first caller still queued on ``log`` its head, if any."""
        while log.waiters:
            made = log.waiters.popleft()
            if not made.done():
                made.set_result(None)
                log.head = True
                return

    @staticmethod
    def _wake(log: SendLog) -> None:
        """Room came to ``log`` (an answer, a larger share): its head looks again, or the next becomes it."""
        if log.answer is not None:
            if not log.answer.done():
                log.answer.set_result(None)
        elif not log.head:
            Limiter._promote(log)

    def answered(self, grant: Grant) -> None:
        """The call :meth:`admit` let go was answered, failed, or was given up: from now its place in the send
        logs expires with the windows (see :class:`~relay.buckets.SendLog`). Call it once per attempt, also when
        the attempt was cancelled; a grant never admitted is a no-op."""
        if not grant._sent:
            return
        now = self._clock()
        for log in grant._sent:
            log.release(now)
            self._wake(log.root)
        grant._sent.clear()

    def throttled(self, app: str, api: str, target: str | None = None, retry_after: float | None = None, *,
                  grant: Grant | None = None, tenant: str | None = None, remote: bool = False) -> None:
        """Feishu throttled a call: pause and slow the bucket it counts against.

        Give ``target`` for a per-target refusal (230020: that chat or user is over 5/s, perhaps because other
        bots share it), none for an app-wide one (HTTP 429 / 99991400). The target's bucket is the one every name
        and API reaching that target shares. Nothing is due for ``retry_after`` seconds (Feishu's
        ``x-ogw-ratelimit-reset``; a default pause without one), every grant handed out before is void, then the
        bucket's rate recovers gradually. With the call's ``grant``: when the bucket was penalized after that
        call was sent, its answer belongs to the burst already paid for (it left before the first answer was
        read), so the pause may grow but the rate is not cut again; without it every answer cuts the rate.

        An app-wide throttle is also told to :attr:`on_throttle` (the other replicas share the quota: they pause
        and slow too); ``remote``: it is one another replica was told, applied here, not told again nor counted.
        """
        now = self._clock()
        pause = self._default_pause if retry_after is None else retry_after
        if not remote:
            self._throttles += 1
            if target is None and self.on_throttle is not None:
                self.on_throttle(app, api, retry_after)
        entry: _Entry | None
        sent_epoch: int | None = None
        if target is not None:
            key: BucketKey = ("target", app, self._aliases.resolve(app, target))
            windows = self._target_windows.get((app, api))
            entry = self._targets.get(key) or (self._target_entry(key, windows) if windows else None)
            if grant is not None and grant._target is entry:
                sent_epoch = grant._target_epoch
        else:
            entry = self._apps.get(_app_key(app, api, tenant))
            if grant is not None and grant._app is entry:
                sent_epoch = grant._app_epoch
        if entry is None:
            if not remote:  # another replica's throttle of an API this one never called: nothing to slow
                log.warning("throttled %s %s target=%s but no bucket was ever used for it", app, api, target)
            return
        again = sent_epoch is not None and sent_epoch != entry.bucket.epoch
        entry.bucket.penalize(now, pause, slow_factor=1.0 if again else self._slow_factor, recovery=self._recovery)

    def learn(self, grant: Grant, data: Any) -> None:
        """Feishu answered a granted call with ``data``: if it names the chat of the call's target (a create,
        reply or forward: ``grant.learns``), every name of that chat counts in one bucket from now on; buckets
        the names had are merged into the chat's (their tokens used and their sends both count there)."""
        if not grant.learns:
            return
        learnt = self._aliases.learn(grant.app, grant.target, data)
        if learnt is None:
            return
        chat, names = learnt
        for name in names:
            self._merge(("target", grant.app, name), ("target", grant.app, chat))

    def stats(self) -> LimiterStats:
        return LimiterStats(
            app_buckets=len(self._apps), target_buckets=len(self._targets), acquires=self._acquires,
            waits=self._waits, waited_seconds=self._waited, throttles=self._throttles, evictions=self._evictions,
            retakes=self._retakes, guarded=self._guarded, voided=self._voided, aliases=len(self._aliases),
            forgotten_apis=self._forgotten)

    # --- granting -----------------------------------------------------------------------------------------

    async def _grant(self, grant: Grant) -> None:
        """Wait for the target's token (if any) and the API's; store in ``grant`` the buckets that gave them."""
        app, target = grant.app, grant.target
        app_entry = self._app_entry(app, grant.api, grant.api_windows, grant.tenant)
        if target is None:
            app_entry.users += 1
            try:
                await self._take(app_entry.bucket, app_entry.windows, grant.api)
            finally:
                app_entry.users -= 1
            grant._app, grant._app_epoch = app_entry, app_entry.bucket.epoch
            grant._target = None
            return
        self._target_windows[(app, grant.api)] = grant.target_windows
        while True:
            key: BucketKey = ("target", app, self._aliases.resolve(app, target))
            entry = self._target_entry(key, grant.target_windows)
            entry.users += 1
            app_entry.users += 1
            try:
                async with entry.lock:
                    while self._current(app, target, key, entry):
                        now = self._clock()
                        wait = entry.bucket.delay(now)
                        # no app-wide token is free before the target's: reserving one now burns nothing, and
                        # the call sleeps once instead of twice (a chat's next call, behind a queue of others)
                        if wait > DUE and wait > app_entry.bucket.delay(now):
                            await self._sleep(wait)
                            continue  # look again: a penalty or a merge may have come meanwhile
                        await self._take(app_entry.bucket, app_entry.windows, grant.api)
                        if self._current(app, target, key, entry) and entry.bucket.take(self._clock()):
                            grant._app, grant._app_epoch = app_entry, app_entry.bucket.epoch
                            grant._target, grant._target_epoch = entry, entry.bucket.epoch
                            return
                        self._retakes += 1
            finally:
                entry.users -= 1
                app_entry.users -= 1

    async def _take(self, bucket: TokenBucket, windows: tuple[Window, ...], api: str) -> None:
        """Reserve an app-wide token and sleep until it is due; again if a penalty voided it meanwhile. First
        wait while this replica's share of ``api`` leaves its ``windows`` no call."""
        self._waiting_api[api] = self._waiting_api.get(api, 0) + 1
        try:
            await self._take_app(bucket, windows, api)
        finally:
            self._waiting_api[api] -= 1
            if not self._waiting_api[api]:
                del self._waiting_api[api]

    async def _take_app(self, bucket: TokenBucket, windows: tuple[Window, ...], api: str) -> None:
        """A reservation is made at the bucket's rate of the moment: when the share changes meanwhile its
        sleeper wakes, gives the token back and reserves again at the new rate (a grown share is used at once by
        the calls already queued, a shrunk one binds them at once)."""
        while True:
            while share_leaves_no_call(windows, self.share_of(api)) is not None:
                await self._share_changed.wait()
            epoch, shapes = bucket.epoch, bucket.reshapes
            now = self._clock()
            due = self._on_tick(now, now + bucket.reserve(now))
            try:
                while (wait := due - self._clock()) > DUE and bucket.reshapes == shapes:
                    await self._sleep_reserved(wait)
            except asyncio.CancelledError:
                if bucket.epoch == epoch and bucket.reshapes == shapes:  # the callers behind must not wait for it
                    bucket.refund(self._clock())
                raise
            if bucket.reshapes != shapes:
                continue  # resized while waiting: its debt was forgiven, reserve again at the new rate
            if bucket.epoch == epoch:
                return
            self._retakes += 1

    def _on_tick(self, now: float, due: float) -> float:
        """When a call that must wait for its app-wide token goes: at the first multiple of ``tick`` at or after
        ``due`` (a call due now goes now). Waiting calls then wake together, a few per tick instead of one timer
        each: on a VM every wake-up of the process costs some hundred microseconds of CPU, and calls that leave
        together share their writes (HTTP, the result batch). Later than due is always within the limits (the
        send-time guard checks again); it costs a waiting call up to ``tick`` of latency."""
        if self._tick <= 0 or due - now <= DUE:
            return due
        return math.ceil(due / self._tick) * self._tick

    async def _sleep_reserved(self, seconds: float) -> None:
        """Sleep ``seconds`` towards a reserved token, or until the shares change (:meth:`_resize` ends the sleep
        through its timeout). One timer in the caller's own task: a sleep racing an event would cost two tasks, a
        wait and a gather per call (some ten event-loop callbacks, measured)."""
        try:
            async with asyncio.timeout(None) as sleep:
                self._reserved_sleeps.add(sleep)
                try:
                    await self._sleep(seconds)
                finally:
                    self._reserved_sleeps.discard(sleep)
        except TimeoutError:
            pass  # the shares changed: the caller looks at its bucket again

    def _current(self, app: str, target: str, key: BucketKey, entry: _Entry) -> bool:
        """``entry`` is still the bucket ``target`` counts in (not merged into another name's, not forgotten)."""
        return self._aliases.resolve(app, target) == key[2] and self._targets.get(key) is entry

    def _live(self, grant: Grant) -> tuple[_Entry, _Entry | None] | None:
        """The buckets a granted call counts in as it leaves, or None when a throttle voided the grant.

        Usually the ones that granted it, unpenalized since. A target bucket forgotten meanwhile (idle and full: a
        call waited for a connection, or its window is short) is taken back if no other took its place. An
        app-wide bucket forgotten and made again, or a target merged into its chat's bucket (which took over its
        use and sends) leaves the grant good, and the send counts in the live bucket instead, unless that one was
        ever penalized (the grant cannot tell whether before or after it): then it queues again there, once.
        """
        assert grant._app is not None
        app = self._app_entry(grant.app, grant.api, grant.api_windows, grant.tenant)
        if app.bucket.epoch != (grant._app_epoch if app is grant._app else 0):
            return None
        if grant.target is None:
            return app, None
        key: BucketKey = ("target", grant.app, self._aliases.resolve(grant.app, grant.target))
        target = self._targets.get(key)
        if target is not None and (grant.target_windows is target.given or grant.target_windows is target.windows):
            self._targets.move_to_end(key)
        else:
            if target is None and (kept := grant._target) is not None and kept.log.root is kept.log:
                # forgotten since it granted this call (idle and full, as a fresh one would be): that bucket
                # again, not a new one made (and forgotten again) on every look
                self._targets[key] = kept
            target = self._target_entry(key, grant.target_windows)
        if target.bucket.epoch != (grant._target_epoch if target is grant._target else 0):
            return None
        return app, target

    # --- buckets ------------------------------------------------------------------------------------------

    def _app_entry(self, app: str, api: str, windows: tuple[Window, ...], tenant: str | None = None) -> _Entry:
        key = _app_key(app, api, tenant)
        entry = self._apps.get(key)
        if entry is None:
            self._make_room()  # never refuses here: a call already admitted is not stopped
            entry = self._apps[key] = self._new_entry(windows, target=False, api=api)
            self._api_users[api] = self._api_users.get(api, 0) + 1
        else:
            self._apps.move_to_end(key)
            if windows is not entry.given and windows is not entry.windows:
                self._tighten(entry, windows, target=False)
        return entry

    def _make_room(self) -> bool:
        """Forget least recently used forgettable app-wide buckets until one more fits; False if none could go."""
        if len(self._apps) < self._max_api_buckets:
            return True
        now = self._clock()
        for key, entry in list(self._apps.items()):
            if entry.users == 0 and entry.bucket.is_full(now) and entry.log.idle(now):
                del self._apps[key]
                api = key[2]
                left = self._api_users[api] - 1
                if left:
                    self._api_users[api] = left
                else:
                    del self._api_users[api]
                self._forgotten += 1
                if len(self._apps) < self._max_api_buckets:
                    return True
        return False

    def hold_targets(self, seconds: float) -> None:
        """Partitions were just assigned: a target bucket made within ``seconds`` from now starts then.

        A target reached through one ordering key is called by the replica owning its partition only, and the
        previous owner made its last call before this assignment (it drained before rejoining, or it was out of
        the group and its membership lease had stopped its calls first). A fresh bucket would admit a call at
        once, in the same second as the previous owner's last ones; held for one target window (plus the jitter
        margin) it cannot. Buckets that exist already counted this replica's own calls and are left alone.
        """
        self._targets_held_until = max(self._targets_held_until, self._clock() + seconds)

    def _target_entry(self, key: BucketKey, windows: tuple[Window, ...]) -> _Entry:
        entry = self._targets.get(key)
        if entry is None:
            entry = self._targets[key] = self._new_entry(windows, target=True, start=self._targets_held_until)
            self._evict(self._clock(), 2)  # only a new bucket adds to the memory (see _evict)
        else:
            self._targets.move_to_end(key)
            if windows is not entry.given and windows is not entry.windows:
                self._tighten(entry, windows, target=True)
        return entry

    def _tighten(self, entry: _Entry, windows: tuple[Window, ...], *, target: bool) -> None:
        """Another caller of the same bucket with other windows: keep the stricter of both."""
        if windows == entry.given or windows == entry.windows:
            entry.given = windows
            return
        entry.given = windows
        merged = stricter(entry.windows, windows)
        if merged != entry.windows:
            shape = self.shape(merged, target=target, api=entry.api)
            entry.bucket.set_shape(shape.rate, shape.burst, self._clock())
            entry.windows = merged
            entry.log.spans = tuple(self._spans(merged, target=target, api=entry.api))

    def _merge(self, name: BucketKey, chat: BucketKey) -> None:
        """``name`` turned out to count in ``chat``: its bucket becomes the chat's, or is merged into it."""
        old = self._targets.pop(name, None)
        if old is None:
            return
        entry = self._targets.get(chat)
        if entry is None:
            self._targets[chat] = old
            return
        entry.bucket.absorb(old.bucket, self._clock())
        entry.log.merge(old.log)
        self._wake_all(old.log)  # they look again: their calls count in the chat's log from now

        if old.windows != entry.windows:
            self._tighten(entry, old.windows, target=True)

    @staticmethod
    def _wake_all(log: SendLog) -> None:
        """Every caller queued on or heading ``log`` looks again (its calls now count in another log)."""
        waiters, log.waiters = log.waiters, deque()
        log.head = False
        if log.answer is not None and not log.answer.done():
            log.answer.set_result(None)
        for made in waiters:
            if not made.done():
                made.set_result(None)

    def _new_entry(self, given: tuple[Window, ...], *, target: bool, start: float = -math.inf,
                   api: str = "") -> _Entry:
        if target:  # a fan-out makes one per chat: what depends only on the windows is made once per windows
            made = self._target_made.get(given)
            if made is None:
                if len(self._target_made) >= _MAX_SHAPES:
                    self._target_made.clear()
                windows = stricter(given)
                made = self._target_made[given] = (
                    windows, self.shape(windows, target=True), tuple(self._spans(windows, target=True)))
            windows, shape, spans = made
        else:
            windows = stricter(given)
            shape = self.shape(windows, target=False, api=api)
            spans = tuple(self._spans(windows, target=False, api=api))
        entry = _Entry(TokenBucket(shape.rate, shape.burst, max(self._clock(), start)), windows, SendLog(spans), api)
        entry.given = given  # the caller's own object: the next call with it takes the fast path
        return entry

    def _spans(self, windows: Sequence[Window], *, target: bool, api: str = "") -> list[tuple[int, float]]:
        """The send log's (limit, span) per window: this replica's share of the limit (app-wide windows only),
        over the scaled window plus the jitter margin, like the bucket's sizing."""
        share = 1.0 if target else self.share_of(api)
        return [(max(1, math.floor(w.limit * share)), w.seconds / self._time_scale + self._jitter) for w in windows]

    def _evict(self, now: float, budget: int) -> None:
        """Look at the ``budget`` least recently used targets: forget the idle full ones, requeue the rest.

        Each new target looks at two, so idle targets go at least as fast as new ones come (a call to a known
        target adds nothing and looks at none); a busy or penalized one moves to the back instead of blocking the
        scan.
        """
        for _ in range(min(budget, len(self._targets) - 1)):
            key, entry = next(iter(self._targets.items()))
            if entry.users == 0 and entry.bucket.is_full(now) and entry.log.idle(now):
                del self._targets[key]
                self._evictions += 1
            else:
                self._targets.move_to_end(key)
