"""The event subscription URL: Feishu events and callbacks in, Kafka records out, 200 only once Kafka has them.

``POST /feishu/events`` (the app named ``default``) and ``POST /feishu/events/{app}``. Per request:

1. checks before the body (each refusal is ``{"error": <reason>}``, counted in
   ``relay_inbound_rejected_total{reason}``, logged in one line without body or secrets):

       unknown_app   404  the URL names no app served here (an app without a verification token is not served)
       content_type  415  a Content-Type other than application/json (none at all is read as JSON)
       header        400  a malformed signature header (:func:`relay.events.read_signature_headers`)
       too_large     413  a body over ``inbound.max_body_bytes`` (never read past the cap)
       signature     401  an unsigned body over ``relay.events.CHALLENGE_MAX_BYTES`` for an app with an
                          encrypt key (only a url_verification comes unsigned: such a body is not read further)
       read_timeout  408  the body not received within ``inbound.read_timeout`` of the headers (a slow or
                          stalled client, a chunked body with no end, cannot hold a handler)

2. :func:`relay.events.verify_request` (signature, timestamp, decryption, envelope, token, app id): its reasons
   are listed in :mod:`relay.events`;
3. a ``url_verification`` -> ``{"challenge": ...}``;
4. anything else is published: the plaintext as Feishu sent it minus the verification token, to the callbacks
   topic for ``inbound.callback_types`` or to ``inbound.routes[event_type]`` / ``kafka.events_topic``; key =
   the chat id, else the message id, else the event id (:class:`relay.events.EventIds`); headers
   ``event_type``, ``event_id``, ``app``, ``tenant_key``, and for a callback the request–reply headers of
   :mod:`relay.replies`, whose answer (a service's reply, or the fallback) is the HTTP answer. A store app's
   ``app_ticket`` goes to ``kafka.app_tickets_topic`` instead, keyed by the app's ``app_id`` (compacted: the
   latest ticket per app, read by every replica's :mod:`relay.tickets`).

Guarantees. ``inbound.publish_timeout`` runs from a request's arrival to its answer:

* **Events**: 200 means the broker acknowledged the record (idempotent producer, ``acks=all``). Without that
  by the deadline the answer is 503 and Feishu redelivers; the publish itself keeps going, and should it
  succeed later the event counts as seen (see :mod:`relay.dedup`), so the redelivery is not published twice.
* **Callbacks** are never redelivered and a non-200 is an error the user sees (200671), so they are always
  answered 200 by ``inbound.reply_timeout``: with the reply a service wrote (:mod:`relay.replies`), else the
  fallback (``{}`` or ``inbound.fallback_toast``). The publish waits at most ``reply_timeout`` when a reply is
  awaited, else ``publish_timeout``; a publish not acknowledged by then goes on in the background
  and ends in one log line either way: published late (``relay_inbound_callbacks_late_total``) or lost
  (``relay_inbound_callbacks_lost_total``, an error line; also when the broker refused it, or shutdown cancelled
  it). Never silently.

Duplicates within ``inbound.dedup_ttl`` get 200 and are not published again. At-least-once remains: a process
restart forgets the dedup memory, so consumers deduplicate by the ``event_id`` header.

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

from relay.config import AppConfig, Config, unsigned_warning
from relay.dedup import Dedup, Outcome, PublishFailed
from relay.errors import SignatureError
from relay.events import CHALLENGE_MAX_BYTES, Challenge, Event, read_signature_headers, verify_request
from relay.kafka import MAX_REQUEST_SIZE, ensure_topics, make_producer
from relay.metrics import Metrics
from relay.replies import Answer, Pending, Replies, Source, fallback_for
from relay.tickets import APP_TICKET

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


def _check_content_type(request: web.Request) -> None:
    types = request.headers.getall("Content-Type", [])
    if not types:
        return
    if len(types) > 1 or types[0].partition(";")[0].strip().lower() != "application/json":
        raise SignatureError("content_type", 415)


class Inbound:
    """The aiohttp handlers of the event URL; one instance per process (it holds the dedup memory)."""

    def __init__(self, config: Config, publisher: Publisher, metrics: Metrics, *,
                 clock: Callable[[], float] = time.time, replies: Replies | None = None) -> None:
        self._config = config
        self._cfg = config.inbound
        self._publisher = publisher
        self._replies = replies  # None: callbacks get the fallback answer once Kafka has them
        self._metrics = metrics
        self._clock = clock
        # an app without a verification token is refused by check_inbound; one that gets here anyway (the
        # sandbox's stand-in app) is not served: anyone could post its events
        # an app in websocket mode gets its events over the long connection (relay.ws), never at the URL
        webhook = [app for app in config.apps if app.inbound.mode == "webhook"]
        self._apps: dict[str, AppConfig] = {app.name: app for app in webhook if app.verification_token}
        for app in webhook:
            if not app.verification_token:
                log.warning("inbound: apps[%s] has no verification_token: not served at the event URL", app.name)
            elif warning := unsigned_warning(app):
                log.warning("inbound: %s", warning)
        self._callback_types = frozenset(self._cfg.callback_types)
        self._store_apps = frozenset(app.name for app in config.apps if app.type == "store")
        self.dedup = Dedup(self._cfg.dedup_ttl, self._cfg.dedup_max_entries, clock)
        metrics.collect(self._export)
        metrics.know_event_types([*self._cfg.routes, *self._callback_types])  # labels the config names

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
        try:
            app = self._apps.get(name)
            if app is None:
                raise SignatureError("unknown_app", 404)
            _check_content_type(request)
            signed = read_signature_headers(request.headers) if app.encrypt_key else None
            body = await self._read_body(request, unsigned=bool(app.encrypt_key) and signed is None)
            verified = verify_request(app, signed, body, self._clock(), self._cfg)
        except SignatureError as err:
            response = self._reject(name, err)
            if err.reason == "read_timeout":
                # a stalled body: answer, then close at once. (Otherwise aiohttp reads and drops an unread rest
                # after the answer, for at most its lingering_time of 10 s, so that a client sending a body
                # too large sees its 413 rather than a reset; the handler is done by then either way.)
                await response.prepare(request)
                await response.write_eof()
                request.protocol.force_close()
            return response
        if isinstance(verified, Challenge):
            self._metrics.inc("relay_inbound_challenges_total", help="url_verification requests answered",
                              app=name)
            log.info("inbound app=%s url_verification answered", name)
            return web.json_response({"challenge": verified.challenge})
        return await self._publish(name, verified, started)

    async def _publish(self, name: str, event: Event, started: float) -> web.Response:
        topic = self.topic_for(event.event_type)
        callback = event.event_type in self._callback_types
        pending = None
        if callback and self._replies is not None:  # the reply is awaited by relay.replies (docs there)
            budget = self._cfg.reply_timeout - (time.perf_counter() - started)
            pending = self._replies.open(event.event_type, int(1000 * (self._clock() + budget)))
        try:
            if pending is not None and self._replies is not None:
                await self._replies.ready()  # a parked reply reader wakes at the end first (relay.replies)
            return await self._publish_and_answer(name, event, started, topic, callback, pending)
        finally:
            if pending is not None and self._replies is not None:
                self._replies.close(pending)

    async def _publish_and_answer(self, name: str, event: Event, started: float, topic: str, callback: bool,
                                  pending: Pending | None) -> web.Response:
        headers = event.headers(name) + (pending.headers if pending is not None else [])
        key = event.key
        if event.event_type == APP_TICKET and name in self._store_apps:  # module doc: the latest ticket per app
            topic, key = self._config.kafka.app_tickets_topic, self._apps[name].app_id

        async def publish() -> None:
            await self._publisher.publish(topic, key.encode(), event.record, headers)

        def late(error: BaseException | None) -> None:
            if error is None:
                self._metrics.inc("relay_inbound_callbacks_late_total", help="callbacks published after the answer",
                                  app=name)
                log.info("inbound app=%s %s %s -> %s published after the answer", name, event.event_type,
                         event.event_id, topic)
            elif isinstance(error, asyncio.CancelledError):  # by close(): shutdown while Kafka had not taken it
                self._lost(name, event, topic, "cancelled at shutdown; the producer may still flush it")
            else:
                self._lost(name, event, topic, type(error).__name__)

        # a callback whose reply is awaited may wait for the broker as long as for the reply: the answer is the
        # fallback either way, and an acknowledgement at 2.2 s still leaves the reply its chance
        limit = self._cfg.reply_timeout if pending is not None else self._cfg.publish_timeout
        remaining = max(0.0, limit - (time.perf_counter() - started))
        try:
            outcome = await self.dedup.publish_once(event.dedup_keys(name), publish, remaining,
                                                    on_late=late if callback else None)
        except (TimeoutError, PublishFailed) as err:
            why = "timeout" if isinstance(err, TimeoutError) else str(err)
            elapsed = 1000 * (time.perf_counter() - started)
            if not callback:
                self._count(name, event, "unavailable", started)
                log.warning("inbound app=%s %s %s -> %s not acknowledged (%s) in %.0f ms: 503", name,
                            event.event_type, event.event_id, topic, why, elapsed)
                return _reply(503, b'{"error":"unavailable"}')
            self._count(name, event, "unacknowledged", started)
            if isinstance(err, PublishFailed):
                self._lost(name, event, topic, why)
            else:
                log.warning("inbound app=%s %s %s -> %s answered the fallback unacknowledged after %.0f ms; "
                            "still publishing", name, event.event_type, event.event_id, topic, elapsed)
            return self._answer(name, event, started, Answer(self._fallback(event.event_type), "unpublished"))
        self._count(name, event, outcome.value, started)
        if pending is None:  # else the answer's line says it all, once the reply came or not
            elapsed = 1000 * (time.perf_counter() - started)
            log.info("inbound app=%s %s %s -> %s %s in %.1f ms", name, event.event_type, event.event_id, topic,
                     outcome.value, elapsed,
                     extra={"app": name, "event_type": event.event_type, "event_id": event.event_id, "topic": topic,
                            "outcome": outcome.value, "latency_ms": round(elapsed, 1)})
        if not callback:
            return _reply(200, _SUCCESS)
        if pending is None or self._replies is None or outcome is not Outcome.PUBLISHED:
            # no replies awaited, or a duplicate (the first copy's request has the reply)
            source: Source = "duplicate" if outcome is not Outcome.PUBLISHED else "timeout"
            return self._answer(name, event, started, Answer(self._fallback(event.event_type), source))
        answer = await self._replies.answer(pending, self._cfg.reply_timeout - (time.perf_counter() - started))
        return self._answer(name, event, started, answer)

    def _fallback(self, event_type: str) -> bytes:
        return fallback_for(self._config, event_type)

    def _answer(self, name: str, event: Event, started: float, answer: Answer) -> web.Response:
        """Count and log a callback's answer (``source``: reply, timeout, malformed, unpublished, duplicate)."""
        elapsed = time.perf_counter() - started
        if self._replies is not None:
            self._metrics.inc("relay_callback_answers_total", help="callbacks answered, by where the answer came "
                              "from", app=name, event_type=self._metrics.event_type(event.event_type),
                              source=answer.source)
            self._metrics.observe("relay_callback_answer_seconds", elapsed, help="callback arrival to answer",
                                  source=answer.source)
            log.info("inbound app=%s %s %s -> %s answered from %s in %.1f ms", name, event.event_type,
                     event.event_id, self.topic_for(event.event_type), answer.source, 1000 * elapsed,
                     extra={"app": name, "event_type": event.event_type, "event_id": event.event_id,
                            "source": answer.source, "latency_ms": round(1000 * elapsed, 1)})
        return _reply(200, answer.body)

    async def accept(self, name: str, event: Event, started: float) -> tuple[int, bytes]:
        """Publish a verified event exactly as the event URL does (dedup, topic, key, headers, deadline from
        ``started``, a ``time.perf_counter()``); the HTTP status and body the URL would answer. The long
        connection (``relay.ws``) answers its frames from these, so a consumer cannot tell the modes apart."""
        response = await self._publish(name, event, started)
        body = response.body
        return response.status, body if isinstance(body, bytes) else b""

    def _lost(self, name: str, event: Event, topic: str, why: str) -> None:
        self._metrics.inc("relay_inbound_callbacks_lost_total", help="callbacks answered but never published",
                          app=name)
        log.error("inbound app=%s %s %s -> %s LOST: answered {} but not published (%s)", name, event.event_type,
                  event.event_id, topic, why, extra={"app": name, "event_type": event.event_type,
                                                     "event_id": event.event_id, "topic": topic, "outcome": "lost"})

    def _count(self, name: str, event: Event, outcome: str, started: float) -> None:
        self._metrics.inbound_event(name, event.event_type, outcome, time.perf_counter() - started)

    def _export(self, metrics: Metrics) -> None:
        metrics.set("relay_inbound_dedup_entries", len(self.dedup), help="event keys remembered")
        metrics.set_total("relay_inbound_dedup_evicted_total", self.dedup.evicted,
                          help="event keys forgotten before their TTL (dedup_max_entries too small)")

    def _reject(self, name: str, err: SignatureError) -> web.Response:
        # the reason is one of a few fixed words, so it is a safe label; the app name comes from the URL and is
        # attacker-chosen for an unknown app, so it is logged shortened and escaped, and not used as a label
        self._metrics.inc("relay_inbound_rejected_total", help="requests refused by a check", reason=err.reason)
        log.info("inbound app=%.40r rejected: %s (%d)", name, err.reason, err.status,
                 extra={"app": name[:40], "outcome": "rejected", "reason": err.reason, "http_status": err.status})
        return _reply(err.status, b'{"error":"' + err.reason.encode() + b'"}')

    async def _read_body(self, request: web.Request, *, unsigned: bool) -> bytes:
        """The body, within ``read_timeout`` and the cap (never reading more than cap + 1 bytes).

        ``unsigned``: the request needs a signature it does not have, so only a url_verification is acceptable
        and no more than :data:`~relay.events.CHALLENGE_MAX_BYTES` is read.
        """
        cap = min(CHALLENGE_MAX_BYTES, self._cfg.max_body_bytes) if unsigned else self._cfg.max_body_bytes
        over = SignatureError("signature", 401) if unsigned else SignatureError("too_large", 413)
        if request.content_length is not None and request.content_length > cap:
            raise over

        async def read() -> bytes:
            data = bytearray()
            while True:
                chunk = await request.content.read(cap + 1 - len(data))
                if not chunk:
                    return bytes(data)
                data += chunk
                if len(data) > cap:
                    raise over

        if request.content.is_eof():  # all of it arrived with the headers (the usual case): nothing to wait for
            return await read()
        try:
            async with asyncio.timeout(self._cfg.read_timeout):
                return await read()
        except TimeoutError:
            raise SignatureError("read_timeout", 408) from None


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
