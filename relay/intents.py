"""Intents: what a producer asks Feishu to do, the outbound wire contract (results are :mod:`relay.results`).

One intent is one Kafka record whose value is a JSON object tagged by ``kind`` (docs/intents.md). Every
kind is a strict, frozen ``msgspec.Struct`` (unknown fields are an error: a typo must not silently drop a
field); the union ``Intent`` is decoded once, at the edge, by ``decode_intent``. Field rules taken from the
Feishu docs sit next to the field they constrain, with the page they came from, so that a bad record fails
at decode with the JSON path of the field, never later in the middle of a retry.

Decisions worth knowing:

* ``content``/``card`` accept a JSON object or the JSON *string* Feishu expects; a string must itself hold a
  JSON object (checked here, so the relay never sends Feishu a body it will answer 230001 to).
* CardKit kinds that carry a ``sequence`` at Feishu (``card.stream``, ``card.settings``, ``card.update``,
  ``card.finish``) take no ``order_key``: the relay derives the sequence from the record's offset, which orders
  a card's operations only while all of them share one partition, so their key is always the ``card_id``
  (:func:`relay.calls.card_sequence`).
* Bytes to upload travel base64-encoded in ``data`` (msgspec decodes it), or the relay downloads them from
  ``url``; the relay's configured cap on them is checked when the intent is performed, not here
  (:mod:`relay.media`, :mod:`relay.fetch`).
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
    "CardCreate",
    "CardDelayUpdate",
    "CardFinish",
    "CardPatch",
    "CardSend",
    "CardSettings",
    "CardStream",
    "CardTemplate",
    "CardUpdate",
    "ChatButton",
    "ChatButtonText",
    "ChatButtonUpdate",
    "ChatButtonUrls",
    "ChatButtons",
    "Content",
    "EphemeralDelete",
    "EphemeralSend",
    "FileUpload",
    "ImageUpload",
    "Intent",
    "MediaUpload",
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
    "SequencedCardIntent",
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
    """Fields every intent kind has (docs/intents.md "Common fields")."""

    id: IntentId
    app: Annotated[str, Meta(min_length=1, description="Name of a configured Feishu app.")] = "default"
    expires_at: AwareTime | None = None
    order_key: Annotated[str, Meta(min_length=1, description="Overrides the default ordering key.")] | None = None
    tenant_key: TenantKey | None = None


# --- im/v1 messages -----------------------------------------------------------------------------------------


# docs/feishu-rules.md §5.8: images ≤ 10 MB, files ≤ 30 MB; the relay's own cap (``outbound.max_upload_bytes``)
# is checked when the intent is performed (relay.media), since it is configuration, not contract.
InlineBytes = Annotated[bytes, Meta(min_length=1, max_length=30 * 1024 * 1024,
                                    description="The bytes to upload, base64-encoded (1 byte .. 30 MB).")]
# A URL the relay downloads the bytes from itself (relay.fetch guards it: public addresses only).
FetchUrl = Annotated[str, Meta(pattern=r"^https?://[^/?#\s]+", max_length=2048,
                               description="http(s) URL the relay downloads the bytes from (public addresses only).")]


def _one_source(data: bytes | None, url: str | None) -> None:
    if (data is None) == (url is None):
        raise ValueError("data: give exactly one of data (base64 bytes) and url")


# docs/feishu-rules.md §5.8, file/create: file_name required, with its extension.
FileName = Annotated[str, Meta(min_length=3, max_length=250,
                               pattern=r"^[^/\\\x00-\x1f]*[^/\\\x00-\x1f.]\.[A-Za-z0-9]+$",
                               description="File name with its extension, e.g. report.pdf.")]
# docs/feishu-rules.md §5.8, file/create: duration in milliseconds (audio/video; without it no duration is shown).
DurationMs = Annotated[int, Meta(gt=0, lt=2**31, description="Duration in milliseconds (opus and mp4 only).")]


class MediaUpload(_Strict, frozen=True, kw_only=True):
    """The file a ``message.send`` of ``msg_type`` image, file, audio or media uploads first, from ``url``.

    image: POST /im/v1/images (``image_type`` message); file: POST /im/v1/files with ``file_type`` from the name's
    extension (pdf, doc(x), xls(x), ppt(x), else stream); audio: opus; media: mp4 (docs/feishu-rules.md §5.8).
    ``file_name`` (with its extension) is required for all but images; ``duration`` (ms) for audio and media.
    """

    url: FetchUrl
    file_name: FileName | None = None
    duration: DurationMs | None = None


# Message types whose content is an uploaded key (docs/feishu-rules.md §5.8 "Message content after upload").
UPLOAD_MSG_TYPES: Final = ("image", "file", "audio", "media")


class MessageSend(_Intent, tag="message.send", frozen=True, kw_only=True):
    """POST /open-apis/im/v1/messages (im-v1/message/create); ``id`` is sent as ``uuid``.

    With ``upload`` instead of ``content`` (``msg_type`` image, file, audio or media), the relay first downloads
    the file from its url and uploads it, then sends the key it got as the content (:mod:`relay.media`)."""

    receive_id_type: ReceiveIdType
    receive_id: NonEmpty
    msg_type: MsgType
    content: Content | None = None
    upload: MediaUpload | None = None

    def __post_init__(self) -> None:
        if (self.content is None) == (self.upload is None):
            raise ValueError("content: give exactly one of content and upload")
        if self.upload is not None:
            if self.msg_type not in UPLOAD_MSG_TYPES:
                raise ValueError(f"upload: msg_type must be one of {', '.join(UPLOAD_MSG_TYPES)} to upload a file")
            if self.msg_type != "image" and self.upload.file_name is None:
                raise ValueError("upload.file_name: required to upload a file (Feishu needs its extension)")
            if self.upload.duration is not None and self.msg_type not in ("audio", "media"):
                raise ValueError("upload.duration: only for msg_type audio or media")
        _check_json_object("content", self.content)


class MessageReply(_Intent, tag="message.reply", frozen=True, kw_only=True):
    """POST /open-apis/im/v1/messages/:message_id/reply (im-v1/message/reply); ``id`` is sent as ``uuid``.

    ``chat_id`` is optional and only keys the 5/s per-chat limit (docs/feishu-rules.md §2.3).
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
    """PATCH /open-apis/im/v1/messages/:message_id (im-v1/message/patch): replace a sent card, ≤ 5/s per message.

    ``latest_wins``: a patch replaces the whole card, so one that a later patch of the same message (already
    read, behind it in its lane) replaces is not sent: it is ``superseded`` by it (:mod:`relay.folding`). Opt-in,
    because a producer may want every intermediate card seen.
    """

    message_id: PathId
    content: Content
    latest_wins: bool = False

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


