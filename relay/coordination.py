"""The replicas' meeting place: a compacted one-partition Kafka topic every replica writes beats to and reads whole.

:mod:`relay.shares` says what a beat means and how a share follows from the log (its docstring carries the design
and the safety argument); this is its I/O shell. :class:`Coordinator`:

* at :meth:`start`, reads the topic from the beginning (a plain ``assign()``-ed consumer: no group, everyone
  reads everything), then follows it live in a task of its own, feeding every record to the
  :class:`~relay.shares.ShareBook`;
* writes a beat every ``feishu.beat_interval`` (owned partitions, calls waiting per API, the view), and one at once
  when the limiter reports an app-wide throttle (:attr:`relay.limits.Limiter.on_throttle`), so the others
  pause and slow that API too: they share its quota;
* sets the limiter's share (:meth:`relay.limits.Limiter.set_share`) after every record and every tenth of a
  beat (a share grows with time alone, once the horizon passes);
* at :meth:`stop` (after the outbound consumer drained: no call of this replica follows) writes a "left" beat,
  which hands its share back at once.

Why a topic and not a store: the relay depends on Kafka and nothing else. Why one partition: the safety argument
needs every replica to read the same records in the same order: every beat is written to and read from partition
0 (a topic created with more partitions works; the others stay empty). Why compacted: one record per member survives,
so a start-up reads a few records however long the group has run; a member id is one process's (a uuid), so
a restart is a new member and the old id's last beat expires or says it left. The topic's records are stamped by
the broker (``LogAppendTime``): liveness is judged on one clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import msgspec
from aiokafka.errors import KafkaError

from relay.config import Config
from relay.shares import Beat, ShareBook, Throttle, decode_beat, encode_beat

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from relay.limits import Limiter

log = logging.getLogger(__name__)

# compact: the latest beat per member is all a reader needs; an hour of retention for beats of members long gone
COORDINATION_TOPIC_CONFIG: Final = {
    "cleanup.policy": "compact,delete",
    "retention.ms": str(3600 * 1000),
    "segment.ms": str(600 * 1000),
    "message.timestamp.type": "LogAppendTime",
}
# the longest Feishu window a call is limited by (IM's and api.call's minute): the horizon of relay.shares
LONGEST_WINDOW: Final = 60.0

# (owned intent partitions, waiting records)
Demand = Callable[[], Awaitable[tuple[int, int]]]


def horizon(config: Config) -> float:
    """No call older than this counts in a window with a call now (scaled window plus the jitter margin)."""
    return LONGEST_WINDOW / config.feishu.time_scale + config.feishu.limit_jitter


def member_ttl(config: Config) -> float:
    """A member whose last beat is this much older (broker time) than the newest record is dead: the horizon,
    the fence margin and ten beats (a beat late by a GC pause or a slow produce is no death)."""
    return horizon(config) + fence_margin(config) + 10 * config.feishu.beat_interval


def fence_margin(config: Config) -> float:
    """Covers the broker clock's skew against a writer's and a beat's trip: two beats, at least one second."""
    return max(1.0, 2 * config.feishu.beat_interval)


