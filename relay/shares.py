"""Each replica's share of an app's quota, derived the same way by every replica from one coordination log.

Pure: no I/O, the clock injected. The Kafka shell that feeds it (and publishes this replica's beats) is
:mod:`relay.coordination`; the limiter applies the share (:meth:`relay.limits.Limiter.set_share`).

Feishu counts an app's calls per API over every replica. Each replica publishes a *beat* every
``beat_interval`` to a single-partition compacted topic (key: its member id): how many intent partitions it owns,
how many calls waited for each API's app-wide token (its *demand*: the peak over the last horizon, so that it
falls only after a horizon without), and its *view* (the offset of the last
coordination record it had applied when it wrote the beat). Each API's quota is split on its own (a replica
whose queue is all sends must not hold the reactions' quota). Every replica reads every record in log order, so
every replica knows, for every prefix (a *view* ``v``) of the log, the same set of beats.

**The split at a view** (:func:`split`, one per API) is a function of the latest beat of each *live* member in
that view (a beat stamped by the broker at most ``member_ttl`` before the view's newest record, not a "left" one):
``floor`` of the quota is shared in proportion to owned partitions (the minimum: an owner of partitions can start
at once when work arrives), the rest in proportion to demand, rounded to a power of two and capped (:func:`weight`:
a split that wobbles wastes quota, see below), in proportion to partitions when nobody waits. The
shares of one view sum to at most 1. A replica's *target* ``t(v)`` is its part of the split at ``v`` (0 if it is
not live in ``v``).

**The share a replica uses** at instant ``s`` is ``e(s) = min { t(v) : lo(s) <= v <= cur(s) }`` where ``cur`` is
the view it has read and ``lo(s)`` is ``L(r)`` for the latest read instant ``r <= s - H``, with
``L(r) = min(cur(r), view of every other member live in cur(r))`` and ``H`` the horizon (the longest Feishu
window, scaled, plus the jitter margin: no call older than ``H`` counts in any window with a call now). So a
share that shrinks takes effect the moment the view that shrinks it is read; one that grows only once every live
member has acknowledged (in a beat) a view where it has grown, and ``H`` has passed since that acknowledgement
was read: the others' old, larger shares can no longer overlap a window with the new one.

**Safety: the replicas' calls in any Feishu window stay within the limit, also while shares change.** A token
bucket (and the send log) whose shape changes within a window admits in it at most what the largest shape it had
in that window admits, so it suffices that ``sum_i max_{s in [t-H, t]} e_i(s) <= 1`` for every ``t``. Let
``v* = min_j cur_j(t - H)`` over the replicas sending in the window. For every sender ``i`` and ``s`` in the
window: ``v* <= cur_i(s)`` (views only grow); and ``lo_i(s) = L_i(r) <= v*`` with ``r <= t - H``, because for each
``j`` either ``j`` was live in ``i``'s view at ``r`` and ``L_i(r) <= view_j <= cur_j(t - H)`` (``j`` wrote that
beat before ``r``), or it was not: a member whose first beat ``i`` had not read yet sends only under views that
hold its own beat (``t_j = 0`` before), so ``cur_j(t-H)`` is past ``cur_i(r) >= L_i(r)``; a member that left
wrote its "left" beat after its last call, before ``r``; an expired member fenced itself (below) at least ``H``
before ``i`` saw it expire. So ``v*`` lies in every sender's range, ``e_i(s) <= t_i(v*)`` and the sum is at most
``sum_i t_i(v*) <= 1``.

**Fencing.** A replica whose own beats stop coming back (the broker is away, the process froze) would be
declared dead by the others ``member_ttl`` after its last beat, and its share handed out: so it uses share 0 from
``member_ttl - H - margin`` after writing the last beat it read back, by its own monotonic clock
(:meth:`ShareBook.share`); ``margin`` covers the broker clock's skew against the writer's. A dead replica's share
returns to the others within ``member_ttl + H`` (plus a beat) of its last beat.

**Start.** A replica that has not read the log for ``H`` yet has no ``lo``: share 0, unless every other member in
the log is quiet (left or expired), when nothing it could overlap exists and it starts at its target at once.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

import msgspec


class Throttle(msgspec.Struct, frozen=True):
    """Feishu throttled ``app``'s ``api`` app-wide on one replica: nothing for ``pause`` seconds, then slower."""

    app: str
    api: str
    pause: float | None = None