# --- CardKit v1 (docs/feishu-rules.md §5.7) -----------------------------------------------------------------

# docs/feishu-rules.md §5.7: card_id and element_id 1–20 characters; element_id letters, digits and underscore, starting
# with a letter.
CardId = Annotated[str, Meta(min_length=1, max_length=20, pattern=_PATH_ID, description="A CardKit card_id.")]
ElementId = Annotated[str, Meta(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,19}$",
                                description="A card element's element_id (1..20: a letter, then letters, "
                                            "digits, underscore).")]


def _card_json(field: str, value: Content) -> dict[str, Any]:
    """A CardKit card: a JSON 2.0 card (``"schema": "2.0"``) that does not set ``update_multi`` false.

    docs/feishu-rules.md §5.7: CardKit takes JSON 2.0 cards only and rejects ``update_multi=false``.
    """
    card = value if isinstance(value, dict) else _any_decoder.decode(value)
    if card.get("schema") != "2.0":
        raise ValueError(f'{field}: CardKit takes JSON 2.0 cards only (set "schema": "2.0")')
    config = card.get("config")
    if isinstance(config, dict) and config.get("update_multi") is False:
        raise ValueError(f"{field}: CardKit rejects config.update_multi = false")
    return card


class CardTemplate(_Strict, frozen=True, kw_only=True, omit_defaults=True):
    """A card built from a template (cardkit-v1/card/create ``type`` template: ``data`` holds these fields)."""

    template_id: NonEmpty
    template_version_name: NonEmpty | None = None
    template_variable: dict[str, Any] | None = None


class CardCreate(_Intent, tag="card.create", frozen=True, kw_only=True):
    """POST /open-apis/cardkit/v1/cards: a card entity (``data.card_id``), valid 14 days, sent once.

    ``card`` is a JSON 2.0 card (set ``config.streaming_mode`` true to stream into it); or ``template``.
    """

    card: Content | None = None
    template: CardTemplate | None = None

    def __post_init__(self) -> None:
        if (self.card is None) == (self.template is None):
            raise ValueError("card: give exactly one of card and template")
        if self.card is not None:
            _check_json_object("card", self.card)
            _card_json("card", self.card)


