"""The long connection's rules as values and plain functions (no I/O): what the client decides, tested without sockets.

The protocol (as Feishu's official SDKs implement it: lark-oapi ``ws/client.py``, oapi-sdk-go ``ws/``, node-sdk
``ws-client/``):

1. ``POST {base_url}/callback/ws/endpoint`` with ``{"AppID", "AppSecret"}`` and header ``locale: zh`` answers
   ``{"code": 0, "data": {"URL": "wss://...?device_id=..&service_id=..", "ClientConfig": {...}}}``
   (:func:`read_endpoint`). ClientConfig values are seconds.
2. The client opens a WebSocket to that URL. A refused upgrade carries headers ``Handshake-Status``,
   ``Handshake-Msg``, ``Handshake-Autherrcode`` (:func:`read_handshake_refusal`).
3. Every frame is a binary ``pbbp2.Frame`` (:mod:`relay.ws.frames`). The client pings (method 0, header
   ``type=ping``, ``service`` = the URL's ``service_id``) every ``PingInterval``; a ``pong`` may carry a new
   ClientConfig JSON, which replaces the current one.
4. Data frames (method 1, ``type`` = ``event`` or ``card``) carry the event JSON (a normal 2.0 envelope, not
   encrypted), possibly split in ``sum`` fragments numbered by ``seq`` under one ``message_id``
   (:class:`Reassembly`). The client answers the (last) frame by echoing it (:func:`answer`): same SeqID, LogID,
   service, method and headers (``instance_id`` routes the answer back) plus ``biz_rt`` (ms spent), and payload
   ``{"code": 200|500, "data": base64(answer JSON)?}``. An event not answered 200 within 3 s is redelivered.

Where the relay differs from the SDKs, and why:

* **Which failures are retried** (:func:`read_endpoint`, :func:`read_handshake_refusal`): the SDKs stop on
  every endpoint code they do not know (so a ``1000040345 system busy`` seen in the wild stops them for good);
  the relay stops only on a refusal that cannot heal by itself (a 4xx answer, a handshake 403, 514 with
  1000040350 "connections exceeded the limit", an endpoint code outside the server-side ones) and retries
  everything else, for ever.
* **Reconnecting** (:class:`Reconnect`): first attempt after ``uniform(0, ReconnectNonce)``, then every
  ``ReconnectInterval`` plus that jitter (replicas that lost the same server spread out); ``ReconnectCount`` is
  ignored: a relay that gave up on retryable failures would stop delivering events while it keeps running.
* **Liveness** (:class:`Liveness`): the SDKs never notice a half-open socket (after a sleep/wake or a NAT
  dropping the flow, pings go out and nothing comes back, for ever). The relay reconnects when nothing at all
  was received for ``PingInterval + grace``.
* **Card frames** are answered like events (the SDKs drop them unanswered).
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from typing import Final, TypeAlias
from urllib.parse import parse_qs, urlsplit

import msgspec

from relay.ws.frames import CONTROL, DATA, Frame

ENDPOINT_PATH: Final = "/callback/ws/endpoint"

# frame header keys and values (oapi-sdk-go ws/const.go)
TYPE: Final = "type"
MESSAGE_ID: Final = "message_id"
SUM: Final = "sum"
SEQ: Final = "seq"
TRACE_ID: Final = "trace_id"
BIZ_RT: Final = "biz_rt"
PING: Final = "ping"
PONG: Final = "pong"
EVENT: Final = "event"
CARD: Final = "card"

# handshake refusal headers and the codes that mean "do not retry" (oapi-sdk-go ws/const.go, parseErr)
HANDSHAKE_STATUS: Final = "Handshake-Status"
HANDSHAKE_MSG: Final = "Handshake-Msg"
HANDSHAKE_AUTH_ERRCODE: Final = "Handshake-Autherrcode"
AUTH_FAILED: Final = 514
FORBIDDEN: Final = 403
EXCEED_CONN_LIMIT: Final = 1000040350

# endpoint codes Feishu's SDKs treat as the server's (retry): 1 system busy, 1000040343 internal error; and
# 1000040345 "system busy", reported in the wild, in no SDK's table (those stop on it)
RETRYABLE_ENDPOINT_CODES: Final = frozenset({1, 1000040343, 1000040345})

OK: Final = 200
ERROR: Final = 500


class ClientConfig(msgspec.Struct, frozen=True):
    """The server's connection settings, in seconds (the endpoint's ``data.ClientConfig``, a pong's payload).

    Feishu's defaults (the SDKs' initial values) where a value is absent; a value that is not positive keeps
    the previous one (:meth:`merged`), so a broken config cannot make the client ping in a busy loop.
    """

    reconnect_count: int = msgspec.field(default=-1, name="ReconnectCount")
    reconnect_interval: float = msgspec.field(default=120.0, name="ReconnectInterval")
    reconnect_nonce: float = msgspec.field(default=30.0, name="ReconnectNonce")
    ping_interval: float = msgspec.field(default=120.0, name="PingInterval")

    def merged(self, new: ClientConfig) -> ClientConfig:
        """``new``, except that a non-positive interval (or a negative nonce) keeps this config's value."""
        return ClientConfig(
            reconnect_count=new.reconnect_count,
            reconnect_interval=new.reconnect_interval if new.reconnect_interval > 0 else self.reconnect_interval,
            reconnect_nonce=new.reconnect_nonce if new.reconnect_nonce >= 0 else self.reconnect_nonce,
            ping_interval=new.ping_interval if new.ping_interval > 0 else self.ping_interval)