class Coordinator:
    """Beats out, the log in, the share into the limiter; see the module doc."""

    def __init__(self, config: Config, producer: AIOKafkaProducer, limiter: Limiter, demand: Demand, *,
                 clock: Callable[[], float] = time.monotonic, member: str | None = None) -> None:
        self._config = config
        self.topic = config.kafka.coordination_topic
        self._producer = producer
        self._limiter = limiter
        self._demand = demand
        self._clock = clock
        self.member = member or uuid.uuid4().hex
        self.book = ShareBook(self.member, horizon=horizon(config), member_ttl=member_ttl(config),
                              floor=config.feishu.share_floor, margin=fence_margin(config), clock=clock)
        self._beats = itertools.count(1)
        self._throttles: list[Throttle] = []
        self._history: deque[tuple[float, dict[str, int]]] = deque()  # (beat time, calls waiting per API)
        self._wake = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._live = False  # the initial read is done: throttles read from now on are applied
        self.read = 0
        self.applied_throttles = 0
        self._shown: dict[str, float] = {}  # the shares last logged, rounded

    async def start(self, load_timeout: float = 60.0) -> None:
        from aiokafka import TopicPartition

        from relay.kafka import FOLLOWER_FETCH_WAIT_MS, ensure_topics, make_consumer, read_to_end

        if self._config.kafka.create_topics:
            await ensure_topics(self._config.kafka, {self.topic: dict(COORDINATION_TOPIC_CONFIG)})
        await self._producer.partitions_for(self.topic)
        tp = TopicPartition(self.topic, 0)
        consumer = self._consumer = make_consumer(self._config.kafka, group_id=None, enable_auto_commit=False,
                                                  fetch_max_wait_ms=FOLLOWER_FETCH_WAIT_MS)
        await consumer.start()
        consumer.assign([tp])

        def take(records: list[Any]) -> None:
            for record in records:
                self._apply(record)

        async with asyncio.timeout(load_timeout):
            await read_to_end(consumer, [tp], take)
        self._live = True
        self._limiter.on_throttle = self._throttled
        await self._beat()
        self._tasks = [asyncio.create_task(self._follow(consumer), name="coordination-tail"),
                       asyncio.create_task(self._beating(), name="coordination-beats")]
        log.info("coordination: member %s, %d records read from %s; %d live member(s)", self.member[:12],
                 self.read, self.topic, len(self.book.live()))

    async def wait(self) -> None:
        """Ends (with its error) when the tail or the beats die; they run until :meth:`stop` otherwise."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and (err := task.exception()) is not None:
                raise err

    async def stop(self) -> None:
        """Hand the share back ("left"), stop the tasks and the consumer. Call after the outbound consumer
        stopped: no call of this replica may follow the "left" beat."""
        self._limiter.set_share(0.0)
        self._limiter.on_throttle = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            with contextlib.suppress(KafkaError, TimeoutError):
                async with asyncio.timeout(5):
                    await self._send(Beat(view=self.book.view, left=True, n=next(self._beats)))
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    # -- beats -----------------------------------------------------------------------------------------------

    def _throttled(self, app: str, api: str, pause: float | None) -> None:
        self._throttles.append(Throttle(app, api, pause))
        self._wake.set()

    async def _beating(self) -> None:
        interval = self._config.feishu.beat_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            await self._beat()

    async def _beat(self) -> None:
        self._wake.clear()
        try:
            partitions, demand = await self._demand()
        except Exception as err:  # a consumer mid-rebalance: report nothing owned rather than die
            log.debug("coordination: demand unknown (%s)", err)
            partitions, demand = 0, 0
        throttles, self._throttles = self._throttles, []
        n = next(self._beats)
        self.book.wrote(n)
        beat = Beat(partitions=partitions, demand=demand, apis=self._peaks(), view=self.book.view,
                    throttles=throttles, n=n)
        try:
            await self._send(beat)
        except KafkaError as err:  # the fence stops our calls if this lasts (relay.shares)
            log.warning("coordination: a beat could not be written: %s", err)

    def _peaks(self) -> dict[str, int]:
        """The most calls that waited for each API's token at any beat within the last horizon.

        A share that shrinks applies at once and one that grows waits a horizon, so a demand reported as it
        wobbles (a fetch that brought only sends, a queue that drained for a second) would keep every share at
        its lowest point. Reported as its peak over the horizon, a replica's demand falls only after it has
        really had none for that long; it rises at once.
        """
        now = self._clock()
        self._history.append((now, self._limiter.waiting_by_api()))
        while self._history and self._history[0][0] < now - self.book.horizon:
            self._history.popleft()
        peaks: dict[str, int] = {}
        for _, waiting in self._history:
            for api, n in waiting.items():
                peaks[api] = max(peaks.get(api, 0), n)
        return peaks

    async def _send(self, beat: Beat) -> None:
        await self._producer.send_and_wait(self.topic, encode_beat(beat), key=self.member.encode(), partition=0)

    # -- the log ---------------------------------------------------------------------------------------------

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        tick = self._config.feishu.beat_interval / 10
        while True:
            for records in (await consumer.getmany(timeout_ms=int(tick * 1000) + 1)).values():
                for record in records:
                    self._apply(record)
            self._apply_shares()

    def _apply(self, record: Any) -> None:
        if record.key is None:
            return
        member = record.key.decode("utf-8", "replace")
        beat: Beat | None = None
        if record.value is not None:
            try:
                beat = decode_beat(record.value)
            except msgspec.DecodeError:
                log.warning("coordination: unreadable beat of member %r, ignored", member[:40])
                return
        self.read += 1
        self.book.read(record.offset, record.timestamp / 1000.0, member, beat)
        if self._live and beat is not None and member != self.member:
            for throttle in beat.throttles:
                self.applied_throttles += 1
                self._limiter.throttled(throttle.app, throttle.api, retry_after=throttle.pause, remote=True)
        if self._live:
            self._apply_shares()

    def _apply_shares(self) -> None:
        shares = self.book.shares()
        self._show(shares)
        default = shares.pop("")
        self._limiter.set_shares(default, shares)

    def _show(self, shares: dict[str, float]) -> None:
        """One line each time this replica's share of some API changes (to 3 places): how the group split the
        quota, and when a share that grew took effect (a horizon after the others acknowledged it)."""
        shown = {api: round(share, 3) for api, share in shares.items()}
        if shown == self._shown:
            return
        self._shown = shown
        parts = [f"{api} {share:.3f}" for api, share in sorted(shown.items()) if api]
        log.info("coordination: quota shares now %s", ", ".join([*parts, f"other APIs {shown.get('', 0.0):.3f}"]))
