"""The sandbox's long connection: Feishu's WebSocket event mode, as strict as the rest of the sandbox.

What it does, as Feishu does (the protocol of ``relay.ws.protocol``):

* ``POST /callback/ws/endpoint`` with ``{"AppID", "AppSecret"}`` (the sandbox's apps, or any app when it has
  none configured) answers ``{"code": 0, "data": {"URL": "ws://.../callback/ws/connect?device_id=..&
  service_id=..&ticket=..", "ClientConfig": {...}}}``; a wrong secret answers code 10014, a body without both
  fields code 10003 (the codes of the token API). A ticket admits one handshake within 60 s.
* The handshake refuses a missing or used ticket (status 514, ``Handshake-Autherrcode`` 1000040351), more than
  ``max_connections`` per app (514 + 1000040350, "the number of connections exceeded the limit"), and whatever
  :meth:`LongConnections.refuse_handshake` set; a refusal carries ``Handshake-Status``/``-Msg``/``-Autherrcode``.
* Pings are answered with a pong carrying the ClientConfig; events are pushed as data frames (``type=event``, or
  ``card`` when asked), split into ``sum`` fragments of at most ``fragment_size`` bytes when set, to one
  connection of the app (round robin; each event to one connection, as Feishu does).
* An event not answered 200 within ``ack_timeout`` (Feishu: 3 s) is sent again after each of ``redelivery``'s
  delays (Feishu: 15 s, 5 min, 1 h, 6 h); callbacks (``card.action.trigger``, ``url.preview.get``) never are.
  An event with no connection waits for one.
* Faults: :meth:`half_open` (the current connections stop answering and sending anything, as a socket that
  died without a FIN), :meth:`disconnect` (close every connection), :meth:`refuse_handshake`,
  :meth:`fail_endpoint` (the endpoint answers a code).

Strictness (``violations``, each a one-line reason): an answer to a frame never sent, an answer that does not
echo the frame (SeqID, LogID, service, method, every header in order, LogIDNew) plus exactly one ``biz_rt``
header of a non-negative integer, a payload that is not ``{"code": int, "data": base64 string?}``, a ping
whose ``service`` is not the connection's ``service_id``, a frame that does not decode, a text frame.
Time values here are real seconds (not scaled by ``time_scale``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import WSMsgType, web

from relay.ws.frames import CONTROL, DATA, Frame, FrameError, decode, encode

log = logging.getLogger(__name__)

ENDPOINT: Final = "/callback/ws/endpoint"
CONNECT: Final = "/callback/ws/connect"
CALLBACK_TYPES: Final = frozenset({"card.action.trigger", "url.preview.get"})
_TICKET_TTL: Final = 60.0


class WsOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The long connection's behaviour; Feishu's numbers by default (seconds)."""

    ping_interval: float = 120.0
    reconnect_interval: float = 120.0
    reconnect_nonce: float = 30.0
    reconnect_count: int = -1
    ack_timeout: float = 3.0
    redelivery: tuple[float, ...] = (15.0, 300.0, 3600.0, 21600.0)
    fragment_size: int = 0  # 0: never split
    max_connections: int = 50  # per app (Feishu's documented limit)


class _Answer(msgspec.Struct, forbid_unknown_fields=True):
    code: int
    data: str | None = None
    headers: dict[str, str] | None = None


_ANSWER: Final = msgspec.json.Decoder(_Answer)


class _Body(msgspec.Struct):
    AppID: str | None = None
    AppSecret: str | None = None


_BODY: Final = msgspec.json.Decoder(_Body)


@dataclass
class Delivery:
    """One event and what became of it: each attempt's answer code (None: unanswered in time)."""

    event_id: str
    app_id: str
    payload: bytes
    frame_type: str
    callback: bool
    answers: list[int | None] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # answered 200, or given up
    acknowledged: bool = False
    data: bytes | None = None  # the decoded ``data`` of the 200 answer
    late: int = 0  # answers that came after ack_timeout
    answer_seconds: float | None = None  # the answered attempt's first frame sent -> its answer read


@dataclass
class _Attempt:
    """One sending of a delivery: its frames share one answer."""

    delivery: Delivery
    answered: asyncio.Future[int]
    message_id: str
    seq_ids: tuple[int, ...]
    timed_out: bool = False
    sent_at: float = 0.0  # perf_counter


@dataclass
class _Sent:
    attempt: _Attempt
    frame: Frame


@dataclass
class _Conn:
    ws: web.WebSocketResponse
    app_id: str
    device_id: str
    service_id: int
    half_open: bool = False
    pings: int = 0


