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
  beyond ``max_entries`` (counted in :attr:`Dedup.evicted`: an entry evicted before its TTL lets a redelivery
  through); both are insertion-ordered (one ``dict``), so eviction is O(1) per entry. The clock is injected.
* **Small entries.** A key is kept as its 16-byte BLAKE2b digest (whatever the length of the ids in it) and
  entries marked in the same second share one expiry object, so an entry costs the digest (49 bytes as a
  ``bytes``) plus its dict slot: about 95 bytes, **about 91 MiB at the default 1,000,000 entries** (measured with
  tracemalloc: ``test_dedup.test_memory_per_entry``; the earlier tuple-of-strings entries took about 205 bytes).
  A digest collision (2^-128 per pair) would make two events one: never in practice.

The memory is per process: consumers finish the job across restarts and replicas with the ``event_id`` header.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    PUBLISHED = "published"
    DUPLICATE = "duplicate"


class PublishFailed(Exception):
    """The publish (ours, or the concurrent first copy's) failed; the event is not marked seen."""


def digest(key: str) -> bytes:
    """The form a key is remembered in: 16 bytes, whatever the key's length."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


class Dedup:
    """Seen-keys memory with TTL and a size bound, and the map of publishes in flight."""

    __slots__ = ("_clock", "_expiry", "_in_flight", "_max_entries", "_seen", "_ttl", "evicted")

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._seen: dict[bytes, float] = {}  # digest -> expiry, in insertion (so expiry) order
        self._expiry = 0.0  # the last expiry stamped: shared by every entry marked in the same second
        self._in_flight: dict[bytes, asyncio.Task[BaseException | None]] = {}
        self.evicted = 0  # entries dropped by the size bound before their TTL

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def in_flight(self) -> int:
        return len({id(task) for task in self._in_flight.values()})

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            key = next(iter(seen))
            if seen[key] > now:
                break
            del seen[key]

    def seen(self, keys: Iterable[str]) -> bool:
        """Whether any of the keys was marked within the TTL."""
        now = self._clock()
        self._expire(now)
        return any(self._seen.get(digest(key), now) > now for key in keys)

    def mark(self, keys: Iterable[str]) -> None:
        """Remember the keys for the TTL from now (evicting expired, then oldest entries)."""
        now = self._clock()
        self._expire(now)
        expiry = float(math.ceil(now + self._ttl))
        if expiry != self._expiry:
            self._expiry = expiry
        for key in map(digest, keys):
            self._seen.pop(key, None)  # re-insert at the end: the order stays the expiry order
            self._seen[key] = self._expiry
        while len(self._seen) > self._max_entries:
            del self._seen[next(iter(self._seen))]
            self.evicted += 1

    async def _run(self, keys: Sequence[str], publish: Callable[[], Awaitable[None]]) -> BaseException | None:
        """Publish, mark on success; the error is returned (a value) so that no waiter has to be present."""
        try:
            await publish()
        except Exception as exc:
            return exc
        else:
            self.mark(keys)
            return None
        finally:
            for key in map(digest, keys):
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
        if self.seen(keys):
            return Outcome.DUPLICATE
        digests = [digest(key) for key in keys]
        task = next((self._in_flight[key] for key in digests if key in self._in_flight), None)
        joined = task is not None
        if task is None:
            task = asyncio.create_task(self._run(keys, publish))
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
            self.mark(keys)  # the first copy may have carried other keys (a new event id, same message id)
            return Outcome.DUPLICATE
        return Outcome.PUBLISHED

    async def close(self) -> None:
        """Cancel the publishes still in flight (at shutdown, after the server stopped taking requests)."""
        tasks = set(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
