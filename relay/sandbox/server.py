"""A local stand-in for the Feishu Open Platform: a real aiohttp server, strict about every documented limit.

The relay's integration tests and benchmarks run against it, and ``relay run --with-sandbox`` uses it when no app
has real credentials. It is the *referee*: it answers the way docs/feishu-rules.md says Feishu answers, and it
logs every call so a test can prove the relay never exceeded a limit.

Endpoints (every answer is ``{"code", "msg", "data"}`` JSON with an ``X-Tt-Logid`` header, except injected
gateway faults, which answer 500/502/503 with a plain-text body like a load balancer would):

- ``POST /open-apis/auth/v3/tenant_access_token/internal``: 2 h tokens (``token_ttl``); a call when the current
  token has < 30 min (``token_refresh_window``) left mints a new one, the old one stays valid until its own expiry
  (docs/feishu-rules.md §1). Unknown app or wrong secret → 10014 (HTTP 400). ``apps`` empty = any credentials
  are accepted.
- Store apps (``store_apps``, :mod:`relay.sandbox.store`): ``POST /open-apis/auth/v3/app_ticket/resend``,
  ``/app_access_token`` and ``/tenant_access_token``; app_tickets pushed to each app's ``ticket_url``; a tenant
  token's calls count in that tenant's own app-wide windows (Feishu limits per API x app x tenant).
- Every other ``/open-apis/...`` call needs ``Authorization: Bearer <token>``: missing → 99991661, unknown or
  expired → 99991663 (HTTP 400, docs/feishu-rules.md §1).
- The IM APIs of the kinds table of docs/intents.md, url_previews/batch_update and chat_button
  (docs/feishu-rules.md §5.4, §5.5), and a generic fallback for any other ``/open-apis/...`` path (code 0, empty
  data) used by ``api.call``.
- CardKit: create, element content, settings and full update of card entities, with their sequence, uuid,
  streaming-mode and element rules (``relay.sandbox.cards``, docs/feishu-rules.md §5.7); a ``message.send`` or
  ``reply`` of a card entity (``{"type":"card","data":{"card_id"}}``) sends it once.
- Uploads: ``POST /open-apis/im/v1/images`` and ``/files`` parse multipart/form-data and refuse what Feishu
  refuses (``relay.sandbox.uploads``, §5.8); a message of ``msg_type`` image, file, audio or media must send a
  key this app uploaded (else 230001).
- ``/_sandbox/calls`` (GET, ``?api=`` filter), ``/_sandbox/stats`` (GET), ``/_sandbox/control`` (POST a
  ``Control``), ``/_sandbox/reset`` (POST): the same controls as the Python methods, for a relay run as a
  subprocess or a curious ``make run`` user.
- ``POST /callback/ws/endpoint`` and the WebSocket it hands out: Feishu's long connection (``relay.sandbox.ws``:
  pings, fragments, redelivery of unanswered events, refusals, half-open sockets), with ``/_sandbox/ws/emit``,
  ``/_sandbox/ws/fault`` and ``/_sandbox/ws/stats`` for a relay run as a subprocess.
- Anything else, and any ``/open-apis/`` path that leaves ``/open-apis/`` once a server decodes it (a ``.`` or
  ``..`` segment, also percent-encoded or twice encoded or as ``..;``, an encoded slash or backslash): logged with
  its raw path as a violation and answered 404, before authorization (a real gateway would have normalized it
  and routed it elsewhere, tenant token attached).

Limits (sliding windows over arrival times, see ``relay.sandbox.windows``; only admitted calls count, refused ones are
logged as throttled; §N is a section of docs/feishu-rules.md):

=====================================  =========================  ==========================================
what                                   limit                      answer when exceeded
=====================================  =========================  ==========================================
each IM API, per (app, API); a store   50 in any 1 s AND          HTTP 429, 99991400, ``x-ogw-ratelimit-limit``
  app's per (app, tenant, API)         1000 in any 60 s           and ``x-ogw-ratelimit-reset`` (§2.1, §2.2)
url_previews/batch_update, per app     5 in any 1 s               same (§2.2)
chat_button, per app                   10 in any 1 s              same (§2.2)
generic ``/open-apis`` fallback        ``generic_limits``         same
send / forward / reply per chat        5 in any 1 s, shared by    HTTP 400, 230020 (§2.3: "≤5 QPS to the
  (a person's: their p2p chat, however   the three APIs             same user; ≤5 QPS to the same group"; a reply
  the call names them; a reply: the                                 counts in the chat of the replied message)
  replied message's chat)
card.patch per ``message:<id>``        5 in any 1 s               230020 (patch page)
pin.add / pin.remove per message       5 in any 1 s               230020 (pin create/delete pages)
ephemeral.send per                     40 in any 1 s              230020 (ephemeral send page)
  ``ephemeral-chat:<chat_id>``
each ``preview-token:<token>``         1 in any 5 s               230020 for the whole batch (§2.3, §5.4)
each CardKit and upload API, per app   50 in any 1 s AND          HTTP 429, 99991400 (§5.7, §5.8)
                                       1000 in any 60 s
each card entity ``card:<card_id>``,   10 in any 1 s              230020 (§5.7: ≤ 10 card/element calls per
  across content, settings, update                                  second per card entity)
=====================================  =========================  ==========================================

API names (the ``api`` of a call record): ``message.send``, ``message.reply``, ``message.edit``,
``message.recall``, ``message.forward``, ``card.patch``, ``message.urgent_app|urgent_sms|urgent_phone``,
``reaction.add``, ``reaction.remove``, ``pin.add``, ``pin.remove``, ``card.delay_update``, ``ephemeral.send``,
``ephemeral.delete``, ``url_preview.update``, ``chat_button.update``, ``message.batch_send``, ``card.create``,
``card.stream``, ``card.settings``, ``card.update``, ``image.upload``, ``file.upload``, ``api.call``,
``auth.tenant_access_token`` (and ``outside`` for a request outside ``/open-apis/``). Each counts in its own
app-wide windows (Feishu limits per API x app); an ``api.call`` path that is a named API's (``POST
/open-apis/im/v1/messages``) is routed to that API and counts there. Per-target windows are keyed by (app, API,
target key), except a recipient's: one window per chat, whichever API reaches it. A send or forward lands in the
chat it names (``receive_id_type`` chat_id) or in the person's p2p chat: ``users`` lists people with several ids
(open_id, union_id, user_id, email) and their p2p chat, so all their ids and that chat are one window and every
answer's ``chat_id`` is that chat; an id no user lists is a person of its own (p2p chat ``oc_p2p_<id>``). A reply
counts in the chat of the replied message: one the sandbox created, one seeded with ``messages`` (posted by
somebody else), or else a chat of its own (``oc_of_<message_id>``). Target keys, also what
``throttle_target``/``fail_target`` take: ``receive:<receive_id>``, ``chat:<chat_id>``, ``message:<message_id>``,
``ephemeral-chat:<chat_id>``, ``preview-token:<token>``; ``throttle_api`` takes an API name.

Order of checks: path → authorization → ``throttle_api`` → app-wide window → fault injection → request validation
(230001 naming the field; the body rules are the structs of ``relay.sandbox.bodies``) → forced target errors /
timed throttles → per-target windows → ``uuid`` dedup → the operation → an after-operation fault (``lost``,
``hang``).

``time_scale`` k divides every Feishu duration (windows, token lifetime and refresh window, the 1 h ``uuid``
window, ``throttle_target`` and ``throttle_api`` seconds) so tests run limits k times faster; reported ``expire`` and
``x-ogw-ratelimit-reset`` are real seconds (the reset is rounded up to a whole second, as Feishu sends integers).
Injected latency is network time and is not scaled: ``latency`` before the answer, ``request_latency`` before
the call arrives (and is counted), so calls sent in one order can arrive in another.
Arrival times in the call log are the unscaled clock.

Faults (``fault_rate``, ``latency``) apply to API calls only, never to the token endpoint or ``/_sandbox``.
A fault is rolled after the app-wide window admitted the call, so a faulted call still counts against the quota,
as a retried call does at Feishu. ``fault_kinds`` picks among (default: the first five, ``BEFORE_FAULTS``):

=============  =====================================================================================
``http500``,   *instead of* the operation: a gateway's plain-text 500/502/503 (not performed)
``http502``,
``http503``
``code1500``   instead of the operation: Feishu's 1500 "internal error" (not performed)
``drop``       instead of the operation: the connection is aborted without an answer (not performed)
``lost``       the operation IS performed, then the connection is aborted without an answer
``hang``       the operation IS performed, then the answer is held ``hang_seconds`` (past the client's
               timeout; released at once when the sandbox stops) and written to whoever still listens
=============  =====================================================================================

``lost`` and ``hang`` (``AFTER_FAULTS``) are what a client cannot tell apart from ``drop`` and a slow network:
the request may or may not have been performed. They apply only to a call whose operation succeeds (a refusal
is answered as usual). Every call record says whether its operation took effect (``performed``: not for a
refusal, a fault before the operation or a ``uuid`` answered from the dedup cache), so a test can count the
operations performed per message or intent however the answers went.

``token_outage`` (option, ``set_token_outage``, or ``Control.token_outage``) answers every token request with a
gateway's plain-text 503 until cleared: a token endpoint that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar
from urllib.parse import unquote

import aiohttp
import msgspec
from aiohttp import web

from relay.sandbox.bodies import (
    AppTokenBody,
    AuthBody,
    BatchSendBody,
    CardContentBody,
    CardCreateBody,
    CardEntityBody,
    CardSettingsBody,
    CardUpdateBody,
    ChatButtonBody,
    EditBody,
    EphemeralDeleteBody,
    EphemeralSendBody,
    ForwardBody,
    PatchBody,
    PinBody,
    ReactionBody,
    ReplyBody,
    SendBody,
    UrgentBody,
    UrlPreviewBody,
)
from relay.sandbox.cards import CardRefused, Cards
from relay.sandbox.store import Refusal, SandboxStoreApp, StoreAuth, push, ticket_event
from relay.sandbox.uploads import FilePart, UploadRefused, Uploads
from relay.sandbox.windows import Limit, SlidingWindows
from relay.sandbox.ws import LongConnections, WsOptions

log = logging.getLogger(__name__)

FaultKind = Literal["http500", "http502", "http503", "code1500", "drop", "lost", "hang"]
# answered instead of the operation, which is not performed
BEFORE_FAULTS: Final[tuple[FaultKind, ...]] = ("http500", "http502", "http503", "code1500", "drop")
# the operation is performed, then its answer is lost (module doc)
AFTER_FAULTS: Final[tuple[FaultKind, ...]] = ("lost", "hang")
ALL_FAULTS: Final[tuple[FaultKind, ...]] = BEFORE_FAULTS + AFTER_FAULTS

# Messages Feishu sends with each code (docs/feishu-rules.md §1, §2.1, §4; §5.5 for 230027).
MESSAGES: Final[Mapping[int, str]] = {
    0: "success",
    1500: "internal error",
    10003: "invalid param",
    10012: "app_ticket is invalid",
    10014: "app secret invalid",
    230001: "param is invalid",
    230002: "Bot/User can NOT be out of the chat.",
    230011: "The message is recalled.",
    230020: "This operation triggers the frequency limit",
    230027: "no permission, bot not in the chat",
    230034: "The receive_id is invalid.",
    230049: "The message is being sent, please try again later.",
    230099: "Failed to create card content",
    234001: "Invalid request param.",
    234006: "The file size exceed the max value.",
    234010: "File's size can't be 0.",
    300309: "streaming mode is closed",
    300313: "element not found",
    300317: "sequence number compare failed",
    99991400: "request trigger frequency limit",
    99991661: "Missing access token for authorization",
    99991663: "Invalid access token for authorization",
    99991664: "Invalid app access token",
}

IM_APIS: Final[frozenset[str]] = frozenset({
    "message.send", "message.reply", "message.edit", "message.recall", "message.forward", "card.patch",
    "message.urgent_app", "message.urgent_sms", "message.urgent_phone", "reaction.add", "reaction.remove",
    "pin.add", "pin.remove", "card.delay_update", "ephemeral.send", "ephemeral.delete", "message.batch_send",
    # docs/feishu-rules.md §5.7, §5.8: the CardKit and upload APIs have the same 1000/min & 50/s tier
    "card.create", "card.stream", "card.settings", "card.update", "image.upload", "file.upload",
})
UPLOAD_APIS: Final[frozenset[str]] = frozenset({"image.upload", "file.upload"})
# room for a 30 MB file and its multipart framing: the sandbox answers an oversize upload itself (234006)
MAX_REQUEST_BYTES: Final = 40 * 1024 * 1024


class SandboxUser(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One person under each of their ids, with one p2p chat with the bot (``chat_id``, default
    ``oc_p2p_<open_id>``): a send or forward to any of the ids, or to that chat, lands in that chat and counts in
    the person's 5 per second (docs/feishu-rules.md §2.3: 5 per second to the same user), and the answer's
    ``chat_id`` is that chat, as at Feishu. An id no user lists is a person of its own, with p2p chat
    ``oc_p2p_<id>``."""

    open_id: str
    union_id: str | None = None
    user_id: str | None = None
    email: str | None = None
    chat_id: str | None = None


class SandboxOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the sandbox behaves. Defaults are Feishu's documented numbers; durations are in Feishu seconds."""

    apps: dict[str, str] = msgspec.field(default_factory=dict)  # app_id -> secret; empty = accept any
    token_ttl: float = 7200.0  # docs/feishu-rules.md §1: 2 h
    token_refresh_window: float = 1800.0  # docs/feishu-rules.md §1: < 30 min left → a new token
    time_scale: float = 1.0
    enforce_limits: bool = True  # False lifts every limit (engine-overhead benchmark)
    im_per_second: int = 50  # docs/feishu-rules.md §2.2: 1000/min & 50/s per IM API
    im_per_minute: int = 1000
    url_preview_per_second: int = 5  # docs/feishu-rules.md §2.2: 5 per second
    chat_button_per_second: int = 10  # docs/feishu-rules.md §2.2: 10 per second
    generic_per_second: int = 50
    generic_per_minute: int = 1000
    # docs/feishu-rules.md §2.3: send/reply/forward per user or group, patch and pins per message
    target_per_second: int = 5
    ephemeral_chat_per_second: int = 40  # docs/feishu-rules.md §2.3: 40 per second per group
    preview_token_interval: float = 5.0  # docs/feishu-rules.md §5.4: one update per token per 5 s
    card_per_second: int = 10  # docs/feishu-rules.md §5.7: ≤ 10 card/element calls per second per card entity
    streaming_window: float = 600.0  # docs/feishu-rules.md §5.7: streaming mode closes 10 min after it opened
    uuid_window: float = 3600.0  # docs/feishu-rules.md §3: same uuid at most once per hour
    latency: float = 0.0  # seconds added before every API answer (not scaled)
    latency_jitter: float = 0.0  # plus uniform(0, jitter)
    # seconds a request travels before Feishu counts it (not scaled): a call the client sent first can arrive
    # after one it sent later, as on a real network path
    request_latency: float = 0.0
    request_latency_jitter: float = 0.0  # plus uniform(0, jitter)
    fault_rate: float = 0.0  # share of API calls (after the app window) answered by a fault
    fault_kinds: tuple[FaultKind, ...] = BEFORE_FAULTS
    hang_seconds: float = 30.0  # how long a ``hang`` fault holds its answer (real seconds, not scaled)
    token_outage: bool = False  # the token endpoint answers a gateway's 503 (module doc)
    target_errors: dict[str, int] = msgspec.field(default_factory=dict)  # target (key or bare id) -> code
    users: tuple[SandboxUser, ...] = ()  # people with several ids and one p2p chat each (others: one id each)
    messages: dict[str, str] = msgspec.field(default_factory=dict)  # message_id -> chat_id existing at start
    failed_users: frozenset[str] = frozenset()  # chat_button user_ids reported in failed_user_reasons
    chats_without_bot: frozenset[str] = frozenset()  # chat_button chat_ids answered 230027
    seed: int | None = None  # for the fault / latency RNG
    log_bodies: bool = True  # keep each call's parsed body in the log (off for long benchmarks)
    ws: WsOptions = msgspec.field(default_factory=WsOptions)  # the long connection (relay.sandbox.ws)
    store_apps: dict[str, SandboxStoreApp] = msgspec.field(default_factory=dict)  # app_id -> store app
    ticket_ttl: float = 12 * 3600.0  # a ticket's validity: undocumented (the Go SDK keeps one 12 h)
    ticket_interval: float = 3600.0  # app_ticket pushed this often (event page: every hour); 0 = on resend only


