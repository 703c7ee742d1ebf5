"""The event subscription URL: Feishu events and callbacks in, Kafka records out, 200 only once Kafka has them.

``POST /feishu/events`` (the app named ``default``) and ``POST /feishu/events/{app}``. Per request:

1. unknown app → 404; a body over ``inbound.max_body_bytes`` → 413 (never read past the cap);
2. :func:`relay.events.verify_request` (challenge, signature, timestamp, decryption, token) → 4xx with
   ``{"error": <reason>}``, counted in ``relay_inbound_rejected_total{reason}``, logged without body or secrets;
3. a ``url_verification`` → ``{"challenge": ...}``;
4. anything else is published, the plaintext bytes exactly as Feishu sent them, to the callbacks topic for
   ``inbound.callback_types`` (answer ``{}``) or to ``inbound.routes[event_type]`` / ``kafka.events_topic``;
   key = chat_id, else message_id, else event id; headers ``event_type``, ``event_id``, ``app``, ``tenant_key``.

Guarantees: 200 means the broker acknowledged the record (idempotent producer, ``acks=all``). If that has not
happened within ``inbound.publish_timeout`` the answer is 503 and Feishu redelivers; the publish itself keeps
going, and should it succeed later the event counts as seen (see :mod:`relay.dedup`), so the redelivery is not
published twice. Duplicates within ``inbound.dedup_ttl`` get 200 and are not published again. At-least-once
remains: a process restart forgets the dedup memory, so consumers deduplicate by the ``event_id`` header.

Wiring (``relay.app``)::

    inbound, publisher = await start_inbound(config, metrics)   # producer started, topics ensured
    inbound.install(web_app)                                     # before the app starts (routes + shutdown hook)
    ...
    await inbound.close(); await publisher.stop()               # after the server stopped (install's
                                                                 # on_shutdown hook already calls close)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final, Protocol

from aiohttp import web
from aiokafka import AIOKafkaProducer

from relay.config import AppConfig, Config
from relay.dedup import Dedup, Outcome, PublishFailed
from relay.errors import SignatureError
from relay.events import Challenge, Event, verify_request
from relay.kafka import MAX_REQUEST_SIZE, ensure_topics, make_producer
from relay.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_APP: Final = "default"


class Publisher(Protocol):
    """Puts one record on Kafka; returns once the broker acknowledged it (no deadline of its own)."""

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        ...


class KafkaPublisher:
    """:class:`Publisher` over an idempotent ``acks=all`` :class:`AIOKafkaProducer` (``relay.kafka``).

    With idempotence aiokafka never times a batch out by itself, so the caller puts a deadline around
    :meth:`publish` (``Dedup.publish_once``). A caller giving up does not cancel the delivery future (shielded):
    the record may still be written, which is what lets a late acknowledgement mark the event seen.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._started = False

    async def start(self) -> None:
        await self.producer.start()
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.producer.stop()

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        delivery = await self.producer.send(topic, value, key=key, headers=headers)
        await asyncio.shield(delivery)