class LongConnections:
    """The endpoint, the WebSocket server and the event pusher; installed on the sandbox's application."""

    def __init__(self, apps: dict[str, str], options: WsOptions | None = None) -> None:
        self._apps = apps
        self.options = options or WsOptions()
        self._conns: list[_Conn] = []
        self._rr = itertools.count()
        self._seq = itertools.count(1)
        self._tickets: dict[str, tuple[str, float]] = {}  # ticket -> (app_id, expires)
        self._sent: dict[int, _Sent] = {}  # SeqID -> frame in flight
        self._connected = asyncio.Condition()
        self._refusal: tuple[int, int, str] | None = None
        self._endpoint_code: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.deliveries: list[Delivery] = []
        self.violations: list[str] = []
        self.handshakes = 0  # successful ones
        self.pings = 0  # pings answered (or ignored on a half-open connection: not counted)
        self.endpoint_calls = 0
        self.url = ""  # the sandbox's base URL (set by the sandbox at start)

    def install(self, app: web.Application) -> None:
        app.router.add_post(ENDPOINT, self._endpoint)
        app.router.add_get(CONNECT, self._connect)
        app.router.add_post("/_sandbox/ws/emit", self._control_emit)
        app.router.add_post("/_sandbox/ws/fault", self._control_fault)
        app.router.add_get("/_sandbox/ws/stats", self._control_stats)

    # ---- what tests call --------------------------------------------------------------------------------------

    def connections(self, app_id: str | None = None) -> int:
        return sum(1 for c in self._conns if app_id is None or c.app_id == app_id)

    def half_open(self) -> None:
        """Every current connection goes silent both ways (the client's pings go nowhere)."""
        for conn in self._conns:
            conn.half_open = True

    async def disconnect(self) -> None:
        for conn in list(self._conns):
            await conn.ws.close()

    def refuse_handshake(self, status: int | None, autherrcode: int = 0, msg: str = "refused") -> None:
        """Refuse every handshake from now with ``Handshake-Status: status`` (None: accept again)."""
        self._refusal = None if status is None else (status, autherrcode, msg)

    def fail_endpoint(self, code: int | None) -> None:
        """The endpoint answers ``code`` (None: normally again)."""
        self._endpoint_code = code

    def reset(self) -> None:
        """Forget deliveries, violations, refusals and counts (connections and events in flight stay)."""
        self.deliveries.clear()
        self.violations.clear()
        self._refusal = None
        self._endpoint_code = None
        self.handshakes = self.endpoint_calls = self.pings = 0

    def stats(self) -> dict[str, Any]:
        """For ``/_sandbox/ws/stats``: connections, counts, violations, what became of each delivery."""
        return {"connections": self.connections(), "handshakes": self.handshakes,
                "endpoint_calls": self.endpoint_calls, "pings": self.pings, "violations": list(self.violations),
                "deliveries": [{"event_id": d.event_id, "answers": d.answers, "acknowledged": d.acknowledged}
                               for d in self.deliveries[-1000:]]}

    def push(self, app_id: str, payload: bytes, *, event_id: str, event_type: str = "",
             frame_type: str = "event") -> Delivery:
        """Send one event to one connection of the app (waiting for one), redelivering until answered 200."""
        delivery = Delivery(event_id=event_id, app_id=app_id, payload=payload, frame_type=frame_type,
                            callback=event_type in CALLBACK_TYPES or frame_type == "card")
        self.deliveries.append(delivery)
        task = asyncio.create_task(self._deliver(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return delivery

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.disconnect()

    # ---- the endpoint ----------------------------------------------------------------------------------------

    def _client_config(self) -> dict[str, float]:
        o = self.options
        return {"ReconnectCount": o.reconnect_count, "ReconnectInterval": o.reconnect_interval,
                "ReconnectNonce": o.reconnect_nonce, "PingInterval": o.ping_interval}

    async def _endpoint(self, request: web.Request) -> web.Response:
        self.endpoint_calls += 1
        try:
            body = _BODY.decode(await request.read())
        except (msgspec.DecodeError, msgspec.ValidationError):
            body = _Body()
        if not body.AppID or body.AppSecret is None:
            return web.json_response({"code": 10003, "msg": "invalid param", "data": {}})
        if self._apps and self._apps.get(body.AppID) != body.AppSecret:
            return web.json_response({"code": 10014, "msg": "app secret invalid", "data": {}})
        if self._endpoint_code is not None:
            return web.json_response({"code": self._endpoint_code, "msg": "system busy", "data": {}})
        ticket = secrets.token_hex(16)
        now = time.monotonic()
        self._tickets = {t: v for t, v in self._tickets.items() if v[1] > now}
        self._tickets[ticket] = (body.AppID, now + _TICKET_TTL)
        device_id = f"d{next(self._seq)}"
        service_id = 10000 + len(self._tickets)
        url = (self.url.replace("http", "ws", 1) + CONNECT +
               f"?device_id={device_id}&service_id={service_id}&ticket={ticket}")
        return web.json_response({"code": 0, "msg": "ok",
                                  "data": {"URL": url, "ClientConfig": self._client_config()}})

    # ---- the handshake and the connection --------------------------------------------------------------------

    @staticmethod
    def _refuse(status: int, autherrcode: int, msg: str) -> web.Response:
        headers = {"Handshake-Status": str(status), "Handshake-Msg": msg}
        if autherrcode:
            headers["Handshake-Autherrcode"] = str(autherrcode)
        return web.Response(status=403 if status == 403 else 400, headers=headers)

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        ticket = self._tickets.pop(request.query.get("ticket", ""), None)
        if ticket is None or ticket[1] <= time.monotonic():
            return self._refuse(514, 1000040351, "invalid ticket")
        app_id = ticket[0]
        if self._refusal is not None:
            return self._refuse(*self._refusal)
        if self.connections(app_id) >= self.options.max_connections:
            return self._refuse(514, 1000040350, "the number of connections exceeded the limit")
        try:
            service_id = int(request.query.get("service_id", ""))
        except ValueError:
            return self._refuse(400, 0, "bad service_id")
        ws = web.WebSocketResponse(autoping=True, max_msg_size=8 << 20)
        await ws.prepare(request)
        conn = _Conn(ws=ws, app_id=app_id, device_id=request.query.get("device_id", ""), service_id=service_id)
        self.handshakes += 1
        async with self._connected:
            self._conns.append(conn)
            self._connected.notify_all()
        try:
            async for msg in ws:
                if conn.half_open:
                    continue  # the socket is dead in both directions: nothing read is acted on
                if msg.type is WSMsgType.BINARY:
                    await self._on_frame(conn, msg.data)
                elif msg.type is WSMsgType.TEXT:
                    self.violations.append("a text frame (the protocol is binary pbbp2 frames)")
        finally:
            self._conns.remove(conn)
        return ws

    async def _on_frame(self, conn: _Conn, data: bytes) -> None:
        try:
            frame = decode(data)
        except FrameError as err:
            self.violations.append(f"a frame that does not decode: {err}")
            return
        if frame.method == CONTROL:
            if frame.header("type") != "ping":
                self.violations.append(f"a control frame of type {frame.header('type')!r} from the client")
                return
            conn.pings += 1
            self.pings += 1
            if frame.service != conn.service_id:
                self.violations.append(f"a ping with service {frame.service}, not the URL's {conn.service_id}")
            pong = Frame(service=conn.service_id, method=CONTROL, headers=(("type", "pong"),),
                         payload=msgspec.json.encode(self._client_config()))
            await conn.ws.send_bytes(encode(pong))
            return
        if frame.method != DATA:
            self.violations.append(f"a frame of method {frame.method}")
            return
        sent = self._sent.get(frame.seq_id)
        if sent is None:
            self.violations.append(f"an answer to SeqID {frame.seq_id}, which was not sent (or already answered)")
            return
        reason = self._check_answer(sent.frame, frame)
        if reason is not None:
            self.violations.append(f"answer to {sent.attempt.message_id}: {reason}")
            return
        attempt = sent.attempt
        for seq_id in attempt.seq_ids:  # one answer per event: a second one is "not sent (or already answered)"
            self._sent.pop(seq_id, None)
        answer = _ANSWER.decode(frame.payload or b"")
        if answer.code == 200 and answer.data is not None:
            attempt.delivery.data = base64.b64decode(answer.data)
        if attempt.timed_out:
            attempt.delivery.late += 1
        else:
            attempt.delivery.answer_seconds = time.perf_counter() - attempt.sent_at
            attempt.answered.set_result(answer.code)

    @staticmethod
    def _check_answer(original: Frame, got: Frame) -> str | None:
        if (got.log_id, got.service, got.method, got.log_id_new) != (original.log_id, original.service,
                                                                      original.method, original.log_id_new):
            return "LogID, service, method or LogIDNew not echoed"
        if got.headers[:-1] != original.headers or not got.headers or got.headers[-1][0] != "biz_rt":
            return "headers not echoed in order with one biz_rt appended"
        if not got.headers[-1][1].isdigit():
            return f"biz_rt {got.headers[-1][1]!r} is not a non-negative integer"
        try:
            answer = _ANSWER.decode(got.payload or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            return f"payload is not {{code, data?}}: {err}"
        if answer.data is not None:
            try:
                base64.b64decode(answer.data, validate=True)
            except (binascii.Error, ValueError):
                return "data is not base64"
        return None

    # ---- pushing events --------------------------------------------------------------------------------------

    async def _pick(self, app_id: str) -> _Conn:
        async with self._connected:
            while True:
                conns = [c for c in self._conns if c.app_id == app_id and not c.ws.closed]
                if conns:
                    return conns[next(self._rr) % len(conns)]
                await self._connected.wait()

    def _frames(self, conn: _Conn, delivery: Delivery) -> list[Frame]:
        size = self.options.fragment_size
        payload = delivery.payload
        parts = [payload[i:i + size] for i in range(0, len(payload), size)] if 0 < size < len(payload) else [payload]
        message_id = secrets.token_hex(8)
        trace = secrets.token_hex(8)
        frames = []
        for seq, part in enumerate(parts):
            headers = (("type", delivery.frame_type), ("message_id", message_id), ("sum", str(len(parts))),
                       ("seq", str(seq)), ("trace_id", trace), ("instance_id", f"inst-{conn.device_id}"),
                       ("timestamp", str(int(time.time() * 1000))))
            frames.append(Frame(seq_id=next(self._seq), log_id=secrets.randbits(63), service=conn.service_id,
                                method=DATA, headers=headers, payload=part, log_id_new=secrets.token_hex(6)))
        return frames

    async def _attempt(self, delivery: Delivery) -> int | None:
        conn = await self._pick(delivery.app_id)
        frames = self._frames(conn, delivery)
        attempt = _Attempt(delivery, asyncio.get_running_loop().create_future(),
                           frames[0].header("message_id") or "", tuple(f.seq_id for f in frames))
        for frame in frames:  # the answer may come to any of them (the SDKs answer the one that completed it)
            self._sent[frame.seq_id] = _Sent(attempt, frame)
        attempt.sent_at = time.perf_counter()
        try:
            if not conn.half_open:
                for frame in frames:
                    await conn.ws.send_bytes(encode(frame))
            # else: the socket is dead: what Feishu sends is lost on the way
            return await asyncio.wait_for(asyncio.shield(attempt.answered), self.options.ack_timeout)
        except (TimeoutError, ConnectionError, RuntimeError):
            attempt.timed_out = True  # an answer may still come: counted late, ignored (Feishu has moved on)
            return None

    async def _deliver(self, delivery: Delivery) -> None:
        delays = (0.0, *(() if delivery.callback else self.options.redelivery))
        for delay in delays:
            await asyncio.sleep(delay)
            code = await self._attempt(delivery)
            delivery.answers.append(code)
            if code == 200:
                delivery.acknowledged = True
                break
        delivery.done.set()

    # ---- /_sandbox/ws ----------------------------------------------------------------------------------------

    async def _control_emit(self, request: web.Request) -> web.Response:
        """``{"app_id", "payload": <event JSON text>, "event_id", "event_type"?, "frame_type"?}`` -> pushed."""
        body: dict[str, Any] = msgspec.json.decode(await request.read())
        if not self.connections(str(body["app_id"])):
            return web.json_response({"error": f"no long connection for app {body['app_id']!r}"}, status=409)
        delivery = self.push(str(body["app_id"]), str(body["payload"]).encode(), event_id=str(body["event_id"]),
                             event_type=str(body.get("event_type", "")),
                             frame_type=str(body.get("frame_type", "event")))
        if body.get("wait", True):
            await delivery.done.wait()
        return web.json_response({"event_id": delivery.event_id, "answers": delivery.answers,
                                  "acknowledged": delivery.acknowledged})

    async def _control_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _control_fault(self, request: web.Request) -> web.Response:
        """``{"half_open": true}``, ``{"disconnect": true}``, ``{"refuse": [status, autherrcode]|null}``,
        ``{"endpoint_code": int|null}``."""
        body: dict[str, Any] = msgspec.json.decode(await request.read())
        if body.get("half_open"):
            self.half_open()
        if body.get("disconnect"):
            await self.disconnect()
        if "refuse" in body:
            refuse = body["refuse"]
            self.refuse_handshake(None if refuse is None else int(refuse[0]),
                                  int(refuse[1]) if refuse and len(refuse) > 1 else 0)
        if "endpoint_code" in body:
            self.fail_endpoint(body["endpoint_code"])
        return web.json_response({"code": 0, "msg": "ok", "data": {}})
