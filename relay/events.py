"""Feishu event requests, verified and read: signature headers, decryption, envelopes, record keys (pure, no I/O).

Two calls check a request. :func:`read_signature_headers` (before the body is read: it decides how much body an
unsigned request may send) and :func:`verify_request`, which returns a :class:`Challenge` (answer
``{"challenge": ...}``) or an :class:`Event` (publish ``record`` under ``key`` with ``headers()``), or raises
:class:`~relay.errors.SignatureError` with a reason word that is safe to show and to count:

    reason          status  when
    header          400     a signature header is malformed: repeated, not printable ASCII, over 256 characters,
                            a timestamp that is not digits, a signature that is not 64 hex digits
    signature       401     the app has an encrypt key and the request is not signed by it: anything but a
                            url_verification no larger than CHALLENGE_MAX_BYTES
    timestamp_stale 401     signed, but the timestamp is older than ``inbound.timestamp_tolerance``
    timestamp_future 401    ... or further ahead than ``inbound.future_tolerance``
    json            400     the body is not JSON
    no_encrypt_key  400     an ``{"encrypt": ...}`` body for an app without an encrypt key
    decrypt         400     signed, but not decryptable: bad base64, bad length, bad PKCS#7 padding, a wrong key,
                            a plaintext that is not JSON (one word for all of them: no format oracle)
    envelope        400     not an event: not an object, no event type or id, or one that is not printable
                            ASCII (they reach logs and record headers)
    token           401     the verification token is missing or wrong (or the app has none configured)
    app_id          403     ``header.app_id`` (v2, required) or ``event.app_id`` (v1, when present) is another app's

The order, and why (docs/events.md; docs/feishu-rules.md §6):

* **Signature first, for an app with an encrypt key.** ``X-Lark-Signature`` = hex SHA-256(timestamp + nonce +
  encrypt_key + raw body), compared in constant time, before any base64, AES or JSON work: a request nobody
  signed costs one hash, not a decryption of up to ``max_body_bytes``. Feishu does not sign ``url_verification``,
  so an unsigned body may still be one, but only a body of at most :data:`CHALLENGE_MAX_BYTES` is decrypted to
  find out, and every way of not being a valid challenge gives the same answer (``signature``). So nobody
  without the key learns whether a ciphertext's padding or JSON was good: the endpoint is no padding oracle.
* Then the timestamp window, the decryption, the envelope, the verification token (v2 ``header.token``, v1
  ``token``), and the app id. An app without an encrypt key has only the token: Feishu neither signs nor
  encrypts its requests, so nothing else can be checked (``relay run`` warns about such an app at start).

The record is the plaintext exactly as Feishu sent it minus the verification token member (:func:`without_member`
cuts that member's bytes out; nothing else is re-encoded): a consumer has no use for the token, and anyone who
can read the events topic could forge events with it. Envelopes and event bodies are read leniently (unknown
fields ignored: a new Feishu field never breaks the relay).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias

import msgspec
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from multidict import MultiMapping

from relay.config import AppConfig, InboundConfig
from relay.errors import SignatureError

TIMESTAMP_HEADER: Final = "X-Lark-Request-Timestamp"
NONCE_HEADER: Final = "X-Lark-Request-Nonce"
SIGNATURE_HEADER: Final = "X-Lark-Signature"

URL_VERIFICATION: Final = "url_verification"
RECEIVE_V1: Final = "im.message.receive_v1"

# A url_verification is {"challenge", "token", "type"}: about 100 bytes, about 200 encrypted. Unsigned bodies
# up to this size are read and decrypted to see whether they are one; larger unsigned bodies are refused unread.
CHALLENGE_MAX_BYTES: Final = 1024

_BLOCK: Final = 16
_HEADER_MAX: Final = 256
_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[\x21-\x7e]{1,256}")  # event types and ids: printable ASCII, no spaces or controls


# --- signature headers (docs/feishu-rules.md §6.4) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedHeaders:
    """The three signature headers of a request that carries all of them, each well-formed."""

    timestamp: str
    nonce: str
    signature: str


def read_signature_headers(headers: MultiMapping[str]) -> SignedHeaders | None:
    """The signature headers, or None when the request does not carry all three.

    Raises ``SignatureError("header", 400)`` for one that is present but malformed (see the module docstring).
    aiohttp decodes header bytes as UTF-8 with ``surrogateescape``, so a non-UTF-8 byte arrives as a lone
    surrogate: it is not ASCII, so it is refused here, before anything encodes the text.
    """
    values: list[str | None] = []
    for name in (TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER):
        found = headers.getall(name, [])
        if len(found) > 1:
            raise SignatureError("header", 400)
        value = found[0] if found else None
        if value is not None and not (0 < len(value) <= _HEADER_MAX and value.isascii() and value.isprintable()):
            raise SignatureError("header", 400)
        values.append(value)
    timestamp, nonce, given = values
    if timestamp is not None and not timestamp.isdigit():
        raise SignatureError("header", 400)
    if given is not None and not _SIGNATURE.fullmatch(given):
        raise SignatureError("header", 400)
    if timestamp is None or nonce is None or given is None:
        return None
    return SignedHeaders(timestamp, nonce, given.lower())


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    """``X-Lark-Signature``: hex SHA-256 over timestamp + nonce + encrypt_key + the raw body bytes."""
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()


def verify_signature(signed: SignedHeaders, encrypt_key: str, body: bytes) -> bool:
    """Whether the request's signature is right; constant time in the compared text."""
    expected = signature(signed.timestamp, signed.nonce, encrypt_key, body)
    return hmac.compare_digest(expected.encode(), signed.signature.encode())


