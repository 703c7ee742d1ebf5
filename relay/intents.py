"""Intents: what a producer asks Feishu to do, the outbound wire contract (results are :mod:`relay.results`).

One intent is one Kafka record whose value is a JSON object tagged by ``kind`` (SPEC.md "Outbound"). Every
kind is a strict, frozen ``msgspec.Struct`` (unknown fields are an error: a typo must not silently drop a
field); the union ``Intent`` is decoded once, at the edge, by ``decode_intent``. Field rules taken from the
Feishu docs sit next to the field they constrain, with the page they came from, so that a bad record fails
at decode with the JSON path of the field, never later in the middle of a retry.

Decisions worth knowing:

* ``content``/``card`` accept a JSON object or the JSON *string* Feishu expects; a string must itself hold a
  JSON object (checked here, so the relay never sends Feishu a body it will answer 230001 to).
* ``decode_intent`` raises ``IntentError`` with ``error="decode"`` when the value is not a UTF-8 JSON object at
  all and ``error="invalid"`` otherwise; the reason is one line that names the field and never quotes the body.
  ``id``/``kind``/``app`` are recovered leniently when readable, so a ``rejected`` result can still be keyed.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal, TypeAlias
from urllib.parse import quote, unquote

import msgspec
from msgspec import Meta

from relay.errors import IntentError

__all__ = [
    "ApiCall",
    "CardDelayUpdate",
    "CardPatch",
    "ChatButton",
    "ChatButtonText",
    "ChatButtonUpdate",
    "ChatButtonUrls",
    "ChatButtons",
    "Content",
    "EphemeralDelete",
    "EphemeralSend",
    "Intent",
    "MessageBatchSend",
    "MessageEdit",
    "MessageForward",
    "MessageRecall",
    "MessageReply",
    "MessageSend",
    "MessageUrgent",
    "PinAdd",
    "PinRemove",
    "Rate",
    "ReactionAdd",
    "ReactionRemove",
    "UrlPreviewUpdate",
    "decode_intent",
    "ordering_key",
]

# --- field types --------------------------------------------------------------------------------------------

# Feishu's uuid is at most 50 characters (im-v1/message/create, reply: "uuid ... 最大长度 50"); the intent id is
# sent as that uuid, so it carries the same limit.
IntentId = Annotated[str, Meta(min_length=1, max_length=50, description="Idempotency key; Feishu uuid (1..50 chars).")]
NonEmpty = Annotated[str, Meta(min_length=1)]
# An id the relay puts in a URL path segment (message_id, reaction_id): Feishu's ids never hold "/", "\\", "%" or
# control characters, nor are "." or "..", any of which a server could decode into a different path.
_PATH_ID: Final = r"^(?!\.\.?(;|$))[^/\\%\x00-\x1f\x7f]+$"
PathId = Annotated[str, Meta(min_length=1, pattern=_PATH_ID, description="An id placed in a path segment.")]
# A store app's tenant (app_open event ``tenant_key``, every v2 event's ``header.tenant_key``): required for a store
# app's intents, refused for a custom app's (relay.outbound checks it against the config). Printable ASCII without
# spaces, at most 128 characters: it is sent in the token request and written in logs and record headers.
TenantKey = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[!-~]+$",
                                description="The tenant of a store app (its tenant_key); only for store apps.")]
AwareTime = Annotated[datetime, Meta(tz=True, description="RFC 3339 time with a timezone offset.")]

# im-v1/message/create, query ``receive_id_type``.
ReceiveIdType = Literal["open_id", "user_id", "union_id", "email", "chat_id"]
# im-v1/message/create, body ``msg_type`` (消息类型: text, post, image, file, audio, media, sticker, interactive,
# share_chat, share_user, system).
MsgType = Literal[
    "text", "post", "image", "file", "audio", "media", "sticker", "interactive", "share_chat", "share_user", "system",
]
# im-v1/message/urgent_app|urgent_sms|urgent_phone, query ``user_id_type``.
UserIdType = Literal["open_id", "user_id", "union_id"]
# A message body: the JSON object, or the JSON string Feishu expects (which must hold an object).
Content = dict[str, Any] | str


def _check_json_object(field: str, value: Content | None) -> None:
    """``content``/``card`` given as a string must be the JSON encoding of an object."""
    if isinstance(value, str):
        try:
            parsed = _any_decoder.decode(value)
        except msgspec.DecodeError:
            raise ValueError(f"{field}: string is not JSON (give an object or a JSON-encoded object)") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{field}: string must encode a JSON object")


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A part of a contract we own: unknown fields are errors, values are immutable."""


