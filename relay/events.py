"""Feishu event requests, verified and read: decryption, signature, envelopes, typed views (pure, no I/O).

One function does the whole check of a request, :func:`verify_request`; it returns a :class:`Challenge` (answer
``{"challenge": ...}``) or an :class:`Event` (publish ``plaintext`` under ``key`` with ``headers()``), or raises
:class:`~relay.errors.SignatureError` with a short reason that is safe to show and to count.

The checks (SPEC "Inbound"; feishu-facts §5):

* ``url_verification`` (plain or encrypted): only the verification token is checked; Feishu does not sign it.
* Every other request, when the app has an encrypt key: ``X-Lark-Signature`` = hex SHA-256(timestamp + nonce +
  encrypt_key + raw body), compared in constant time; the timestamp no older than ``timestamp_tolerance`` and no
  further ahead than ``future_tolerance``; then decryption; then the verification token (v2 ``header.token``,
  v1 ``token``).

Why the signature comes before the decryption for events: an unauthenticated AES-CBC decryption whose padding
error is distinguishable from any later error is a padding oracle (it would let anyone decrypt a captured event
body). So a request without a valid signature is only ever decrypted to see whether it is a ``url_verification``,
and every way of not being one gets the same answer (``signature``). Once the signature holds, decryption errors
have their own reasons: only the holder of the encrypt key can ask.

Envelopes are read leniently (unknown fields ignored: a new Feishu field never breaks the relay); the bytes that
travel on are the plaintext exactly as Feishu sent it, never re-encoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

import msgspec
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from relay.config import AppConfig, InboundConfig
from relay.errors import SignatureError

log = logging.getLogger(__name__)

TIMESTAMP_HEADER: Final = "X-Lark-Request-Timestamp"
NONCE_HEADER: Final = "X-Lark-Request-Nonce"
SIGNATURE_HEADER: Final = "X-Lark-Signature"

URL_VERIFICATION: Final = "url_verification"
RECEIVE_V1: Final = "im.message.receive_v1"
READ_V1: Final = "im.message.message_read_v1"
RECALLED_V1: Final = "im.message.recalled_v1"
REACTION_CREATED_V1: Final = "im.message.reaction.created_v1"
REACTION_DELETED_V1: Final = "im.message.reaction.deleted_v1"

_BLOCK: Final = 16


# --- crypto (feishu-facts §5.3, §5.4) ------------------------------------------------------------------------


def decrypt(encrypt_b64: str, encrypt_key: str) -> bytes:
    """Decrypt an ``{"encrypt": ...}`` value: AES-256-CBC, key = SHA-256(encrypt_key), IV = first 16 bytes.

    Raises ``SignatureError("base64", 400)`` for text that is not strict base64 and
    ``SignatureError("ciphertext", 400)`` for a wrong length or PKCS#7 padding (every pad byte is checked),
    which is also what a wrong key almost always gives.
    """
    try:
        raw = base64.b64decode(encrypt_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("base64", 400) from None
    if len(raw) < 2 * _BLOCK or len(raw) % _BLOCK:
        raise SignatureError("ciphertext", 400)
    key = hashlib.sha256(encrypt_key.encode()).digest()
    decryptor = Cipher(algorithms.AES(key), modes.CBC(raw[:_BLOCK])).decryptor()
    padded = decryptor.update(raw[_BLOCK:]) + decryptor.finalize()
    unpadder = padding.PKCS7(8 * _BLOCK).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise SignatureError("ciphertext", 400) from None
    if not plain:
        raise SignatureError("ciphertext", 400)
    return plain


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    """``X-Lark-Signature``: hex SHA-256 over timestamp + nonce + encrypt_key + the raw body bytes."""
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()


def verify_signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes, given: str) -> bool:
    """Whether ``given`` is the request's signature; constant time in the compared text."""
    expected = signature(timestamp, nonce, encrypt_key, body).encode()
    return hmac.compare_digest(expected, given.strip().lower().encode("utf-8", "replace"))


# --- envelopes (feishu-facts §5.1, §5.2) ----------------------------------------------------------------------


class Header(msgspec.Struct, frozen=True):
    """v2 ``header``."""

    event_id: str | None = None
    event_type: str | None = None
    token: str | None = None
    tenant_key: str | None = None
    app_id: str | None = None
    create_time: str | None = None


class V1Event(msgspec.Struct, frozen=True):
    """What the relay reads of a v1 ``event``: its type and tenant."""

    type: str | None = None
    tenant_key: str | None = None