# --- crypto (docs/feishu-rules.md §6.3) -------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _aes_key(encrypt_key: str) -> algorithms.AES:
    """AES-256 with key SHA-256(encrypt_key), made once per app's key."""
    return algorithms.AES(hashlib.sha256(encrypt_key.encode()).digest())


def decrypt(encrypt_b64: str, encrypt_key: str) -> bytes:
    """Decrypt an ``{"encrypt": ...}`` value: AES-256-CBC, key = SHA-256(encrypt_key), IV = first 16 bytes.

    Raises ``SignatureError("decrypt", 400)`` for text that is not strict base64, a wrong length or a bad
    PKCS#7 padding (every pad byte is checked), which is also what a wrong key almost always gives.
    """
    try:
        raw = base64.b64decode(encrypt_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("decrypt", 400) from None
    if len(raw) < 2 * _BLOCK or len(raw) % _BLOCK:
        raise SignatureError("decrypt", 400)
    decryptor = Cipher(_aes_key(encrypt_key), modes.CBC(raw[:_BLOCK])).decryptor()
    padded = decryptor.update(raw[_BLOCK:]) + decryptor.finalize()
    unpadder = padding.PKCS7(8 * _BLOCK).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise SignatureError("decrypt", 400) from None
    if not plain:
        raise SignatureError("decrypt", 400)
    return plain


# --- envelopes (docs/feishu-rules.md §6.1, §6.2) -----------------------------------------------------------------


class Header(msgspec.Struct, frozen=True):
    """v2 ``header``."""

    event_id: str | None = None
    event_type: str | None = None
    token: str | None = None
    tenant_key: str | None = None
    app_id: str | None = None
    create_time: str | None = None


class V1Event(msgspec.Struct, frozen=True):
    """What the relay reads of a v1 ``event``: its type, tenant and app."""

    type: str | None = None
    tenant_key: str | None = None
    app_id: str | None = None


class Envelope(msgspec.Struct, frozen=True):
    """Every top-level shape Feishu posts, read leniently: encrypted, challenge, v2 and v1 events."""

    encrypt: str | None = None
    # url_verification
    challenge: str | None = None
    type: str | None = None
    token: str | None = None
    # v2
    schema: str | None = None
    header: msgspec.Raw = msgspec.Raw(b"")  # a Header, decoded by read_event; b"" when absent
    # v1
    uuid: str | None = None
    ts: str | None = None
    event: msgspec.Raw = msgspec.Raw(b"")  # read by type below; b"" when absent

    @property
    def event_raw(self) -> msgspec.Raw | None:
        return self.event if len(self.event) and bytes(self.event) != b"null" else None


# --- where an event names its chat and message (docs/feishu-rules.md §6.6, §6.7) --------------------------------


class Ids(msgspec.Struct, frozen=True):
    """The ids an object of an event body may carry, under either of Feishu's spellings."""

    chat_id: str | None = None
    open_chat_id: str | None = None
    message_id: str | None = None
    open_message_id: str | None = None


class EventIds(Ids, frozen=True):
    """One lenient view of every event body: where the chat and the message are, whatever the event type.

    :func:`chat_and_message` takes the first id found, in this order: ``event.message.*``, ``event.*``,
    ``event.context.*`` (chat: ``chat_id`` then ``open_chat_id``; message: ``message_id`` then
    ``open_message_id``, and last ``event.message_id_list[0]``). The rule needs no list of types; these are the
    ones it is checked against (tests/test_events.py has the same table):

        event type                                  chat from               message from
        im.message.receive_v1                       message.chat_id         message.message_id
        im.message.recalled_v1                      chat_id                 message_id
        im.message.message_read_v1                  (none: p2p only)        message_id_list[0]
        im.message.reaction.created_v1, deleted_v1  (none)                  message_id
        im.chat.updated_v1, im.chat.disbanded_v1,   chat_id                 (none)
        im.chat.member.{user,bot}.{added,deleted}_v1,
        im.chat.access_event.bot_p2p_chat_entered_v1
        card.action.trigger, url.preview.get        context.open_chat_id    context.open_message_id
        v1 message, v1 add_bot                      open_chat_id            open_message_id
        v1 p2p_chat_create                          chat_id                 (none)

    A body this view cannot read (a field of an unexpected type) is keyed by its event id, not refused.
    """

    message: Ids | None = None
    context: Ids | None = None
    message_id_list: list[str] | None = None


def chat_and_message(ids: EventIds) -> tuple[str | None, str | None]:
    """The event's chat id and message id (see :class:`EventIds`); an empty string counts as absent."""
    chat = message = None
    for place in (ids.message, ids, ids.context):
        if place is not None:
            chat = chat or place.chat_id or place.open_chat_id
            message = message or place.message_id or place.open_message_id
    if not message and ids.message_id_list:
        message = ids.message_id_list[0]
    return chat or None, message or None


_ENVELOPE: Final = msgspec.json.Decoder(Envelope)
_HEADER: Final = msgspec.json.Decoder(Header)
_V1_EVENT: Final = msgspec.json.Decoder(V1Event)
_EVENT_IDS: Final = msgspec.json.Decoder(EventIds)


# --- cutting one member out of JSON text, byte for byte --------------------------------------------------------

_WS = rb"[ \t\r\n]*"
_STRING_TEXT = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'  # possessive (3.11): no backtracking, no ReDoS
_STRING = re.compile(_STRING_TEXT, re.DOTALL)
_KEY = re.compile(_WS + b"(" + _STRING_TEXT + b")" + _WS + b":" + _WS, re.DOTALL)  # a key, its colon: the value next
# the common case in one call: a key, a string value, and what follows it
_STRING_MEMBER = re.compile(_WS + b"(" + _STRING_TEXT + b")" + _WS + b":" + _WS + b"(" + _STRING_TEXT + b")"
                            + _WS + rb"([,}])", re.DOTALL)
_NEXT = re.compile(_WS + rb"([,}])")  # after a value: another member, or the end of the object
_SPACE = re.compile(_WS)
_SPACES: Final = b" \t\r\n"
_FLAT = re.compile(rb'[{\[](?:[^{}\[\]"]++|' + _STRING_TEXT + rb')*+[}\]]', re.DOTALL)  # no nested brackets
_STRUCTURE = re.compile(rb'[\[\]{}"]')
_SCALAR_END = re.compile(rb"[,}\]\s]")
_OPEN: Final = frozenset(b"[{")


class _Member(NamedTuple):
    key: str
    key_start: int
    value_start: int
    value_end: int


def _space_end(data: bytes, i: int) -> int:
    match = _SPACE.match(data, i)
    return match.end() if match else i


def _value_end(data: bytes, i: int) -> int:
    """The end of the JSON value starting at ``i`` (strings and brackets skipped by regex, not byte by byte)."""
    first = data[i]
    if first == 0x22:  # "
        match = _STRING.match(data, i)
        if match is None:
            raise ValueError("bad string")
        return match.end()
    if first not in _OPEN:  # a number, true, false or null
        scalar = _SCALAR_END.search(data, i)
        return scalar.start() if scalar else len(data)
    flat = _FLAT.match(data, i)  # most values (a header, an id object): one call
    if flat is not None:
        return flat.end()
    depth = 0
    while True:
        found = _STRUCTURE.search(data, i)
        if found is None:
            raise ValueError("unterminated value")
        if data[found.start()] == 0x22:
            string = _STRING.match(data, found.start())
            if string is None:
                raise ValueError("bad string")
            i = string.end()
            continue
        depth += 1 if data[found.start()] in _OPEN else -1
        i = found.end()
        if depth == 0:
            return i


def _key(raw: bytes) -> str:
    return msgspec.json.decode(raw, type=str) if b"\\" in raw else raw[1:-1].decode()


def _members(data: bytes, start: int, known: Sequence[bytes] = ()) -> list[_Member]:
    """The members of the JSON object whose ``{`` is at ``start``, with their keys decoded.

    A value that starts with one of ``known`` (whole JSON objects or arrays) ends where that one does: found by
    one comparison instead of a scan (the header and the event, which msgspec has already delimited, are most
    of the text).
    """
    members: list[_Member] = []
    i = start + 1
    while True:
        member = _STRING_MEMBER.match(data, i)
        if member is not None:
            members.append(_Member(_key(member.group(1)), member.start(1), member.start(2), member.end(2)))
            if member.group(3) == b"}":
                return members
            i = member.end()
            continue
        key = _KEY.match(data, i)
        if key is None:  # only right after the "{" of an empty object
            return members
        value_start = key.end()
        value_end = next((value_start + len(text) for text in known if data.startswith(text, value_start)), 0)
        if not value_end:
            value_end = _value_end(data, value_start)
        members.append(_Member(_key(key.group(1)), key.start(1), value_start, value_end))
        after = _NEXT.match(data, value_end)
        if after is None:
            raise ValueError("comma or } expected")
        if after.group(1) == b"}":
            return members
        i = after.end()


@functools.lru_cache(maxsize=8)
def _flat_member(raw_key: bytes) -> re.Pattern[bytes]:
    return re.compile(re.escape(raw_key) + _WS + b":" + _WS + rb'(?:"[^"]*+"|[^,}\s]*+)')


def _flat_cuts(data: bytes, start: int, end: int, key: str) -> list[tuple[int, int]] | None:
    """:func:`_cuts` for a flat object ``data[start:end]`` (no nested value), in a few regex calls; None when it
    has a backslash or repeats the key (the general walk handles those).

    Without backslashes every ``"`` delimits a string, so a ``"key"`` followed by ``:`` can only be a member key
    of this object (a string value is never followed by ``:``): no member-by-member walk is needed. The cut is
    the one :func:`_cuts` makes, the rule for the last member included (the tests hold both paths to it).
    """
    raw_key = msgspec.json.encode(key)
    if b"\\" in raw_key or data.find(b"\\", start, end) >= 0:
        return None
    found = list(_flat_member(raw_key).finditer(data, start, end))
    if len(found) != 1:
        return [] if not found else None
    key_start, value_end = found[0].span()
    after = _NEXT.match(data, value_end)
    if after is None:
        raise ValueError("comma or } expected")
    if after.group(1) == b",":  # not the last member: up to the next key
        return [(key_start, _space_end(data, after.end()))]
    before = data[start:key_start].rstrip(_SPACES)
    if before.endswith(b"{"):  # the only member
        return [(key_start, value_end)]
    # the last member: from the end of the previous value (the comma and the spaces around it go too)
    return [(start + len(before[:-1].rstrip(_SPACES)), value_end)]


def _is_flat(data: bytes, start: int, end: int) -> bool:
    """Whether the object ``data[start:end]`` has no nested value: no ``{`` after its first and no ``[`` (not
    even inside a string: the general walk takes those)."""
    return data.find(b"{", start + 1, end) < 0 and data.find(b"[", start, end) < 0


def _cuts(data: bytes, start: int, path: Sequence[str], known: Sequence[bytes] = ()) -> list[tuple[int, int]]:
    """Byte spans to remove so that no member at ``path`` is left in the object at ``start``."""
    members = _members(data, start, known)
    if len(path) > 1:
        cuts: list[tuple[int, int]] = []
        for m in members:
            if m.key != path[0] or data[m.value_start] != 0x7B:
                continue
            flat = (_flat_cuts(data, m.value_start, m.value_end, path[1])
                    if len(path) == 2 and _is_flat(data, m.value_start, m.value_end) else None)
            cuts += _cuts(data, m.value_start, path[1:]) if flat is None else flat
        return cuts
    gone = [m.key == path[0] for m in members]
    if not any(gone):
        return []
    tail = len(members)  # members[tail:] are all removed: the separator before them goes too
    while tail and gone[tail - 1]:
        tail -= 1
    cuts = [(m.key_start, members[i + 1].key_start) for i, m in enumerate(members[:tail]) if gone[i]]
    if tail < len(members):
        begin = members[tail - 1].value_end if tail else members[0].key_start
        cuts.append((begin, members[-1].value_end))
    return cuts


_V2_HEAD = re.compile(_WS + rb'\{' + _WS + rb'"schema"' + _WS + b":" + _WS + rb'"[^"\\]*+"' + _WS + b"," + _WS
                      + rb'"header"' + _WS + b":" + _WS)
_V2_MIDDLE = re.compile(_WS + b"," + _WS + rb'"event"' + _WS + b":" + _WS)
_V2_TAIL = re.compile(_WS + rb"\}" + _WS)


def _v2_header_cuts(data: bytes, header: bytes, event: bytes, key: str) -> list[tuple[int, int]] | None:
    """The cuts for ``("header", key)`` when ``data`` is laid out as Feishu lays out a v2 envelope, exactly
    ``{"schema": "...", "header": <header>, "event": <event>}``, with a flat header; else None.

    Checked in a few calls, the layout proves the header member is the only one (the general walk would
    visit every top-level member to know that).
    """
    head = _V2_HEAD.match(data)
    if head is None or not data.startswith(header, head.end()) or header[:1] != b"{":
        return None
    header_end = head.end() + len(header)
    middle = _V2_MIDDLE.match(data, header_end)
    if middle is None or not data.startswith(event, middle.end()) or event[:1] not in (b"{", b"["):
        return None
    tail = _V2_TAIL.match(data, middle.end() + len(event))
    if tail is None or tail.end() != len(data) or not _is_flat(data, head.end(), header_end):
        return None
    return _flat_cuts(data, head.end(), header_end, key)


def without_member(data: bytes, path: Sequence[str], known: Sequence[bytes] = ()) -> bytes:
    """``data`` (a JSON object) with every member at ``path`` cut out, and nothing else changed.

    Each removed member goes with one adjacent comma and the whitespace between them, so the rest of the text
    stays byte for byte as it was (``{"a": 1, "token": "x", "b": 2}`` -> ``{"a": 1, "b": 2}``). Keys are
    compared decoded (``"\\u0074oken"`` is ``token``) and repeated keys are all removed, as a JSON reader would
    otherwise take the last. ``data`` must be valid JSON (here: it already decoded); else ``ValueError``.
    ``known``: texts of top-level values to skip by comparison rather than scan.
    """
    # only a bracketed value ends where its text does (a number's text may be a prefix of a longer number)
    known = [text for text in known if text[:1] in (b"{", b"[")]
    return _cut(data, _cuts(data, data.index(b"{"), path, known))


def _cut(data: bytes, cuts: list[tuple[int, int]]) -> bytes:
    if not cuts:
        return data
    parts, last = [], 0
    for begin, end in sorted(cuts):
        parts.append(data[last:begin])
        last = end
    parts.append(data[last:])
    return b"".join(parts)


def without_token(plaintext: bytes, envelope: Envelope) -> bytes:
    """The record: the plaintext minus the verification token, v2 ``header.token`` or v1 ``token``."""
    header, event = bytes(envelope.header), bytes(envelope.event)
    if header:
        cuts = _v2_header_cuts(plaintext, header, event, "token")
        if cuts is not None:
            return _cut(plaintext, cuts)
        return without_member(plaintext, ("header", "token"), (header, event))
    return without_member(plaintext, ("token",), (event,))


# --- the verified request -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """A ``url_verification`` whose token checked out: answer ``{"challenge": challenge}``."""

    challenge: str


@dataclass(frozen=True, slots=True)
class Event:
    """A verified event or callback. ``record`` is the JSON Feishu sent (decrypted) minus its verification token."""

    record: bytes
    schema: str  # "2.0" or "1.0"
    event_type: str
    event_id: str
    tenant_key: str | None
    chat_id: str | None
    message_id: str | None

    @property
    def key(self) -> str:
        """The record key: the chat id when the event has one, else the message id, else the event id."""
        return self.chat_id or self.message_id or self.event_id

    def dedup_keys(self, app: str) -> tuple[str, ...]:
        """What makes a redelivery a duplicate, per app: the event id and, for receive_v1, the message id."""
        event = f"{app}\0event\0{self.event_id}"
        if self.event_type == RECEIVE_V1 and self.message_id:
            return event, f"{app}\0message\0{self.message_id}"
        return (event,)

    def headers(self, app: str) -> list[tuple[str, bytes]]:
        """Record headers (docs/events.md): ``event_type``, ``event_id``, ``app``, ``tenant_key`` when present."""
        headers = [("event_type", self.event_type.encode()), ("event_id", self.event_id.encode()),
                   ("app", app.encode())]
        if self.tenant_key:
            headers.append(("tenant_key", self.tenant_key.encode()))
        return headers


Verified: TypeAlias = Challenge | Event


def parse_envelope(data: bytes) -> Envelope:
    """Decode a JSON object leniently; ``SignatureError("json"|"envelope", 400)`` otherwise."""
    try:
        return _ENVELOPE.decode(data)
    except msgspec.ValidationError:
        raise SignatureError("envelope", 400) from None
    except msgspec.DecodeError:
        raise SignatureError("json", 400) from None


def url_verification(envelope: Envelope) -> str | None:
    """The challenge, when the envelope is a ``url_verification``; else None."""
    if envelope.type == URL_VERIFICATION and envelope.challenge is not None:
        return envelope.challenge
    return None


def _check_token(app: AppConfig, token: str | None) -> None:
    if not app.verification_token:  # fail closed: inbound does not serve such an app (config.check_inbound)
        raise SignatureError("token", 401)
    expected = app.verification_token.reveal().encode()
    if token is None or not hmac.compare_digest(expected, token.encode("utf-8", "replace")):
        raise SignatureError("token", 401)


def _check_timestamp(timestamp: str, now: float, cfg: InboundConfig) -> None:
    stamp = int(timestamp)  # digits only (read_signature_headers)
    if stamp < now - cfg.timestamp_tolerance:
        raise SignatureError("timestamp_stale", 401)
    if stamp > now + cfg.future_tolerance:
        raise SignatureError("timestamp_future", 401)


def _plaintext(app: AppConfig, body: bytes) -> tuple[bytes, Envelope]:
    outer = parse_envelope(body)
    if outer.encrypt is None:
        return body, outer
    if not app.encrypt_key:
        raise SignatureError("no_encrypt_key", 400)
    plain = decrypt(outer.encrypt, app.encrypt_key.reveal())
    try:
        return plain, parse_envelope(plain)
    except SignatureError as err:  # decrypted to garbage (a wrong key, mostly): one answer with the others
        raise SignatureError("decrypt" if err.reason == "json" else err.reason, 400) from None


def _challenge(app: AppConfig, envelope: Envelope) -> Challenge | None:
    challenge = url_verification(envelope)
    if challenge is None:
        return None
    _check_token(app, envelope.token)
    return Challenge(challenge)


def read_event(app: AppConfig, plaintext: bytes, envelope: Envelope, *, check_token: bool = True) -> Event:
    """The event in a decoded envelope, once its type, id, token and app id check out (see the module docstring).

    ``check_token=False`` only for :func:`verify_pushed`, whose app has no token configured.
    """
    if envelope.schema is not None or len(envelope.header):
        try:
            header = _HEADER.decode(envelope.header) if len(envelope.header) else Header()
        except msgspec.ValidationError:
            raise SignatureError("envelope", 400) from None
        schema, event_type, event_id = "2.0", header.event_type, header.event_id
        tenant_key, token = header.tenant_key, header.token
        app_id_ok = header.app_id == app.app_id  # every v2 header names its app
    elif envelope.uuid is not None:
        try:
            v1 = _V1_EVENT.decode(raw) if (raw := envelope.event_raw) is not None else V1Event()
        except msgspec.ValidationError:
            raise SignatureError("envelope", 400) from None
        schema, event_type, event_id = "1.0", v1.type, envelope.uuid
        tenant_key, token = v1.tenant_key, envelope.token
        app_id_ok = v1.app_id in (None, app.app_id)  # v1 bodies carry event.app_id for most types only
    else:
        raise SignatureError("envelope", 400)
    if not event_type or not event_id or not _NAME.fullmatch(event_type) or not _NAME.fullmatch(event_id):
        raise SignatureError("envelope", 400)
    if check_token:
        _check_token(app, token)
    if not app_id_ok:
        raise SignatureError("app_id", 403)
    chat_id = message_id = None
    if (raw := envelope.event_raw) is not None:
        with contextlib.suppress(msgspec.ValidationError):  # an unexpected shape: keyed by the event id
            chat_id, message_id = chat_and_message(_EVENT_IDS.decode(raw))
    try:
        record = without_token(plaintext, envelope)
    except ValueError:  # cannot happen for text that decoded; refuse rather than publish the token
        raise SignatureError("envelope", 400) from None
    return Event(record=record, schema=schema, event_type=event_type, event_id=event_id, tenant_key=tenant_key,
                 chat_id=chat_id, message_id=message_id)


def verify_request(app: AppConfig, signed: SignedHeaders | None, raw_body: bytes, now: float,
                   cfg: InboundConfig) -> Verified:
    """Check one request to the event URL (see the module docstring for the order and why).

    ``signed`` is :func:`read_signature_headers` of the request; ``now`` is Unix time. The body cap is the
    server's job. Raises :class:`SignatureError` with a reason word and an HTTP status.
    """
    if not app.encrypt_key:
        plain, envelope = _plaintext(app, raw_body)
        return _challenge(app, envelope) or read_event(app, plain, envelope)

    if signed is None or not verify_signature(signed, app.encrypt_key.reveal(), raw_body):
        # Only a url_verification may come unsigned, and only a small one is looked at; whatever else this
        # is, the answer is the same one.
        if len(raw_body) > CHALLENGE_MAX_BYTES:
            raise SignatureError("signature", 401)
        try:
            _, envelope = _plaintext(app, raw_body)
        except SignatureError:
            raise SignatureError("signature", 401) from None
        challenge = _challenge(app, envelope)
        if challenge is None:
            raise SignatureError("signature", 401)
        return challenge
    _check_timestamp(signed.timestamp, now, cfg)
    plain, envelope = _plaintext(app, raw_body)
    return _challenge(app, envelope) or read_event(app, plain, envelope)


def verify_pushed(app: AppConfig, payload: bytes) -> Event:
    """Check one event pushed over the long connection (:mod:`relay.ws`), the webhook's checks that apply there.

    The connection itself was authenticated with the app secret, and Feishu sends its events as plain JSON,
    neither signed nor encrypted (an ``{"encrypt": ...}`` body is still decrypted, as node-sdk does). So: the
    envelope, the verification token **when the app has one configured** (the console shows one for every app;
    a long-connection app need not copy it), and the app id. A ``url_verification`` never comes this way and is
    refused as an ``envelope``. Raises :class:`SignatureError` with the reasons of the module docstring.
    """
    plain, envelope = _plaintext(app, payload)
    if url_verification(envelope) is not None:
        raise SignatureError("envelope", 400)
    return read_event(app, plain, envelope, check_token=bool(app.verification_token))
