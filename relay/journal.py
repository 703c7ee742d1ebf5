"""The write-ahead journal: a call that is not safe to repeat is never performed twice, not even across a kill.

A record's offset is committed only after its result is written, so a relay killed (or a drain cut off, or a
rebalance) between a Feishu call and that commit leaves the record to the partition's next owner, which would
perform the call again: a second reaction, a second SMS buzz, a second broadcast. For calls that are not
``Call.repeatable``, the relay therefore writes to a Kafka topic (``kafka.journal_topic``) and awaits
(``acks=all``):

    Started(topic, partition, offset, id)            before the call's first request is written (a tenant
                                                     token and a connection held: the executor's before_write)
    Finished(..., result, dead_letter)               after the call ended, BEFORE its result and dead letter

``result`` is the exact bytes of the result record; ``dead_letter`` the ``relay.error`` and ``relay.reason``
of the dead letter due, if any. A new owner of the partition that reaches a record with a journal entry does not
call Feishu: with ``Finished`` it writes that result again (identical bytes, a harmless duplicate of one the
previous owner may have written) and the dead letter; with only ``Started`` it writes a ``failed`` result with
``relay.error`` = ``outcome-unknown`` (the call may or may not have been performed), after journaling that
result as ``Finished`` so a third owner writes the same bytes. Repeatable calls write nothing here: only the
kinds that need it pay two extra acknowledged writes per intent.

Where a new owner reads. Source partition ``(t, p)`` always writes to journal partition ``p mod N`` (N = the
journal's partition count), and its commit metadata carries a *journal position*
(:class:`~relay.offsets.JournalPosition`: that journal partition and an offset before which no entry of the
partition's uncommitted records can lie). At assignment the new owner reads the journal partition from that
position to its end and keeps the entries of its source partition at offsets at or above the committed one, so
what it reads is what was written since the oldest uncommitted call started, not the whole topic. Without a
position (a group's first run, metadata from before the journal, unreadable commit metadata) it reads from the
beginning: bounded by the topic's retention, and read once.

How the position stays a lower bound (:class:`JournalBook`, pure): every entry this process writes for a source
partition lands at or after the journal offset known as the end when its write began (Kafka appends), and is
kept, until the commit passes its record, as that record's *floor*; writes in flight count with the end known
when they began. The position committed is the lowest floor of the records at or above the commit point, or the
known end when there are none. The known end only grows: from the end read at assignment, from this process's
acknowledged writes, and from a refresh every ``REFRESH_SECONDS``, so an idle partition sharing a busy journal
partition commits a position at most that old.

Topic settings (:data:`JOURNAL_TOPIC_CONFIG`): ``cleanup.policy=delete``. An entry matters only until its
record is committed: seconds while the relay runs, but as long as the whole group is stopped, so retention is 7
days (Kafka's default, which the intents topics have unless configured otherwise; keep the journal's retention
at least as long as theirs) with daily segments so old data really goes. Not compacted: compaction keeps the
last entry of every key forever (one per non-repeatable intent ever made), and a reader starting at a recent
position gains nothing from it. ``max.message.bytes`` is sized like the results topic's, since ``Finished``
carries a result. Do not change the journal's partition count while records are uncommitted and no position
was committed yet (first run): the mapping ``p mod N`` would point elsewhere (a committed position names its
journal partition, so later runs do not depend on N).

What this does not cover: a uuid kind's protection is Feishu's (at most once per ``uuid`` per hour), not the
journal's; a record whose started entry could not be written is not called (its intent fails ``internal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final, Protocol

import msgspec

from relay.config import KafkaConfig
from relay.errors import RelayError
from relay.offsets import JournalPosition

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

log = logging.getLogger(__name__)

__all__ = [
    "JOURNAL_TOPIC_CONFIG",
    "DeadLetter",
    "Entry",
    "Finished",
    "Journal",
    "JournalBook",
    "JournalUnavailable",
    "KafkaJournal",
    "Started",
    "decode_entry",
    "encode_entry",
    "entry_key",
    "journal_partition",
]

# seconds between refreshes of the journal partitions' end offsets (module doc)
REFRESH_SECONDS: Final = 30.0
# how long the broker may hold a fetch of a journal load (KafkaJournal._consumer)
LOAD_FETCH_WAIT_MS: Final = 20
JOURNAL_TOPIC_CONFIG: Final = {
    "cleanup.policy": "delete",
    "retention.ms": str(7 * 24 * 3600 * 1000),
    "segment.ms": str(24 * 3600 * 1000),
}


# ---- entries (the wire shapes; lenient, so a newer relay's extra fields never break an older one) ---------------


class DeadLetter(msgspec.Struct, frozen=True):
    """The dead letter due with a journaled result: its ``relay.error`` and ``relay.reason``."""

    error: str
    reason: str


class Started(msgspec.Struct, frozen=True, tag_field="entry", tag="started"):
    """The call of the record at ``topic``/``partition``/``offset`` (intent ``id``) is about to be attempted."""

    topic: str
    partition: int
    offset: int
    id: str


class Finished(msgspec.Struct, frozen=True, tag_field="entry", tag="finished"):
    """The call ended: ``result`` is the result record's value, byte for byte; ``dead_letter`` is due if set."""

    topic: str
    partition: int
    offset: int
    id: str
    result: msgspec.Raw
    dead_letter: DeadLetter | None = None