class Envelope(msgspec.Struct, frozen=True):
    """Every top-level shape Feishu posts, read leniently: encrypted, challenge, v2 and v1 events."""

    encrypt: str | None = None
    # url_verification
    challenge: str | None = None
    type: str | None = None
    token: str | None = None
    # v2
    schema: str | None = None
    header: Header | None = None
    # v1
    uuid: str | None = None
    ts: str | None = None
    event: msgspec.Raw = msgspec.Raw(b"")  # read by type below; b"" when absent

    @property
    def event_raw(self) -> msgspec.Raw | None:
        return self.event if len(self.event) and bytes(self.event) != b"null" else None


# --- typed views of the IM events (feishu-facts §6) ----------------------------------------------------------


class UserId(msgspec.Struct, frozen=True):
    union_id: str | None = None
    user_id: str | None = None
    open_id: str | None = None


class Sender(msgspec.Struct, frozen=True):
    sender_id: UserId | None = None
    sender_type: str | None = None
    tenant_key: str | None = None


class Mention(msgspec.Struct, frozen=True):
    key: str | None = None
    id: UserId | None = None
    name: str | None = None
    tenant_key: str | None = None


class Message(msgspec.Struct, frozen=True):
    message_id: str | None = None
    root_id: str | None = None
    parent_id: str | None = None
    create_time: str | None = None
    update_time: str | None = None
    chat_id: str | None = None
    thread_id: str | None = None
    chat_type: str | None = None
    message_type: str | None = None
    content: str | None = None  # a JSON *string* (Feishu encodes it twice)
    mentions: list[Mention] | None = None


class MessageReceived(msgspec.Struct, frozen=True):
    """``im.message.receive_v1``."""

    sender: Sender | None = None
    message: Message | None = None

    @property
    def chat_id(self) -> str | None:
        return self.message.chat_id if self.message else None

    @property
    def message_id(self) -> str | None:
        return self.message.message_id if self.message else None


class Reader(msgspec.Struct, frozen=True):
    reader_id: UserId | None = None
    read_time: str | None = None
    tenant_key: str | None = None


class MessageRead(msgspec.Struct, frozen=True):
    """``im.message.message_read_v1`` (no chat_id: only p2p bot messages emit it)."""

    reader: Reader | None = None
    message_id_list: list[str] | None = None

    @property
    def chat_id(self) -> str | None:
        return None

    @property
    def message_id(self) -> str | None:
        return self.message_id_list[0] if self.message_id_list else None


class MessageRecalled(msgspec.Struct, frozen=True):
    """``im.message.recalled_v1``."""

    message_id: str | None = None
    chat_id: str | None = None
    recall_time: str | None = None
    recall_type: str | None = None


class ReactionType(msgspec.Struct, frozen=True):
    emoji_type: str | None = None


class Reaction(msgspec.Struct, frozen=True):
    """``im.message.reaction.created_v1`` / ``deleted_v1`` (no chat_id)."""

    message_id: str | None = None
    reaction_type: ReactionType | None = None
    operator_type: str | None = None
    user_id: UserId | None = None
    app_id: str | None = None
    action_time: str | None = None

    @property
    def chat_id(self) -> str | None:
        return None


View: TypeAlias = MessageReceived | MessageRead | MessageRecalled | Reaction

_VIEW_DECODERS: Final[dict[str, msgspec.json.Decoder[View]]] = {
    RECEIVE_V1: msgspec.json.Decoder(MessageReceived),
    READ_V1: msgspec.json.Decoder(MessageRead),
    RECALLED_V1: msgspec.json.Decoder(MessageRecalled),
    REACTION_CREATED_V1: msgspec.json.Decoder(Reaction),
    REACTION_DELETED_V1: msgspec.json.Decoder(Reaction),
}
_ENVELOPE: Final = msgspec.json.Decoder(Envelope)
_V1_EVENT: Final = msgspec.json.Decoder(V1Event)


# --- the verified request -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """A ``url_verification`` whose token checked out: answer ``{"challenge": challenge}``."""

    challenge: str


@dataclass(frozen=True, slots=True)
class Event:
    """A verified event or callback. ``plaintext`` is the JSON Feishu sent (decrypted), byte for byte."""

    plaintext: bytes
    schema: str  # "2.0" or "1.0"
    event_type: str
    event_id: str
    tenant_key: str | None
    view: View | None  # typed view for the IM events above; None for any other type (relayed untouched)

    @property
    def message_id(self) -> str | None:
        return self.view.message_id if self.view is not None else None

    @property
    def key(self) -> str:
        """The record key: ``chat_id`` when the event has one, else ``message_id``, else the event id."""
        if self.view is not None:
            return self.view.chat_id or self.view.message_id or self.event_id
        return self.event_id

    def dedup_keys(self, app: str) -> tuple[str, ...]:
        """What makes a redelivery a duplicate, per app: the event id and, for receive_v1, the message id."""
        event = f"{app}\0event\0{self.event_id}"
        if self.event_type == RECEIVE_V1 and self.message_id:
            return event, f"{app}\0message\0{self.message_id}"
        return (event,)

    def headers(self, app: str) -> list[tuple[str, bytes]]:
        """Record headers (SPEC): ``event_type``, ``event_id``, ``app``, ``tenant_key`` when present."""
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


