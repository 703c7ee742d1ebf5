"""Commit bookkeeping for one partition: only the contiguous prefix of finished records is committed.

Records of a partition finish out of order (different keys run concurrently, a key may wait on a limit or a
retry). Kafka stores one offset per partition, meaning "everything before this is done". So the commit point is
the lowest offset still pending, or one past the highest offset seen when nothing is pending. A record counts as
finished only when its result (and dead letter, if any) is acknowledged by Kafka; a relay killed at any instant
therefore redoes at most the records at or after the committed offset.

Records finished *above* the commit point (a later key done while an earlier one still waits) would be redone
by the next owner of the partition. To avoid repeating those calls, the commit carries them in Kafka's offset
``metadata`` string (the technique of Confluent's parallel consumer), and the next owner skips them.

Metadata format (ASCII; offsets relative to the committed offset ``c``; never longer than ``cap`` characters)::

    done1:<base64 bitset>[;journal=<p>@<o>]     bit r (least significant bit of byte r // 8 first) = offset
                                                c + r is finished (the previous version's format, still
                                                written when it is the smaller encoding)
    done2:r<base64 run lengths>[;journal=<p>@<o>]
    ;journal=<p>@<o>                             nothing finished above c, a journal position

Run lengths are unsigned LEB128 varints: alternately a run of offsets *not* finished and a run of finished
ones, starting at ``c`` with a not-finished run (0 when ``c`` itself is finished). Offsets past the last run are
not known to be finished. Per commit the encoder writes whichever of the two records more finished offsets
(the smaller when both record all): run lengths win for a stuck record under a long finished tail (30,000
finished offsets above one pending offset take a few bytes), the bitset for finely interleaved sets. When the
set does not fit it records the **longest prefix** that does, never nothing; the tail past it would be redone.
``metadata_room`` says how many more records a partition may read while the set is guaranteed to fit however
its pending records finish, which is what backpressure enforces.

The journal position of the partition (``;journal=<partition>@<offset>``, ``relay.journal``) rides at the end so a
new owner reads only the part of the journal that can matter; it is kept whatever is cut.
"""

from __future__ import annotations

import base64
import bisect
import heapq
from collections.abc import Iterable, Iterator
from typing import Final, NamedTuple

import msgspec

# the broker's offset.metadata.max.bytes defaults to 4096 characters; stay below it by default (journal included)
DEFAULT_CAP: Final = 4000
_V1: Final = "done1:"
_RUNS: Final = "done2:r"
# a done run of fewer than 2**21 offsets takes at most 3 varint bytes; the worst case is priced at that width
_WIDE_RUN: Final = (1 << 21) - 1
# room kept for the previous owner's ranges and the seam between them and ours (two varints)
_SLACK: Final = 2 * 10


class OffsetRanges:
    """A set of offsets as sorted, disjoint, non-touching half-open ranges; membership is a binary search.

    The compact form of a finished set: 30,000 consecutive offsets are one range, so a previous owner's
    metadata never expands into a set of ints.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = (), *, ordered: bool = False) -> None:
        """``ordered``: the ranges are already sorted by start (then only touching ones are merged)."""
        starts: list[int] = []
        ends: list[int] = []
        for start, end in ranges if ordered else sorted(ranges):
            if start >= end:
                continue
            if ends and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        self._starts = starts
        self._ends = ends

    @classmethod
    def of(cls, offsets: Iterable[int]) -> OffsetRanges:
        return cls(((o, o + 1) for o in sorted(offsets)), ordered=True)

    def __contains__(self, offset: object) -> bool:
        if not isinstance(offset, int):
            return False
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and offset < self._ends[i]

    def __len__(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[int]:
        for start, end in zip(self._starts, self._ends, strict=True):
            yield from range(start, end)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OffsetRanges) and self.ranges() == other.ranges()

    __hash__ = None  # type: ignore[assignment]  # mutable-by-value semantics: compared, never hashed

    def __repr__(self) -> str:
        return f"OffsetRanges({self.ranges()!r})"

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def from_(self, offset: int) -> OffsetRanges:
        """The part at or above ``offset``."""
        i = bisect.bisect_right(self._ends, offset)
        if i == 0 and (not self._starts or self._starts[0] >= offset):
            return self
        part = OffsetRanges()
        part._starts, part._ends = self._starts[i:], self._ends[i:]
        if part._starts and part._starts[0] < offset:
            part._starts[0] = offset
        return part

    def union(self, other: OffsetRanges) -> OffsetRanges:
        if not other:
            return self
        if not self:
            return other
        return OffsetRanges(heapq.merge(self.ranges(), other.ranges()), ordered=True)

    @property
    def end(self) -> int | None:
        """One past the highest offset, or None when empty."""
        return self._ends[-1] if self._ends else None


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


class CommitMetadata(msgspec.Struct, frozen=True):
    """What a commit's metadata says: the finished offsets at or above the commit point and the journal position."""

    done: OffsetRanges
    journal: JournalPosition | None = None


