"""One app's long connection to Feishu: connect, ping, watch, reassemble, publish, answer; reconnect for ever.

:class:`LongConnection` runs the protocol of :mod:`relay.ws.protocol` over aiohttp; :class:`PushedEvents` turns
a pushed event into a Kafka record through the webhook's own path (:meth:`relay.inbound.Inbound.accept`:
verification, dedup, topic, key, headers, deadline), so a consumer cannot tell which mode delivered an event.

Guarantees:

* **An event is answered 200 only after Kafka acknowledged it** (or it was a duplicate of one that was);
  otherwise, by ``inbound.publish_timeout`` from its last frame's arrival, it is answered 500 and Feishu
  redelivers it; a publish still running then may finish later and marks the event seen, so that redelivery is
  not published twice (:mod:`relay.dedup`). An event that fails verification is answered 500 and not published
  (Feishu's redeliveries of it are bounded: 15 s, 5 min, 1 h, 6 h). A callback (``card.action.trigger``) is
  answered 200 with the webhook's reply by the deadline, as at the URL: Feishu does not redeliver callbacks.
* Data frames are handled concurrently (at most ``inbound.ws_max_in_flight``; past it, 500 at once): a slow
  broker never holds pings, pongs or other events. Answers are written one at a time.
* **Liveness**: nothing received for ``PingInterval + inbound.ws_liveness_grace`` -> the socket is given up and
  a new connection made (a half-open socket after a sleep or a NAT timeout is noticed, unlike in the SDKs).
* **Reconnecting** for ever on retryable failures, with the server's interval and jitter
  (:class:`~relay.ws.protocol.Reconnect`); a refusal that cannot heal (:class:`~relay.ws.protocol.Stop`) ends
  :meth:`LongConnection.run` with :class:`~relay.errors.LongConnectionError` (one line; ``relay run`` exits 1).
  Every reconnect is logged with its reason and counted in ``relay_ws_reconnects_total{app,reason}``.
* Events answered when the socket is already gone are lost answers, not lost events: Feishu redelivers them
  and dedup answers 200 without a second record.

Replicas: every replica holds its own connection per app (Feishu allows 50 per app and sends each event to one
of them); the dedup memory is per process, so a redelivery that lands on another replica is published again:
consumers deduplicate by the ``event_id`` header, as for webhooks.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol

import aiohttp

from relay.config import AppConfig, Config
from relay.errors import LongConnectionError, SignatureError
from relay.events import Event, verify_pushed
from relay.metrics import Metrics
from relay.ws.frames import CONTROL, DATA, Frame, FrameError, decode, encode
from relay.ws.protocol import (
    CARD,
    ENDPOINT_PATH,
    ERROR,
    EVENT,
    OK,
    PONG,
    TYPE,
    ClientConfig,
    Connect,
    Liveness,
    Reassembly,
    Reconnect,
    Retry,
    Stop,
    Verdict,
    answer,
    data_headers,
    ping,
    read_config,
    read_endpoint,
    read_handshake_refusal,
)

log = logging.getLogger(__name__)

_ENDPOINT_BODY_MAX: Final = 64 * 1024  # the endpoint's answer is a few hundred bytes; never read more
_FRAME_OVERHEAD: Final = 64 * 1024  # a frame's headers around a payload at the body cap
_LAST_LOOK: Final = 0.05  # seconds


class Accept(Protocol):
    """Publishes a verified event as the event URL does; the HTTP status and body the URL would answer."""

    async def accept(self, name: str, event: Event, started: float) -> tuple[int, bytes]:
        ...


class EventHandler(Protocol):
    """What a data frame's whole payload becomes: (code 200 or 500, the answer JSON or None)."""

    async def __call__(self, payload: bytes, started: float) -> tuple[int, bytes | None]:
        ...


class PushedEvents:
    """:class:`EventHandler` for one app: :func:`relay.events.verify_pushed`, then the webhook's publish path."""

    def __init__(self, app: AppConfig, config: Config, inbound: Accept, metrics: Metrics) -> None:
        self._app = app
        self._inbound = inbound
        self._metrics = metrics
        self._callbacks = frozenset(config.inbound.callback_types)

    async def __call__(self, payload: bytes, started: float) -> tuple[int, bytes | None]:
        try:
            event = verify_pushed(self._app, payload)
        except SignatureError as err:
            self._metrics.inc("relay_ws_rejected_total", help="pushed events refused by a check (answered 500)",
                              app=self._app.name, reason=err.reason)
            log.warning("ws app=%s pushed event rejected: %s (answered 500)", self._app.name, err.reason)
            return ERROR, None
        status, body = await self._inbound.accept(self._app.name, event, started)
        if status != 200:
            return ERROR, None
        # a callback's answer is its reply (base64 in the frame, as the SDKs send a handler's result)
        return OK, body if event.event_type in self._callbacks else None


