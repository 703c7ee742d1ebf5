"""The write-ahead journal: entries, the position bookkeeping (pure), then the Kafka journal on the real broker."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from aiokafka import TopicPartition

from relay.config import KafkaConfig
from relay.journal import (
    DeadLetter,
    Finished,
    JournalBook,
    KafkaJournal,
    Started,
    decode_entry,
    encode_entry,
    entry_key,
    journal_partition,
    keep,
)
from relay.kafka import ensure_topics, make_producer
from relay.offsets import JournalPosition

SOURCE = ("intents", 4)

# ---- entries ----------------------------------------------------------------------------------------------------


def test_entries_round_trip_and_a_finished_result_keeps_its_bytes() -> None:
    result = b'{"id":"r-1","status":"ok","attempts":1,  "odd spacing":true}'
    finished = Finished("intents", 4, 17, "r-1", msgspec.Raw(result), DeadLetter("feishu", "Feishu code 1"))
    back = decode_entry(encode_entry(finished))
    assert isinstance(back, Finished) and bytes(back.result) == result
    assert back.dead_letter == DeadLetter("feishu", "Feishu code 1")
    assert decode_entry(encode_entry(Started("intents", 4, 17, "r-1"))) == Started("intents", 4, 17, "r-1")
    assert decode_entry(b"not json") is None and decode_entry(None) is None
    # lenient: a newer relay's extra field does not make an entry unreadable
    assert decode_entry(b'{"entry":"started","topic":"t","partition":0,"offset":1,"id":"x","new":1}') is not None
    assert entry_key("intents", 4, 17) == b"intents/4/17"


def test_a_finished_entry_beats_a_started_one_in_any_order() -> None:
    started = Started("t", 0, 5, "x")
    finished = Finished("t", 0, 5, "x", msgspec.Raw(b"{}"))
    for order in ((started, finished), (finished, started)):
        entries: dict[int, Started | Finished] = {}
        for entry in order:
            keep(entries, entry)
        assert entries == {5: finished}


def test_a_source_partition_maps_to_a_fixed_journal_partition() -> None:
    assert [journal_partition(p, 4) for p in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]


# ---- the position is a lower bound of every entry of an uncommitted record ---------------------------------------


def test_position_is_the_known_end_when_nothing_is_journaled() -> None:
    book = JournalBook()
    assert book.position(SOURCE, 100) is None  # not owned: read from the beginning
    book.own(SOURCE, 0, 500)
    assert book.position(SOURCE, 100) == JournalPosition(0, 500)
    book.advance(0, 450)  # the end never goes back
    assert book.position(SOURCE, 100) == JournalPosition(0, 500)
    book.advance(0, 900)  # a refresh, or another source's acknowledged write
    assert book.position(SOURCE, 100) == JournalPosition(0, 900)


def test_position_covers_writes_in_flight_and_uncommitted_records() -> None:
    book = JournalBook()
    book.own(SOURCE, 0, 500)
    low = book.begin(SOURCE)  # a Started entry for record 120 is being written
    book.advance(0, 800)  # meanwhile a refresh saw a later end: the entry may still land below it
    assert book.position(SOURCE, 100) == JournalPosition(0, 500)
    book.end_write(SOURCE, low, 120, 610)  # acknowledged at 610
    assert book.position(SOURCE, 100) == JournalPosition(0, 610)
    assert book.position(SOURCE, 121) == JournalPosition(0, 800)  # past record 120: the end
    book.committed(SOURCE, 121)
    assert book.position(SOURCE, 100) == JournalPosition(0, 800)  # record 120's floor is gone for good


def test_a_failed_write_stops_holding_the_position_back() -> None:
    book = JournalBook()
    book.own(SOURCE, 0, 500)
    low = book.begin(SOURCE)
    book.advance(0, 700)
    book.end_write(SOURCE, low, 120, None)
    assert book.position(SOURCE, 100) == JournalPosition(0, 700)


def test_a_previous_owners_entries_stay_covered_until_committed() -> None:
    book = JournalBook()
    book.found(SOURCE, 130, 420)  # read at assignment, before own()
    book.found(SOURCE, 130, 415)  # its Started was earlier than its Finished
    book.own(SOURCE, 0, 500)
    assert book.position(SOURCE, 100) == JournalPosition(0, 415)
    book.committed(SOURCE, 131)
    assert book.position(SOURCE, 131) == JournalPosition(0, 500)


def test_sources_sharing_a_journal_partition_keep_their_own_floors() -> None:
    book = JournalBook()
    other = ("intents", 0)
    book.own(SOURCE, 0, 100)
    book.own(other, 0, 100)
    low = book.begin(other)
    book.end_write(other, low, 7, 150)  # the other source's write moves the shared end only
    assert book.position(SOURCE, 0) == JournalPosition(0, 151)
    assert book.position(other, 0) == JournalPosition(0, 150)
    book.forget(other)
    assert book.journal_partitions() == {0} and book.position(other, 0) is None


# ---- the Kafka journal, on the real broker -----------------------------------------------------------------------


@pytest.mark.integration
async def test_kafka_journal_reads_back_what_matters_from_the_committed_position(
        kafka_bootstrap: str, topic_prefix: str) -> None:
    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap, journal_topic=f"{topic_prefix}.journal",
                      topic_partitions=2)
    await ensure_topics(cfg, {cfg.journal_topic: {}})
    source, neighbour = TopicPartition("in", 2), TopicPartition("in", 0)  # both write to journal partition 0
    producer = make_producer(cfg)
    await producer.start()
    try:
        first = KafkaJournal(cfg, producer)
        await first.start()
        await first.load({source: (0, None), neighbour: (0, None)})
        assert first.position(source, 0) == JournalPosition(0, 0)
        await first.started(source, 3, "old")  # a record committed below: must not come back
        await first.finished(source, 3, "old", b'{"id":"old"}', None)
        await first.started(neighbour, 10, "n")  # another source on the same journal partition
        await first.started(source, 10, "s-10")
        await first.finished(source, 10, "s-10", b'{"id":"s-10","status":"ok"}', DeadLetter("feishu", "why"))
        await first.started(source, 11, "s-11")  # killed before it finished
        first.committed(source, 10)
        position = first.position(source, 10)
        assert position == JournalPosition(0, 3)  # record 10's Started: the 4th entry of journal partition 0
        assert first.writes == 6
        await first.stop()

        # the next owner: only source's entries at offsets >= the committed 10, from the position on
        second = KafkaJournal(cfg, producer)
        await second.start()
        await second.load({source: (10, position)})
        finished, started = second.recovered(source, 10), second.recovered(source, 11)
        assert isinstance(finished, Finished) and bytes(finished.result) == b'{"id":"s-10","status":"ok"}'
        assert finished.dead_letter == DeadLetter("feishu", "why")
        assert started == Started("in", 2, 11, "s-11")
        assert second.recovered(source, 3) is None and second.recovered(neighbour, 10) is None
        assert second.recovered(source, 10) is None, "asked once per record"
        assert second.position(source, 10) == position  # still covered until committed past
        await second.stop()

        # without a position (a first run): read from the beginning, keep what is not committed
        third = KafkaJournal(cfg, producer)
        await third.start()
        await third.load({source: (4, None)})
        assert isinstance(third.recovered(source, 10), Finished) and third.recovered(source, 3) is None
        await third.stop()
    finally:
        await producer.stop()


@pytest.mark.integration
async def test_an_idle_partition_commits_a_recent_position(kafka_bootstrap: str, topic_prefix: str) -> None:
    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap, journal_topic=f"{topic_prefix}.journal",
                      topic_partitions=1)
    await ensure_topics(cfg, {cfg.journal_topic: {}})
    idle, busy = TopicPartition("in", 0), TopicPartition("in", 1)  # one journal partition for both
    producer = make_producer(cfg)
    await producer.start()
    try:
        ours = KafkaJournal(cfg, producer, refresh_seconds=0.1)
        theirs = KafkaJournal(cfg, producer)  # another replica, owning the busy partition
        await ours.start()
        await theirs.start()
        await ours.load({idle: (0, None)})
        await theirs.load({busy: (0, None)})
        for offset in range(5):
            await theirs.started(busy, offset, f"b-{offset}")
        for _ in range(100):  # the refresh sees their writes: our position does not lag behind them
            if ours.position(idle, 0) == JournalPosition(0, 5):
                break
            await asyncio.sleep(0.05)
        assert ours.position(idle, 0) == JournalPosition(0, 5)
        await ours.stop()
        await theirs.stop()
    finally:
        await producer.stop()