class _Intent(_Strict, tag_field="kind", frozen=True, kw_only=True):
    """Fields every intent kind has (SPEC.md "Common fields")."""

    id: IntentId
    app: Annotated[str, Meta(min_length=1, description="Name of a configured Feishu app.")] = "default"
    expires_at: AwareTime | None = None
    order_key: Annotated[str, Meta(min_length=1, description="Overrides the default ordering key.")] | None = None
    tenant_key: TenantKey | None = None


# --- im/v1 messages -----------------------------------------------------------------------------------------


class MessageSend(_Intent, tag="message.send", frozen=True, kw_only=True):
    """POST /open-apis/im/v1/messages (im-v1/message/create); ``id`` is sent as ``uuid``."""

    receive_id_type: ReceiveIdType
    receive_id: NonEmpty
    msg_type: MsgType
    content: Content

    def __post_init__(self) -> None:
        _check_json_object("content", self.content)


class MessageReply(_Intent, tag="message.reply", frozen=True, kw_only=True):
    """POST /open-apis/im/v1/messages/:message_id/reply (im-v1/message/reply); ``id`` is sent as ``uuid``.

    ``chat_id`` is optional and only keys the 5/s per-chat limit (facts §2.3, reply: same 5 QPS per group rule).
    """

    message_id: PathId
    msg_type: MsgType
    content: Content
    chat_id: NonEmpty | None = None
    reply_in_thread: bool = False

    def __post_init__(self) -> None:
        _check_json_object("content", self.content)


class MessageEdit(_Intent, tag="message.edit", frozen=True, kw_only=True):
    """PUT /open-apis/im/v1/messages/:message_id (im-v1/message/update: only text and post, ≤ 20 edits)."""

    message_id: PathId
    msg_type: Literal["text", "post"]
    content: Content

    def __post_init__(self) -> None:
        _check_json_object("content", self.content)


class MessageRecall(_Intent, tag="message.recall", frozen=True, kw_only=True):
    """DELETE /open-apis/im/v1/messages/:message_id (im-v1/message/delete)."""

    message_id: PathId


class MessageForward(_Intent, tag="message.forward", frozen=True, kw_only=True):
    """POST /open-apis/im/v1/messages/:message_id/forward (im-v1/message/forward); ``id`` is the query ``uuid``."""

    message_id: PathId
    receive_id_type: ReceiveIdType
    receive_id: NonEmpty


class CardPatch(_Intent, tag="card.patch", frozen=True, kw_only=True):
    """PATCH /open-apis/im/v1/messages/:message_id (im-v1/message/patch): replace a sent card, ≤ 5/s per message."""

    message_id: PathId
    content: Content

    def __post_init__(self) -> None:
        _check_json_object("content", self.content)


class MessageUrgent(_Intent, tag="message.urgent", frozen=True, kw_only=True):
    """PATCH /open-apis/im/v1/messages/:message_id/urgent_{app,sms,phone} (im-v1/buzz-messages)."""

    message_id: PathId
    channel: Literal["app", "sms", "phone"]
    user_id_list: Annotated[list[NonEmpty], Meta(min_length=1)]
    user_id_type: UserIdType = "open_id"


class ReactionAdd(_Intent, tag="reaction.add", frozen=True, kw_only=True):
    """POST …/messages/:message_id/reactions (im-v1/message-reaction/create); ``emoji_type`` flattened."""

    message_id: PathId
    emoji_type: NonEmpty


class ReactionRemove(_Intent, tag="reaction.remove", frozen=True, kw_only=True):
    """DELETE …/messages/:message_id/reactions/:reaction_id (im-v1/message-reaction/delete)."""

    message_id: PathId
    reaction_id: PathId