class Beat(msgspec.Struct, frozen=True):
    """The value of a coordination record (key: the member id). Lenient: a newer relay's fields are ignored."""

    partitions: int = 0  # intent partitions this member owns
    demand: int = 0  # records it has not finished (lag on its partitions plus in flight): for metrics and logs
    apis: dict[str, int] = msgspec.field(default_factory=dict)  # calls waiting for each API's app-wide token
    view: int = -1  # the last coordination offset it had applied when it wrote this beat
    left: bool = False  # it stopped: no call of it follows this beat
    n: int = 0  # the writer's count of its beats (it recognises its own when they come back)
    throttles: list[Throttle] = msgspec.field(default_factory=list)


encode_beat = msgspec.json.Encoder().encode
decode_beat = msgspec.json.Decoder(Beat).decode


def weight(demand: int) -> int:
    """The weight of a member's demand: the power of two at or below it, at most :data:`SATURATED`.

    A share that changes costs quota (a growth waits a horizon; a shrink is at once), so the split must not
    follow every wobble of a queue: rounded down to a power of two, a weight changes only when the queue halves
    or doubles. Past :data:`SATURATED` calls waiting for an API's token a member is as hungry as can be, so a
    group under a backlog splits evenly and stays put.

    The count of calls waiting is not the backlog: a key's calls go one at a time, so at most one call per key
    in the in-flight window waits, and a hot key whose records fill a partition's window
    (``outbound.max_in_flight_per_partition``) makes a deep backlog look like a few dozen calls. A few calls
    queued at once for the app-wide token already mean the member's share binds, so the cap is low: above it, a
    member's weight would follow how its keys happen to be spread, not whether it could use more.
    """
    if demand <= 0:
        return 0
    return min(SATURATED, 1 << (demand.bit_length() - 1))


# calls waiting for an API's token past which a member counts as saturated (see weight)
SATURATED: Final = 8


def split(beats: Mapping[str, Beat], floor: float, api: str = "") -> dict[str, float]:
    """The share of ``api``'s quota of each member in ``beats`` (the live ones): ``floor`` by partitions, the
    rest by the calls waiting for its token (:func:`weight`). An API no member waits for (``""``: any such API)
    is split by partitions alone.

    Deterministic in its input (every replica computes the same), each share in [0, 1], their sum at most 1.
    """
    if not beats:
        return {}
    members = sorted(beats)
    partitions = {m: max(0, beats[m].partitions) for m in members}
    demand = {m: weight(beats[m].apis.get(api, 0)) for m in members}
    total_p = sum(partitions.values())
    total_d = sum(demand.values())

    def by(weights: dict[str, int], total: int) -> dict[str, float]:
        if total <= 0:
            return {m: 1.0 / len(members) for m in members}
        return {m: weights[m] / total for m in members}

    minimum = by(partitions, total_p)
    rest = by(demand, total_d) if total_d > 0 else minimum
    shares = {m: floor * minimum[m] + (1.0 - floor) * rest[m] for m in members}
    total = math.fsum(shares.values())
    scale = min(1.0, 1.0 / total) * (1.0 - 1e-9) if total > 0 else 0.0  # float sums never exceed 1
    return {m: s * scale for m, s in shares.items()}