Entry = Started | Finished

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Entry)


def encode_entry(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def decode_entry(value: bytes | None) -> Entry | None:
    """The entry of a journal record, or None for one this relay cannot read (logged, then ignored)."""
    if value is None:
        return None
    try:
        return _decoder.decode(value)
    except msgspec.DecodeError:
        log.warning("journal: unreadable entry ignored (%d bytes)", len(value))
        return None


def entry_key(topic: str, partition: int, offset: int) -> bytes:
    """``<topic>/<partition>/<offset>``: Kafka topic names cannot contain ``/``."""
    return f"{topic}/{partition}/{offset}".encode()


def journal_partition(source_partition: int, journal_partitions: int) -> int:
    """The journal partition a source partition writes to (module doc)."""
    return source_partition % journal_partitions


def keep(entries: Mapping[int, Entry], entry: Entry) -> None:
    """Add ``entry`` to the entries of one source partition by offset: a ``Finished`` beats a ``Started``."""
    if isinstance(entries.get(entry.offset), Finished) and isinstance(entry, Started):
        return
    entries[entry.offset] = entry  # type: ignore[index]  # a dict in practice; Mapping keeps callers honest


# ---- the position bookkeeping (pure) -------------------------------------------------------------------------


Source = tuple[str, int]  # (topic, partition) of an intents partition


class JournalBook:
    """Per source partition, where entries of its uncommitted records can lie in its journal partition.

    Plain values only, so the lower-bound argument of the module docstring is tested without Kafka.
    """

    __slots__ = ("_end", "_floors", "_partition", "_sending")

    def __init__(self) -> None:
        self._end: dict[int, int] = {}  # journal partition -> a known lower bound of its end offset
        self._partition: dict[Source, int] = {}  # source -> its journal partition (while owned)
        self._floors: dict[Source, dict[int, int]] = {}  # source -> record offset -> lowest journal offset
        self._sending: dict[Source, list[int]] = {}  # source -> known end when each write in flight began

    def own(self, source: Source, journal_partition: int, end: int) -> None:
        """``source`` is ours, writing to ``journal_partition`` whose end was just read as ``end``."""
        self._partition[source] = journal_partition
        self.advance(journal_partition, end)
        self._floors.setdefault(source, {})
        self._sending.setdefault(source, [])

    def advance(self, journal_partition: int, end: int) -> None:
        """The journal partition's end is known to be at least ``end`` (it only grows)."""
        if end > self._end.get(journal_partition, -1):
            self._end[journal_partition] = end

    def found(self, source: Source, record_offset: int, journal_offset: int) -> None:
        """A previous owner's entry for ``record_offset``, read at ``journal_offset``: keep it covered."""
        floors = self._floors.setdefault(source, {})
        floors[record_offset] = min(floors.get(record_offset, journal_offset), journal_offset)

    def begin(self, source: Source) -> int:
        """A write for ``source`` begins; returns the token :meth:`end_write` needs (the known end now)."""
        jp = self._partition.get(source)
        low = self._end.get(jp, 0) if jp is not None else 0
        self._sending.setdefault(source, []).append(low)
        return low

    def end_write(self, source: Source, low: int, record_offset: int, journal_offset: int | None) -> None:
        """The write begun with ``low`` ended: acknowledged at ``journal_offset``, or failed (None)."""
        sending = self._sending.get(source)
        if sending is not None and low in sending:
            sending.remove(low)
        if journal_offset is None or source not in self._partition:
            return
        self.found(source, record_offset, journal_offset)
        self.advance(self._partition[source], journal_offset + 1)

    def position(self, source: Source, commit_point: int) -> JournalPosition | None:
        """Where a new owner must start reading, for a commit at ``commit_point`` (None: from the beginning)."""
        jp = self._partition.get(source)
        if jp is None or jp not in self._end:
            return None
        lows = [j for offset, j in self._floors.get(source, {}).items() if offset >= commit_point]
        lows.extend(self._sending.get(source, ()))
        return JournalPosition(jp, min(lows, default=self._end[jp]))

    def committed(self, source: Source, commit_point: int) -> None:
        """Records below ``commit_point`` are committed: their entries can no longer matter."""
        floors = self._floors.get(source)
        if floors:
            for offset in [o for o in floors if o < commit_point]:
                del floors[offset]

    def forget(self, source: Source) -> None:
        self._partition.pop(source, None)
        self._floors.pop(source, None)
        self._sending.pop(source, None)

    def journal_partitions(self) -> set[int]:
        """The journal partitions of the sources owned now."""
        return set(self._partition.values())


# ---- the journal the outbound engine uses --------------------------------------------------------------------


class JournalUnavailable(Exception):
    """An entry could not be written and retrying cannot help (not authorized, too large): the call is not made."""


class Journal(Protocol):
    """What :class:`relay.outbound.Outbound` needs; :class:`KafkaJournal` is the real one."""

    async def load(self, committed: Mapping[TopicPartition, tuple[int, JournalPosition | None]]) -> None:
        """Read the entries of newly assigned partitions: ``{tp: (committed offset, position or None)}``."""
        ...

    def recovered(self, tp: TopicPartition, offset: int) -> Entry | None:
        """The entry a previous owner left for the record at ``offset`` (consumed: asked once per record)."""
        ...

    async def started(self, tp: TopicPartition, offset: int, id: str) -> None:
        """Journal the start of a call; returns once durable. Raises JournalUnavailable if it cannot be."""
        ...

    async def finished(self, tp: TopicPartition, offset: int, id: str, result: bytes,
                       dead_letter: DeadLetter | None) -> None:
        """Journal how a call ended, before its result is written; returns once durable (or logged as lost)."""
        ...

    def position(self, tp: TopicPartition, commit_point: int) -> JournalPosition | None:
        """The journal position to commit with ``commit_point`` (see :class:`JournalBook`)."""
        ...

    def committed(self, tp: TopicPartition, commit_point: int) -> None:
        ...

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        ...


class KafkaJournal:
    """The journal in ``kafka.journal_topic``, written with the relay's ``acks=all`` producer (module doc).

    Entries of source partition ``(t, p)`` go to journal partition ``p mod N`` (chosen explicitly, not by key
    hash, so a reader knows the one partition to read). Reads use a plain ``assign()``-ed consumer without a
    group, started and stopped per load (assignments are rare; a consumer left assigned would keep fetching).
    """

    def __init__(self, cfg: KafkaConfig, producer: AIOKafkaProducer, *, load_timeout: float = 60.0,
                 refresh_seconds: float = REFRESH_SECONDS) -> None:
        """``producer``: the relay's started idempotent ``acks=all`` producer (shared, not stopped here)."""
        self._cfg = cfg
        self.topic = cfg.journal_topic
        self._producer = producer
        self._load_timeout = load_timeout
        self._refresh_seconds = refresh_seconds
        self._partitions = 0
        self.book = JournalBook()
        self._entries: dict[Source, dict[int, Entry]] = {}
        self._refresher: asyncio.Task[None] | None = None
        self.writes = 0  # entries acknowledged, for tests and metrics

    async def start(self) -> None:
        """Learn the journal's partition count (the topic must exist: ``app.topics_to_create`` makes it)."""
        from aiokafka.errors import KafkaError

        try:
            partitions: set[int] = await self._producer.partitions_for(self.topic)  # waits for the metadata
        except KafkaError as err:
            raise RelayError(f"kafka.journal_topic: topic {self.topic!r} is not available ({err}); create it "
                             "or set kafka.create_topics = true") from None
        if not partitions:
            raise RelayError(f"kafka.journal_topic: topic {self.topic!r} has no partitions")
        self._partitions = len(partitions)
        self._refresher = asyncio.create_task(self._refresh_loop(), name="relay-journal-refresh")

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # its failures are logged in the loop
                await self._refresher
            self._refresher = None

    def _partition_of(self, source_partition: int) -> int:
        if not self._partitions:
            raise RuntimeError("KafkaJournal used before start()")
        return journal_partition(source_partition, self._partitions)

    # reading, at assignment ----------------------------------------------------------------------------

    async def load(self, committed: Mapping[TopicPartition, tuple[int, JournalPosition | None]]) -> None:
        """Read each needed journal partition once, from the lowest position among its sources, to its end."""
        from aiokafka import TopicPartition

        if not committed:
            return
        first: dict[int, int | None] = {}  # journal partition -> first offset to read (None: the beginning)
        wanted: dict[int, dict[Source, int]] = {}  # journal partition -> source -> committed offset
        for tp, (offset, position) in committed.items():
            jp = position.partition if position is not None else self._partition_of(tp.partition)
            if jp != self._partition_of(tp.partition):  # the count changed since that commit (module doc)
                log.warning("journal: %s[%d] committed journal partition %d but now writes to %d", tp.topic,
                            tp.partition, jp, self._partition_of(tp.partition))
            wanted.setdefault(jp, {})[(tp.topic, tp.partition)] = max(offset, 0)
            at = position.offset if position is not None else None
            if jp not in first:
                first[jp] = at
            else:
                known = first[jp]
                first[jp] = None if at is None or known is None else min(at, known)
        tps = [TopicPartition(self.topic, jp) for jp in sorted(first)]
        found = 0
        consumer = self._consumer()
        await consumer.start()
        try:
            consumer.assign(tps)
            for tp in tps:
                at = first[tp.partition]
                if at is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, at)  # below the log start (retention): reset to the earliest
            end: dict[TopicPartition, int] = await consumer.end_offsets(tps)
            async with asyncio.timeout(self._load_timeout):
                todo = {tp for tp in tps if await consumer.position(tp) < end[tp]}
                while todo:
                    batch = await consumer.getmany(*todo, timeout_ms=500)
                    for jtp, records in batch.items():
                        for record in records:
                            found += self._read(jtp.partition, wanted.get(jtp.partition, {}), record.offset,
                                                record.value)
                    todo = {tp for tp in todo if await consumer.position(tp) < end[tp]}
        finally:
            await consumer.stop()
        ends = {tp.partition: offset for tp, offset in end.items()}
        for tp in committed:
            jp = self._partition_of(tp.partition)
            self.book.own((tp.topic, tp.partition), jp, ends.get(jp, 0))  # not read: 0 is a safe lower bound
        log.info("journal: %d entries for %d partition(s) read from %s (%s)", found, len(committed), self.topic,
                 ", ".join(f"[{jp}] from {'the start' if at is None else at}" for jp, at in sorted(first.items())))

    def _read(self, jp: int, wanted: Mapping[Source, int], journal_offset: int, value: bytes | None) -> int:
        entry = decode_entry(value)
        if entry is None:
            return 0
        source = (entry.topic, entry.partition)
        committed = wanted.get(source)
        if committed is None or entry.offset < committed:
            return 0  # another partition's, or a record already committed
        keep(self._entries.setdefault(source, {}), entry)
        if jp == self._partition_of(entry.partition):  # a floor in the partition our positions name
            self.book.found(source, entry.offset, journal_offset)
        return 1

    def _consumer(self) -> AIOKafkaConsumer:
        from relay.kafka import make_consumer

        # a load reads to the end once: nothing is gained by letting the broker hold its fetches, and each
        # partition's offset lookup waits behind the fetch in flight (a broker answers a connection's requests in
        # turn): at the relays' idle wait of 500 ms, 24 partitions took 12 s to load, at 20 ms about a second
        return make_consumer(self._cfg, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=LOAD_FETCH_WAIT_MS)

    def recovered(self, tp: TopicPartition, offset: int) -> Entry | None:
        entries = self._entries.get((tp.topic, tp.partition))
        return entries.pop(offset, None) if entries else None

    # writing -------------------------------------------------------------------------------------------

    async def started(self, tp: TopicPartition, offset: int, id: str) -> None:
        await self._write(tp, Started(tp.topic, tp.partition, offset, id), required=True)

    async def finished(self, tp: TopicPartition, offset: int, id: str, result: bytes,
                       dead_letter: DeadLetter | None) -> None:
        entry = Finished(tp.topic, tp.partition, offset, id, msgspec.Raw(result), dead_letter)
        await self._write(tp, entry, required=False)

    async def _write(self, tp: TopicPartition, entry: Entry, *, required: bool) -> None:
        """Produce and await the acknowledgement, retrying retriable errors until it comes (or cancellation).

        A non-retriable error: for ``Started`` (``required``) the call must not be made, so it raises; for
        ``Finished`` the result is written anyway (a later owner would then report the outcome as unknown,
        never repeat the call), so it is logged and dropped.
        """
        from aiokafka.errors import KafkaError

        source = (tp.topic, tp.partition)
        value, key = encode_entry(entry), entry_key(tp.topic, tp.partition, entry.offset)
        jp = self._partition_of(tp.partition)
        delay = 0.1
        while True:
            low = self.book.begin(source)
            acked: int | None = None
            try:
                future = await self._producer.send(self.topic, value, key=key, partition=jp)
                acked = (await future).offset
                self.writes += 1
                return
            except KafkaError as err:
                if not err.retriable:
                    log.error("journal: writing to %s failed for good (%s)", self.topic, err)
                    if required:
                        raise JournalUnavailable(f"kafka.journal_topic {self.topic}: {err}") from None
                    return
                log.warning("journal: writing to %s failed (%s); retrying in %.1fs", self.topic, err, delay)
            finally:
                self.book.end_write(source, low, entry.offset, acked)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # positions -----------------------------------------------------------------------------------------

    def position(self, tp: TopicPartition, commit_point: int) -> JournalPosition | None:
        return self.book.position((tp.topic, tp.partition), commit_point)

    def committed(self, tp: TopicPartition, commit_point: int) -> None:
        self.book.committed((tp.topic, tp.partition), commit_point)
        entries = self._entries.get((tp.topic, tp.partition))
        if entries:  # a previous owner's entries below the commit point will never be asked for
            for offset in [o for o in entries if o < commit_point]:
                del entries[offset]

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.book.forget((tp.topic, tp.partition))
            self._entries.pop((tp.topic, tp.partition), None)

    async def _refresh_loop(self) -> None:
        """Keep the known ends recent, so an idle partition commits a recent position (module doc).

        Best effort: a failure only leaves the known ends older (positions stay lower bounds), so it is logged
        and tried again at the next interval."""
        from aiokafka import TopicPartition

        consumer: AIOKafkaConsumer | None = None
        try:
            while True:
                await asyncio.sleep(self._refresh_seconds)
                tps = [TopicPartition(self.topic, jp) for jp in sorted(self.book.journal_partitions())]
                if not tps:
                    continue
                try:
                    if consumer is None:
                        consumer = self._consumer()
                        await consumer.start()
                    ends = await consumer.end_offsets(tps)
                except Exception as err:  # any failure only delays the refresh (docstring)
                    log.warning("journal: could not refresh end offsets (%s)", err)
                    continue
                for jtp, end in ends.items():
                    self.book.advance(jtp.partition, end)
        finally:
            if consumer is not None:
                await consumer.stop()