class PinAdd(_Intent, tag="pin.add", frozen=True, kw_only=True):
    """POST /open-apis/im/v1/pins (im-v1/pin/create)."""

    message_id: PathId


class PinRemove(_Intent, tag="pin.remove", frozen=True, kw_only=True):
    """DELETE /open-apis/im/v1/pins/:message_id (im-v1/pin/delete)."""

    message_id: PathId


# --- cards outside im/v1 ------------------------------------------------------------------------------------


class CardDelayUpdate(_Intent, tag="card.delay_update", frozen=True, kw_only=True):
    """POST /open-apis/interactive/v1/card/update: the callback ``token`` (valid 30 min, 2 uses) and a card."""

    token: NonEmpty
    card: Content

    def __post_init__(self) -> None:
        _check_json_object("card", self.card)


class EphemeralSend(_Intent, tag="ephemeral.send", frozen=True, kw_only=True):
    """POST /open-apis/ephemeral/v1/send: a card only ``open_id`` sees in group ``chat_id`` (40/s per chat)."""

    chat_id: NonEmpty
    open_id: NonEmpty
    card: Content

    def __post_init__(self) -> None:
        _check_json_object("card", self.card)


class EphemeralDelete(_Intent, tag="ephemeral.delete", frozen=True, kw_only=True):
    """POST /open-apis/ephemeral/v1/delete."""

    message_id: PathId


# --- im/v2 --------------------------------------------------------------------------------------------------


class UrlPreviewUpdate(_Intent, tag="url_preview.update", frozen=True, kw_only=True):
    """POST /open-apis/im/v2/url_previews/batch_update (seeds/url_preview_batch_update.md).

    ``open_ids`` absent or ``[]`` both mean every member of the chat (the seed: "若不传，则默认更新 … 所有成员").
    """

    # seed: preview_tokens 长度范围 1～10; distinct because the coalescer keys pending work by token.
    preview_tokens: Annotated[list[NonEmpty], Meta(min_length=1, max_length=10)]
    # seed: open_ids 长度范围 0～100.
    open_ids: Annotated[list[NonEmpty], Meta(max_length=100)] | None = None

    def __post_init__(self) -> None:
        if len(set(self.preview_tokens)) != len(self.preview_tokens):
            raise ValueError("preview_tokens: must be distinct")


class ChatButtonUrls(_Strict, frozen=True, kw_only=True, omit_defaults=True):
    """``multi_url`` (seeds/chat_button_update.md: https only, each ≤ 700 characters)."""

    url: Annotated[str, Meta(max_length=700, pattern="^https://")] | None = None
    android_url: Annotated[str, Meta(max_length=700, pattern="^https://")] | None = None
    ios_url: Annotated[str, Meta(max_length=700, pattern="^https://")] | None = None
    pc_url: Annotated[str, Meta(max_length=700, pattern="^https://")] | None = None


class ChatButtonText(_Strict, frozen=True, kw_only=True):
    """``text`` (seed: text 长度范围 1～30 字符)."""

    text: Annotated[str, Meta(min_length=1, max_length=30)]


class ChatButton(_Strict, frozen=True, kw_only=True, omit_defaults=True):
    """One ``open_app_feed_card_button`` (seeds/chat_button_update.md); unset optionals are not sent."""

    action_type: Literal["url_page", "webhook"]
    text: ChatButtonText
    multi_url: ChatButtonUrls | None = None
    button_type: Literal["default", "primary", "success"] = "default"
    action_map: dict[str, str] | None = None


class ChatButtons(_Strict, frozen=True, kw_only=True):
    """``buttons`` keeps Feishu's nesting: ``buttons.buttons`` is a full replacement, 0..2 (seed: 长度范围 0～2)."""

    buttons: Annotated[list[ChatButton], Meta(max_length=2)]


class ChatButtonUpdate(_Intent, tag="chat_button.update", frozen=True, kw_only=True):
    """PUT /open-apis/im/v2/chat_button (seeds/chat_button_update.md; 10/s; no bot_id)."""

    chat_id: NonEmpty  # seed: 必填
    user_id_type: UserIdType = "open_id"  # seed: default open_id
    user_ids: Annotated[list[NonEmpty], Meta(min_length=1, max_length=20)] | None = None  # seed: 长度范围 1～20
    buttons: ChatButtons | None = None  # seed: absent = no buttons shown


