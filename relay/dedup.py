"""Which events were already published: a bounded TTL memory plus one in-flight publish per event.

Feishu delivers at least once (redeliveries after 15 s, 5 min, 1 h, 6 h; ``im.message.receive_v1`` may even come
again under a new event id, so its message id counts too). The relay answers a duplicate 200 without publishing
it again. Rules, and why:

* **Seen only after the broker acknowledged.** :meth:`Dedup.publish_once` marks the keys when the publish
  succeeded; a failed publish leaves them unmarked, so Feishu's redelivery is published.
* **One publish per event at a time.** A duplicate arriving while the first copy is being published waits for
  that publish (under its own deadline) instead of sending a second record; when it succeeds, the duplicate is
  answered 200 too. The publish outlives the request that started it: a request that gave up at its deadline
  (503) leaves the publish running, and if the broker acknowledges it later the event is marked seen then, so
  the redelivery is not published a second time.
* **Bounded.** Entries expire after ``ttl`` seconds (rounded up to the next whole second) and the oldest go first
  beyond ``max_entries``, 1% of it at a time (counted in :attr:`Dedup.evicted`: an entry evicted before its TTL
  lets a redelivery through). Both are insertion-ordered (one ``dict``) and removed from its front in one pass,
  and expired entries are swept only once the oldest is due: CPython's dict keeps the slots of deleted entries
  at its front until it next resizes, so ``next(iter(d))`` after each removal rescans all of them (that made a
  mark at the cap cost ~0.6 ms, ~1,500 marks/s). The clock is injected.
* **Small entries.** A key is kept as its 16-byte BLAKE2b digest (whatever the length of the ids in it) and
  entries marked in the same second share one expiry object, so an entry costs the digest (a 49-byte ``bytes``)
  plus its dict slot: 91 bytes. **At the default 1,000,000 entries: 86.8 MiB** (tracemalloc, 92.7 MiB peak while
  the dict grows; 95 MiB of RSS in ``bench/inbound.py``). The tuples of strings kept before took about 205 bytes
  an entry (``test_dedup.test_memory_per_entry`` holds it under 110). A digest collision (2^-128 per pair)
  would make two events one: never in practice.

* **Shared between replicas and restarts** when given a :class:`SeenStore` (:meth:`Dedup.share`; the relay's is
  a compacted Kafka topic, :mod:`relay.seenlog`): a publish that succeeded is written there before the request
  is answered, and every replica learns what the others wrote (:meth:`Dedup.learn`), from the topic's beginning
  at start. So a redelivery or a replay landing on another replica, or on this one after a restart, is answered
  as a duplicate. What stays open: two copies arriving at two replicas within the same fraction of a second
  (the publishes in flight are per process), and a crash between the event's acknowledgement and the seen
  record's (the redelivery is then published again): consumers still have the ``event_id`` header.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    PUBLISHED = "published"
    DUPLICATE = "duplicate"


class PublishFailed(Exception):
    """The publish (ours, or the concurrent first copy's) failed; the event is not marked seen."""


def digest(key: str) -> bytes:
    """The form a key is remembered in: 16 bytes, whatever the key's length."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


class SeenStore(Protocol):
    """Where a replica tells the others which keys it published (their digests), durably."""

    async def add(self, digests: Sequence[bytes]) -> None: ...


class Dedup:
    """Seen-keys memory with TTL and a size bound, and the map of publishes in flight."""

    __slots__ = ("_clock", "_expiry", "_in_flight", "_max_entries", "_next_expiry", "_seen", "_store", "_ttl",
                 "evicted", "share_failures")

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._seen: dict[bytes, float] = {}  # digest -> expiry, in insertion (so expiry) order
        self._expiry = 0.0  # the last expiry stamped: shared by every entry marked in the same second
        self._next_expiry = math.inf  # no entry expires before this: no sweep needed until then
        self._in_flight: dict[bytes, asyncio.Task[BaseException | None]] = {}
        self._store: SeenStore | None = None
        self.evicted = 0  # entries dropped by the size bound before their TTL
        self.share_failures = 0  # published keys that could not be written to the store

    def share(self, store: SeenStore) -> None:
        """Write every key published from now on to ``store`` too (module doc)."""
        self._store = store

    def learn(self, digests: Iterable[bytes]) -> None:
        """Another replica (or an earlier process) published these: remember them for the TTL from now."""
        self._mark_digests(digests)

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def in_flight(self) -> int:
        return len({id(task) for task in self._in_flight.values()})

    def _expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        seen = self._seen
        for key in list(itertools.takewhile(lambda key: seen[key] <= now, seen)):
            del seen[key]
        self._next_expiry = next(iter(seen.values()), math.inf)

    def seen(self, keys: Iterable[str]) -> bool:
        """Whether any of the keys was marked within the TTL."""
        return self._seen_digests([digest(key) for key in keys])

    def mark(self, keys: Iterable[str]) -> None:
        """Remember the keys for the TTL from now (evicting expired, then oldest entries)."""
        self._mark_digests([digest(key) for key in keys])

    def _seen_digests(self, digests: Iterable[bytes]) -> bool:
        now = self._clock()
        self._expire(now)
        return any(self._seen.get(key, now) > now for key in digests)

    def _mark_digests(self, digests: Iterable[bytes]) -> None:
        now = self._clock()
        self._expire(now)
        expiry = float(math.ceil(now + self._ttl))
        if expiry != self._expiry:
            self._expiry = expiry
        self._next_expiry = min(self._next_expiry, expiry)
        seen = self._seen
        for key in digests:
            seen.pop(key, None)  # re-insert at the end: the order stays the expiry order
            seen[key] = self._expiry
        if len(seen) > self._max_entries:
            excess = len(seen) - self._max_entries + self._max_entries // 100
            for key in list(itertools.islice(seen, excess)):
                del seen[key]
            self.evicted += excess

    async def _run(self, digests: Sequence[bytes], publish: Callable[[], Awaitable[None]]) -> BaseException | None:
        """Publish, mark on success; the error is returned (a value) so that no waiter has to be present."""
        try:
            await publish()
        except Exception as exc:
            return exc
        else:
            self._mark_digests(digests)
            if self._store is not None:
                try:  # before the answer: a redelivery to another replica must find it
                    await self._store.add(digests)
                except Exception as exc:  # published all the same: at worst a redelivery goes out again
                    self.share_failures += 1
                    log.warning("dedup: published keys not shared with the other replicas: %s", exc)
            return None
        finally:
            for key in digests:
                if self._in_flight.get(key) is asyncio.current_task():
                    del self._in_flight[key]

    async def publish_once(self, keys: Sequence[str], publish: Callable[[], Awaitable[None]], deadline: float, *,
                           on_late: Callable[[BaseException | None], None] | None = None) -> Outcome:
        """Publish unless seen or already being published; wait at most ``deadline`` seconds for the acknowledgement.

        Raises ``TimeoutError`` at the deadline (the publish keeps going; see the module docstring) and
        :class:`PublishFailed` when the publish failed. After a ``TimeoutError``, ``on_late`` is called once the
        publish ends: with None when it succeeded, else with its error (``CancelledError`` when :meth:`close`
        cancelled it), so that a caller who answered without waiting can account for every outcome.
        """
        digests = [digest(key) for key in keys]
        if self._seen_digests(digests):
            return Outcome.DUPLICATE
        task = next((self._in_flight[key] for key in digests if key in self._in_flight), None)
        joined = task is not None
        if task is None:
            task = asyncio.create_task(self._run(digests, publish))
            for key in digests:
                self._in_flight[key] = task
        # shield: a request giving up (deadline, disconnect) must not cancel the publish others may share
        try:
            error = await asyncio.wait_for(asyncio.shield(task), deadline)
        except TimeoutError:
            if on_late is not None:
                task.add_done_callback(lambda done: on_late(
                    asyncio.CancelledError() if done.cancelled() else done.result()))
            raise
        if error is not None:
            raise PublishFailed(type(error).__name__) from error
        if joined:
            self._mark_digests(digests)  # the first copy may have carried other keys (a new event id, same message)
            return Outcome.DUPLICATE
        return Outcome.PUBLISHED

    async def close(self) -> None:
        """Cancel the publishes still in flight (at shutdown, after the server stopped taking requests)."""
        tasks = set(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
