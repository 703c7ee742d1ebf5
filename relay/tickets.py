"""Store apps' ``app_ticket``: the latest one per app, kept in a compacted Kafka topic that every replica follows.

A store app (商店应用) gets its tokens from an ``app_ticket`` that Feishu pushes to the app's event URL every hour
(a v1 event ``{"type": "event_callback", "event": {"app_id", "app_ticket", "type": "app_ticket"}}``, event page
``application-v6/event/app_ticket-events``) or at once after ``POST /open-apis/auth/v3/app_ticket/resend``. The
push reaches whichever replica the load balancer picks, and a restarted relay must not wait an hour for the next,
so the inbound side publishes the verified event to ``kafka.app_tickets_topic`` keyed by ``app_id`` (answering
Feishu only once Kafka holds it, like any event), and every replica follows that topic from the beginning, then
live (:class:`KafkaTickets`): compaction keeps one record per app, so a start-up reads one record per store app.

:class:`TicketBook` is the pure core: the latest ticket per ``app_id``, who waits for one, and a ticket Feishu
called invalid (code 10012) dropped so the next token fetch asks for a resend (``relay.feishu``). The Go SDK keeps
a ticket 12 h; Feishu documents no lifetime, so a ticket is kept until a newer one arrives or Feishu refuses it.
The ticket is a credential only together with the app secret; it is never logged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

from relay.config import KafkaConfig

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

log = logging.getLogger(__name__)

APP_TICKET: Final = "app_ticket"
# compact: one record per app survives, the latest ticket
TICKETS_TOPIC_CONFIG: Final[dict[str, str]] = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}


class _TicketEvent(msgspec.Struct):
    """What the relay reads of an app_ticket event (lenient: Feishu's other fields are ignored)."""

    app_id: str = ""
    app_ticket: str = ""
    type: str = ""


class _TicketEnvelope(msgspec.Struct):
    event: _TicketEvent | None = None


_decoder: Final = msgspec.json.Decoder(_TicketEnvelope)


def read_ticket(value: bytes) -> tuple[str, str] | None:
    """``(app_id, app_ticket)`` of an app_ticket event body (as published by the inbound side), else None."""
    try:
        event = _decoder.decode(value).event
    except msgspec.DecodeError:
        return None
    if event is None or event.type != APP_TICKET or not event.app_id or not event.app_ticket:
        return None
    return event.app_id, event.app_ticket


class Tickets(Protocol):
    """Where :class:`~relay.feishu.FeishuClient` finds a store app's latest ticket."""

    def get(self, app_id: str) -> str | None:
        ...

    def drop(self, app_id: str, ticket: str) -> None:
        ...

    async def wait(self, app_id: str, timeout: float) -> str | None:
        ...


class TicketBook:
    """The latest ticket per app_id; waiters are woken when one arrives (pure, no I/O)."""

    def __init__(self) -> None:
        self._tickets: dict[str, str] = {}
        self._arrived: dict[str, asyncio.Event] = {}
        self.read = 0  # tickets read (tests, logs)

    def put(self, app_id: str, ticket: str) -> None:
        self.read += 1
        self._tickets[app_id] = ticket
        arrived = self._arrived.pop(app_id, None)
        if arrived is not None:
            arrived.set()

    def get(self, app_id: str) -> str | None:
        return self._tickets.get(app_id)

    def drop(self, app_id: str, ticket: str) -> None:
        """Forget ``ticket`` (Feishu said it is invalid) unless a newer one has arrived meanwhile."""
        if self._tickets.get(app_id) == ticket:
            del self._tickets[app_id]

    async def wait(self, app_id: str, timeout: float) -> str | None:
        """The ticket at once if there is one, else the next to arrive within ``timeout`` seconds, else None."""
        ticket = self._tickets.get(app_id)
        if ticket is not None:
            return ticket
        arrived = self._arrived.setdefault(app_id, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                await arrived.wait()
        except TimeoutError:
            return None
        return self._tickets.get(app_id)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the tickets topic; a tombstone or an unreadable value changes nothing."""
        if value is None:
            return
        read = read_ticket(value)
        if read is None:
            log.warning("app tickets: unreadable record under key %r ignored", (key or b"")[:80])
            return
        self.put(*read)


class KafkaTickets(TicketBook):
    """A :class:`TicketBook` loaded from ``kafka.app_tickets_topic`` and kept current by a tail task."""

    def __init__(self, cfg: KafkaConfig, producer: AIOKafkaProducer, *, load_timeout: float = 60.0) -> None:
        """``producer``: a started producer, asked for the topic's partitions (it waits for the metadata)."""
        super().__init__()
        self._cfg = cfg
        self._producer = producer
        self.topic = cfg.app_tickets_topic
        self._load_timeout = load_timeout
        self._consumer: AIOKafkaConsumer | None = None
        self._tail: asyncio.Task[None] | None = None

    async def start(self) -> asyncio.Task[None]:
        """Read the topic to its end (so a restarted relay knows the latest tickets), then follow it in a task;
        returns that task (it ends only with an error, or :meth:`stop`)."""
        from aiokafka import TopicPartition

        from relay.kafka import FOLLOWER_FETCH_WAIT_MS, ensure_topics, make_consumer, read_to_end

        if self._cfg.create_topics:
            await ensure_topics(self._cfg, {self.topic: dict(TICKETS_TOPIC_CONFIG)})
        consumer = self._consumer = make_consumer(self._cfg, group_id=None, enable_auto_commit=False,
                                                  fetch_max_wait_ms=FOLLOWER_FETCH_WAIT_MS)
        await consumer.start()
        async with asyncio.timeout(self._load_timeout):
            partitions: set[int] = await self._producer.partitions_for(self.topic)
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await read_to_end(consumer, tps, self._apply_records)
        log.info("app tickets: %d read from %s; following it", self.read, self.topic)
        self._tail = asyncio.create_task(self._follow(consumer), name="app-tickets")
        return self._tail

    async def stop(self) -> None:
        tail, self._tail = self._tail, None
        if tail is not None:
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            self._apply_batch(await consumer.getmany(timeout_ms=5000))

    def _apply_batch(self, batch: dict[Any, list[Any]]) -> None:
        for records in batch.values():
            self._apply_records(records)

    def _apply_records(self, records: list[Any]) -> None:
        for record in records:
            self.apply(record.key, record.value)