# --- message/v4 ---------------------------------------------------------------------------------------------


class MessageBatchSend(_Intent, tag="message.batch_send", frozen=True, kw_only=True):
    """POST /open-apis/message/v4/batch_send/ (users and department members only, ≤ 500 000 messages/app/day).

    ``interactive`` takes ``card``, every other ``msg_type`` takes ``content``; v4 wants both as objects.
    """

    msg_type: MsgType
    content: Content | None = None
    card: Content | None = None
    open_ids: list[NonEmpty] | None = None
    user_ids: list[NonEmpty] | None = None
    union_ids: list[NonEmpty] | None = None
    # batch_send doc: department_ids 列表长度小于等于 200.
    department_ids: Annotated[list[NonEmpty], Meta(max_length=200)] | None = None

    def __post_init__(self) -> None:
        if self.msg_type == "interactive":
            if self.card is None:
                raise ValueError("card: required when msg_type is interactive")
            if self.content is not None:
                raise ValueError("content: not allowed when msg_type is interactive (use card)")
        else:
            if self.content is None:
                raise ValueError(f"content: required when msg_type is {self.msg_type}")
            if self.card is not None:
                raise ValueError("card: only allowed when msg_type is interactive")
        _check_json_object("content", self.content)
        _check_json_object("card", self.card)
        if not (self.open_ids or self.user_ids or self.union_ids or self.department_ids):
            raise ValueError("give at least one target: open_ids, user_ids, union_ids or department_ids")


# --- any other API ------------------------------------------------------------------------------------------

_PATH_PARAM: Final = re.compile(r":([A-Za-z_][A-Za-z0-9_]*)")
# What may stand in an api.call path as written (RFC 3986 ``pchar`` and "/"): the relay sends the path exactly
# so (yarl ``encoded=True``), nothing re-normalizes it after these checks, so everything else is refused here.
_PATH_CHARS: Final = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")
_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# seeds/url_preview_batch_update.md: one update per token per 5 s, kept only by kind url_preview.update
_URL_PREVIEWS: Final = ("im", "v2", "url_previews", "batch_update")


def _check_segments(path: str) -> None:
    """An api.call path (template or filled) that cannot leave ``/open-apis/`` however it is decoded.

    URL libraries (yarl with ``encoded=False``, servers, proxies) percent-decode and then collapse ``.``/``..``
    segments, so ``/open-apis/%2e%2e/x`` would reach ``/x`` with the tenant token; a gateway may also decode
    ``%2F`` or ``%5C`` into a separator, or decode twice. So every segment is checked decoded: no dot segment,
    no slash or backslash, no ``%`` left (double encoding), no control character; and no empty segment but a
    trailing slash (``//`` is a path some normalize away).
    """
    if not path.startswith("/open-apis/"):
        raise ValueError("path: must start with /open-apis/")
    if "?" in path or "#" in path:
        raise ValueError("path: put the query in `query`, not in the path")
    if "\\" in path:
        raise ValueError("path: must not contain a backslash")
    if _CONTROL.search(path):
        raise ValueError("path: must not contain control characters")
    if not _PATH_CHARS.fullmatch(path):
        bad = next(c for c in path if not _PATH_CHARS.fullmatch(c))
        raise ValueError(f"path: character {bad!r} must be percent-encoded (or given in path_params)")
    if _PERCENT.search(path):
        raise ValueError("path: '%' must start a percent-encoding (%XX)")
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        decoded = unquote(segment)
        if decoded.split(";", 1)[0] in (".", ".."):  # "..;" is ".." to servlet-style path parameters
            raise ValueError("path: must not contain '.' or '..' segments (also percent-encoded)")
        if "/" in decoded or "\\" in decoded:
            raise ValueError("path: must not contain an encoded slash or backslash (%2F, %5C)")
        if "%" in decoded:
            raise ValueError("path: must not be percent-encoded twice")
        if _CONTROL.search(decoded):
            raise ValueError("path: must not contain control characters (also percent-encoded)")
        if not segment and i < len(segments) - 1:
            raise ValueError("path: must not contain empty segments ('//')")


