"""Commit bookkeeping: only the contiguous finished prefix of a partition is ever committed, and the finished
offsets above it ride in the commit metadata (the longest prefix that fits, never nothing)."""

from __future__ import annotations

import base64
import random
import string

import pytest

from relay.offsets import (
    DEFAULT_CAP,
    JOURNAL_METADATA_ROOM,
    JournalPosition,
    OffsetRanges,
    PartitionOffsets,
    decode_metadata,
    encode_metadata,
    payload_budget,
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
    assert moved is not None and moved[0] == 1 and set(decode_metadata(1, moved[1]).done) == {2}
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
        assert set(p.finished()) == {o for o in finished if o >= point}
    assert p.commit_point() == 1000


def test_done_offsets_round_trip_through_commit_metadata() -> None:
    done = {101, 102, 107, 164, 1100}
    text = encode_metadata(100, done | {98, 99})  # below the commit point: not recorded
    assert set(decode_metadata(100, text).done) == done
    assert encode_metadata(100, []) == ""
    for text in ("", "something else", "done1:!!!", "done2:", "done2:r!!", "done2:r" + "gA==", "done2:q"):
        assert not decode_metadata(100, text).done, text


def test_30000_finished_above_one_pending_offset_fit_in_a_few_bytes() -> None:
    # a stuck key at the commit point and 30,000 records finished behind it: a bitset would need 3,750 bytes
    # (5,000 base64 characters, past the broker's 4,096), which used to leave the metadata empty
    p = PartitionOffsets()
    for off in range(5000, 35001):
        p.add(off)
        if off != 5000:
            p.done(off)
    point, text = p.uncommitted() or (None, "")
    assert point == 5000 and len(text) < 40 and text.startswith("done2:r")
    assert decode_metadata(5000, text).done == OffsetRanges([(5001, 35001)])


def test_the_smaller_encoding_wins_and_the_previous_version_can_read_a_bitset() -> None:
    dense = {o for o in range(1, 2000) if o % 3}  # finely interleaved: a bitset is smaller than runs
    text = encode_metadata(0, dense)
    assert text.startswith("done1:")  # today's format: a replica of the previous version still skips them
    assert set(decode_metadata(0, text).done) == dense
    sparse = {7, 70_000, 900_000}
    text = encode_metadata(0, sparse)
    assert text.startswith("done2:r") and set(decode_metadata(0, text).done) == sparse


def test_metadata_written_by_the_previous_version_is_read() -> None:
    # done1: as the previous version wrote it for commit point 100 and finished {101, 102, 107, 164, 1100}
    bits = bytearray(1000 // 8 + 1)
    for r in (1, 2, 7, 64, 1000):
        bits[r >> 3] |= 1 << (r & 7)
    old = "done1:" + base64.b64encode(bytes(bits)).decode()
    assert set(decode_metadata(100, old).done) == {101, 102, 107, 164, 1100}
    assert decode_metadata(100, old).journal is None


@pytest.mark.parametrize("cap", [60, 200, 1000, DEFAULT_CAP])
def test_too_many_finished_offsets_keep_the_longest_prefix_that_fits(cap: int) -> None:
    rng = random.Random(cap)
    done = set(rng.sample(range(1, 400_000), 20_000))
    text = encode_metadata(0, done, cap=cap)
    assert 0 < len(text) <= cap and text.isascii()
    recorded = set(decode_metadata(0, text).done)
    assert recorded, "something fits: it must be recorded"
    assert recorded <= done
    edge = max(recorded)
    assert recorded == {o for o in done if o <= edge}, "a prefix, without holes"
    bigger = set(decode_metadata(0, encode_metadata(0, done, cap=cap * 2)).done)
    assert len(bigger) > len(recorded)


def test_the_journal_position_is_kept_when_the_finished_set_is_cut() -> None:
    done = set(range(1, 100_000, 2))
    position = JournalPosition(3, 123_456_789)
    text = encode_metadata(0, done, journal=position, cap=100)
    assert len(text) <= 100
    meta = decode_metadata(0, text)
    assert meta.journal == position and meta.done and set(meta.done) <= done
    biggest = JournalPosition(2**63 - 1, 2**63 - 1)
    meta = decode_metadata(0, encode_metadata(0, done, journal=biggest, cap=64))
    assert meta.journal == biggest  # kept even when nothing else fits
    assert decode_metadata(0, encode_metadata(0, [], journal=position)).journal == position
    assert decode_metadata(0, encode_metadata(0, [], journal=position)).done == OffsetRanges()
    p = PartitionOffsets()
    p.add(0)
    assert p.uncommitted(journal=JournalPosition(0, 42)) == (0, ";journal=0@42")
    p.committed, p.committed_metadata = 0, ";journal=0@42"
    assert p.uncommitted(journal=JournalPosition(0, 42)) is None
    assert p.uncommitted(journal=JournalPosition(0, 43)) == (0, ";journal=0@43")  # it moved: worth a commit


def test_the_journal_position_rides_beside_the_finished_set() -> None:
    done = encode_metadata(100, {102, 105})
    for metadata in (done, ""):
        carried = with_journal(metadata, JournalPosition(3, 12345))
        assert split_journal(carried) == (metadata, JournalPosition(3, 12345))
        assert decode_metadata(100, carried).done == decode_metadata(100, metadata).done
    assert with_journal(done, None) == done and split_journal(done) == (done, None)
    assert split_journal(None) == ("", None)
    assert split_journal(done + ";journal=x@1") == (done, None)  # unreadable: read the journal from the start
    biggest = with_journal("", JournalPosition(2**63 - 1, 2**63 - 1))
    assert len(biggest) <= JOURNAL_METADATA_ROOM


def test_a_previous_owners_finished_set_stays_in_the_metadata_until_reached() -> None:
    # the previous owner committed 100 with {105, 110} finished; we have read and finished 100..104 only
    p = PartitionOffsets()
    for off in range(100, 105):
        p.add(off)
        p.done(off)
    move = p.uncommitted(also_done={105, 110})
    assert move is not None and move[0] == 105
    # 105 is the commit point and finished: a second owner must skip it too, not redo it
    assert set(decode_metadata(105, move[1]).done) == {105, 110}
    assert p.uncommitted(also_done=()) == (105, "")  # without it, a second rebalance would redo 105 and 110


def test_garbage_metadata_never_raises() -> None:
    rng = random.Random(3)
    alphabet = string.printable
    for _ in range(2000):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for prefix in ("", "done1:", "done2:", "done2:r", ";journal=", ";journal=1@"):
            decode_metadata(rng.randint(0, 10**12), prefix + body)
    huge = "done2:r" + base64.b64encode(b"\x00" + b"\xff" * 8 + b"\x7f").decode()
    assert len(decode_metadata(0, huge).done) > 2**60  # a range, not a set of ints


def test_memory_follows_pending_offsets_not_finished_ones() -> None:
    p = PartitionOffsets()
    p.add(0)  # stuck
    for off in range(1, 100_001):
        p.add(off)
        p.done(off)
    assert p.pending == 1 and len(p._heap) < 200  # the finished ones are not kept one by one


@pytest.mark.parametrize("cap", [120, 400, 1500, DEFAULT_CAP])
def test_metadata_room_keeps_every_finished_offset_recordable(cap: int) -> None:
    """A stuck offset at the bottom, at most 300 in flight, read only what ``metadata_room`` allows, finish in a
    bad order (isolated survivors, random picks): the metadata always records the whole finished set, so a
    rebalance at any instant repeats nothing, and the span grows past what a bitset could hold."""
    rng = random.Random(cap)
    p = PartitionOffsets()
    previous = OffsetRanges.of(rng.sample(range(3000, 6000), cap // 40))  # a previous owner's set that fits
    p.add(0)  # stuck for the whole test
    next_offset = 1
    pending: list[int] = []
    for _ in range(1500):
        room = p.metadata_room(300 - p.pending, previous, cap=cap)
        for _ in range(rng.randint(0, room)):
            p.add(next_offset)
            if next_offset in previous:
                p.done(next_offset)
            else:
                pending.append(next_offset)
            next_offset += 1
        for _ in range(rng.randint(0, 40)):  # finish every other one (isolated survivors), or a random one
            if not pending:
                break
            index = rng.randrange(len(pending)) if rng.random() < 0.3 else min(1, len(pending) - 1)
            p.done(pending.pop(index))
        move = p.uncommitted(previous, cap=cap)
        if move is not None:
            point, text = move
            assert point == 0 and len(text) <= cap
            assert decode_metadata(0, text).done == p.finished(previous), (cap, next_offset, len(pending))
    assert next_offset > 3000, "the room never let enough records through"
    if cap == DEFAULT_CAP:
        assert next_offset > 8 * payload_budget(cap), "the span never outgrew a bitset: run lengths untested"
