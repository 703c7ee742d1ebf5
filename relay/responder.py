"""A responder for Python services: read callbacks, call your function, write its answer where the relay waits.

    async def on_callback(callback: Callback) -> CardActionAnswer | dict[str, Any] | bytes | None:
        if callback.event_type == "card.action.trigger":
            return CardActionAnswer(toast=Toast(type="success", content="Approved"))
        return None                                  # -> {} at once: no change, and no 2.5 s wait

    async with Responder("kafka:9092", on_callback) as responder:
        await responder.run()                        # until cancelled

The relay publishes each callback to ``feishu.callbacks`` with the request–reply headers of :mod:`relay.replies`
and answers Feishu with the first valid reply written by the deadline. What this does for the service:

* **The reply record**: value = the answer JSON, key = the correlation id, header ``relay.correlation_id``, to the
  topic the callback names in ``relay.reply_topic`` (so the service needs no relay config).
* **Concurrency**: each callback is handled in a task of its own (at most ``max_concurrency`` at once), so one
  slow answer does not hold the others back. The function may be sync or async; a sync one runs in a thread.
* **Deadlines**: a callback whose ``relay.reply_deadline`` has passed is not handed to the function (nobody waits
  for its answer: counted in ``stats.expired``); an answer ready after it is not written (``stats.late``).
* **Answers**: a :mod:`relay.answers` struct, a dict or bytes; ``None`` is ``{}``. An answer the relay would
  refuse (:func:`relay.answers.check_answer`, with ``max_answer_bytes``: the relay's
  ``inbound.max_answer_bytes``) is not written: logged and counted (``stats.malformed``), the user gets the
  relay's fallback. An exception in the function is logged with the callback's event id and
  nothing is written (``stats.failed``, also for a reply Kafka refused): the relay answers the fallback at its
  deadline.
* **Where it starts**: a consumer group (default ``feishu-callback-responder``); a new group starts at the end
  of the topic (older callbacks are long past their deadline), offsets are auto-committed every
  ``commit_interval_ms``. A responder that dies holds its partitions until ``session_timeout_ms`` (10 s) has
  passed: their clicks get the relay's fallback meanwhile; the next owner re-reads what was not committed, past
  its deadline by then, so skipped, not answered twice. This is for
  answering; a service that must act on every click even across its own restarts also reads the callbacks
  topic with a group of its own.

A callback without the request–reply headers (a relay with ``inbound.callback_replies = false``) is handed to the
function too, and its answer dropped (``stats.unanswerable``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeAlias

import msgspec
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from relay.answers import Malformed, check_answer
from relay.kafka import new_consumer
from relay.replies import CORRELATION_HEADER, DEADLINE_HEADER, REPLY_TOPIC_HEADER

log = logging.getLogger(__name__)

DEFAULT_CALLBACKS_TOPIC: Final = "feishu.callbacks"
DEFAULT_GROUP: Final = "feishu-callback-responder"
# the relay's default inbound.max_answer_bytes; give the responder the relay's value when it was changed
MAX_ANSWER_BYTES: Final = 30 * 1024

_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Callback:
    """One callback as the relay published it: the Feishu JSON (``body``, minus the verification token) and the
    record headers. ``event()`` decodes the body."""

    event_type: str
    event_id: str
    app: str
    body: bytes
    correlation_id: str | None
    reply_topic: str | None
    deadline: float | None  # Unix seconds: the relay stops waiting then

    def event(self) -> dict[str, Any]:
        """The decoded body: ``{"schema": "2.0", "header": {...}, "event": {...}}``."""
        decoded: dict[str, Any] = msgspec.json.decode(self.body)
        return decoded


AnswerValue: TypeAlias = msgspec.Struct | dict[str, Any] | bytes | None
Handler: TypeAlias = Callable[[Callback], AnswerValue | Awaitable[AnswerValue]]


@dataclass
class ResponderStats:
    answered: int = 0  # replies written
    expired: int = 0  # callbacks read after their deadline: not handled
    late: int = 0  # answers ready after the deadline: not written
    malformed: int = 0  # answers the relay would refuse: not written
    failed: int = 0  # the function raised, or the reply could not be written
    unanswerable: int = 0  # callbacks without request–reply headers


def read_callback(record: ConsumerRecord[bytes, bytes]) -> Callback:
    """A callback record as :class:`Callback` (missing headers are None / empty)."""
    headers = {name: value.decode(errors="replace") for name, value in record.headers}
    deadline_ms = headers.get(DEADLINE_HEADER, "")
    return Callback(event_type=headers.get("event_type", ""), event_id=headers.get("event_id", ""),
                    app=headers.get("app", ""), body=record.value or b"",
                    correlation_id=headers.get(CORRELATION_HEADER) or None,
                    reply_topic=headers.get(REPLY_TOPIC_HEADER) or None,
                    deadline=int(deadline_ms) / 1000 if deadline_ms.isdigit() else None)


def encode_answer(value: AnswerValue) -> bytes:
    """The reply value: bytes as they are, ``None`` as ``{}``, anything else as JSON."""
    if value is None:
        return b"{}"
    if isinstance(value, bytes):
        return value
    return _encoder.encode(value)


class _Assigned(ConsumerRebalanceListener):
    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    async def on_partitions_revoked(self, revoked: object) -> None:
        self._event.clear()

    async def on_partitions_assigned(self, assigned: object) -> None:
        if assigned:
            self._event.set()


class Responder:
    """Answers the relay's callbacks with ``handler`` (see the module docstring)."""

    def __init__(self, bootstrap_servers: str, handler: Handler, *,
                 callbacks_topic: str = DEFAULT_CALLBACKS_TOPIC, group_id: str = DEFAULT_GROUP,
                 max_concurrency: int = 256, client_id: str = "feishu-callback-responder",
                 session_timeout_ms: int = 10000, commit_interval_ms: int = 5000,
                 max_answer_bytes: int = MAX_ANSWER_BYTES,
                 clock: Callable[[], float] = time.time, **kafka_settings: Any) -> None:
        self.handler = handler
        self.callbacks_topic = callbacks_topic
        self.stats = ResponderStats()
        self._clock = clock
        self._max_answer_bytes = max_answer_bytes
        settings: dict[str, Any] = {"bootstrap_servers": bootstrap_servers, "client_id": client_id,
                                    **kafka_settings}
        # replies matter for seconds: one acknowledgement is enough, and no batching delay
        self._producer = AIOKafkaProducer(**settings, acks=1, linger_ms=0)
        # a responder that dies holds its partitions until session_timeout_ms passes (their clicks get the relay's
        # fallback meanwhile); the next owner re-reads up to commit_interval_ms of callbacks, already expired
        self._consumer = new_consumer(**settings, group_id=group_id, auto_offset_reset="latest",
                                      enable_auto_commit=True, auto_commit_interval_ms=commit_interval_ms,
                                      session_timeout_ms=session_timeout_ms,
                                      heartbeat_interval_ms=max(1, min(3000, session_timeout_ms // 4)),
                                      fetch_max_wait_ms=20)
        self._slots = asyncio.Semaphore(max_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._assigned = asyncio.Event()

    async def __aenter__(self) -> Responder:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the producer and join the group (``assigned()`` waits for the partitions). A start that fails
        stops what it started: nothing is left open for a caller whose ``async with`` never entered."""
        try:
            await self._producer.start()
            await self._consumer.start()
            self._consumer.subscribe([self.callbacks_topic], listener=_Assigned(self._assigned))
        except BaseException:
            await self.stop()
            raise

    async def assigned(self, timeout: float = 30.0) -> None:
        """Wait until the group gave this responder partitions, positioned (callbacks after this are read).

        Only while :meth:`run` runs: the group is joined by the consumer's fetches."""
        async with asyncio.timeout(timeout):
            await self._assigned.wait()
            for tp in self._consumer.assignment():
                await self._consumer.position(tp)

    async def stop(self) -> None:
        """Finish the callbacks being handled, then leave the group and flush. Both clients' stop does nothing the
        second time and is safe on one never (or half) started: aiokafka counts a client open from its making."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._consumer.stop()
        await self._producer.stop()

    async def run(self) -> None:
        """Read and answer callbacks until cancelled."""
        while True:
            batch = await self._consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._handle(read_callback(record)))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _handle(self, callback: Callback) -> None:
        answerable = callback.correlation_id is not None and callback.reply_topic is not None
        if answerable and callback.deadline is not None and self._clock() >= callback.deadline:
            self.stats.expired += 1
            return
        try:
            if inspect.iscoroutinefunction(self.handler):
                value = await self.handler(callback)
            else:
                value = await asyncio.to_thread(self.handler, callback)
            if inspect.isawaitable(value):  # a plain function that returned a coroutine
                value = await value
        except Exception:
            self.stats.failed += 1
            log.exception("responder: the handler raised for %s %s", callback.event_type, callback.event_id)
            return
        if not answerable:
            self.stats.unanswerable += 1
            return
        answer = encode_answer(value)
        try:
            check_answer(callback.event_type, answer, self._max_answer_bytes)
        except Malformed as err:
            self.stats.malformed += 1
            log.warning("responder: answer to %s %s not written: %s", callback.event_type, callback.event_id,
                        err.reason)
            return
        if callback.deadline is not None and self._clock() >= callback.deadline:
            self.stats.late += 1
            return
        assert callback.correlation_id is not None and callback.reply_topic is not None
        correlation = callback.correlation_id.encode()
        try:
            delivery = await self._producer.send(callback.reply_topic, answer, key=correlation,
                                                 headers=[(CORRELATION_HEADER, correlation)])
            await delivery
        except KafkaError as err:
            self.stats.failed += 1
            log.warning("responder: reply to %s %s not written: %s", callback.event_type, callback.event_id, err)
            return
        self.stats.answered += 1