class CallRecord(msgspec.Struct, kw_only=True):
    """One request as the sandbox saw and answered it."""

    at: float  # arrival, the sandbox clock (unscaled)
    method: str
    path: str  # percent-decoded, as the router matched it
    raw_path: str = ""  # exactly as it arrived (no query), before any decoding
    api: str
    log_id: str
    app_id: str | None = None
    tenant_key: str | None = None  # the tenant of a store app's token
    targets: list[str] = msgspec.field(default_factory=list)
    uuid: str | None = None
    body: Any = None
    status: int = 0  # 0: the connection was dropped without an answer
    code: int | None = None
    msg: str = ""
    message_id: str | None = None
    deduped: bool = False
    throttled: bool = False  # answered 429/99991400 or 230020 for any reason
    violation: str | None = None  # which documented limit the call broke (the relay must never cause one)
    fault: str | None = None  # an injected fault or forced target answer
    performed: bool = False  # the operation took effect, whether or not its answer reached the client


class Message(msgspec.Struct, kw_only=True):
    """A message the sandbox created."""

    message_id: str
    chat_id: str
    msg_type: str
    content: str
    uuid: str | None = None
    parent_id: str = ""
    recalled: bool = False
    edits: int = 0


class FaultSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    fault_rate: float | None = None
    fault_kinds: tuple[FaultKind, ...] | None = None
    latency: float | None = None
    latency_jitter: float | None = None
    request_latency: float | None = None
    request_latency_jitter: float | None = None
    hang_seconds: float | None = None


class TargetThrottle(msgspec.Struct, forbid_unknown_fields=True):
    target: str
    seconds: float


class ApiThrottle(msgspec.Struct, forbid_unknown_fields=True):
    api: str  # a sandbox API name, e.g. "message.send"
    seconds: float


class TargetFailure(msgspec.Struct, forbid_unknown_fields=True):
    target: str
    code: int  # 0 clears


class TenantToken(msgspec.Struct, forbid_unknown_fields=True):
    app_id: str
    tenant_key: str