def _check_param(name: str, value: str) -> None:
    """A ``path_params`` value is one path segment, URL-quoted by the relay: nothing that decodes to more."""
    if value.split(";", 1)[0] in (".", ".."):
        raise ValueError(f"path_params.{name}: must not be '.' or '..'")
    if "/" in value or "\\" in value:
        raise ValueError(f"path_params.{name}: must not contain '/' or '\\' (a parameter is one path segment)")
    if "%" in value:
        raise ValueError(f"path_params.{name}: must not contain '%' (give the value unencoded: the relay encodes it)")
    if _CONTROL.search(value):
        raise ValueError(f"path_params.{name}: must not contain control characters")


class Rate(_Strict, frozen=True, kw_only=True):
    """The app-wide limit of the API an ``api.call`` targets, as its Feishu page states it."""

    # bounded so the limiter's arithmetic stays in floats (no Feishu API allows anywhere near this)
    per_second: Annotated[int, Meta(gt=0, le=1_000_000)] | None = None
    per_minute: Annotated[int, Meta(gt=0, le=60_000_000)] | None = None

    def __post_init__(self) -> None:
        if self.per_second is None and self.per_minute is None:
            raise ValueError("give per_second and/or per_minute")


class ApiCall(_Intent, tag="api.call", frozen=True, kw_only=True):
    """Any ``/open-apis/...`` endpoint at ``rate``; buckets as :mod:`relay.calls` says (a built-in API's own).

    ``path`` is a template whose ``:name`` segments are all filled from ``path_params`` (values URL-quoted).
    The path, as written and as filled, must stay under ``/open-apis/`` however a URL library or server decodes
    it (:func:`_check_segments`); a rejection names ``$.path`` or ``$.path_params.<name>``. URL previews have
    their own kind: an api.call to ``im/v2/url_previews/batch_update`` would bypass the per-token 5 s rule.
    """

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: Annotated[str, Meta(pattern="^/open-apis/", description="Template, e.g. /open-apis/im/v1/chats/:chat_id")]
    rate: Rate
    path_params: dict[str, NonEmpty] = {}
    query: dict[str, str] = {}
    body: Any = None  # any JSON; null or absent = no body

    def __post_init__(self) -> None:
        _check_segments(self.path)
        names = _PATH_PARAM.findall(self.path)
        for name in names:
            if name not in self.path_params:
                raise ValueError(f"path_params.{name}: required by the path template")
        for name, value in self.path_params.items():
            if name not in names:
                raise ValueError(f"path_params.{name}: not a :{name} segment of the path template")
            _check_param(name, value)
        filled = self.filled_path
        _check_segments(filled)  # cannot fail after the checks above; kept so no future change lets one through
        rest = [unquote(s).lower() for s in filled.removeprefix("/open-apis/").rstrip("/").split("/")]
        if self.method == "POST" and tuple(rest) == _URL_PREVIEWS:
            raise ValueError("path: URL previews are kind url_preview.update (it keeps one update per token per 5 s)")

    @property
    def filled_path(self) -> str:
        """The path with every ``:name`` replaced by its URL-quoted value."""
        return _PATH_PARAM.sub(lambda m: quote(self.path_params[m.group(1)], safe=""), self.path)


Intent: TypeAlias = (
    MessageSend | MessageReply | MessageEdit | MessageRecall | MessageForward | CardPatch | MessageUrgent
    | ReactionAdd | ReactionRemove | PinAdd | PinRemove | CardDelayUpdate | EphemeralSend | EphemeralDelete
    | UrlPreviewUpdate | ChatButtonUpdate | MessageBatchSend | ApiCall
)

# --- decoding -----------------------------------------------------------------------------------------------

_any_decoder: Final = msgspec.json.Decoder()
_intent_decoder: Final[msgspec.json.Decoder[Intent]] = msgspec.json.Decoder(Intent)