def read_event(plaintext: bytes, envelope: Envelope) -> tuple[Event, str | None]:
    """The event in a decoded envelope, and the token it carries; ``SignatureError("envelope", 400)`` when
    it has no event type or id (neither a v2 header nor a v1 uuid)."""
    if envelope.schema is not None or envelope.header is not None:
        header = envelope.header or Header()
        schema, event_type, event_id = "2.0", header.event_type, header.event_id
        tenant_key, token = header.tenant_key, header.token
    elif envelope.uuid is not None:
        try:
            v1 = _V1_EVENT.decode(raw) if (raw := envelope.event_raw) is not None else V1Event()
        except msgspec.ValidationError:
            raise SignatureError("envelope", 400) from None
        schema, event_type, event_id = "1.0", v1.type, envelope.uuid
        tenant_key, token = v1.tenant_key, envelope.token
    else:
        raise SignatureError("envelope", 400)
    if not event_type or not event_id:
        raise SignatureError("envelope", 400)
    view: View | None = None
    decoder = _VIEW_DECODERS.get(event_type)
    if decoder is not None and (raw := envelope.event_raw) is not None:
        try:
            view = decoder.decode(raw)
        except msgspec.ValidationError:
            raise SignatureError("envelope", 400) from None
    event = Event(plaintext=plaintext, schema=schema, event_type=event_type, event_id=event_id,
                  tenant_key=tenant_key, view=view)
    return event, token


def url_verification(envelope: Envelope) -> str | None:
    """The challenge, when the envelope is a ``url_verification``; else None."""
    if envelope.type == URL_VERIFICATION and envelope.challenge is not None:
        return envelope.challenge
    return None


def _check_token(app: AppConfig, token: str | None) -> None:
    if app.verification_token is None:  # not configured: Feishu's SDKs skip the check too
        return
    expected = app.verification_token.reveal().encode()
    if token is None or not hmac.compare_digest(expected, token.encode("utf-8", "replace")):
        raise SignatureError("token", 401)


def _check_timestamp(raw: str | None, now: float, cfg: InboundConfig) -> None:
    try:
        stamp = float(raw) if raw is not None else None
    except ValueError:
        stamp = None
    if stamp is None or stamp != stamp:  # missing, unparsable or NaN
        raise SignatureError("timestamp", 401)
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
    return plain, parse_envelope(plain)


def _challenge(app: AppConfig, envelope: Envelope) -> Challenge | None:
    challenge = url_verification(envelope)
    if challenge is None:
        return None
    _check_token(app, envelope.token)
    return Challenge(challenge)


def verify_request(app: AppConfig, headers: Mapping[str, str], raw_body: bytes, now: float,
                   cfg: InboundConfig) -> Verified:
    """Check one request to the event URL (see the module docstring for the order and why).

    ``headers`` is case-insensitive (aiohttp's ``request.headers``, a ``CIMultiDict``); ``now`` is Unix time.
    The body cap is the server's job. Raises :class:`SignatureError` with a short reason and an HTTP status.
    """
    if not app.encrypt_key:
        plain, envelope = _plaintext(app, raw_body)
        challenge = _challenge(app, envelope)
        if challenge is not None:
            return challenge
        event, token = read_event(plain, envelope)
        _check_token(app, token)
        return event

    encrypt_key = app.encrypt_key.reveal()
    timestamp = headers.get(TIMESTAMP_HEADER)
    nonce = headers.get(NONCE_HEADER)
    given = headers.get(SIGNATURE_HEADER)
    signed = (timestamp is not None and nonce is not None and given is not None
              and verify_signature(timestamp, nonce, encrypt_key, raw_body, given))
    if not signed:
        # Only a url_verification may come unsigned; whatever else this is, the answer is the same one.
        try:
            _, envelope = _plaintext(app, raw_body)
        except SignatureError:
            raise SignatureError("signature", 401) from None
        challenge = _challenge(app, envelope)
        if challenge is None:
            raise SignatureError("signature", 401)
        return challenge
    _check_timestamp(timestamp, now, cfg)
    plain, envelope = _plaintext(app, raw_body)
    challenge = _challenge(app, envelope)
    if challenge is not None:
        return challenge
    event, token = read_event(plain, envelope)
    _check_token(app, token)
    return event