class ShareBook:
    """One replica's reading of the coordination log and the share it may use now (module doc).

    Feed it every record in log order (:meth:`read`) and :meth:`wrote` for each own beat written; ask
    :meth:`share` at any time (it grows with time alone, as ``lo`` catches up). Times: ``clock`` is this
    replica's monotonic clock; ``at`` of a record is the broker's stamp (seconds), compared only with other
    broker stamps.
    """

    def __init__(self, me: str, *, horizon: float, member_ttl: float, floor: float, margin: float,
                 clock: Callable[[], float]) -> None:
        if member_ttl <= horizon + margin:
            raise ValueError(f"member_ttl {member_ttl:g}s must exceed the horizon {horizon:g}s plus the margin "
                             f"{margin:g}s (a replica fences itself member_ttl - horizon - margin after its beat)")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor {floor} must be in [0, 1]")
        self.me = me
        self.horizon = horizon
        self.member_ttl = member_ttl
        self.floor = floor
        self.margin = margin
        self._clock = clock
        self._beats: dict[str, tuple[Beat, float, int]] = {}  # member -> (latest beat, broker time, offset)
        self._view = -1
        self._view_time = -math.inf
        # per API ("": every API no member waits for): (view, my target from it on), views ascending
        self._targets: dict[str, deque[tuple[int, float]]] = {"": deque()}
        self._lows: deque[tuple[float, int]] = deque()  # (read instant, L then), instants ascending
        self._written: dict[int, float] = {}  # own beat number -> when written (monotonic)
        self._fence_from = -math.inf  # when my last read-back beat was written
        self.split: dict[str, float] = {}  # the split at the current view of an API nobody waits for

    @property
    def view(self) -> int:
        """The last offset read: the ``view`` of the next beat."""
        return self._view

    def wrote(self, number: int) -> None:
        """Own beat ``number`` (:attr:`Beat.n`) is being written now: its return (:meth:`read`) renews the fence."""
        self._written[number] = self._clock()

    def read(self, offset: int, at: float, member: str, beat: Beat | None) -> None:
        """The record at ``offset`` (broker time ``at``) from ``member``: its beat, or None for a tombstone
        (the member is gone, like a "left" beat)."""
        now = self._clock()
        if offset <= self._view:
            return  # read twice (a re-seek): already applied
        self._view = offset
        self._view_time = max(self._view_time, at)
        if beat is None:
            self._beats.pop(member, None)
        else:
            self._beats[member] = (beat, at, offset)
        first = False
        if member == self.me and beat is not None:
            written = self._written.pop(beat.n, None)
            if written is not None:
                first = self._fence_from == -math.inf
                self._fence_from = max(self._fence_from, written)
                for n in [n for n in self._written if n < beat.n]:
                    del self._written[n]
        live = self.live()
        self.split = split(live, self.floor)
        default = self._targets[""]
        for api in {a for b in live.values() for a in b.apis}:
            if api not in self._targets:  # unnamed until now: its targets were the default's
                self._targets[api] = deque(default)
        for api, targets in self._targets.items():
            target = (self.split if not api else split(live, self.floor, api)).get(self.me, 0.0)
            if not targets or targets[-1][1] != target:
                targets.append((offset, target))
        if first and all(self._quiet(m) for m in self._beats if m != self.me):
            self._lows.clear()  # nothing in the log could overlap us: start at once (module doc)
            self._lows.append((-math.inf, offset))
        others = [b.view for m, b in live.items() if m != self.me]
        self._lows.append((now, min([offset, *others])))

    def live(self) -> dict[str, Beat]:
        """The members live in the current view, with their latest beats."""
        return {m: b for m, (b, at, _) in self._beats.items()
                if not b.left and at >= self._view_time - self.member_ttl}

    def _quiet(self, member: str) -> bool:
        beat, at, _ = self._beats[member]
        return beat.left or at < self._view_time - self.member_ttl

    def lo(self) -> int | None:
        """The lowest view whose target still binds (None: not read for a horizon yet)."""
        cutoff = self._clock() - self.horizon
        while len(self._lows) > 1 and self._lows[1][0] <= cutoff:
            self._lows.popleft()
        if not self._lows or self._lows[0][0] > cutoff:
            return None
        return self._lows[0][1]

    def target(self, api: str = "") -> float:
        """This replica's part of the split of ``api`` at the current view."""
        targets = self._targets.get(api) or self._targets[""]
        return targets[-1][1] if targets else 0.0

    def share(self, api: str = "") -> float:
        """The share of ``api`` this replica may use now: the least target over ``[lo, view]``; 0 before a
        horizon of reading, and once fenced (its own beats not read back for ``member_ttl - horizon - margin``).
        """
        return self.shares().get(api, self.shares()[""]) if api else self.shares()[""]

    def shares(self) -> dict[str, float]:
        """:meth:`share` of every API named in a beat, and of the others under ``""``."""
        now = self._clock()
        lo = self.lo()
        fenced = now >= self._fence_from + self.member_ttl - self.horizon - self.margin
        out: dict[str, float] = {}
        for api, targets in self._targets.items():
            if fenced or lo is None:
                out[api] = 0.0
                continue
            while len(targets) > 1 and targets[1][0] <= lo:
                targets.popleft()  # the entry in effect at lo is kept; older ones can bind nobody any more
            out[api] = min((t for _, t in targets), default=0.0)
        return out

    def throttles_from_others(self, member: str, beat: Beat) -> list[Throttle]:
        """The throttles ``beat`` carries when another member wrote it (ours are applied already)."""
        return [] if member == self.me else list(beat.throttles)