_AT: Final = re.compile(r"^(?P<msg>.*) - at `(?P<path>[^`]*)`$", re.DOTALL)
_OWN: Final = re.compile(r"^(?P<field>[A-Za-z_][\w.\[\]]*): (?P<msg>.*)$", re.DOTALL)
_MISSING: Final = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")
_UNKNOWN: Final = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")
_MAX_REASON: Final = 300
_TOO_DEEP: Final = "value is nested too deeply to read (arrays or objects inside each other, ~1,000 levels)"
_JSON_NAMES: Final[dict[type, str]] = {
    list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null",
}


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…"


def _reason(error: msgspec.ValidationError) -> str:
    """msgspec's "Expected … - at `$.x`" rewritten as "$.x: expected …" (the field first, one line)."""
    message, path = str(error), "$"
    if m := _AT.match(message):
        message, path = m["msg"], m["path"]
    if m := _MISSING.match(message):
        return _one_line(f"{path}.{m['field']}: required field missing")
    if m := _UNKNOWN.match(message):
        return _one_line(f"{path}.{m['field']}: unknown field")
    if path == "$.kind" and message.startswith("Invalid value"):
        return _one_line(f"$.kind: unknown kind {message.removeprefix('Invalid value ')[:60]}")
    if m := _OWN.match(message):  # raised by a __post_init__ as "field: why"
        return _one_line(f"{path}.{m['field']}: {m['msg']}")
    if message == f"Expected `str` matching regex {_PATH_ID!r}":
        return f"{path}: must be one path segment (no '/', '\\', '%' or control characters; not '.' or '..')"
    return _one_line(f"{path}: {message[:1].lower()}{message[1:]}")


def _peek(value: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """``id``, ``kind`` and ``app`` of an invalid intent, each only when it is readable."""
    ident = value.get("id")
    kind = value.get("kind")
    app = value.get("app", "default")
    return (
        ident if isinstance(ident, str) and 1 <= len(ident) <= 50 else None,
        kind if isinstance(kind, str) else None,
        app if isinstance(app, str) and app else None,
    )


def decode_intent(raw: bytes | None) -> Intent:
    """Decode one intent record value, or raise ``IntentError`` naming what is wrong.

    ``error="decode"``: the value is empty, not UTF-8, not JSON, or not a JSON object (nothing to key a result
    by). ``error="invalid"``: a JSON object that is not a valid intent (unknown kind, missing or mistyped field,
    a Feishu rule broken); ``id``/``kind``/``app`` are filled in when they can be read.
    """
    if not raw:
        raise IntentError("value is empty (expected a JSON object)", error="decode")
    try:
        return _intent_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError is a DecodeError
        failure: Exception = exc
    except RecursionError:  # msgspec's guard for the C stack; a string field's own decode raises it too
        raise IntentError(_TOO_DEEP, error="decode") from None
    # Slow path, errors only: find out which of the two classes this is and what can still be read.
    try:
        bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntentError(f"value is not UTF-8 (invalid byte at offset {exc.start})", error="decode") from None
    try:
        value = _any_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise IntentError(f"value is not JSON ({_one_line(str(exc))})", error="decode") from None
    except RecursionError:
        raise IntentError(_TOO_DEEP, error="decode") from None
    if not isinstance(value, dict):
        raise IntentError(f"value is not a JSON object (got {_JSON_NAMES.get(type(value), 'a value')})", error="decode")
    ident, kind, app = _peek(value)
    reason = _reason(failure) if isinstance(failure, msgspec.ValidationError) else _one_line(str(failure))
    raise IntentError(reason, error="invalid", id=ident, kind=kind, app=app) from None


def ordering_key(intent: Intent) -> str:
    """The key that orders this intent against others (SPEC.md "default ordering key"); ``order_key`` wins."""
    if intent.order_key is not None:
        return intent.order_key
    match intent:
        case MessageSend() | MessageForward():
            return intent.receive_id
        case CardDelayUpdate():
            return intent.token
        case EphemeralSend() | ChatButtonUpdate():
            return intent.chat_id
        case UrlPreviewUpdate():
            return intent.preview_tokens[0]
        case MessageBatchSend():
            return intent.id
        case ApiCall():
            return intent.filled_path
        case _:
            return intent.message_id
