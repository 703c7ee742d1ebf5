"""Commit bookkeeping: only the contiguous finished prefix of a partition is ever committed."""

from __future__ import annotations

import random

from relay.offsets import (
    JOURNAL_METADATA_ROOM,
    MAX_METADATA,
    JournalPosition,
    PartitionOffsets,
    decode_done,
    encode_done,
    split_journal,
    with_journal,
)


def test_empty_partition_has_no_commit_point() -> None:
    assert PartitionOffsets().commit_point() is None


def test_commit_point_is_lowest_pending() -> None:
    p = PartitionOffsets()
    for off in (10, 11, 12, 13):
        p.add(off)
    assert p.commit_point() == 10
    p.done(12)
    p.done(11)
    assert p.commit_point() == 10  # 10 still pending: 11 and 12 must not be committed yet
    p.done(10)
    assert p.commit_point() == 13
    p.done(13)
    assert p.commit_point() == 14
    assert p.pending == 0


def test_uncommitted_reports_only_moves() -> None:
    p = PartitionOffsets()
    p.add(0)
    p.done(0)
    assert p.uncommitted() == (1, "")
    p.committed = 1
    assert p.uncommitted() is None
    p.add(1)
    assert p.uncommitted() is None  # the commit point is still 1
    p.add(2)
    p.done(2)  # finished above the commit point: the metadata changes, so there is something to commit
    moved = p.uncommitted()
    assert moved is not None and moved[0] == 1 and decode_done(1, moved[1]) == {2}
    p.committed, p.committed_metadata = moved
    p.done(1)
    assert p.uncommitted() == (3, "")


def test_random_completion_order_never_commits_past_a_pending_offset() -> None:
    rng = random.Random(7)
    p = PartitionOffsets()
    offsets = list(range(1000))
    for off in offsets:
        p.add(off)
    order = offsets[:]
    rng.shuffle(order)
    finished: set[int] = set()
    for off in order:
        p.done(off)
        finished.add(off)
        point = p.commit_point()
        assert point is not None
        assert all(o in finished for o in range(point))  # everything before the point is done
        assert point == 1000 or point not in finished  # and the point itself is the first not done
    assert p.commit_point() == 1000


def test_done_offsets_round_trip_through_commit_metadata() -> None:
    done = {101, 102, 107, 164, 1100}
    text = encode_done(100, done | {99, 100})  # at or below the commit point: not recorded
    assert decode_done(100, text) == done
    assert encode_done(100, []) == ""
    assert decode_done(100, "") == set()
    assert decode_done(100, "something else") == set()
    assert decode_done(100, "done1:!!!") == set()


def test_too_many_done_offsets_fall_back_to_no_metadata() -> None:
    assert encode_done(0, {MAX_METADATA * 8}) == ""  # redo the tail rather than exceed the broker's cap


def test_a_previous_owners_finished_set_stays_in_the_metadata_until_reached() -> None:
    # the previous owner committed 100 with {105, 110} finished; we have read and finished 100..104 only
    p = PartitionOffsets()
    for off in range(100, 105):
        p.add(off)
        p.done(off)
    move = p.uncommitted(also_done={105, 110})
    assert move is not None and move[0] == 105
    assert decode_done(105, move[1]) == {110}  # 105 is the commit point itself: it will be skipped when read
    assert p.uncommitted(also_done=()) == (105, "")  # without it, a second rebalance would redo 110


def test_the_journal_position_rides_beside_the_finished_set() -> None:
    done = encode_done(100, {102, 105})
    for metadata in (done, ""):
        carried = with_journal(metadata, JournalPosition(3, 12345))
        assert split_journal(carried) == (metadata, JournalPosition(3, 12345))
        assert decode_done(100, split_journal(carried)[0]) == decode_done(100, metadata)
    assert with_journal(done, None) == done and split_journal(done) == (done, None)
    assert split_journal(None) == ("", None)
    assert split_journal(done + ";journal=x@1") == (done, None)  # unreadable: read the journal from the start
    biggest = with_journal("", JournalPosition(2**63 - 1, 2**63 - 1))
    assert len(biggest) <= JOURNAL_METADATA_ROOM and MAX_METADATA + JOURNAL_METADATA_ROOM <= 4096