class CardSend(_Intent, tag="card.send", frozen=True, kw_only=True):
    """POST /open-apis/im/v1/messages with ``msg_type`` interactive and content
    ``{"type":"card","data":{"card_id":…}}``: send a card entity (docs/feishu-rules.md §5.7: it can be sent once).

    A ``message.send`` underneath: same uuid (the intent id), same per-recipient 5/s, same ordering key."""

    receive_id_type: ReceiveIdType
    receive_id: NonEmpty
    card_id: CardId


class _CardOp(_Intent, frozen=True, kw_only=True):
    """An operation on a card entity: one ``sequence`` per record, from its offset
    (:func:`relay.calls.card_sequence`)."""

    card_id: CardId

    def __post_init__(self) -> None:
        if self.order_key is not None:
            raise ValueError("order_key: not allowed on a CardKit operation (its sequence comes from the "
                             "record's offset, so every operation on a card must share the card_id's partition)")


class CardStream(_CardOp, tag="card.stream", frozen=True, kw_only=True):
    """PUT …/cardkit/v1/cards/:card_id/elements/:element_id/content: the element's full text, streamed.

    Streaming mode must be open (docs/feishu-rules.md §5.7: it closes 10 min after it was opened; then 300309). An
    update that a later one of the same element already read replaces is not sent (:mod:`relay.folding`).
    """

    element_id: ElementId
    # cardkit-v1/card-element/content: content 最小长度 1, 最大长度 100000 (the full text, not a delta)
    content: Annotated[str, Meta(min_length=1, max_length=100_000, description="The element's full text.")]


class CardSettings(_CardOp, tag="card.settings", frozen=True, kw_only=True):
    """PATCH …/cardkit/v1/cards/:card_id/settings: ``settings`` holds ``config`` (``streaming_mode``,
    ``summary``, ``streaming_config``, …) and/or ``card_link``, as an object or its JSON string."""

    settings: Content

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_json_object("settings", self.settings)
        settings = self.settings if isinstance(self.settings, dict) else _any_decoder.decode(self.settings)
        unknown = sorted(set(settings) - {"config", "card_link"})
        if unknown:
            raise ValueError(f"settings: unknown key {unknown[0]!r} (settings take config and card_link)")
        if not settings:
            raise ValueError("settings: give config and/or card_link")


class CardUpdate(_CardOp, tag="card.update", frozen=True, kw_only=True):
    """PUT …/cardkit/v1/cards/:card_id: replace the whole card entity (a JSON 2.0 card); works in or out of
    streaming mode (docs/feishu-rules.md §5.7)."""

    card: Content

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_json_object("card", self.card)
        _card_json("card", self.card)


class CardFinish(_CardOp, tag="card.finish", frozen=True, kw_only=True):
    """Close streaming mode, optionally setting the list preview: PATCH …/settings with
    ``{"config": {"streaming_mode": false, "summary": {"content": summary}}}`` (as the official Node SDK's
    ``finishStreamingCard`` does)."""

    summary: str | None = None


# The kinds whose call carries a sequence (relay.calls.card_sequence).
SequencedCardIntent: TypeAlias = CardStream | CardSettings | CardUpdate | CardFinish


# --- uploads (docs/feishu-rules.md §5.8) --------------------------------------------------------------------


class ImageUpload(_Intent, tag="image.upload", frozen=True, kw_only=True):
    """POST /open-apis/im/v1/images (multipart): ``data.image_key``. ≤ 10 MB, JPG/JPEG/PNG/WEBP/GIF/BMP/ICO/TIFF/
    HEIC (by the bytes' signature), checked before the upload (:mod:`relay.media`). The bytes are ``data``, or
    downloaded by the relay from ``url`` (:mod:`relay.fetch`)."""

    image_type: Literal["message", "avatar"] = "message"
    data: InlineBytes | None = None
    url: FetchUrl | None = None

    def __post_init__(self) -> None:
        _one_source(self.data, self.url)


# docs/feishu-rules.md §5.8, file/create: file_type (anything else → stream).
FileType = Literal["opus", "mp4", "pdf", "doc", "xls", "ppt", "stream"]