def _reply(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


_SUCCESS: Final = b'{"msg":"success"}'
_EMPTY: Final = b"{}"


class Inbound:
    """The aiohttp handlers of the event URL; one instance per process (it holds the dedup memory)."""

    def __init__(self, config: Config, publisher: Publisher, metrics: Metrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._cfg = config.inbound
        self._publisher = publisher
        self._metrics = metrics
        self._clock = clock
        self._apps: dict[str, AppConfig] = {app.name: app for app in config.apps}
        self._callback_types = frozenset(self._cfg.callback_types)
        self.dedup = Dedup(self._cfg.dedup_ttl, self._cfg.dedup_max_entries, clock)

    def install(self, app: web.Application) -> None:
        """Add the two routes, and cancel publishes still in flight when the app shuts down."""
        app.router.add_post("/feishu/events", self.handle)
        app.router.add_post("/feishu/events/{app}", self.handle)
        app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, _app: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        await self.dedup.close()

    def topic_for(self, event_type: str) -> str:
        if event_type in self._callback_types:
            return self._config.kafka.callbacks_topic
        return self._cfg.routes.get(event_type, self._config.kafka.events_topic)

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        name = request.match_info.get("app", DEFAULT_APP)
        app = self._apps.get(name)
        if app is None:
            return self._reject(name, SignatureError("unknown_app", 404))
        body = await self._read_body(request)
        if body is None:
            return self._reject(name, SignatureError("too_large", 413))
        try:
            verified = verify_request(app, request.headers, body, self._clock(), self._cfg)
        except SignatureError as err:
            return self._reject(name, err)
        if isinstance(verified, Challenge):
            self._metrics.inc("relay_inbound_challenges_total", help="url_verification requests answered",
                              app=name)
            log.info("inbound app=%s url_verification answered", name)
            return web.json_response({"challenge": verified.challenge})
        return await self._publish(name, verified, started)

    async def _publish(self, name: str, event: Event, started: float) -> web.Response:
        topic = self.topic_for(event.event_type)
        callback = event.event_type in self._callback_types

        async def publish() -> None:
            await self._publisher.publish(topic, event.key.encode(), event.plaintext, event.headers(name))

        try:
            outcome = await self.dedup.publish_once(event.dedup_keys(name), publish, self._cfg.publish_timeout)
        except (TimeoutError, PublishFailed) as err:
            why = "timeout" if isinstance(err, TimeoutError) else str(err)
            self._count(name, "unavailable", started)
            log.warning("inbound app=%s %s %s -> %s not acknowledged (%s) in %.0f ms: 503", name,
                        event.event_type, event.event_id, topic, why, 1000 * (time.perf_counter() - started))
            return _reply(503, b'{"error":"unavailable"}')
        self._count(name, outcome.value, started)
        log.info("inbound app=%s %s %s -> %s %s in %.1f ms", name, event.event_type, event.event_id, topic,
                 outcome.value, 1000 * (time.perf_counter() - started))
        if outcome is Outcome.PUBLISHED:
            self._metrics.set("relay_inbound_dedup_entries", len(self.dedup), help="event keys remembered")
            self._metrics.set_total("relay_inbound_dedup_evicted_total", self.dedup.evicted,
                                    help="event keys forgotten before their TTL (dedup_max_entries too small)")
        return _reply(200, _EMPTY if callback else _SUCCESS)

    def _count(self, name: str, outcome: str, started: float) -> None:
        self._metrics.inc("relay_inbound_events_total", help="events by outcome", app=name, outcome=outcome)
        self._metrics.observe("relay_inbound_response_seconds", time.perf_counter() - started,
                              help="time to answer an event", outcome=outcome)

    def _reject(self, name: str, err: SignatureError) -> web.Response:
        # the reason is one of a few fixed words, so it is a safe label; the app name comes from the URL and is
        # attacker-chosen for an unknown app, so it is logged shortened and not used as a label
        self._metrics.inc("relay_inbound_rejected_total", help="requests refused by a check", reason=err.reason)
        log.info("inbound app=%.40r rejected: %s (%d)", name, err.reason, err.status)
        return _reply(err.status, b'{"error":"' + err.reason.encode() + b'"}')

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The body, or None when it is over the cap (never reading more than cap + 1 bytes)."""
        cap = self._cfg.max_body_bytes
        if request.content_length is not None and request.content_length > cap:
            return None
        data = bytearray()
        while True:
            chunk = await request.content.read(cap + 1 - len(data))
            if not chunk:
                return bytes(data)
            data += chunk
            if len(data) > cap:
                return None


def inbound_topics(config: Config) -> dict[str, dict[str, str]]:
    """The topics inbound writes to, each allowing records as large as the producer sends (a body at the cap)."""
    names = {config.kafka.events_topic, config.kafka.callbacks_topic, *config.inbound.routes.values()}
    return {name: {"max.message.bytes": str(MAX_REQUEST_SIZE)} for name in sorted(names)}


async def start_inbound(config: Config, metrics: Metrics, *,
                        clock: Callable[[], float] = time.time) -> tuple[Inbound, KafkaPublisher]:
    """Ensure the topics (when ``kafka.create_topics``), start the producer, build the handlers.

    The caller installs them (``inbound.install(web_app)``) and, at shutdown, ``await inbound.close()`` and
    then ``await publisher.stop()``.
    """
    if config.kafka.create_topics:
        await ensure_topics(config.kafka, inbound_topics(config))
    publisher = KafkaPublisher(make_producer(config.kafka))
    await publisher.start()
    return Inbound(config, publisher, metrics, clock=clock), publisher
