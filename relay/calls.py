"""The Feishu APIs the relay calls, and the pure mapping from an intent to the HTTP call that performs it.

A ``Call`` is everything the I/O shell needs and nothing it has to decide: method, filled path, query, the body
bytes exactly as Feishu expects them, the stable name of the Feishu API (the limiter's key, with the app), the
app-wide windows of that API, and the per-target key and windows where Feishu documents one.

Body encoding: the im/v1 message APIs (create, reply, update, patch) want ``content`` as a JSON *string*; an
object given by the producer is encoded to that string, a string is passed through. The APIs that want an
object (``message/v4/batch_send``, ``interactive/v1/card/update``, ``ephemeral/v1/send``) get the object; a
string given by the producer is embedded as the JSON it holds (``decode_intent`` checked it is an object).

Limits (docs/feishu-rules.md §2.2 app-wide, §2.3 per target): the limiter keys app-wide windows by (app, ``api``)
and per-target windows by (app, ``target``); both must admit a call. Feishu's "≤5 QPS to the same user; ≤5 QPS
to the same group" counts send, reply and forward together (§2.3), so the three name a recipient the same
way, and the limiter resolves the names Feishu's answers showed to be one chat (:mod:`relay.targets`):

    send / forward to receive_id_type chat_id      ``chat:<chat_id>``
    send / forward to a user                       ``user:<receive_id_type>:<id>`` (-> its p2p chat, once known)
    reply                                          ``chat:<chat_id>`` when the intent gives it, else
                                                   ``reply:<message_id>`` (-> the message's chat, once known)
    card.patch, pin.add, pin.remove                ``message:<message_id>`` ("single message ≤5 QPS"; one
                                                   bucket for a message across patch and pins: conservative)
    ephemeral.send                                 ``ephemeral-chat:<chat_id>`` (its own 40/s per group)

Safe to repeat (``Call.repeatable``), decided per API, not from the HTTP method (urgent is a PATCH that buzzes
again on every call):

    repeatable      message.send / reply / forward (uuid = intent id: Feishu performs a uuid at most once per
                    hour, §3; a repeat more than an hour later is not protected), message.edit (PUT of
                    the same content), card.patch (PATCH of the same card), message.recall, reaction.remove,
                    pin.remove (DELETE), pin.add (pinning a pinned message leaves one pin),
                    chat_button.update (PUT of the whole set), url_preview.update (the coalescer counts every
                    attempt against the token's 5 s rule anyway), ephemeral.delete; api.call with GET, PUT
                    or DELETE (idempotent methods, RFC 9110 §9.2.2)
    not repeatable  message.urgent (each call buzzes, SMSes or phones again), reaction.add (a second reaction),
                    ephemeral.send (a second card), card.delay_update (the token has two uses),
                    message.batch_send (a second broadcast); api.call with POST, or PATCH (RFC 5789: "PATCH
                    is neither safe nor idempotent", and Feishu's own urgent PATCH shows it)

A repeat of a repeatable call has its effect once, but its answer may differ: a recall or removal whose first
attempt did succeed can be answered "already recalled" / "not found", and its result then says so.

Create, reply and forward are ``learns`` calls: their answer names the chat of the message made.

``api.call``: a call whose method and filled path have the shape of a built-in API (:data:`ROUTES`: any value in
a parameter segment, a trailing slash ignored) *is* that API at Feishu, so it carries that API's name, its
windows made stricter by the intent's ``rate``, and its per-target key where the query, body or path name the
target as the built-in would (a send's ``receive_id_type`` and ``receive_id``, a reply's message id, ...): it
shares the built-in's buckets instead of getting a second quota. Any other api.call is named
``api:<METHOD> <template>`` with every ``:param`` written ``:`` and every literal segment that is a Feishu id
(``om_…``, ``oc_…``, ``ou_…``, digits, an email, see :data:`LITERAL_ID`) written ``:`` too, so one API is one
bucket whatever its parameters are called; the limiter keeps the strictest rate any of its calls gave.

:func:`check_share` says at startup whether a replica's ``quota_share`` leaves a call in every built-in app-wide
window (a per-target window is never shared: one target lives on one partition, so on one replica).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final, Literal
from urllib.parse import quote, unquote

import msgspec

from relay.buckets import Window, share_leaves_no_call, size_bucket, stricter
from relay.intents import (
    ApiCall,
    CardCreate,
    CardDelayUpdate,
    CardFinish,
    CardPatch,
    CardSend,
    CardSettings,
    CardStream,
    CardUpdate,
    ChatButtonUpdate,
    Content,
    EphemeralDelete,
    EphemeralSend,
    FileUpload,
    ImageUpload,
    Intent,
    MessageBatchSend,
    MessageEdit,
    MessageForward,
    MessageRecall,
    MessageReply,
    MessageSend,
    MessageUrgent,
    PinAdd,
    PinRemove,
    ReactionAdd,
    ReactionRemove,
    SequencedCardIntent,
    UrlPreviewUpdate,
)
from relay.media import upload_refusal

__all__ = [
    "API_WINDOWS",
    "LITERAL_ID",
    "MAX_SEQUENCE",
    "PREVIEW_TOKEN_WINDOWS",
    "ROUTES",
    "Call",
    "FormField",
    "Route",
    "api_name",
    "build_call",
    "card_sequence",
    "check_share",
    "recipient",
    "unsendable",
    "url_preview_call",
]


class FormField(msgspec.Struct, frozen=True, kw_only=True):
    """One part of a multipart/form-data body: a text field, or (``filename`` set) the file itself."""

    name: str
    value: str | bytes
    filename: str | None = None
    content_type: str | None = None


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """One HTTP request to Feishu, fully decided. ``path`` is filled and quoted; ``body`` is the exact bytes, or
    ``form`` the parts of a multipart/form-data body (the uploads), never both."""

    method: str
    path: str
    query: dict[str, str] = msgspec.field(default_factory=dict)
    body: bytes | None = None
    form: tuple[FormField, ...] = ()
    api: str  # stable name of the Feishu API, e.g. "im.message.create"; api.call: "api:<METHOD> <template>"
    api_windows: tuple[Window, ...]  # the app-wide limits of ``api``
    target: str | None = None  # the per-target limit key shared by every API, e.g. "chat:oc_1" (module doc)
    target_windows: tuple[Window, ...] = ()
    learns: bool = False  # the answer names the chat of the message made (create, reply, forward): module doc
    # Feishu performs the call at most once per hour for this uuid (docs/feishu-rules.md §3)
    uuid_protected: bool = False
    # performing it twice has the effect of performing it once (module doc, "Safe to repeat"); the executor
    # retries a call whose last attempt may have been performed only when this is set, and only such calls go
    # without a journal entry (relay.journal). The default is the safe answer for a call nobody classified.
    repeatable: bool = False


# --- limits -------------------------------------------------------------------------------------------------

# docs/feishu-rules.md §2.2 (im-v1 message create/reply/update/patch/delete/forward, reactions, pins, card/update,
# ephemeral, batch_send): "1000/min & 50/s" -- both windows must hold.
IM: Final = (Window(50, 1), Window(1000, 60))
# docs/feishu-rules.md §2.2: urgent_app "默认接口限流为 50 QPS", urgent_sms "1000/min & 50/s", urgent_phone assumed
# the same: we keep the stricter pair for all three.
URGENT: Final = IM
# docs/feishu-rules.md §2.2: url_preview batch_update "5 次/秒" (5 per second).
URL_PREVIEW: Final = (Window(5, 1),)
# docs/feishu-rules.md §2.3, §5.4: "单个 token 限制更新频率为 1次/5秒" (for the coalescer, keyed by token).
PREVIEW_TOKEN_WINDOWS: Final = (Window(1, 5),)
# docs/feishu-rules.md §2.2: chat_button "10 次/秒" (10 per second).
CHAT_BUTTON: Final = (Window(10, 1),)
# docs/feishu-rules.md §2.2 batch_send: "1000/min & 50/s".
BATCH_SEND: Final = IM
# docs/feishu-rules.md §2.3 create/reply/forward: "≤5 QPS to the same user; ≤5 QPS to the same group"; patch:
# "single message ≤5 QPS"; pin/unpin: "same message ≤5 QPS".
PER_TARGET: Final = (Window(5, 1),)
# docs/feishu-rules.md §2.3 ephemeral send: "40 QPS per group".
EPHEMERAL_CHAT: Final = (Window(40, 1),)

# docs/feishu-rules.md §5.7: every CardKit API "1000/min & 50/s" per app; "≤ 10 card/element API calls per second" per
# card entity, on top (the per-target key ``card:<card_id>``, shared by every call on that card).
CARDKIT: Final = IM
PER_CARD: Final = (Window(10, 1),)
# docs/feishu-rules.md §5.8: image and file upload "1000/min & 50/s".
UPLOAD: Final = IM

# The app-wide windows of every named API (api.call's come from its intent).
API_WINDOWS: Final[dict[str, tuple[Window, ...]]] = {
    "im.message.create": IM,
    "im.message.reply": IM,
    "im.message.update": IM,
    "im.message.delete": IM,
    "im.message.forward": IM,
    "im.message.patch": IM,
    "im.message.urgent_app": URGENT,
    "im.message.urgent_sms": URGENT,
    "im.message.urgent_phone": URGENT,
    "im.message_reaction.create": IM,
    "im.message_reaction.delete": IM,
    "im.pin.create": IM,
    "im.pin.delete": IM,
    "interactive.card.update": IM,
    "ephemeral.send": IM,
    "ephemeral.delete": IM,
    "im.url_preview.batch_update": URL_PREVIEW,
    "im.chat_button.update": CHAT_BUTTON,
    "message.batch_send": BATCH_SEND,
    "cardkit.card.create": CARDKIT,
    "cardkit.card.settings": CARDKIT,
    "cardkit.card.update": CARDKIT,
    "cardkit.card_element.content": CARDKIT,
    "im.image.create": UPLOAD,
    "im.file.create": UPLOAD,
}



def check_share(share: float, time_scale: float, jitter: float, utilization: float) -> None:
    """Raise ValueError, naming the API and window, when ``share`` leaves no call in a built-in app-wide window.

    The smallest is URL previews' 5 in 1 s, so a share under 0.2 fails. Each window must keep at least one call
    after ``floor(limit * share)``, and every bucket must be sizeable with these settings.
    """
    for api, windows in API_WINDOWS.items():
        window = share_leaves_no_call(windows, share)
        if window is not None:
            raise ValueError(
                f"{share:g} of {api}'s {window.limit} calls per {window.seconds:g} s leaves no call per replica "
                f"(needs at least {1 / window.limit:.3g})")
        try:
            size_bucket(windows, jitter=jitter, utilization=utilization, share=share, time_scale=time_scale)
        except ValueError as err:
            raise ValueError(f"{api}: {err}") from None


def recipient(receive_id_type: str, receive_id: str) -> str:
    """The per-target key of a send or forward: ``chat:<id>`` for a chat, ``user:<id type>:<id>`` for a user."""
    if receive_id_type == "chat_id":
        return f"chat:{receive_id}"
    return f"user:{receive_id_type}:{receive_id}"


_MESSAGES: Final = "/open-apis/im/v1/messages"
_encoder: Final = msgspec.json.Encoder()


def _seg(value: str) -> str:
    """One path segment, URL-quoted (an id must never add a segment or a query)."""
    return quote(value, safe="")


def _json(value: Any) -> bytes:
    return _encoder.encode(value)


def _as_string(content: Content) -> str:
    """im/v1 wants ``content`` as the JSON string of the object."""
    return content if isinstance(content, str) else _encoder.encode(content).decode()


def _as_object(content: Content) -> Any:
    """v4 batch_send, card/update and ephemeral want the object itself; a string holds its JSON already."""
    return msgspec.Raw(content.encode()) if isinstance(content, str) else content


def _call(method: str, path: str, api: str, *, repeatable: bool, query: dict[str, str] | None = None,
          body: Any = None, target: str | None = None, target_windows: tuple[Window, ...] = (),
          uuid: bool = False, learns: bool = False) -> Call:
    return Call(
        method=method, path=path, query=query or {}, body=None if body is None else _json(body), api=api,
        api_windows=API_WINDOWS[api], target=target, target_windows=target_windows if target else (),
        learns=learns, uuid_protected=uuid, repeatable=repeatable,
    )


# api.call methods that are idempotent by HTTP semantics (RFC 9110 §9.2.2); PATCH is not (RFC 5789)
IDEMPOTENT_METHODS: Final = frozenset({"GET", "PUT", "DELETE"})


def url_preview_call(tokens: Sequence[str], open_ids: Sequence[str] | None) -> Call:
    """POST /open-apis/im/v2/url_previews/batch_update for merged requests; ``None`` or ``[]`` = everyone.

    The coalescer owns the per-token 1/5 s rule (``PREVIEW_TOKEN_WINDOWS``) and the merge; this only checks the
    per-call bounds of docs/feishu-rules.md §5.4 (1..10 tokens, 0..100 open_ids) so a coalescer bug fails loudly,
    not at Feishu.
    """
    if not 1 <= len(tokens) <= 10:
        raise ValueError(f"url_preview_call: {len(tokens)} tokens (Feishu takes 1..10 per call)")
    if open_ids is not None and len(open_ids) > 100:
        raise ValueError(f"url_preview_call: {len(open_ids)} open_ids (Feishu takes 0..100; merge to everyone)")
    body: dict[str, Any] = {"preview_tokens": list(tokens)}
    if open_ids:
        body["open_ids"] = list(open_ids)
    return _call("POST", "/open-apis/im/v2/url_previews/batch_update", "im.url_preview.batch_update", body=body,
                 repeatable=True)


# cardkit-v1/card-element/content: sequence "取值范围为 int32 范围内的值", a positive integer
MAX_SEQUENCE: Final = 2**31 - 1


def card_sequence(offset: int) -> int | None:
    """The ``sequence`` of the CardKit call made for the intent record at ``offset``; None when there is none.

    Feishu wants every operation on a card (content, settings, full update) to carry a positive int32 that is
    greater than the last one it took for that card, else 300317 (docs/feishu-rules.md §5.7). The relay needs no
    counter to give one, because Kafka already keeps the order it must follow:

    * every sequenced operation on a card has the ``card_id`` as its record key (``order_key`` is refused at
      decode, and the consumer refuses a record keyed otherwise), so all of them are on one partition of the
      topic: the same key always maps to the same partition while the partition count stays as it is;
    * offsets in a partition are assigned by the broker, strictly increase, are never reused, and read the same
      for every consumer: any replica, before or after any restart or rebalance, computes the same number for
      the same record, and a later record always a larger one;
    * the consumer performs one key's records one after another in offset order (its lanes), so the calls on a
      card leave in increasing sequence. A record that makes no call (superseded, refused) only leaves a gap, and
      Feishu asks for increasing, not consecutive numbers.

    So ``sequence = offset + 1`` (offset 0 would give 0, which Feishu refuses). A record redone after a kill
    carries the sequence it had the first time, with the same ``uuid`` (the intent id), so Feishu performs it
    once. Not covered: adding partitions to the intents topic while a card is streaming (its later operations
    may hash to another partition, as Kafka's ordering per key is lost too), and one card's operations written
    to two intents topics. A partition past 2**31 - 2 records has no int32 left: None, and the intent is
    refused rather than sent with a number Feishu would refuse.
    """
    sequence = offset + 1
    return sequence if 0 < sequence <= MAX_SEQUENCE else None


def unsendable(intent: Intent, *, key: bytes | None, offset: int, max_upload_bytes: int) -> str | None:
    """Why the intent record (its Kafka ``key`` and ``offset``) must not be performed, one line naming the field;
    None when it may. Checked before the call, so Feishu never sees what it would refuse for these reasons.

    A CardKit operation keyed by anything but its ``card_id`` could share no partition with the card's other
    operations, and its offset-derived sequence would order nothing (:func:`card_sequence`); an upload must pass
    Feishu's size and type rules and the relay's cap (:func:`relay.media.upload_refusal`).
    """
    if isinstance(intent, SequencedCardIntent):
        if key != intent.card_id.encode():
            return ("key: a CardKit operation's record key must be its card_id (its sequence comes from the "
                    "partition's order)")
        if card_sequence(offset) is None:
            return f"sequence: offset {offset} is past the int32 range CardKit takes for a sequence"
        return None
    if isinstance(intent, ImageUpload | FileUpload) and intent.data is not None:  # a url's: once downloaded
        return upload_refusal(intent, max_upload_bytes)
    return None


_CARDS: Final = "/open-apis/cardkit/v1/cards"


def _card_data(card: Content) -> str:
    """CardKit's ``data``: the card JSON as a string."""
    return _as_string(card)


def _card_op(method: str, path: str, api: str, intent: CardStream | CardSettings | CardUpdate | CardFinish,
             body: dict[str, Any], sequence: int | None) -> Call:
    if sequence is None:
        raise ValueError(f"{api}: a CardKit operation needs its sequence (card_sequence)")
    return _call(method, path, api, body={**body, "sequence": sequence, "uuid": intent.id}, repeatable=True,
                 target=f"card:{intent.card_id}", target_windows=PER_CARD)


def _upload_call(intent: ImageUpload | FileUpload) -> Call:
    """POST /open-apis/im/v1/images or /files as multipart/form-data (docs/feishu-rules.md §5.8); the file part last."""
    if intent.data is None:
        raise ValueError(f"{intent.id}: an upload by url needs its bytes first (relay.fetch)")
    form: tuple[FormField, ...]
    if isinstance(intent, ImageUpload):
        form = (FormField(name="image_type", value=intent.image_type),
                FormField(name="image", value=intent.data, filename="image", content_type="application/octet-stream"))
        path, api = "/open-apis/im/v1/images", "im.image.create"
    else:
        fields = [FormField(name="file_type", value=intent.file_type),
                  FormField(name="file_name", value=intent.file_name)]
        if intent.duration is not None:
            fields.append(FormField(name="duration", value=str(intent.duration)))
        fields.append(FormField(name="file", value=intent.data, filename=intent.file_name,
                                content_type="application/octet-stream"))
        form, path, api = tuple(fields), "/open-apis/im/v1/files", "im.file.create"
    # not repeatable: a second upload makes a second key (harmless, but not "the effect of one")
    return Call(method="POST", path=path, form=form, api=api, api_windows=API_WINDOWS[api], repeatable=False)


def build_call(intent: Intent, *, sequence: int | None = None) -> Call:
    """The one HTTP call that performs ``intent`` (docs/intents.md, the kinds table); ``sequence`` is the CardKit
    sequence of a card operation (:func:`card_sequence`), required for those and ignored otherwise."""
    match intent:
        case CardCreate():
            if intent.card is not None:
                body = {"type": "card_json", "data": _card_data(intent.card)}
            else:
                assert intent.template is not None
                body = {"type": "template", "data": _encoder.encode(intent.template).decode()}
            # not repeatable: a second call makes a second card entity (unused, but not the effect of one)
            return _call("POST", _CARDS, "cardkit.card.create", body=body, repeatable=False)
        case CardSend():
            content = {"type": "card", "data": {"card_id": intent.card_id}}
            return _call(
                "POST", _MESSAGES, "im.message.create", query={"receive_id_type": intent.receive_id_type},
                body={"receive_id": intent.receive_id, "msg_type": "interactive", "content": _as_string(content),
                      "uuid": intent.id},
                target=recipient(intent.receive_id_type, intent.receive_id), target_windows=PER_TARGET, uuid=True,
                repeatable=True, learns=True,
            )
        case CardStream():
            return _card_op("PUT", f"{_CARDS}/{_seg(intent.card_id)}/elements/{_seg(intent.element_id)}/content",
                            "cardkit.card_element.content", intent, {"content": intent.content}, sequence)
        case CardSettings():
            return _card_op("PATCH", f"{_CARDS}/{_seg(intent.card_id)}/settings", "cardkit.card.settings", intent,
                            {"settings": _as_string(intent.settings)}, sequence)
        case CardFinish():
            config: dict[str, Any] = {"streaming_mode": False}
            if intent.summary is not None:
                config["summary"] = {"content": intent.summary}
            return _card_op("PATCH", f"{_CARDS}/{_seg(intent.card_id)}/settings", "cardkit.card.settings", intent,
                            {"settings": _as_string({"config": config})}, sequence)
        case CardUpdate():
            return _card_op("PUT", f"{_CARDS}/{_seg(intent.card_id)}", "cardkit.card.update", intent,
                            {"card": {"type": "card_json", "data": _card_data(intent.card)}}, sequence)
        case ImageUpload() | FileUpload():
            return _upload_call(intent)
        case MessageSend():
            if intent.content is None:
                raise ValueError(f"{intent.id}: a message.send with upload is sent once uploaded (relay.media)")
            return _call(
                "POST", _MESSAGES, "im.message.create", query={"receive_id_type": intent.receive_id_type},
                body={"receive_id": intent.receive_id, "msg_type": intent.msg_type,
                      "content": _as_string(intent.content), "uuid": intent.id},
                target=recipient(intent.receive_id_type, intent.receive_id), target_windows=PER_TARGET, uuid=True,
                repeatable=True, learns=True,
            )
        case MessageReply():
            return _call(
                "POST", f"{_MESSAGES}/{_seg(intent.message_id)}/reply", "im.message.reply",
                body={"content": _as_string(intent.content), "msg_type": intent.msg_type,
                      "reply_in_thread": intent.reply_in_thread, "uuid": intent.id},
                target=f"chat:{intent.chat_id}" if intent.chat_id else f"reply:{intent.message_id}",
                target_windows=PER_TARGET, uuid=True, repeatable=True, learns=True,
            )
        case MessageEdit():
            return _call("PUT", f"{_MESSAGES}/{_seg(intent.message_id)}", "im.message.update", repeatable=True,
                         body={"msg_type": intent.msg_type, "content": _as_string(intent.content)})
        case MessageRecall():
            return _call("DELETE", f"{_MESSAGES}/{_seg(intent.message_id)}", "im.message.delete", repeatable=True)
        case MessageForward():
            return _call(
                "POST", f"{_MESSAGES}/{_seg(intent.message_id)}/forward", "im.message.forward",
                query={"receive_id_type": intent.receive_id_type, "uuid": intent.id},
                body={"receive_id": intent.receive_id},
                target=recipient(intent.receive_id_type, intent.receive_id), target_windows=PER_TARGET, uuid=True,
                repeatable=True, learns=True,
            )
        case CardPatch():
            return _call("PATCH", f"{_MESSAGES}/{_seg(intent.message_id)}", "im.message.patch", repeatable=True,
                         body={"content": _as_string(intent.content)},
                         target=f"message:{intent.message_id}", target_windows=PER_TARGET)
        case MessageUrgent():
            return _call("PATCH", f"{_MESSAGES}/{_seg(intent.message_id)}/urgent_{intent.channel}",
                         f"im.message.urgent_{intent.channel}", repeatable=False,
                         query={"user_id_type": intent.user_id_type},
                         body={"user_id_list": intent.user_id_list})
        case ReactionAdd():
            return _call("POST", f"{_MESSAGES}/{_seg(intent.message_id)}/reactions", "im.message_reaction.create",
                         repeatable=False, body={"reaction_type": {"emoji_type": intent.emoji_type}})
        case ReactionRemove():
            return _call("DELETE", f"{_MESSAGES}/{_seg(intent.message_id)}/reactions/{_seg(intent.reaction_id)}",
                         "im.message_reaction.delete", repeatable=True)
        case PinAdd():
            return _call("POST", "/open-apis/im/v1/pins", "im.pin.create", repeatable=True,
                         body={"message_id": intent.message_id},
                         target=f"message:{intent.message_id}", target_windows=PER_TARGET)
        case PinRemove():
            return _call("DELETE", f"/open-apis/im/v1/pins/{_seg(intent.message_id)}", "im.pin.delete", repeatable=True,
                         target=f"message:{intent.message_id}", target_windows=PER_TARGET)
        case CardDelayUpdate():
            return _call("POST", "/open-apis/interactive/v1/card/update", "interactive.card.update",
                         repeatable=False, body={"token": intent.token, "card": _as_object(intent.card)})
        case EphemeralSend():
            return _call("POST", "/open-apis/ephemeral/v1/send", "ephemeral.send", repeatable=False,
                         body={"chat_id": intent.chat_id, "open_id": intent.open_id, "msg_type": "interactive",
                               "card": _as_object(intent.card)},
                         target=f"ephemeral-chat:{intent.chat_id}", target_windows=EPHEMERAL_CHAT)
        case EphemeralDelete():
            return _call("POST", "/open-apis/ephemeral/v1/delete", "ephemeral.delete", repeatable=True,
                         body={"message_id": intent.message_id})
        case UrlPreviewUpdate():
            return url_preview_call(intent.preview_tokens, intent.open_ids)
        case ChatButtonUpdate():
            return _chat_button_call(intent)
        case MessageBatchSend():
            return _batch_send_call(intent)
        case ApiCall():
            return _api_call(intent)


def _chat_button_call(intent: ChatButtonUpdate) -> Call:
    """PUT /open-apis/im/v2/chat_button (docs/feishu-rules.md §5.5); unset optionals are left out."""
    body: dict[str, Any] = {"chat_id": intent.chat_id}
    if intent.user_ids is not None:
        body["user_ids"] = intent.user_ids
    if intent.buttons is not None:
        body["buttons"] = intent.buttons  # structs with omit_defaults: Feishu's nesting, no nulls
    return _call("PUT", "/open-apis/im/v2/chat_button", "im.chat_button.update", repeatable=True,
                 query={"user_id_type": intent.user_id_type}, body=body)


def _batch_send_call(intent: MessageBatchSend) -> Call:
    """POST /open-apis/message/v4/batch_send/ (trailing slash as documented); content/card as objects."""
    body: dict[str, Any] = {"msg_type": intent.msg_type}
    if intent.card is not None:
        body["card"] = _as_object(intent.card)
    if intent.content is not None:
        body["content"] = _as_object(intent.content)
    for name in ("open_ids", "user_ids", "union_ids", "department_ids"):
        if ids := getattr(intent, name):
            body[name] = ids
    return _call("POST", "/open-apis/message/v4/batch_send/", "message.batch_send", body=body, repeatable=False)


# --- api.call ------------------------------------------------------------------------------------------------

# How a built-in API's target is read from an api.call to it (module doc): "receive" = query receive_id_type and
# body receive_id, "reply"/"message"/"card" = the first path parameter, "pin" = body message_id, "ephemeral" =
# body chat_id.
TargetFrom = Literal["receive", "reply", "message", "pin", "ephemeral", "card"]


class Route(msgspec.Struct, frozen=True):
    """A built-in API as Feishu routes it: ``method`` and ``path`` (a ``:`` segment matches any value)."""

    method: str
    path: str
    api: str
    target: TargetFrom | None = None
    learns: bool = False


# Every built-in call above, by method and path; url_previews/batch_update is not here: an api.call to it is
# refused at decode (relay.intents), its 1 update per 5 s per token is kept only by url_preview.update.
ROUTES: Final = (
    Route("POST", f"{_MESSAGES}", "im.message.create", "receive", learns=True),
    Route("POST", f"{_MESSAGES}/:/reply", "im.message.reply", "reply", learns=True),
    Route("PUT", f"{_MESSAGES}/:", "im.message.update"),
    Route("DELETE", f"{_MESSAGES}/:", "im.message.delete"),
    Route("POST", f"{_MESSAGES}/:/forward", "im.message.forward", "receive", learns=True),
    Route("PATCH", f"{_MESSAGES}/:", "im.message.patch", "message"),
    Route("PATCH", f"{_MESSAGES}/:/urgent_app", "im.message.urgent_app"),
    Route("PATCH", f"{_MESSAGES}/:/urgent_sms", "im.message.urgent_sms"),
    Route("PATCH", f"{_MESSAGES}/:/urgent_phone", "im.message.urgent_phone"),
    Route("POST", f"{_MESSAGES}/:/reactions", "im.message_reaction.create"),
    Route("DELETE", f"{_MESSAGES}/:/reactions/:", "im.message_reaction.delete"),
    Route("POST", "/open-apis/im/v1/pins", "im.pin.create", "pin"),
    Route("DELETE", "/open-apis/im/v1/pins/:", "im.pin.delete", "message"),
    Route("POST", "/open-apis/interactive/v1/card/update", "interactive.card.update"),
    Route("POST", "/open-apis/ephemeral/v1/send", "ephemeral.send", "ephemeral"),
    Route("POST", "/open-apis/ephemeral/v1/delete", "ephemeral.delete"),
    Route("PUT", "/open-apis/im/v2/chat_button", "im.chat_button.update"),
    Route("POST", "/open-apis/message/v4/batch_send", "message.batch_send"),
    Route("POST", _CARDS, "cardkit.card.create"),
    Route("PUT", f"{_CARDS}/:/elements/:/content", "cardkit.card_element.content", "card"),
    Route("PATCH", f"{_CARDS}/:/settings", "cardkit.card.settings", "card"),
    Route("PUT", f"{_CARDS}/:", "cardkit.card.update", "card"),
    Route("POST", "/open-apis/im/v1/images", "im.image.create"),
    Route("POST", "/open-apis/im/v1/files", "im.file.create"),
)

# A literal path segment that is a Feishu id, not a word of the API's path: message om_, chat oc_, open_id ou_,
# union_id on_, thread omt_, department od-, app cli_, batch message bm-, image/file keys, all digits, an email.
LITERAL_ID: Final = re.compile(r"^(?:om|oc|ou|on|omt|od|cli|bm|img|file)[_-]|^\d+$|@")


def _segments(path: str) -> list[str]:
    """The percent-decoded segments after ``/open-apis/``, a trailing slash ignored."""
    rest = path.removeprefix("/open-apis/")
    if rest.endswith("/"):
        rest = rest[:-1]
    return [unquote(segment) for segment in rest.split("/")]


def _shape(path: str) -> tuple[str, ...]:
    return tuple(segment if segment != ":" else "" for segment in _segments(path))


_ROUTES: Final[dict[tuple[str, int], list[tuple[tuple[str, ...], Route]]]] = {}
for _route in ROUTES:
    _ROUTES.setdefault((_route.method, len(_shape(_route.path))), []).append((_shape(_route.path), _route))


def _match(method: str, path: str) -> tuple[Route, list[str]] | None:
    """The built-in route ``method path`` (a filled path) is, and the values in its ``:`` segments."""
    segments = _segments(path)
    for shape, route in _ROUTES.get((method, len(segments)), ()):
        if all(want == "" or want == got for want, got in zip(shape, segments, strict=True)):
            return route, [got for want, got in zip(shape, segments, strict=True) if want == ""]
    return None


def api_name(method: str, template: str) -> str:
    """``api:<METHOD> <template>`` with every ``:param`` and every literal Feishu id written ``:``."""
    segments = [":" if segment.startswith(":") or LITERAL_ID.search(segment) else segment
                for segment in _segments(template)]
    return f"api:{method} /open-apis/{'/'.join(segments)}"


def _text(value: Any, name: str) -> str | None:
    found = value.get(name) if isinstance(value, dict) else None
    return found if isinstance(found, str) and found else None


def _route_target(route: Route, values: list[str], query: dict[str, str], body: Any) -> str | None:
    """The built-in's per-target key as this api.call names it, or None when it does not (Feishu refuses it)."""
    match route.target:
        case "receive":
            id_type, receive_id = query.get("receive_id_type"), _text(body, "receive_id")
            return recipient(id_type, receive_id) if id_type and receive_id else None
        case "reply":
            return f"reply:{values[0]}"
        case "message":
            return f"message:{values[0]}"
        case "card":
            return f"card:{values[0]}"
        case "pin":
            message_id = _text(body, "message_id")
            return f"message:{message_id}" if message_id else None
        case "ephemeral":
            chat_id = _text(body, "chat_id")
            return f"ephemeral-chat:{chat_id}" if chat_id else None
        case None:
            return None


def _api_call(intent: ApiCall) -> Call:
    """Any endpoint at the intent's ``rate`` (per_second → Window(n, 1 s), per_minute → Window(n, 60 s)); a
    built-in API's buckets and target when the call is one (module doc)."""
    windows: list[Window] = []
    if intent.rate.per_second is not None:
        windows.append(Window(intent.rate.per_second, 1))
    if intent.rate.per_minute is not None:
        windows.append(Window(intent.rate.per_minute, 60))
    path = intent.filled_path
    body = None if intent.body is None else _json(intent.body)
    repeatable = intent.method in IDEMPOTENT_METHODS
    matched = _match(intent.method, path)
    if matched is None:
        return Call(method=intent.method, path=path, query=dict(intent.query), body=body,
                    api=api_name(intent.method, intent.path), api_windows=tuple(windows), repeatable=repeatable)
    route, values = matched
    target = _route_target(route, values, intent.query, intent.body)
    target_windows = {"ephemeral": EPHEMERAL_CHAT, "card": PER_CARD}.get(route.target or "", PER_TARGET) \
        if target else ()
    return Call(method=intent.method, path=path, query=dict(intent.query), body=body, api=route.api,
                api_windows=stricter(API_WINDOWS[route.api], windows), target=target,
                target_windows=target_windows, learns=route.learns, repeatable=repeatable)