class FileUpload(_Intent, tag="file.upload", frozen=True, kw_only=True):
    """POST /open-apis/im/v1/files (multipart): ``data.file_key``. ≤ 30 MB, not empty; ``file_name`` with its
    extension; ``duration`` (ms) for opus/mp4 only. The bytes are ``data``, or downloaded from ``url``."""

    file_type: FileType = "stream"
    file_name: FileName
    duration: DurationMs | None = None
    data: InlineBytes | None = None
    url: FetchUrl | None = None

    def __post_init__(self) -> None:
        _one_source(self.data, self.url)
        if self.duration is not None and self.file_type not in ("opus", "mp4"):
            raise ValueError("duration: only for file_type opus or mp4")


# --- im/v2 --------------------------------------------------------------------------------------------------


class UrlPreviewUpdate(_Intent, tag="url_preview.update", frozen=True, kw_only=True):
    """POST /open-apis/im/v2/url_previews/batch_update (docs/feishu-rules.md §5.4).

    ``open_ids`` absent or ``[]`` both mean every member of the chat (Feishu: absent = everyone; ``[]`` is not sent).
    """

    # Feishu: preview_tokens 1 to 10; distinct because the coalescer keys pending work by token.
    preview_tokens: Annotated[list[NonEmpty], Meta(min_length=1, max_length=10)]
    # Feishu: open_ids 0 to 100.
    open_ids: Annotated[list[NonEmpty], Meta(max_length=100)] | None = None

    def __post_init__(self) -> None:
        if len(set(self.preview_tokens)) != len(self.preview_tokens):
            raise ValueError("preview_tokens: must be distinct")


class ChatButtonUrls(_Strict, frozen=True, kw_only=True, omit_defaults=True):
    """``multi_url`` (docs/feishu-rules.md §5.5: https only, each ≤ 700 characters)."""

    url: Annotated[str, Meta(max_length=700, pattern="^https://")] | None = None
    android_url: Annotated[str, Meta(max_length=700, pattern="^https://")] | None = None
    ios_url: Annotated[str, Meta(max_length=700, pattern="^https://")] | None = None
    pc_url: Annotated[str, Meta(max_length=700, pattern="^https://")] | None = None


class ChatButtonText(_Strict, frozen=True, kw_only=True):
    """``text`` (docs/feishu-rules.md §5.5: 1 to 30 characters)."""

    text: Annotated[str, Meta(min_length=1, max_length=30)]


class ChatButton(_Strict, frozen=True, kw_only=True, omit_defaults=True):
    """One ``open_app_feed_card_button`` (docs/feishu-rules.md §5.5); unset optionals are not sent."""

    action_type: Literal["url_page", "webhook"]
    text: ChatButtonText
    multi_url: ChatButtonUrls | None = None
    button_type: Literal["default", "primary", "success"] = "default"
    action_map: dict[str, str] | None = None


class ChatButtons(_Strict, frozen=True, kw_only=True):
    """``buttons`` keeps Feishu's nesting: ``buttons.buttons``, 0..2, replaces all (docs/feishu-rules.md §5.5)."""

    buttons: Annotated[list[ChatButton], Meta(max_length=2)]


class ChatButtonUpdate(_Intent, tag="chat_button.update", frozen=True, kw_only=True):
    """PUT /open-apis/im/v2/chat_button (docs/feishu-rules.md §5.5; 10/s; no bot_id)."""

    chat_id: NonEmpty  # required
    user_id_type: UserIdType = "open_id"  # Feishu's default
    user_ids: Annotated[list[NonEmpty], Meta(min_length=1, max_length=20)] | None = None  # Feishu: 1 to 20
    buttons: ChatButtons | None = None  # absent = no buttons shown


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
# docs/feishu-rules.md §5.4: one update per token per 5 s, kept only by kind url_preview.update
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
    | UrlPreviewUpdate | ChatButtonUpdate | MessageBatchSend | CardCreate | CardSend | CardStream | CardSettings
    | CardUpdate | CardFinish | ImageUpload | FileUpload | ApiCall
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
    """The key that orders this intent against others (docs/intents.md "Ordering keys and limits").

    ``order_key`` wins."""
    if intent.order_key is not None:
        return intent.order_key
    match intent:
        case MessageSend() | MessageForward() | CardSend():
            return intent.receive_id
        case CardDelayUpdate():
            return intent.token
        case EphemeralSend() | ChatButtonUpdate():
            return intent.chat_id
        case UrlPreviewUpdate():
            return intent.preview_tokens[0]
        case MessageBatchSend() | CardCreate() | ImageUpload() | FileUpload():
            return intent.id
        case CardStream() | CardSettings() | CardUpdate() | CardFinish():
            return intent.card_id
        case ApiCall():
            return intent.filled_path
        case _:
            return intent.message_id