class LongConnection:
    """The long connection of one app (see the module docstring). ``run()`` until cancelled or refused."""

    def __init__(self, app: AppConfig, config: Config, handler: EventHandler, session: aiohttp.ClientSession,
                 metrics: Metrics, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, initial: ClientConfig | None = None) -> None:
        """``initial``: the settings until the endpoint gives its own (default: Feishu's, as in its SDKs:
        ping every 120 s, reconnect after up to 30 s, then every 120 s)."""
        self._app = app
        self._name = self.name = app.name
        self._base_url = config.base_url_for(app)
        self._cfg = config.inbound
        self._handler = handler
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._reconnect = Reconnect(rng or random.Random())
        self.config = initial or ClientConfig()
        self._fragments = Reassembly(ttl=self._cfg.ws_fragment_ttl, max_bytes=4 * self._cfg.max_body_bytes,
                                     max_event_bytes=self._cfg.max_body_bytes)
        self._dropped = 0  # fragments dropped on earlier connections
        self._tasks: set[asyncio.Task[None]] = set()
        self._write = asyncio.Lock()
        self.connected = False
        self.reason = "starting"  # why it is not connected (for /readyz)
        self.connections = 0  # connections made
        metrics.collect(self._export)

    @property
    def reconnect_attempts(self) -> int:
        """Failed or short-lived connections since the last healthy one (what the next delay depends on)."""
        return self._reconnect.attempts

    def problem(self) -> str | None:
        """None while connected; else why not (``/readyz``)."""
        return None if self.connected else f"websocket apps[{self._name}]: {self.reason}"

    async def run(self) -> None:
        """Connect and serve, reconnecting for ever; raises :class:`LongConnectionError` on a refusal."""
        try:
            while True:
                verdict: Verdict = await self._endpoint()
                if isinstance(verdict, Connect):
                    verdict = await self._serve(verdict)
                if isinstance(verdict, Stop):
                    self.reason = verdict.reason
                    raise LongConnectionError(self._name, verdict.reason)
                assert isinstance(verdict, Retry)
                delay = self._reconnect.delay(self.config)
                self.reason = verdict.reason
                self._metrics.inc("relay_ws_reconnects_total", help="long connections given up and retried",
                                  app=self._name, reason=verdict.kind)
                log.warning("ws app=%s reconnecting in %.1f s (attempt %d): %s", self._name, delay,
                            self._reconnect.attempts, verdict.reason)
                await asyncio.sleep(delay)
        finally:
            self.connected = False
            await self._drain()

    async def _drain(self) -> None:
        """At the end: the publishes in flight finish or are cancelled by the caller's shutdown (their answers
        cannot be sent any more; dedup keeps what Kafka acknowledged)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- the endpoint call and the handshake -------------------------------------------------------------

    async def _endpoint(self) -> Verdict:
        body = {"AppID": self._app.app_id, "AppSecret": self._app.app_secret.reveal()}
        try:
            async with asyncio.timeout(self._cfg.ws_connect_timeout), self._session.post(
                    self._base_url + ENDPOINT_PATH, json=body, headers={"locale": "zh"}) as resp:
                status, raw = resp.status, await resp.content.read(_ENDPOINT_BODY_MAX)
        except TimeoutError:
            return Retry(f"endpoint call timed out after {self._cfg.ws_connect_timeout:g} s")
        except (aiohttp.ClientError, OSError) as err:
            return Retry(f"endpoint call failed: {type(err).__name__}")
        return read_endpoint(status, raw, self.config)

    async def _serve(self, connect: Connect) -> Verdict:
        """One connection, until it is lost (a :class:`Retry`) or refused (a :class:`Stop`)."""
        try:
            async with asyncio.timeout(self._cfg.ws_connect_timeout):
                ws = await self._session.ws_connect(
                    connect.url, autoping=True, heartbeat=None,
                    max_msg_size=self._cfg.max_body_bytes + _FRAME_OVERHEAD)
        except aiohttp.WSServerHandshakeError as err:
            return read_handshake_refusal(err.status, dict(err.headers or {}))
        except TimeoutError:
            return Retry(f"handshake timed out after {self._cfg.ws_connect_timeout:g} s", "handshake")
        except (aiohttp.ClientError, OSError) as err:
            return Retry(f"handshake failed: {type(err).__name__}", "handshake")
        self.config = connect.config
        # fragments are per connection: a split event cut off by the loss is redelivered whole
        self._dropped += self._fragments.dropped
        self._fragments = Reassembly(ttl=self._cfg.ws_fragment_ttl, max_bytes=4 * self._cfg.max_body_bytes,
                                     max_event_bytes=self._cfg.max_body_bytes)
        self.connected = True
        self.connections += 1
        up_since = self._clock()
        log.info("ws app=%s connected (device %s, ping every %g s)", self._name, connect.device_id,
                 self.config.ping_interval)
        pinger = asyncio.create_task(self._ping_loop(ws, connect.service_id), name=f"ws-ping-{self._name}")
        try:
            return await self._receive(ws)
        finally:
            self.connected = False
            # a connection that lasted a ping interval was healthy: the next attempt waits only the jitter; one
            # the server keeps dropping at once is retried at ReconnectInterval, not in a tight loop
            if self._clock() - up_since >= self.config.ping_interval:
                self._reconnect.connected()
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
            try:
                async with asyncio.timeout(1.0):  # a half-open peer never answers the close
                    await ws.close()
            except TimeoutError:
                pass

    # ---- the connection ------------------------------------------------------------------------------------

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> Retry:
        liveness = Liveness(self._clock(), self._cfg.ws_liveness_grace)
        while True:
            try:
                msg = await ws.receive(timeout=max(0.0, liveness.remaining(self._clock(), self.config)))
            except TimeoutError:
                if liveness.remaining(self._clock(), self.config) > 0:
                    continue
                try:  # one last look: frames a stalled event loop has not read yet are not silence
                    msg = await ws.receive(timeout=_LAST_LOOK)
                except TimeoutError:
                    silence = self.config.ping_interval + self._cfg.ws_liveness_grace
                    return Retry(f"nothing received for {silence:g} s (PingInterval + ws_liveness_grace): "
                                 "half-open socket", "liveness")
            if msg.type is aiohttp.WSMsgType.BINARY:
                liveness.received(self._clock())
                self._on_frame(ws, msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return Retry(f"closed by the server (close code {ws.close_code})", "closed")
            elif msg.type is aiohttp.WSMsgType.ERROR:
                return Retry(f"connection error: {type(ws.exception()).__name__}", "network")
            else:  # a text frame: not the protocol; it still shows the peer is alive
                liveness.received(self._clock())

    async def _ping_loop(self, ws: aiohttp.ClientWebSocketResponse, service_id: int) -> None:
        frame = encode(ping(service_id))
        while True:
            await self._send(ws, frame)
            await asyncio.sleep(self.config.ping_interval)

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, data: bytes) -> bool:
        async with self._write:
            if ws.closed:
                return False
            try:
                await ws.send_bytes(data)
            except (aiohttp.ClientError, OSError, RuntimeError):  # closing under us: the answer is lost
                return False
            return True

    def _on_frame(self, ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
        try:
            frame = decode(data)
        except FrameError as err:
            self._count("malformed")
            log.warning("ws app=%s malformed frame ignored: %s", self._name, err)
            return
        if frame.method == CONTROL:
            if frame.header(TYPE) == PONG and (config := read_config(frame.payload)) is not None:
                self.config = self.config.merged(config)
            return
        if frame.method != DATA:
            self._count("unknown")
            return
        headers = data_headers(frame)
        if headers is None or headers.type not in (EVENT, CARD):
            self._count("unknown")
            log.warning("ws app=%s data frame of type %.20r not understood: answered 500", self._name,
                        frame.header(TYPE))
            self._start(self._answer_now(ws, frame, ERROR))
            return
        payload = self._fragments.add(headers, frame.payload or b"", self._clock())
        if payload is None:
            self._count("fragment")
            return
        self._count(headers.type)
        if len(self._tasks) >= self._cfg.ws_max_in_flight:
            log.warning("ws app=%s %d events in flight: %s answered 500", self._name, len(self._tasks),
                        headers.message_id[:64])
            self._start(self._answer_now(ws, frame, ERROR))
            return
        self._start(self._handle(ws, frame, payload, time.perf_counter()))

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_now(self, ws: aiohttp.ClientWebSocketResponse, frame: Frame, code: int) -> None:
        await self._send(ws, encode(answer(frame, code, None, 0)))

    async def _handle(self, ws: aiohttp.ClientWebSocketResponse, frame: Frame, payload: bytes,
                      started: float) -> None:
        code, data = await self._handler(payload, started)
        spent_ms = 1000 * (time.perf_counter() - started)
        if not await self._send(ws, encode(answer(frame, code, data, spent_ms))):
            self._metrics.inc("relay_ws_answers_lost_total", help="answers not sent: the connection was gone "
                              "(Feishu redelivers; dedup keeps a second record out)", app=self._name)
            log.warning("ws app=%s answer %d for %s not sent: connection gone", self._name, code,
                        (frame.header("message_id") or "")[:64])

    def _count(self, kind: str) -> None:
        self._metrics.inc("relay_ws_frames_total", help="data frames received, by type", app=self._name, type=kind)

    def _export(self, metrics: Metrics) -> None:
        metrics.set("relay_ws_connected", 1 if self.connected else 0, help="1 while the long connection is up",
                    app=self._name)
        metrics.set_total("relay_ws_fragments_dropped_total", self._dropped + self._fragments.dropped,
                          help="split events dropped incomplete (too old, too large, malformed)", app=self._name)
