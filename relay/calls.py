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
    CardDelayUpdate,
    CardPatch,
    ChatButtonUpdate,
    Content,
    EphemeralDelete,
    EphemeralSend,
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
    UrlPreviewUpdate,
)

__all__ = [
    "API_WINDOWS",
    "LITERAL_ID",
    "PREVIEW_TOKEN_WINDOWS",
    "ROUTES",
    "Call",
    "Route",
    "api_name",
    "build_call",
    "check_share",
    "recipient",
    "url_preview_call",
]


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """One HTTP request to Feishu, fully decided. ``path`` is filled and quoted; ``body`` is the exact bytes."""

    method: str
    path: str
    query: dict[str, str] = msgspec.field(default_factory=dict)
    body: bytes | None = None
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


def build_call(intent: Intent) -> Call:
    """The one HTTP call that performs ``intent`` (docs/intents.md, the kinds table)."""
    match intent:
        case MessageSend():
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
# body receive_id, "reply"/"message" = the first path parameter, "pin" = body message_id, "ephemeral" = body chat_id.
TargetFrom = Literal["receive", "reply", "message", "pin", "ephemeral"]


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
    target_windows = (EPHEMERAL_CHAT if route.target == "ephemeral" else PER_TARGET) if target else ()
    return Call(method=intent.method, path=path, query=dict(intent.query), body=body, api=route.api,
                api_windows=stricter(API_WINDOWS[route.api], windows), target=target,
                target_windows=target_windows, learns=route.learns, repeatable=repeatable)