def _as_ranges(done: OffsetRanges | Iterable[int]) -> OffsetRanges:
    return done if isinstance(done, OffsetRanges) else OffsetRanges.of(done)


def _varint(n: int, out: bytearray) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _run_lengths(commit_point: int, done: OffsetRanges, budget: int) -> tuple[bytes, int]:
    """(encoding, finished offsets it records) for the longest prefix of (gap, run) pairs within ``budget`` bytes."""
    out = bytearray()
    pos = commit_point
    recorded = 0
    pair = bytearray()
    for start, end in done.ranges():
        pair.clear()
        _varint(start - pos, pair)
        _varint(end - start, pair)
        if len(out) + len(pair) > budget:
            break
        out += pair
        recorded += end - start
        pos = end
    return bytes(out), recorded


def _bitset(commit_point: int, done: OffsetRanges, budget: int) -> tuple[bytes, int]:
    """(bitset, finished offsets it records) over the first ``8 * budget`` offsets from the commit point."""
    width = 8 * budget
    bits = 0
    recorded = 0
    for start, end in done.ranges():
        lo, hi = start - commit_point, min(end - commit_point, width)
        if lo >= width:
            break
        bits |= ((1 << (hi - lo)) - 1) << lo
        recorded += hi - lo
    return bits.to_bytes((bits.bit_length() + 7) // 8, "little"), recorded


def payload_budget(cap: int, reserve: int = 0) -> int:
    """The most payload bytes a ``cap``-character metadata carries beside its prefix and ``reserve`` characters
    (the journal suffix); base64 takes 4 characters per 3 bytes."""
    room = cap - reserve - len(_RUNS)
    return max(0, room // 4 * 3)


def encode_metadata(commit_point: int, done: OffsetRanges | Iterable[int], *, journal: JournalPosition | None = None,
                    cap: int = DEFAULT_CAP) -> str:
    """Commit metadata for ``commit_point``: the finished offsets at or above it (the longest prefix that fits in
    ``cap`` characters) and ``journal``, which is kept whatever is cut ("" when there is nothing to say)."""
    finished = _as_ranges(done).from_(commit_point)
    suffix = with_journal("", journal)
    budget = payload_budget(cap, len(suffix))
    best, recorded, runs = b"", 0, True
    if finished:
        by_runs, runs_recorded = _run_lengths(commit_point, finished, budget)
        by_bits, bits_recorded = _bitset(commit_point, finished, budget)
        runs = (runs_recorded, -len(by_runs)) >= (bits_recorded, -len(by_bits))
        best, recorded = (by_runs, runs_recorded) if runs else (by_bits, bits_recorded)
    if not recorded:
        return suffix
    # a bitset is written in the previous version's format: during a rolling upgrade it still skips them
    return f"{_RUNS if runs else _V1}{base64.b64encode(best).decode()}{suffix}"


def decode_metadata(commit_point: int, metadata: str | None) -> CommitMetadata:
    """What a previous owner recorded with ``commit_point`` (empty when none, unreadable or another tool's)."""
    text, journal = split_journal(metadata)
    if text.startswith(_V1):
        return CommitMetadata(_decode_bits(commit_point, text[len(_V1):]), journal)
    if text.startswith(_RUNS):
        return CommitMetadata(_decode_runs(commit_point, text[len(_RUNS):]), journal)
    return CommitMetadata(OffsetRanges(), journal)


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return None


def _decode_bits(commit_point: int, text: str) -> OffsetRanges:
    raw = _b64(text)
    if raw is None:
        return OffsetRanges()
    bits = int.from_bytes(raw, "little")
    ranges: list[tuple[int, int]] = []
    r = 0
    while bits:
        skip = (bits & -bits).bit_length() - 1  # trailing zeros
        bits >>= skip
        r += skip
        ones = (~bits & (bits + 1)).bit_length() - 1  # trailing ones
        ranges.append((commit_point + r, commit_point + r + ones))
        bits >>= ones
        r += ones
    return OffsetRanges(ranges)


def _decode_runs(commit_point: int, text: str) -> OffsetRanges:
    raw = _b64(text)
    if raw is None:
        return OffsetRanges()
    numbers: list[int] = []
    value = shift = 0
    for byte in raw:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            numbers.append(value)
            value = shift = 0
        elif shift > 63:
            return OffsetRanges()  # not ours: no run is that long
    if shift:
        return OffsetRanges()  # a truncated varint
    ranges: list[tuple[int, int]] = []
    pos = commit_point
    for i, n in enumerate(numbers):
        if i % 2:
            ranges.append((pos, pos + n))
        pos += n
    return OffsetRanges(ranges)


class PartitionOffsets:
    """Pending offsets of one partition and the offset (plus metadata) that may be committed.

    Memory is proportional to the *pending* offsets, not to the finished ones: the finished set is read off as
    the gaps between pending offsets (an offset never read, a compacted one, counts as finished: no record).
    """

    __slots__ = ("_heap", "_pending", "committed", "committed_metadata", "highest")

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._heap: list[int] = []  # pending offsets, lazily cleaned: finished ones are dropped at the top
        self.highest = -1
        self.committed: int | None = None
        self.committed_metadata = ""

    def add(self, offset: int) -> None:
        self._pending.add(offset)
        heapq.heappush(self._heap, offset)
        self.highest = max(self.highest, offset)

    def done(self, offset: int) -> None:
        self._pending.discard(offset)
        heap = self._heap
        while heap and heap[0] not in self._pending:
            heapq.heappop(heap)
        if len(heap) > 2 * len(self._pending) + 64:  # finished ones buried in the heap: rebuild it
            self._heap = list(self._pending)
            heapq.heapify(self._heap)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def commit_point(self) -> int | None:
        """The offset to commit (next record to read), or None when nothing was ever added."""
        if self.highest < 0:
            return None
        return self._heap[0] if self._heap else self.highest + 1

    def finished(self, also_done: OffsetRanges | Iterable[int] = ()) -> OffsetRanges:
        """Offsets finished at or above the commit point: those read and done, plus ``also_done``."""
        point = self.commit_point()
        if point is None:
            return _as_ranges(also_done)
        ours: list[tuple[int, int]] = []
        previous = point
        for offset in sorted(self._pending):
            ours.append((previous, offset))
            previous = offset + 1
        ours.append((previous, self.highest + 1))
        return OffsetRanges(ours, ordered=True).union(_as_ranges(also_done).from_(point))

    def uncommitted(self, also_done: OffsetRanges | Iterable[int] = (), *, journal: JournalPosition | None = None,
                    cap: int = DEFAULT_CAP) -> tuple[int, str] | None:
        """(commit point, metadata) if either moved since the last successful commit, else None.

        ``also_done``: offsets known finished but not yet read here (a previous owner's finished set): they stay
        in the metadata until this owner reaches them, so a second rebalance or a crash still skips them.
        ``journal``: the journal position to record beside them (kept even when the finished set is cut).
        """
        point = self.commit_point()
        if point is None:
            return None
        metadata = encode_metadata(point, self.finished(also_done), journal=journal, cap=cap)
        if (point, metadata) == (self.committed, self.committed_metadata):
            return None
        return point, metadata

    def metadata_room(self, limit: int, also_done: OffsetRanges | Iterable[int] = (), *, reserve: int = 0,
                      cap: int = DEFAULT_CAP) -> int:
        """How many more records (at most ``limit``) may be read while the finished set is sure to fit ``cap``
        beside ``reserve`` characters (the journal suffix, ``JOURNAL_METADATA_ROOM`` at most).

        The worst case for ``p`` pending offsets spread over ``s`` offsets is every pending offset alone between
        finished runs: at most ``p * (1 + varint_size(s))`` bytes of run lengths (a pending run of n costs at
        most n bytes, a finished run at most the varint of the span), or ``s / 8`` bytes of bitset, whichever is
        smaller. The previous owner's ranges above what was read are priced as they encode today. With nothing
        pending, one record may always be read (alone it adds nothing to the finished set), so a partition never
        stalls on a cap too small for anything else.
        """
        point = self.commit_point()
        pending = len(self._pending)
        if point is None:
            point = self.highest + 1
        above = _as_ranges(also_done).from_(self.highest + 1)
        theirs = len(_run_lengths(self.highest + 1, above, 1 << 62)[0]) if above else 0
        span = self.highest + 1 - point
        width = varint_size(max(span + limit, _WIDE_RUN))
        budget = payload_budget(cap, reserve)
        by_runs = (budget - theirs - _SLACK) // (1 + width) - pending
        bits = 8 * budget  # the bitset covers ours and theirs: k more must stay inside
        by_bits = bits - span if (above.end or 0) - point <= bits else -1
        room = min(limit, max(by_runs, by_bits))
        return max(room, 1 if pending == 0 and limit > 0 else 0)