class Control(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of ``POST /_sandbox/control``: every field optional, applied in this order."""

    expire_tokens: bool = False
    expire_tenant_tokens: list[TenantToken] = msgspec.field(default_factory=list)  # store apps' tenants
    invalidate_tickets: list[str] = msgspec.field(default_factory=list)  # store app ids
    faults: FaultSettings | None = None
    throttle: list[TargetThrottle] = msgspec.field(default_factory=list)
    throttle_apis: list[ApiThrottle] = msgspec.field(default_factory=list)
    fail: list[TargetFailure] = msgspec.field(default_factory=list)
    enforce_limits: bool | None = None
    token_outage: bool | None = None


S = TypeVar("S")
_CONTROL = msgspec.json.Decoder(Control)
_ENCODER = msgspec.json.Encoder()
_NO_BODY: Final = object()
_ID_SEGMENT = re.compile(r"^(om_|oc_|ou_|on_|omt_|cli_|bm-|t-|\d+$)")


def _status_for(code: int) -> int:
    if code == 0:
        return 200
    if code == 99991400:
        return 429
    if code == 1500:
        return 500
    return 400


def _escapes(raw_path: str) -> str | None:
    """How ``raw_path`` leaves ``/open-apis/`` once a server decodes it, or None when it stays.

    RFC 3986 lets a server decode ``%2E`` before removing dot segments, proxies decode ``%2F``/``%5C``, and some
    decode twice; servlet containers read ``..;x`` as ``..``: every segment is judged as each of those would.
    """
    if not raw_path.startswith("/open-apis/"):
        return "is not under /open-apis/"
    for segment in raw_path.split("/")[1:]:
        once = unquote(segment)
        for decoded in (segment, once, unquote(once)):
            if decoded.split(";", 1)[0] in (".", ".."):
                return "has a dot segment"
            if "/" in decoded or "\\" in decoded:
                return "has an encoded slash or a backslash"
    return None


def _template(path: str) -> str:
    """``/open-apis/im/v1/messages/om_1/read_users`` → ``/open-apis/im/v1/messages/:id/read_users``."""
    return "/".join(":id" if _ID_SEGMENT.match(seg) else seg for seg in path.split("/"))


class _Refused(Exception):
    """An answer other than success, raised from inside an operation."""

    def __init__(self, code: int, msg: str | None = None, *, headers: Mapping[str, str] | None = None,
                 data: dict[str, Any] | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.msg = msg or MESSAGES.get(code, "error")
        self.headers = dict(headers or {})
        self.data = data or {}


class _Drop(Exception):
    """Close the connection without answering."""


class _After(msgspec.Struct):
    """An after-operation fault rolled for a call (``lost`` or ``hang``)."""

    kind: FaultKind


class _GatewayFault(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(slots=True, frozen=True)
class _Form:
    """A multipart/form-data body (only the upload APIs read one)."""

    fields: dict[str, str | FilePart]


@dataclass(slots=True)
class _Req:
    call: CallRecord
    query: Mapping[str, str]
    match: Mapping[str, str]
    body: Any
    now: float
    app_id: str
    chat: str | None = None  # the chat a receive:<id> target lands in (see _targets)


class _Token(msgspec.Struct):
    value: str
    app_id: str
    expires_at: float
    tenant_key: str | None = None  # a store app's tenant token


def _principal(app_id: str, tenant_key: str | None) -> str:
    """Whose quota a call uses: the app's, or a store app's tenant's."""
    return app_id if tenant_key is None else f"{app_id}\x00{tenant_key}"


Op = Callable[[_Req], dict[str, Any]]


class Sandbox:
    """The Feishu stand-in. Build, ``await start()``, point the relay at the returned URL, ``await stop()``."""

    def __init__(self, options: SandboxOptions | None = None, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self._initial = options or SandboxOptions()
        self._clock = clock
        self._rng = rng or random.Random(self._initial.seed)
        self._runner: web.AppRunner | None = None
        self.url = ""  # the base URL once started
        self._ids = itertools.count(1)
        self.options = self._initial
        self.calls: list[CallRecord] = []
        self.token_requests = 0
        self.messages: dict[str, Message] = {}
        self.messages_by_uuid: dict[str, list[str]] = {}  # uuid -> ids of the messages created for it
        self._tokens: dict[str, _Token] = {}
        self._current: dict[str, str] = {}  # principal (app, or app and tenant) -> newest token
        o = self._initial
        self.store = StoreAuth(dict(o.store_apps), token_ttl=o.token_ttl / o.time_scale,
                               refresh_window=o.token_refresh_window / o.time_scale,
                               ticket_ttl=o.ticket_ttl / o.time_scale, clock=clock)
        self._session: aiohttp.ClientSession | None = None
        self._pushing: set[asyncio.Task[None]] = set()
        self._app_windows: SlidingWindows[tuple[str, str]] = SlidingWindows()
        self._target_windows: SlidingWindows[tuple[str, str, str]] = SlidingWindows()
        self._uuids: dict[tuple[str, str, str, str], tuple[float, dict[str, Any]]] = {}
        self._throttles: dict[str, float] = {}  # target -> clock time until which it answers 230020
        self._api_throttles: dict[str, float] = {}  # api -> clock time until which it answers 99991400
        self._failures: dict[str, int] = dict(self._initial.target_errors)
        self._stopping = asyncio.Event()  # releases ``hang`` answers at stop
        self._p2p: dict[tuple[str, str], str] = {}  # (receive_id_type, id) -> that person's p2p chat
        for user in self._initial.users:
            chat = user.chat_id or f"oc_p2p_{user.open_id}"
            for id_type, value in (("open_id", user.open_id), ("union_id", user.union_id),
                                   ("user_id", user.user_id), ("email", user.email)):
                if value:
                    self._p2p[(id_type, value)] = chat
        self.cards = Cards(self._scaled(self._initial.streaming_window))
        self.uploads = Uploads()
        self._seed_messages()
        self.ws = LongConnections(self._initial.apps, self._initial.ws)
        self.app = self._build_app()

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port); returns the base URL, e.g. ``http://127.0.0.1:PORT``."""
        self._stopping.clear()
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        self.url = self.ws.url = f"http://{host}:{bound[1]}"
        if self.options.store_apps:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
            if self.options.ticket_interval > 0:
                self._spawn(self._hourly_tickets())
        return self.url

    async def stop(self) -> None:
        self._stopping.set()
        await self.ws.stop()
        tasks = list(self._pushing)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ---- what tests read -------------------------------------------------------------------------------------

    def calls_for(self, api: str) -> list[CallRecord]:
        return [c for c in self.calls if c.api == api]

    def throttled_count(self) -> int:
        """Calls answered 429/99991400 or 230020, injected or not."""
        return sum(1 for c in self.calls if c.throttled)

    def violations(self) -> list[CallRecord]:
        """Calls refused because they broke a documented limit. The relay must never produce one."""
        return [c for c in self.calls if c.violation is not None]

    # ---- controls --------------------------------------------------------------------------------------------

    def _scaled(self, seconds: float) -> float:
        return seconds / self.options.time_scale

    def throttle_target(self, target: str, seconds: float) -> None:
        """Answer 230020 to every call on ``target`` (a key like ``receive:oc_1`` or a bare id) for ``seconds``."""
        self._throttles[target] = self._clock() + self._scaled(seconds)

    def throttle_api(self, api: str, seconds: float) -> None:
        """Answer every call of ``api`` (a name like ``message.send``) 429 / 99991400 for ``seconds``, each with
        ``x-ogw-ratelimit-reset`` = the seconds left (rounded up), as Feishu's gateway does once it limits an app:
        the relay must send nothing more on that API before the reset."""
        self._api_throttles[api] = self._clock() + self._scaled(seconds)

    def fail_target(self, target: str, code: int) -> None:
        """Answer ``code`` to every call on ``target`` (key or bare id) until cleared with code 0."""
        if code == 0:
            self._failures.pop(target, None)
        else:
            self._failures[target] = code

    # ---- store apps ------------------------------------------------------------------------------------------

    async def push_ticket(self, app_id: str) -> int:
        """Issue a new app_ticket and push it to the app's ``ticket_url`` now; the push's HTTP status."""
        app = self.options.store_apps[app_id]
        ticket = self.store.new_ticket(app_id)
        if app.ticket_url is None or self._session is None:
            return 0
        status = await push(self._session, app.ticket_url, ticket_event(app_id, ticket.value,
                                                                        app.verification_token))
        self.store.pushes.append((app_id, status))
        return status

    def invalidate_tickets(self, app_id: str) -> None:
        """Refuse every ticket of the store app from now on (10012) until a new one is pushed."""
        self.store.invalidate_tickets(app_id)

    def expire_tenant_token(self, app_id: str, tenant_key: str) -> None:
        """Invalidate one tenant's tokens: its next calls get 99991663, its next token request a new one."""
        for value in [v for v, t in self._tokens.items() if t.app_id == app_id and t.tenant_key == tenant_key]:
            del self._tokens[value]
        self._current.pop(_principal(app_id, tenant_key), None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._pushing.add(task)
        task.add_done_callback(self._pushing.discard)

    async def _hourly_tickets(self) -> None:
        while True:
            for app_id in self.options.store_apps:
                await self.push_ticket(app_id)
            await asyncio.sleep(self._scaled(self.options.ticket_interval))

    def expire_tokens(self) -> None:
        """Invalidate every issued token: the next API calls get 99991663, the next token request a new one."""
        self._tokens.clear()
        self._current.clear()

    def set_faults(self, *, fault_rate: float | None = None, fault_kinds: tuple[FaultKind, ...] | None = None,
                   latency: float | None = None, latency_jitter: float | None = None,
                   request_latency: float | None = None, request_latency_jitter: float | None = None,
                   hang_seconds: float | None = None) -> None:
        changes: dict[str, Any] = {"fault_rate": fault_rate, "fault_kinds": fault_kinds, "latency": latency,
                                   "latency_jitter": latency_jitter, "request_latency": request_latency,
                                   "request_latency_jitter": request_latency_jitter, "hang_seconds": hang_seconds}
        self.options = msgspec.structs.replace(self.options, **{k: v for k, v in changes.items() if v is not None})

    def set_token_outage(self, down: bool) -> None:
        """While ``down``, every token request is answered with a gateway's 503 (module doc)."""
        self.options = msgspec.structs.replace(self.options, token_outage=down)

    def set_enforce_limits(self, enforce: bool) -> None:
        self.options = msgspec.structs.replace(self.options, enforce_limits=enforce)

    def reset(self) -> None:
        """Forget calls, messages, windows, uuids, throttles and faults (the long connection's deliveries,
        violations and refusals too: its connections stay); issued tokens stay valid."""
        self.options = self._initial
        self.calls.clear()
        self.token_requests = 0
        self.messages.clear()
        self.messages_by_uuid.clear()
        self._app_windows.clear()
        self._target_windows.clear()
        self._uuids.clear()
        self._throttles.clear()
        self._api_throttles.clear()
        self._failures = dict(self._initial.target_errors)
        self.cards.clear()
        self.uploads.clear()
        self.store.resends = 0
        self.store.pushes.clear()
        self._seed_messages()
        self.ws.reset()

    def _seed_messages(self) -> None:
        """The ``messages`` option: messages somebody else posted, which the relay may reply to."""
        for message_id, chat_id in self._initial.messages.items():
            self.messages[message_id] = Message(message_id=message_id, chat_id=chat_id, msg_type="text",
                                                content="{}")

    def p2p_chat(self, receive_id_type: str, receive_id: str) -> str:
        """The chat a send or forward to ``receive_id`` lands in: the chat itself, or the person's p2p chat."""
        if receive_id_type == "chat_id":
            return receive_id
        return self._p2p.get((receive_id_type, receive_id), f"oc_p2p_{receive_id}")

    def apply(self, control: Control) -> None:
        if control.expire_tokens:
            self.expire_tokens()
        for tenant in control.expire_tenant_tokens:
            self.expire_tenant_token(tenant.app_id, tenant.tenant_key)
        for app_id in control.invalidate_tickets:
            self.invalidate_tickets(app_id)
        if control.faults is not None:
            f = control.faults
            self.set_faults(fault_rate=f.fault_rate, fault_kinds=f.fault_kinds, latency=f.latency,
                            latency_jitter=f.latency_jitter, request_latency=f.request_latency,
                            request_latency_jitter=f.request_latency_jitter, hang_seconds=f.hang_seconds)
        for t in control.throttle:
            self.throttle_target(t.target, t.seconds)
        for a in control.throttle_apis:
            self.throttle_api(a.api, a.seconds)
        for fail in control.fail:
            self.fail_target(fail.target, fail.code)
        if control.enforce_limits is not None:
            self.set_enforce_limits(control.enforce_limits)
        if control.token_outage is not None:
            self.set_token_outage(control.token_outage)

    # ---- limits ----------------------------------------------------------------------------------------------

    def _app_limits(self, api: str) -> tuple[Limit, ...]:
        o, s = self.options, self._scaled
        if api in IM_APIS:
            return (Limit(o.im_per_second, s(1.0)), Limit(o.im_per_minute, s(60.0)))
        if api == "url_preview.update":
            return (Limit(o.url_preview_per_second, s(1.0)),)
        if api == "chat_button.update":
            return (Limit(o.chat_button_per_second, s(1.0)),)
        return (Limit(o.generic_per_second, s(1.0)), Limit(o.generic_per_minute, s(60.0)))

    def _admit_app(self, call: CallRecord, bucket: str, now: float) -> None:
        if not self.options.enforce_limits:
            return
        refusal = self._app_windows.admit((_principal(call.app_id or "", call.tenant_key), bucket),
                                          self._app_limits(call.api), now)
        if refusal is not None:
            call.violation = (f"{bucket}: app-wide {refusal.limit.count} per "
                              f"{refusal.limit.seconds * self.options.time_scale:g}s exceeded")
            raise _Refused(99991400, headers={
                "x-ogw-ratelimit-limit": str(refusal.limit.count),
                "x-ogw-ratelimit-reset": str(max(1, math.ceil(refusal.retry_after))),
            })

    def _targets(self, req: _Req, targets: list[tuple[str, Limit | None]], chat: str | None = None) -> None:
        """Record the call's targets; answer forced errors and timed throttles; admit through per-target windows.

        ``chat``: the chat a ``receive:<id>`` target lands in (a person's p2p chat), whose window it counts in."""
        call, now = req.call, req.now
        req.chat = chat
        call.targets = [key for key, _ in targets]
        for key in call.targets:
            bare = key.split(":", 1)[1]
            for name in (key, bare):
                if self._throttles.get(name, -math.inf) > now:
                    call.fault = f"throttle_target {name}"
                    raise _Refused(230020)
                if name in self._failures:
                    call.fault = f"fail_target {name}"
                    raise _Refused(self._failures[name])
        if not self.options.enforce_limits:
            return
        limited = [(key, limit) for key, limit in targets if limit is not None]
        for key, limit in limited:
            refusal = self._target_windows.check(self._window_key(req, key), (limit,), now)
            if refusal is not None:
                call.violation = self._target_violation(req, key, limit)
                raise _Refused(230020)
        for key, limit in limited:
            self._target_windows.admit(self._window_key(req, key), (limit,), now)

    def _window_key(self, req: _Req, key: str) -> tuple[str, str, str]:
        kind, _, bare = key.partition(":")
        if kind == "receive":  # a recipient: one window per chat whichever API and id reach it (module docstring)
            return (req.app_id, "recipient", req.chat or bare)
        if kind == "chat":
            return (req.app_id, "recipient", bare)
        if kind == "card":  # one window per card entity, whichever CardKit API reaches it
            return (req.app_id, "card", bare)
        return (req.app_id, req.call.api, key)

    def _target_violation(self, req: _Req, key: str, limit: Limit) -> str:
        scale = self.options.time_scale
        if key.startswith("preview-token:"):
            last = self._target_windows.last(self._window_key(req, key), limit)
            ago = (req.now - last) * scale if last is not None else 0.0
            return f"{key} updated {ago:.3f}s ago (at most 1 per {limit.seconds * scale:g}s)"
        return f"{req.call.api} {key}: {limit.count} per {limit.seconds * scale:g}s exceeded"

    def _per_target(self) -> Limit:
        return Limit(self.options.target_per_second, self._scaled(1.0))

    # ---- tokens ----------------------------------------------------------------------------------------------

    def _issue_token(self, app_id: str, now: float, tenant_key: str | None = None) -> _Token:
        principal = _principal(app_id, tenant_key)
        current = self._tokens.get(self._current.get(principal, ""))
        if current is not None and current.expires_at - now >= self._scaled(self.options.token_refresh_window):
            return current
        token = _Token(value=f"t-{secrets.token_hex(16)}", app_id=app_id,
                       expires_at=now + self._scaled(self.options.token_ttl), tenant_key=tenant_key)
        self._tokens[token.value] = token
        self._current[principal] = token.value
        for value in [v for v, t in self._tokens.items() if t.expires_at <= now]:
            del self._tokens[value]
        return token

    def _authorize(self, request: web.Request, now: float) -> _Token:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            raise _Refused(99991661)
        token = self._tokens.get(header[7:].strip())
        if token is None or token.expires_at <= now:
            raise _Refused(99991663)
        return token

    # ---- HTTP plumbing ---------------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_middleware], client_max_size=MAX_REQUEST_BYTES)
        r = app.router
        r.add_post("/open-apis/auth/v3/tenant_access_token/internal", self._token_endpoint)
        r.add_post("/open-apis/auth/v3/app_ticket/resend", self._resend_endpoint)
        r.add_post("/open-apis/auth/v3/app_access_token", self._app_token_endpoint)
        r.add_post("/open-apis/auth/v3/tenant_access_token", self._store_token_endpoint)
        m = "/open-apis/im/v1/messages"
        routes: list[tuple[str, str, str, Op]] = [
            ("POST", m, "message.send", self._send),
            ("POST", m + "/{message_id}/reply", "message.reply", self._reply),
            ("PUT", m + "/{message_id}", "message.edit", self._edit),
            ("DELETE", m + "/{message_id}", "message.recall", self._recall),
            ("PATCH", m + "/{message_id}", "card.patch", self._patch),
            ("POST", m + "/{message_id}/forward", "message.forward", self._forward),
            ("PATCH", m + "/{message_id}/urgent_app", "message.urgent_app", self._urgent),
            ("PATCH", m + "/{message_id}/urgent_sms", "message.urgent_sms", self._urgent),
            ("PATCH", m + "/{message_id}/urgent_phone", "message.urgent_phone", self._urgent),
            ("POST", m + "/{message_id}/reactions", "reaction.add", self._reaction_add),
            ("DELETE", m + "/{message_id}/reactions/{reaction_id}", "reaction.remove", self._reaction_remove),
            ("POST", "/open-apis/im/v1/pins", "pin.add", self._pin_add),
            ("DELETE", "/open-apis/im/v1/pins/{message_id}", "pin.remove", self._pin_remove),
            ("POST", "/open-apis/interactive/v1/card/update", "card.delay_update", self._card_update),
            ("POST", "/open-apis/ephemeral/v1/send", "ephemeral.send", self._ephemeral_send),
            ("POST", "/open-apis/ephemeral/v1/delete", "ephemeral.delete", self._ephemeral_delete),
            ("POST", "/open-apis/im/v2/url_previews/batch_update", "url_preview.update", self._url_preview),
            ("PUT", "/open-apis/im/v2/chat_button", "chat_button.update", self._chat_button),
            ("POST", "/open-apis/message/v4/batch_send/", "message.batch_send", self._batch_send),
            ("POST", "/open-apis/message/v4/batch_send", "message.batch_send", self._batch_send),
            ("POST", "/open-apis/cardkit/v1/cards", "card.create", self._card_create),
            ("PUT", "/open-apis/cardkit/v1/cards/{card_id}/elements/{element_id}/content", "card.stream",
             self._card_stream),
            ("PATCH", "/open-apis/cardkit/v1/cards/{card_id}/settings", "card.settings", self._card_settings),
            ("PUT", "/open-apis/cardkit/v1/cards/{card_id}", "card.update", self._card_entity_update),
            ("POST", "/open-apis/im/v1/images", "image.upload", self._image_upload),
            ("POST", "/open-apis/im/v1/files", "file.upload", self._file_upload),
        ]
        for method, path, api, op in routes:
            r.add_route(method, path, self._handler(api, op))
        r.add_route("*", "/open-apis/{tail:.*}", self._handler("api.call", self._generic))
        r.add_get("/_sandbox/calls", self._control_calls)
        r.add_get("/_sandbox/stats", self._control_stats)
        r.add_post("/_sandbox/control", self._control)
        r.add_post("/_sandbox/reset", self._control_reset)
        self.ws.install(app)
        r.add_route("*", "/{tail:.*}", self._outside)
        return app

    def _log_id(self) -> str:
        return f"{time.strftime('%Y%m%d%H%M%S')}{next(self._ids):010d}{secrets.token_hex(4).upper()}"

    @web.middleware
    async def _errors_middleware(self, request: web.Request,
                                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                                 ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = self._json(exc.status, {"code": exc.status, "msg": exc.reason, "data": {}})
        except Exception:
            log.exception("sandbox: unexpected error answering %s %s", request.method, request.path)
            response = self._json(500, {"code": 1500, "msg": MESSAGES[1500], "data": {}})
        if "X-Tt-Logid" not in response.headers:
            response.headers["X-Tt-Logid"] = self._log_id()
        return response

    @staticmethod
    def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
        return web.Response(status=status, body=_ENCODER.encode(payload), headers=headers,
                            content_type="application/json", charset="utf-8")

    def _answer(self, call: CallRecord, code: int, msg: str, data: dict[str, Any],
                headers: Mapping[str, str] | None = None) -> web.Response:
        call.status, call.code, call.msg = _status_for(code), code, msg
        call.throttled = code in (99991400, 230020)
        if code == 99991400 and not headers:  # a forced 99991400 still carries the headers the relay reads
            headers = {"x-ogw-ratelimit-limit": str(self.options.im_per_second), "x-ogw-ratelimit-reset": "1"}
        out = {"X-Tt-Logid": call.log_id, **(headers or {})}
        return self._json(call.status, {"code": code, "msg": msg, "data": data}, out)

    @staticmethod
    async def _read_body(request: web.Request) -> Any:
        raw = await request.read()
        if not raw.strip():
            return None
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return _NO_BODY

    @staticmethod
    async def _read_form(request: web.Request) -> dict[str, str | FilePart]:
        """A multipart/form-data body: text fields as str, file parts with their bytes (the last of a name)."""
        form: dict[str, str | FilePart] = {}
        for name, value in (await request.post()).items():
            if isinstance(value, web.FileField):
                form[name] = FilePart(value.filename, value.content_type, value.file.read())
            else:
                form[name] = str(value)
        return form

    def _handler(self, api: str, op: Op) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve_api(request, api, op)
        return handle

    async def _serve_api(self, request: web.Request, api: str, op: Op) -> web.StreamResponse:
        await self._travel()
        now = self._clock()
        call = CallRecord(at=now, method=request.method, path=request.path, raw_path=request.rel_url.raw_path,
                          api=api, log_id=self._log_id())
        self.calls.append(call)
        escape = _escapes(call.raw_path)
        if escape is not None:  # a gateway would normalize this and route it elsewhere, token attached
            call.violation = f"path {call.raw_path!r} {escape}"
            return self._answer(call, 404, "path outside /open-apis/", {})
        if api in UPLOAD_APIS and request.content_type == "multipart/form-data":
            form = await self._read_form(request)
            body: Any = _Form(form)
            logged: Any = {k: v if isinstance(v, str) else f"<{len(v.data)} bytes>" for k, v in form.items()}
        else:
            body = logged = await self._read_body(request)
        call.body = None if body is _NO_BODY or not self.options.log_bodies else logged
        bucket = api if api != "api.call" else f"api.call {request.method} {_template(request.path)}"
        response: web.StreamResponse
        try:
            token = self._authorize(request, now)
            app_id = call.app_id = token.app_id
            call.tenant_key = token.tenant_key
            until = self._api_throttles.get(api, -math.inf)
            if until > now:
                call.fault = f"throttle_api {api}"
                raise _Refused(99991400, headers={"x-ogw-ratelimit-limit": str(self.options.im_per_second),
                                                  "x-ogw-ratelimit-reset": str(max(1, math.ceil(until - now)))})
            self._admit_app(call, bucket, now)
            after = self._roll_fault(call)
            try:
                data = op(_Req(call, request.query, request.match_info, body, now, app_id))
            except (CardRefused, UploadRefused) as refused:
                raise _Refused(refused.code, refused.msg) from None
            call.performed = not call.deduped
            if after is not None:
                return await self._lose_answer(request, call, after, data)
            response = self._answer(call, 0, MESSAGES[0], data)
        except _Refused as refused:
            response = self._answer(call, refused.code, refused.msg, refused.data, refused.headers)
        except _GatewayFault as fault:
            call.status = fault.status
            # A gateway in front of Feishu answers these, with a plain-text body, not Feishu JSON.
            response = web.Response(status=fault.status, text=f"{fault.status} gateway error",
                                    headers={"X-Tt-Logid": call.log_id})
        except _Drop:
            await self._delay()
            transport = request.transport
            if transport is not None:
                transport.abort()
            log.debug("sandbox: dropped %s %s", request.method, request.path)
            return web.Response()
        await self._delay()
        log.debug("sandbox: %s %s -> %s %s", call.method, call.path, call.status, call.code)
        return response

    def _roll_fault(self, call: CallRecord) -> _After | None:
        """Raise a fault answered instead of the operation, or return one to apply after it (module doc)."""
        o = self.options
        if o.fault_rate <= 0 or not o.fault_kinds or self._rng.random() >= o.fault_rate:
            return None
        kind = self._rng.choice(o.fault_kinds)
        if kind in AFTER_FAULTS:
            return _After(kind)  # recorded once the operation succeeded (a refusal is answered as usual)
        call.fault = kind
        if kind == "drop":
            raise _Drop
        if kind == "code1500":
            raise _Refused(1500)
        raise _GatewayFault(int(kind[4:]))

    async def _lose_answer(self, request: web.Request, call: CallRecord, after: _After,
                           data: dict[str, Any]) -> web.StreamResponse:
        """The operation was performed: abort without an answer (``lost``), or answer too late (``hang``)."""
        call.fault = after.kind
        await self._delay()
        if after.kind == "hang":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.options.hang_seconds)
            log.debug("sandbox: answering %s %s after a hang", request.method, request.path)
            return self._answer(call, 0, MESSAGES[0], data)
        transport = request.transport
        if transport is not None:
            transport.abort()
        log.debug("sandbox: performed %s %s and lost the answer", request.method, request.path)
        return web.Response()

    async def _travel(self) -> None:
        """The way in: ``request_latency`` (+ jitter) before the call arrives and is counted."""
        o = self.options
        pause = o.request_latency + (self._rng.uniform(0, o.request_latency_jitter)
                                     if o.request_latency_jitter > 0 else 0.0)
        if pause > 0:
            await asyncio.sleep(pause)

    async def _delay(self) -> None:
        o = self.options
        pause = o.latency + (self._rng.uniform(0, o.latency_jitter) if o.latency_jitter > 0 else 0.0)
        if pause > 0:
            await asyncio.sleep(pause)

    # ---- token endpoint --------------------------------------------------------------------------------------

    async def _outside(self, request: web.Request) -> web.StreamResponse:
        """Any request outside ``/open-apis/`` and ``/_sandbox/``: logged as a violation (the relay never sends one)."""
        call = CallRecord(at=self._clock(), method=request.method, path=request.path,
                          raw_path=request.rel_url.raw_path, api="outside", log_id=self._log_id(),
                          violation=f"request outside /open-apis/: {request.rel_url.raw_path!r}")
        self.calls.append(call)
        return self._answer(call, 404, "not found", {})

    async def _token_endpoint(self, request: web.Request) -> web.StreamResponse:
        now = self._clock()
        call = CallRecord(at=now, method=request.method, path=request.path, api="auth.tenant_access_token",
                    log_id=self._log_id())
        self.calls.append(call)
        self.token_requests += 1
        body = await self._read_body(request)
        try:
            creds = msgspec.convert(body if isinstance(body, dict) else {}, AuthBody)
        except msgspec.ValidationError:
            creds = AuthBody()
        call.app_id = creds.app_id or None
        call.body = {"app_id": creds.app_id, "app_secret": "***"}  # never keep a secret in the log
        headers = {"X-Tt-Logid": call.log_id}
        if self.options.token_outage:
            call.status, call.fault = 503, "token_outage"
            return web.Response(status=503, text="503 gateway error", headers=headers)
        if not creds.app_id or not creds.app_secret:
            call.status, call.code, call.msg = 400, 10003, MESSAGES[10003]
            return self._json(400, {"code": 10003, "msg": MESSAGES[10003]}, headers)
        apps = self.options.apps
        if creds.app_id in self.options.store_apps or (apps and apps.get(creds.app_id) != creds.app_secret):
            call.status, call.code, call.msg = 400, 10014, MESSAGES[10014]
            return self._json(400, {"code": 10014, "msg": MESSAGES[10014]}, headers)
        token = self._issue_token(creds.app_id, now)
        expire = int(token.expires_at - now)
        call.status, call.code, call.msg = 200, 0, "ok"
        return self._json(200, {"code": 0, "msg": "ok", "tenant_access_token": token.value, "expire": expire},
                          headers)

    def _auth_call(self, request: web.Request, api: str) -> CallRecord:
        call = CallRecord(at=self._clock(), method=request.method, path=request.path, api=api,
                          log_id=self._log_id())
        self.calls.append(call)
        return call

    def _auth_answer(self, call: CallRecord, code: int, **fields: Any) -> web.Response:
        call.status, call.code, call.msg = _status_for(code), code, MESSAGES.get(code, "ok")
        return self._json(call.status, {"code": code, "msg": call.msg, **fields}, {"X-Tt-Logid": call.log_id})

    async def _resend_endpoint(self, request: web.Request) -> web.StreamResponse:
        """app_ticket/resend: answered at once; the new ticket is pushed to the event URL meanwhile."""
        call = self._auth_call(request, "auth.app_ticket_resend")
        body = await self._read_body(request)
        creds = msgspec.convert(body, AuthBody) if isinstance(body, dict) else AuthBody()
        call.app_id = creds.app_id or None
        try:
            self.store.check(creds.app_id, creds.app_secret)
        except Refusal as refusal:
            return self._auth_answer(call, refusal.code)
        self.store.resends += 1
        self._spawn(self.push_ticket(creds.app_id))
        return self._auth_answer(call, 0)

    async def _app_token_endpoint(self, request: web.Request) -> web.StreamResponse:
        call = self._auth_call(request, "auth.app_access_token")
        body = await self._read_body(request)
        try:
            creds = msgspec.convert(body if isinstance(body, dict) else {}, AppTokenBody)
        except msgspec.ValidationError:
            creds = AppTokenBody()
        call.app_id = creds.app_id or None
        if self.options.token_outage:
            call.status, call.fault = 503, "token_outage"
            return web.Response(status=503, text="503 gateway error", headers={"X-Tt-Logid": call.log_id})
        if not creds.app_id or not creds.app_secret:
            return self._auth_answer(call, 10003)
        try:
            token = self.store.app_token(creds.app_id, creds.app_secret, creds.app_ticket)
        except Refusal as refusal:
            return self._auth_answer(call, refusal.code)
        return self._auth_answer(call, 0, app_access_token=token.value,
                                 expire=int(token.expires_at - self._clock()))

    async def _store_token_endpoint(self, request: web.Request) -> web.StreamResponse:
        """A store app's tenant_access_token, for one tenant (module doc)."""
        call = self._auth_call(request, "auth.tenant_access_token")
        self.token_requests += 1
        body = await self._read_body(request)
        fields = body if isinstance(body, dict) else {}
        app_token, tenant_key = fields.get("app_access_token"), fields.get("tenant_key")
        call.tenant_key = tenant_key if isinstance(tenant_key, str) else None
        if self.options.token_outage:
            call.status, call.fault = 503, "token_outage"
            return web.Response(status=503, text="503 gateway error", headers={"X-Tt-Logid": call.log_id})
        if not isinstance(app_token, str) or not isinstance(tenant_key, str):
            return self._auth_answer(call, 10003)
        try:
            app_id = call.app_id = self.store.tenant_of(app_token, tenant_key)
        except Refusal as refusal:
            return self._auth_answer(call, refusal.code)
        now = self._clock()
        token = self._issue_token(app_id, now, tenant_key)
        return self._auth_answer(call, 0, tenant_access_token=token.value, expire=int(token.expires_at - now))

    # ---- validation helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _decode(req: _Req, kind: type[S]) -> S:
        if req.body is _NO_BODY:
            raise _Refused(230001, "param is invalid: request body is not valid JSON")
        try:
            return msgspec.convert({} if req.body is None else req.body, kind)
        except msgspec.ValidationError as err:
            raise _Refused(230001, f"param is invalid: {err}") from None

    @staticmethod
    def _query(req: _Req, name: str, allowed: tuple[str, ...], default: str | None = None) -> str:
        value = req.query.get(name, default)
        if value is None:
            raise _Refused(230001, f"param is invalid: query `{name}` is required")
        if value not in allowed:
            raise _Refused(230001, f"param is invalid: query `{name}` must be one of {', '.join(allowed)}")
        return value

    def _live(self, message_id: str) -> Message | None:
        message = self.messages.get(message_id)
        if message is not None and message.recalled:
            raise _Refused(230011)
        return message

    def _dedup(self, req: _Req, uuid: str | None, scope: str) -> dict[str, Any] | None:
        req.call.uuid = uuid
        if uuid is None:
            return None
        hit = self._uuids.get((req.app_id, req.call.api, uuid, scope))
        if hit is not None and req.now - hit[0] < self._scaled(self.options.uuid_window):
            req.call.deduped = True
            req.call.message_id = hit[1].get("message_id")
            return hit[1]
        return None

    def _create(self, req: _Req, *, chat_id: str, msg_type: str, content: str, uuid: str | None,
                scope: str, parent_id: str = "") -> dict[str, Any]:
        message_id = f"om_{secrets.token_hex(12)}"
        self.messages[message_id] = Message(message_id=message_id, chat_id=chat_id, msg_type=msg_type,
                                            content=content, uuid=uuid, parent_id=parent_id)
        req.call.message_id = message_id
        millis = str(int(time.time() * 1000))
        data: dict[str, Any] = {
            "message_id": message_id, "root_id": parent_id, "parent_id": parent_id, "msg_type": msg_type,
            "create_time": millis, "update_time": millis, "deleted": False, "updated": False, "chat_id": chat_id,
            "sender": {"id": req.app_id, "id_type": "app_id", "sender_type": "app", "tenant_key": "sandbox"},
            "body": {"content": content},
        }
        if uuid is not None:
            self._uuids[(req.app_id, req.call.api, uuid, scope)] = (req.now, data)
            self.messages_by_uuid.setdefault(uuid, []).append(message_id)
        return data

    # ---- operations ------------------------------------------------------------------------------------------

    _RECEIVE_TYPES: Final = ("open_id", "user_id", "union_id", "email", "chat_id")
    _USER_TYPES: Final = ("open_id", "user_id", "union_id")

    def _send(self, req: _Req) -> dict[str, Any]:
        id_type = self._query(req, "receive_id_type", self._RECEIVE_TYPES)
        body = self._decode(req, SendBody)
        chat_id = self.p2p_chat(id_type, body.receive_id)
        self._targets(req, [(f"receive:{body.receive_id}", self._per_target())], chat_id)
        cached = self._dedup(req, body.uuid, "")
        if cached is not None:
            return cached
        self._uses(req, body.msg_type, body.content)
        return self._create(req, chat_id=chat_id, msg_type=body.msg_type, content=body.content, uuid=body.uuid,
                            scope="")

    def _reply(self, req: _Req) -> dict[str, Any]:
        message_id = req.match["message_id"]
        body = self._decode(req, ReplyBody)
        parent = self._live(message_id)
        if parent is None:  # posted by somebody else, in a chat of its own (give it with the messages option)
            parent = self.messages[message_id] = Message(message_id=message_id, chat_id=f"oc_of_{message_id}",
                                                         msg_type="text", content="{}")
        chat_id = parent.chat_id
        self._targets(req, [(f"chat:{chat_id}", self._per_target())])
        cached = self._dedup(req, body.uuid, "")
        if cached is not None:
            return cached
        self._uses(req, body.msg_type, body.content)
        return self._create(req, chat_id=chat_id, msg_type=body.msg_type, content=body.content, uuid=body.uuid,
                            scope="", parent_id=message_id)

    def _edit(self, req: _Req) -> dict[str, Any]:
        message_id = req.match["message_id"]
        body = self._decode(req, EditBody)
        message = self._live(message_id)
        self._targets(req, [(f"message:{message_id}", None)])
        if message is not None:
            message.edits += 1
            message.content = body.content
        return {"message_id": message_id, "msg_type": body.msg_type, "updated": True,
                "body": {"content": body.content}}

    def _recall(self, req: _Req) -> dict[str, Any]:
        message_id = req.match["message_id"]
        message = self._live(message_id)
        self._targets(req, [(f"message:{message_id}", None)])
        if message is not None:
            message.recalled = True
        return {}

    def _patch(self, req: _Req) -> dict[str, Any]:
        message_id = req.match["message_id"]
        body = self._decode(req, PatchBody)
        message = self._live(message_id)
        self._targets(req, [(f"message:{message_id}", self._per_target())])
        if message is not None:
            message.content = body.content
        return {}

    def _forward(self, req: _Req) -> dict[str, Any]:
        message_id = req.match["message_id"]
        id_type = self._query(req, "receive_id_type", self._RECEIVE_TYPES)
        uuid = req.query.get("uuid")
        if uuid is not None and len(uuid) > 50:
            raise _Refused(230001, "param is invalid: query `uuid` is longer than 50 characters")
        body = self._decode(req, ForwardBody)
        source = self._live(message_id)
        chat_id = self.p2p_chat(id_type, body.receive_id)
        self._targets(req, [(f"receive:{body.receive_id}", self._per_target())], chat_id)
        cached = self._dedup(req, uuid, body.receive_id)  # forward page: same uuid + same target
        if cached is not None:
            return cached
        return self._create(req, chat_id=chat_id, msg_type=source.msg_type if source else "text",
                            content=source.content if source else "{}", uuid=uuid, scope=body.receive_id)

    def _urgent(self, req: _Req) -> dict[str, Any]:
        message_id = req.match["message_id"]
        self._query(req, "user_id_type", self._USER_TYPES)
        self._decode(req, UrgentBody)
        self._live(message_id)
        self._targets(req, [(f"message:{message_id}", None)])
        return {"invalid_user_id_list": []}

    def _reaction_add(self, req: _Req) -> dict[str, Any]:
        message_id = req.match["message_id"]
        body = self._decode(req, ReactionBody)
        self._live(message_id)
        self._targets(req, [(f"message:{message_id}", None)])
        return {"reaction_id": f"r_{secrets.token_hex(8)}", "action_time": str(int(time.time() * 1000)),
                "operator": {"operator_id": req.app_id, "operator_type": "app"},
                "reaction_type": {"emoji_type": body.reaction_type.emoji_type}}

    def _reaction_remove(self, req: _Req) -> dict[str, Any]:
        message_id = req.match["message_id"]
        self._live(message_id)
        self._targets(req, [(f"message:{message_id}", None)])
        return {"reaction_id": req.match["reaction_id"]}

    def _pin(self, req: _Req, message_id: str) -> dict[str, Any]:
        message = self._live(message_id)
        self._targets(req, [(f"message:{message_id}", self._per_target())])
        return {"pin": {"message_id": message_id, "chat_id": message.chat_id if message else "",
                        "operator_id": req.app_id, "operator_id_type": "app_id",
                        "create_time": str(int(time.time() * 1000))}}

    def _pin_add(self, req: _Req) -> dict[str, Any]:
        return self._pin(req, self._decode(req, PinBody).message_id)

    def _pin_remove(self, req: _Req) -> dict[str, Any]:
        self._pin(req, req.match["message_id"])
        return {}

    def _card_update(self, req: _Req) -> dict[str, Any]:
        body = self._decode(req, CardUpdateBody)
        self._targets(req, [(f"card-token:{body.token}", None)])
        return {}

    def _ephemeral_send(self, req: _Req) -> dict[str, Any]:
        body = self._decode(req, EphemeralSendBody)
        limit = Limit(self.options.ephemeral_chat_per_second, self._scaled(1.0))
        self._targets(req, [(f"ephemeral-chat:{body.chat_id}", limit)])
        return {"message_id": f"om_{secrets.token_hex(12)}"}

    def _ephemeral_delete(self, req: _Req) -> dict[str, Any]:
        body = self._decode(req, EphemeralDeleteBody)
        self._targets(req, [(f"message:{body.message_id}", None)])
        return {}

    def _url_preview(self, req: _Req) -> dict[str, Any]:
        body = self._decode(req, UrlPreviewBody)
        limit = Limit(1, self._scaled(self.options.preview_token_interval))
        self._targets(req, [(f"preview-token:{t}", limit) for t in dict.fromkeys(body.preview_tokens)])
        return {}

    def _chat_button(self, req: _Req) -> dict[str, Any]:
        self._query(req, "user_id_type", self._USER_TYPES, default="open_id")
        body = self._decode(req, ChatButtonBody)
        if body.chat_id in self.options.chats_without_bot:
            raise _Refused(230027)
        self._targets(req, [(f"chat:{body.chat_id}", None)])
        failed = [{"error_code": 0, "error_message": "The user is not in the chat", "user_id": u}
                  for u in body.user_ids or [] if u in self.options.failed_users]
        return {"failed_user_reasons": failed} if failed else {}

    def _batch_send(self, req: _Req) -> dict[str, Any]:
        self._decode(req, BatchSendBody)
        self._targets(req, [])
        return {"message_id": f"bm-{secrets.token_hex(12)}", "invalid_department_ids": [],
                "invalid_open_ids": [], "invalid_user_ids": [], "invalid_union_ids": []}

    def _generic(self, req: _Req) -> dict[str, Any]:
        self._targets(req, [])
        return {}

    # CardKit (relay.sandbox.cards has the rules) and uploads (relay.sandbox.uploads)

    def _per_card(self, req: _Req) -> None:
        self._targets(req, [(f"card:{req.match['card_id']}", Limit(self.options.card_per_second, self._scaled(1.0)))])

    def _card_performed(self, req: _Req, performed: bool, uuid: str | None) -> dict[str, Any]:
        req.call.uuid = uuid
        req.call.deduped = not performed
        return {}

    def _card_create(self, req: _Req) -> dict[str, Any]:
        body = self._decode(req, CardCreateBody)
        self._targets(req, [])
        self.cards.streaming_window = self._scaled(self.options.streaming_window)
        return {"card_id": self.cards.create(req.app_id, body.type, body.data, req.now).card_id}

    def _card_stream(self, req: _Req) -> dict[str, Any]:
        body = self._decode(req, CardContentBody)
        self._per_card(req)
        self.cards.streaming_window = self._scaled(self.options.streaming_window)
        performed = self.cards.content(req.app_id, req.match["card_id"], req.match["element_id"], body.content,
                                       body.sequence, body.uuid, req.now)
        return self._card_performed(req, performed, body.uuid)

    def _card_settings(self, req: _Req) -> dict[str, Any]:
        body = self._decode(req, CardSettingsBody)
        self._per_card(req)
        performed = self.cards.settings(req.app_id, req.match["card_id"], body.settings, body.sequence, body.uuid,
                                        req.now)
        return self._card_performed(req, performed, body.uuid)

    def _card_entity_update(self, req: _Req) -> dict[str, Any]:
        body = self._decode(req, CardEntityBody)
        self._per_card(req)
        performed = self.cards.update(req.app_id, req.match["card_id"], body.card.type, body.card.data,
                                      body.sequence, body.uuid)
        return self._card_performed(req, performed, body.uuid)

    def _image_upload(self, req: _Req) -> dict[str, Any]:
        self._targets(req, [])
        return self.uploads.image(req.app_id, req.body.fields if isinstance(req.body, _Form) else None)

    def _file_upload(self, req: _Req) -> dict[str, Any]:
        self._targets(req, [])
        return self.uploads.file(req.app_id, req.body.fields if isinstance(req.body, _Form) else None)

    def _uses(self, req: _Req, msg_type: str, content: str) -> None:
        """A message that sends a card entity, an image or a file: it must exist (and the entity is sent once)."""
        if msg_type not in ("interactive", "image", "file", "audio", "media"):
            return
        parsed = msgspec.json.decode(content)
        if msg_type == "interactive":
            data = parsed.get("data") if parsed.get("type") == "card" else None
            if isinstance(data, dict) and "card_id" in data:
                try:
                    self.cards.send(req.app_id, str(data["card_id"]))
                except CardRefused as refused:
                    raise _Refused(refused.code, refused.msg) from None
            return
        name = "image_key" if msg_type == "image" else "file_key"
        key = parsed.get(name)
        if not isinstance(key, str) or not self.uploads.uploaded(req.app_id, key):
            raise _Refused(230001, f"param is invalid: {name} was not uploaded by this app")

    # ---- /_sandbox ------------------------------------------------------------------------------------------

    async def _control_calls(self, request: web.Request) -> web.StreamResponse:
        api = request.query.get("api")
        return self._json(200, self.calls_for(api) if api else self.calls)

    async def _control_stats(self, request: web.Request) -> web.StreamResponse:
        return self._json(200, {
            "calls": len(self.calls),
            "token_requests": self.token_requests,
            "app_ticket_resends": self.store.resends,
            "app_ticket_pushes": self.store.pushes,
            "throttled": self.throttled_count(),
            "violations": self.violations(),
            "messages_by_uuid": self.messages_by_uuid,
        })

    async def _control(self, request: web.Request) -> web.StreamResponse:
        try:
            control = _CONTROL.decode(await request.read() or b"{}")
        except msgspec.DecodeError as err:
            return self._json(400, {"code": 400, "msg": f"bad control: {err}", "data": {}})
        self.apply(control)
        return self._json(200, {"code": 0, "msg": "ok", "data": {}})

    async def _control_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return self._json(200, {"code": 0, "msg": "ok", "data": {}})


async def serve(host: str = "127.0.0.1", port: int = 8090, options: SandboxOptions | None = None) -> None:
    """Run a sandbox until cancelled (``relay sandbox``)."""
    sandbox = Sandbox(options)
    url = await sandbox.start(host, port)
    log.info("Feishu sandbox listening on %s (time_scale %g)", url, sandbox.options.time_scale)
    try:
        await asyncio.Event().wait()
    finally:
        await sandbox.stop()
