"""Commit bookkeeping for one partition: only the contiguous prefix of finished records is committed.

Records of a partition finish out of order (different keys run concurrently, a key may wait on a limit or a
retry). Kafka stores one offset per partition, meaning "everything before this is done". So the commit point is
the lowest offset still pending, or one past the highest offset seen when nothing is pending. A record counts as
finished only when its result (and dead letter, if any) is acknowledged by Kafka; a relay killed at any instant
therefore redoes at most the records at or after the committed offset.

Records finished *above* the commit point (a later key done while an earlier one still waits) would be redone
by the next owner of the partition. To avoid repeating those calls, the commit carries them in Kafka's offset
``metadata`` string (the technique of Confluent's parallel-consumer): a bitmap of finished offsets relative to
the committed one. The next owner reads it back and skips those records. The bitmap is bounded by
``MAX_METADATA`` characters (the broker's ``offset.metadata.max.bytes`` defaults to 4096); past that the
metadata is left empty and the tail is redone, which is still at-least-once.

The metadata also carries the journal position of the partition (``with_journal`` / ``split_journal``, at the
end of this module; ``relay.journal``), so a new owner reads only the part of the journal that can matter.
"""

from __future__ import annotations

import base64
import heapq
from collections.abc import Iterable
from typing import Final, NamedTuple

MAX_METADATA: Final = 4000  # plus the journal position's JOURNAL_METADATA_ROOM: under the broker's 4096
_PREFIX: Final = "done1:"


def encode_done(commit_point: int, done: Iterable[int]) -> str:
    """Offsets finished above ``commit_point`` as commit metadata ("" when none or too many)."""
    relative = sorted(o - commit_point for o in done if o > commit_point)
    if not relative:
        return ""
    bits = bytearray((relative[-1] >> 3) + 1)
    for r in relative:
        bits[r >> 3] |= 1 << (r & 7)
    text = _PREFIX + base64.b64encode(bytes(bits)).decode()
    return text if len(text) <= MAX_METADATA else ""


def decode_done(commit_point: int, metadata: str | None) -> set[int]:
    """The finished offsets a previous owner recorded with ``commit_point`` (empty if none or unreadable)."""
    if not metadata or not metadata.startswith(_PREFIX):
        return set()
    try:
        bits = base64.b64decode(metadata[len(_PREFIX):], validate=True)
    except ValueError:
        return set()
    return {commit_point + (i << 3) + b for i, byte in enumerate(bits) for b in range(8) if byte >> b & 1}


class PartitionOffsets:
    """Pending offsets of one partition and the offset that may be committed."""

    __slots__ = ("_done", "_heap", "committed", "committed_metadata", "highest")

    def __init__(self) -> None:
        self._heap: list[int] = []  # pending offsets (lazy deletion: finished ones are dropped at the top)
        self._done: set[int] = set()
        self.highest = -1
        self.committed: int | None = None
        self.committed_metadata = ""

    def add(self, offset: int) -> None:
        heapq.heappush(self._heap, offset)
        self.highest = max(self.highest, offset)

    def done(self, offset: int) -> None:
        self._done.add(offset)
        while self._heap and self._heap[0] in self._done:
            self._done.discard(heapq.heappop(self._heap))

    @property
    def pending(self) -> int:
        return len(self._heap) - len(self._done)

    def commit_point(self) -> int | None:
        """The offset to commit (next record to read), or None when nothing was ever added."""
        if self.highest < 0:
            return None
        return self._heap[0] if self._heap else self.highest + 1

    def finished_above(self) -> set[int]:
        """Offsets already finished above the commit point (what ``encode_done`` records)."""
        return set(self._done)

    def uncommitted(self, also_done: Iterable[int] = ()) -> tuple[int, str] | None:
        """(commit point, metadata) if either moved since the last successful commit, else None.

        ``also_done``: offsets known finished but not yet read here (a previous owner's finished set): they stay
        in the metadata until this owner reaches them, so a second rebalance or a crash still skips them.
        """
        point = self.commit_point()
        if point is None:
            return None
        metadata = encode_done(point, self._done.union(also_done))
        if (point, metadata) == (self.committed, self.committed_metadata):
            return None
        return point, metadata


# --- the journal position, carried beside the finished set ---------------------------------------------------
# Kept apart from the finished-set encoding above (a suffix of its own, parsed first), so that encoding can change
# without touching this. ``relay.journal`` explains what the position means; here it is only carried.


class JournalPosition(NamedTuple):
    """A journal partition and the offset from which the entries of uncommitted records can lie in it."""

    partition: int
    offset: int


_JOURNAL: Final = ";journal="
# room the suffix takes at most (two 19-digit numbers): the finished set must leave it under the broker's cap
JOURNAL_METADATA_ROOM: Final = len(_JOURNAL) + 2 * 19 + 1


def with_journal(metadata: str, position: JournalPosition | None) -> str:
    """``metadata`` with the journal position appended (unchanged without one)."""
    if position is None:
        return metadata
    return f"{metadata}{_JOURNAL}{position.partition}@{position.offset}"


def split_journal(metadata: str | None) -> tuple[str, JournalPosition | None]:
    """(the metadata without the journal part, the journal position or None when absent or unreadable)."""
    text = metadata or ""
    rest, sep, tail = text.rpartition(_JOURNAL)
    if not sep:
        return text, None
    partition, at, offset = tail.partition("@")
    if not at or not partition.isdigit() or not offset.isdigit():
        return rest, None
    return rest, JournalPosition(int(partition), int(offset))