class _Endpoint(msgspec.Struct, frozen=True):
    url: str | None = msgspec.field(default=None, name="URL")
    client_config: ClientConfig | None = msgspec.field(default=None, name="ClientConfig")


class _EndpointAnswer(msgspec.Struct, frozen=True):
    code: int | None = None
    msg: str = ""
    data: _Endpoint | None = None


_ENDPOINT: Final = msgspec.json.Decoder(_EndpointAnswer)
_CONFIG: Final = msgspec.json.Decoder(ClientConfig)


@dataclass(frozen=True, slots=True)
class Connect:
    """The endpoint's answer: where to connect, with what settings."""

    url: str
    service_id: int  # put in every ping's ``service``
    device_id: str  # the connection's id, for logs
    config: ClientConfig


@dataclass(frozen=True, slots=True)
class Retry:
    """A failure that may heal: try again after :class:`Reconnect`'s delay. ``kind`` is a fixed word (a
    metric label): endpoint, handshake, liveness, closed, network."""

    reason: str
    kind: str = "endpoint"


@dataclass(frozen=True, slots=True)
class Stop:
    """A refusal that will not heal by retrying (wrong credentials, too many connections): stop, say why."""

    reason: str


Verdict: TypeAlias = Connect | Retry | Stop


def read_endpoint(status: int, body: bytes, current: ClientConfig) -> Verdict:
    """Classify the endpoint call's answer (HTTP ``status``, raw ``body``); see the module docstring.

    A 5xx, 429, a body that is not the expected JSON, or a retryable code -> :class:`Retry`; another 4xx or any
    other code -> :class:`Stop`. ``current`` fills a ClientConfig value the answer leaves out or spoils.
    """
    try:
        answer = _ENDPOINT.decode(body)
    except msgspec.DecodeError:
        answer = None
    code = answer.code if answer is not None else None
    msg = (answer.msg if answer is not None else "")[:200]
    if status != 200:
        reason = f"endpoint answered HTTP {status}" + (f" code {code} {msg!r}" if code is not None else "")
        return Retry(reason) if status >= 500 or status in (408, 429) else Stop(reason)
    if answer is None or code is None:
        return Retry("endpoint answer is not the expected JSON")
    if code != 0:
        reason = f"endpoint answered code {code} {msg!r}"
        return Retry(reason) if code in RETRYABLE_ENDPOINT_CODES else Stop(reason)
    data = answer.data
    if data is None or not data.url:
        return Retry("endpoint answer has no URL")
    parts = urlsplit(data.url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        return Retry("endpoint URL is not a ws(s) URL")
    query = parse_qs(parts.query)
    try:
        service_id = int(query.get("service_id", ["0"])[0])
    except ValueError:
        return Retry("endpoint URL has a service_id that is not a number")
    device_id = query.get("device_id", [""])[0][:100]
    config = current.merged(data.client_config) if data.client_config is not None else current
    return Connect(url=data.url, service_id=service_id, device_id=device_id, config=config)


def read_handshake_refusal(status: int, headers: dict[str, str]) -> Retry | Stop:
    """Classify a refused WebSocket upgrade: ``Handshake-Status`` (else the HTTP status) 403, or 514 with
    ``Handshake-Autherrcode`` 1000040350, means stop (the SDKs agree); anything else is retried."""
    lower = {key.lower(): value for key, value in headers.items()}
    msg = lower.get(HANDSHAKE_MSG.lower(), "")[:200]
    try:
        code = int(lower.get(HANDSHAKE_STATUS.lower(), "") or status)
    except ValueError:
        code = status
    try:
        auth = int(lower.get(HANDSHAKE_AUTH_ERRCODE.lower(), "") or 0)
    except ValueError:
        auth = 0
    reason = f"handshake refused: status {code}" + (f" autherrcode {auth}" if auth else "") + (
        f" {msg!r}" if msg else "")
    if code == FORBIDDEN or (code == AUTH_FAILED and auth == EXCEED_CONN_LIMIT):
        return Stop(reason)
    return Retry(reason, "handshake")


def read_config(payload: bytes | None) -> ClientConfig | None:
    """A pong's ClientConfig, or None when it carries none (or one that is not JSON: ignored, as the SDKs do)."""
    if not payload:
        return None
    try:
        return _CONFIG.decode(payload)
    except msgspec.DecodeError:
        return None


class Reconnect:
    """When to try the next connection: ``uniform(0, nonce)`` first, then ``interval + uniform(0, nonce)``.

    :meth:`connected` starts over (the next loss waits only the jitter again); the client calls it when a
    connection ends after lasting at least a ping interval. Randomness is injected.
    """

    __slots__ = ("_rng", "attempts")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.attempts = 0  # failed or lost connections since the last that was up

    def delay(self, config: ClientConfig) -> float:
        """Seconds to wait before the next attempt (and count it)."""
        self.attempts += 1
        jitter = self._rng.uniform(0.0, max(0.0, config.reconnect_nonce))
        return jitter if self.attempts == 1 else config.reconnect_interval + jitter

    def connected(self) -> None:
        self.attempts = 0


class Liveness:
    """The watchdog: the connection is dead when nothing was received for ``PingInterval + grace``.

    Every frame received counts (a pong, an event, a server ping), so a busy connection needs no pong. Times
    are an injected monotonic clock's.
    """

    __slots__ = ("_grace", "last")

    def __init__(self, now: float, grace: float) -> None:
        self.last = now
        self._grace = grace

    def received(self, now: float) -> None:
        self.last = now

    def remaining(self, now: float, config: ClientConfig) -> float:
        """Seconds until the connection counts as dead (<= 0: it is)."""
        return self.last + config.ping_interval + self._grace - now


def ping(service_id: int) -> Frame:
    """The client's ping: SeqID 0, LogID 0, control, ``type=ping``."""
    return Frame(service=service_id, method=CONTROL, headers=((TYPE, PING),))


class _Answer(msgspec.Struct, frozen=True, omit_defaults=True):
    """The payload of an answer frame (the SDKs' ``Response``)."""

    code: int
    data: str | None = None  # base64 of the answer JSON; absent when there is none


_ANSWER: Final = msgspec.json.Encoder()


def answer(frame: Frame, code: int, data: bytes | None, biz_rt_ms: float) -> Frame:
    """The answer to data ``frame``: the frame echoed with ``biz_rt`` appended and payload ``{"code", "data"?}``.

    ``data`` is the answer JSON (a callback's reply), sent base64 as the SDKs do; ``biz_rt`` is the time spent,
    in whole milliseconds, never negative (node-sdk sends start - end).
    """
    text = base64.b64encode(data).decode() if data is not None else None
    payload = _ANSWER.encode(_Answer(code=code, data=text))
    headers = (*frame.headers, (BIZ_RT, str(max(0, round(biz_rt_ms)))))
    return msgspec.structs.replace(frame, headers=headers, payload=payload)


@dataclass(frozen=True, slots=True)
class DataHeaders:
    """What the client reads of a data frame's headers; absent ``sum``/``seq`` mean one whole frame."""

    type: str
    message_id: str
    sum: int
    seq: int
    trace_id: str


def data_headers(frame: Frame) -> DataHeaders | None:
    """The data frame's headers, or None when they are malformed (a ``sum``/``seq`` that is not a number)."""
    try:
        total = int(frame.header(SUM) or "1")
        seq = int(frame.header(SEQ) or "0")
    except ValueError:
        return None
    return DataHeaders(type=frame.header(TYPE) or "", message_id=frame.header(MESSAGE_ID) or "", sum=total,
                       seq=seq, trace_id=frame.header(TRACE_ID) or "")


def is_data(frame: Frame) -> bool:
    return frame.method == DATA


class _Pending:
    __slots__ = ("parts", "size", "started")

    def __init__(self, total: int, started: float) -> None:
        self.parts: list[bytes | None] = [None] * total
        self.size = 0
        self.started = started


class Reassembly:
    """Fragments of split events, joined in ``seq`` order once all ``sum`` arrived; bounded in memory and age.

    * an event whose first fragment is older than ``ttl`` is dropped (Feishu redelivers an unanswered event);
    * at most ``max_bytes`` are buffered in all, and one event may not exceed ``max_event_bytes``; past either
      bound the oldest events are dropped (counted in :attr:`dropped`);
    * ``sum`` is at most :attr:`MAX_FRAGMENTS`; a ``seq`` out of range, or a ``sum`` that changes within one
      ``message_id``, drops that event (a malformed set can never complete).

    Times are an injected monotonic clock's.
    """

    MAX_FRAGMENTS: Final = 1024

    __slots__ = ("_max_bytes", "_max_event_bytes", "_pending", "_size", "_ttl", "dropped")

    def __init__(self, *, ttl: float, max_bytes: int, max_event_bytes: int) -> None:
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._max_event_bytes = max_event_bytes
        self._pending: dict[str, _Pending] = {}  # in arrival order: the oldest first
        self._size = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def size(self) -> int:
        """Bytes buffered."""
        return self._size

    def _drop(self, message_id: str) -> None:
        pending = self._pending.pop(message_id, None)
        if pending is not None:
            self._size -= pending.size
            self.dropped += 1

    def expire(self, now: float) -> None:
        """Drop every event whose first fragment arrived ``ttl`` or more ago."""
        for message_id in [m for m, p in self._pending.items() if now - p.started >= self._ttl]:
            self._drop(message_id)

    def add(self, headers: DataHeaders, payload: bytes, now: float) -> bytes | None:
        """The whole event once this fragment completes it, else None (also when the fragment was refused)."""
        self.expire(now)
        total, seq, message_id = headers.sum, headers.seq, headers.message_id
        if total <= 1 and seq == 0:
            return payload
        if not 1 <= total <= self.MAX_FRAGMENTS or not 0 <= seq < total or len(payload) > self._max_event_bytes:
            self._drop(message_id)
            return None
        pending = self._pending.get(message_id)
        if pending is not None and len(pending.parts) != total:
            self._drop(message_id)
            pending = None
        if pending is None:
            pending = self._pending[message_id] = _Pending(total, now)
        old = pending.parts[seq]
        grown = len(payload) - (len(old) if old is not None else 0)
        if pending.size + grown > self._max_event_bytes:
            self._drop(message_id)
            return None
        pending.parts[seq] = payload
        pending.size += grown
        self._size += grown
        while self._size > self._max_bytes:  # the oldest go first (this one last)
            self._drop(next(iter(self._pending)))
        if message_id not in self._pending or any(part is None for part in pending.parts):
            return None
        del self._pending[message_id]
        self._size -= pending.size
        return b"".join(part for part in pending.parts if part is not None)
