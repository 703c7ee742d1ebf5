"""Latest wins: an update that a later one, already read and waiting in the same lane, makes pointless is not sent.

Two kinds of intent replace what they update as a whole, so only the last of a run of them matters:

* ``card.stream`` (always): CardKit's element content is the element's *full* text each time
  (docs/feishu-rules.md §5.7), so an update is pointless once a later update of the same element of the same
  card, whose text starts with this one's (it contains the whole answer so far), is waiting behind it. The
  later text is what Feishu shows either way, and the prefix keeps the typewriter animation going from what the
  reader saw.
* ``card.patch`` with ``latest_wins`` (opt-in): a patch replaces the whole card of one message
  (docs/feishu-rules.md §2.3, 5 per second per message), so with a later patch of the same message waiting,
  this one need not go.

A run is broken by anything else in the lane between the two (a settings change that closes streaming mode, a
full card update, an edit, a recall, ...): an update is superseded only by one that follows it with nothing but
updates of *other* elements of the card (or, for patches, nothing at all) in between, so what Feishu sees is the
same sequence of states minus intermediate texts nobody would have had time to read. The later one must also
live at least as long (``expires_at`` not earlier), or the final text could expire where this one would not.

The lanes of :mod:`relay.outbound` run a key's records one at a time in offset order; this class keeps, per lane,
the records read but not yet finished, and answers, when a record's turn comes, whether (and by which intent id)
it is superseded. A streamed answer produced faster than the per-card limit (10/s) thus reaches Feishu in about
as many calls as that limit allows while it streams, and its last update is always sent: nothing supersedes the
last. Pure and synchronous; the consumer adds a record when it dispatches it and drops it when it finishes.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

from relay.intents import CardPatch, CardStream, Intent

__all__ = ["SEQUENCE_COMPARE_FAILED", "Folding", "foldable", "overtaken", "supersedes"]

# docs/feishu-rules.md §5.7: "sequence number compare failed", a sequence not greater than the card's last
SEQUENCE_COMPARE_FAILED = 300317


def foldable(intent: Intent) -> bool:
    """May a later record supersede this one (the kinds above)?"""
    return isinstance(intent, CardStream) or (isinstance(intent, CardPatch) and intent.latest_wins)


def _outlives(later: Intent, earlier: Intent) -> bool:
    if later.expires_at is None:
        return True
    return earlier.expires_at is not None and later.expires_at >= earlier.expires_at


def supersedes(earlier: Intent, later: Intent) -> bool:
    """Does ``later`` make ``earlier`` pointless (module doc)? Says nothing about what lies between them."""
    if earlier.app != later.app or not _outlives(later, earlier):
        return False
    if isinstance(earlier, CardStream):
        return (isinstance(later, CardStream) and later.card_id == earlier.card_id
                and later.element_id == earlier.element_id and later.content.startswith(earlier.content))
    if isinstance(earlier, CardPatch) and earlier.latest_wins:
        return isinstance(later, CardPatch) and later.message_id == earlier.message_id
    return False


def overtaken(intent: Intent, code: int | None) -> bool:
    """A ``card.stream`` Feishu refused with 300317 was overtaken by a later update already performed: it is
    ``superseded`` (``superseded_by`` unknown), not failed.

    The relay's sequences are the records' offsets (:func:`relay.calls.card_sequence`), so Feishu holding a
    larger one means it performed a later record of the card, and the lane performs a record only after every
    earlier one finished. This happens after a restart: records superseded before it are redone, and one that the
    redo does not supersede (the batches fall differently) reaches Feishu after its successor did. Its text is
    contained in what Feishu already shows, which is what superseded means. Other operations are never
    superseded, so for them 300317 stays a failure (a repeat of a performed one is answered from its uuid).
    """
    return isinstance(intent, CardStream) and code == SEQUENCE_COMPARE_FAILED


def _transparent(earlier: Intent, between: Intent) -> bool:
    """May ``between`` lie between ``earlier`` and a record superseding it (an update of another element)?"""
    return (isinstance(earlier, CardStream) and isinstance(between, CardStream) and between.app == earlier.app
            and between.card_id == earlier.card_id and between.element_id != earlier.element_id)


class Folding:
    """The unfinished records of each lane that take part in latest-wins, in offset order (module doc).

    A lane holds entries from its first foldable record on (a record before it cannot break a run after it);
    it is dropped when it empties. At most one entry per record read and not finished, so it is bounded by the
    consumer's ``max_in_flight``.
    """

    __slots__ = ("_lanes",)

    def __init__(self) -> None:
        self._lanes: dict[Hashable, dict[int, Intent]] = {}  # insertion order = offset order within a lane

    def add(self, lane: Hashable, offset: int, intent: Intent) -> None:
        """A record dispatched into ``lane`` (every record of the lane: others may break a run)."""
        entries = self._lanes.get(lane)
        if entries is None:
            if not foldable(intent):
                return
            entries = self._lanes[lane] = {}
        entries[offset] = intent

    def superseded_by(self, lane: Hashable, offset: int) -> str | None:
        """The id of the latest record behind this one that supersedes it, or None (then it must be sent)."""
        entries = self._lanes.get(lane)
        earlier = entries.get(offset) if entries is not None else None
        if entries is None or earlier is None or not foldable(earlier):
            return None
        found: str | None = None
        behind = False
        for at, intent in entries.items():
            if not behind:
                behind = at == offset
                continue
            if supersedes(earlier, intent):
                found = intent.id
            elif not _transparent(earlier, intent):
                break
        return found

    def done(self, lane: Hashable, offset: int) -> None:
        """The record finished (or was abandoned): it no longer supersedes nor breaks anything."""
        entries = self._lanes.get(lane)
        if entries is not None:
            entries.pop(offset, None)
            if not entries:
                del self._lanes[lane]

    def forget(self, owners: Iterable[Any]) -> None:
        """Drop the lanes whose first element (the partition) is in ``owners`` (revoked partitions)."""
        gone = set(owners)
        for lane in [lane for lane in self._lanes if isinstance(lane, tuple) and lane and lane[0] in gone]:
            del self._lanes[lane]

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._lanes.values())
