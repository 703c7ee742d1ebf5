"""A producer for Python services: typed intents in, results out, without the relay's own config.

    async with RelayClient("kafka:9092") as relay:
        await relay.send(MessageSend(id="n-1", receive_id_type="chat_id", receive_id="oc_1",
                                     msg_type="text", content={"text": "hi"}))          # returns once Kafka has it
        result = await relay.send_and_wait(PinAdd(id="n-2", message_id="om_1"))      # returns the result record
        assert result.status == "ok"

What it does for the caller, and why it matters:

* **The record key** is the intent's ordering key (:func:`relay.intents.ordering_key`), so intents that must stay
  in order (one chat's messages, one message's edits) land on one partition. A hand-written producer that keys by
  ``id`` or not at all loses that order.
* **Delivery** is idempotent with ``acks="all"``: :meth:`RelayClient.send` returns when every in-sync replica has
  the record, and raises (aiokafka's ``KafkaError``) when it cannot be written.
* **The value** is the intent struct encoded as JSON, which the relay decodes back to the same struct: an intent
  the struct accepted is never ``rejected`` for its shape (a Feishu refusal is still possible).
* :meth:`RelayClient.send_and_wait` reads the results topic from its end *before* producing, so a result that
  comes back fast is not missed, and returns the decoded :class:`relay.results.Result` (whatever its status: a
  ``failed`` result is an answer, not an exception). It raises ``TimeoutError`` when no result came in time.
  One reader serves every concurrent ``send_and_wait`` of a client.

Only aiokafka and the relay's type modules are used; ``kafka_settings`` (``security_protocol``, ``sasl_*``,
``ssl_context``, ...) go to both the producer and the results consumer unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Any, Final

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import RecordMetadata

from relay.errors import RelayError
from relay.intents import Intent, ordering_key
from relay.kafka import new_consumer
from relay.results import Result

log = logging.getLogger(__name__)

DEFAULT_INTENTS_TOPIC: Final = "feishu.intents"
DEFAULT_RESULTS_TOPIC: Final = "feishu.results"
# a topic created a moment ago may be missing from the metadata briefly: ask this many times, this far apart
METADATA_TRIES: Final = 20
METADATA_RETRY_SECONDS: Final = 0.25

_encoder: Final = msgspec.json.Encoder()
_result_decoder: Final = msgspec.json.Decoder(Result)


def encode(intent: Intent) -> tuple[bytes, bytes]:
    """(record key, record value) of an intent: its ordering key and its JSON."""
    return ordering_key(intent).encode(), _encoder.encode(intent)


class RelayClient:
    """Produces intents to the relay and, on demand, waits for their results."""

    def __init__(self, bootstrap_servers: str, *, intents_topic: str = DEFAULT_INTENTS_TOPIC,
                 results_topic: str = DEFAULT_RESULTS_TOPIC, client_id: str = "feishu-relay-client",
                 **kafka_settings: Any) -> None:
        self.intents_topic = intents_topic
        self.results_topic = results_topic
        self._settings: dict[str, Any] = {"bootstrap_servers": bootstrap_servers, "client_id": client_id,
                                          **kafka_settings}
        self._producer = AIOKafkaProducer(**self._settings, acks="all", enable_idempotence=True, linger_ms=5)
        self._started = False
        self._results: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reader_ready: asyncio.Lock | None = None
        self._waiting: dict[str, list[asyncio.Future[Result]]] = {}  # intent id -> its waiters

    async def __aenter__(self) -> RelayClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        await self._producer.start()
        self._started = True

    async def stop(self) -> None:
        """Stop the results reader (waiters get ``RelayError``), then flush and stop the producer."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._results is not None:
            await self._results.stop()
            self._results = None
        for futures in self._waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(RelayError("RelayClient stopped before the result arrived"))
        self._waiting.clear()
        if self._started:
            self._started = False
            await self._producer.stop()

    async def send(self, intent: Intent, *, headers: list[tuple[str, bytes]] | None = None) -> RecordMetadata:
        """Produce ``intent`` keyed by its ordering key; returns once Kafka acknowledged it."""
        key, value = encode(intent)
        delivery = await self._producer.send(self.intents_topic, value, key=key, headers=headers or [])
        metadata: RecordMetadata = await delivery
        return metadata

    async def send_and_wait(self, intent: Intent, *, timeout: float = 30.0,
                            headers: list[tuple[str, bytes]] | None = None) -> Result:
        """Produce ``intent`` and return its result record (raises ``TimeoutError`` after ``timeout`` s)."""
        await self._start_reader()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(intent.id, []).append(future)  # before producing: the result may be quick
        try:
            await self.send(intent, headers=headers)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(f"no result for {intent.id} on {self.results_topic} within {timeout:g} s "
                               "(is the relay running?)") from None
        finally:
            waiters = self._waiting.get(intent.id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiting.pop(intent.id, None)

    async def _start_reader(self) -> None:
        """Once: a consumer on every partition of the results topic, positioned at its end."""
        if self._reader_ready is None:
            self._reader_ready = asyncio.Lock()
        async with self._reader_ready:
            if self._reader is not None:
                return
            # a relay.kafka.Consumer: closed whole when its start fails, or when it is stopped at once below
            consumer = new_consumer(**self._settings, group_id=None, enable_auto_commit=False)
            await consumer.start()
            try:
                # a consumer without assignments has no topic metadata yet, and consumer.topics() (public) keeps
                # the partitions it fetched to itself: ask the client for the cluster's metadata. A topic created
                # a moment ago may not be in every broker's metadata yet, so ask again for a few seconds.
                partitions: set[int] | None = None
                for _ in range(METADATA_TRIES):
                    cluster = await consumer._client.fetch_all_metadata()
                    partitions = cluster.partitions_for_topic(self.results_topic)
                    if partitions:
                        break
                    await asyncio.sleep(METADATA_RETRY_SECONDS)
                if not partitions:
                    raise RelayError(f"results topic {self.results_topic!r} does not exist (is the relay running?)")
                tps = [TopicPartition(self.results_topic, p) for p in sorted(partitions)]
                consumer.assign(tps)
                await consumer.seek_to_end(*tps)
                for tp in tps:  # resolve the end offsets now, before anything is produced
                    await consumer.position(tp)
            except BaseException:
                await consumer.stop()
                raise
            self._results = consumer
            self._reader = asyncio.create_task(self._read(consumer), name="relay-client-results")

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    waiters = self._waiting.get(record.key.decode(errors="replace")) if record.key else None
                    if not waiters or record.value is None:
                        continue
                    try:
                        outcome: Result | BaseException = _result_decoder.decode(record.value)
                    except msgspec.DecodeError as err:  # not a result record: say so rather than hang
                        outcome = RelayError(f"unreadable result record for {record.key!r}: {err}")
                    for future in waiters:
                        if future.done():
                            continue
                        if isinstance(outcome, BaseException):
                            future.set_exception(outcome)
                        else:
                            future.set_result(outcome)
