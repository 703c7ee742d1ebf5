"""The Feishu request bodies the sandbox accepts: one lenient struct per endpoint, each documented rule in the type.

Unknown fields are ignored, as at Feishu; every limit is written next to its field with the doc it came from
(docs/feishu-rules.md, and the Open Platform pages named in each class comment). A body that
breaks a rule fails once, at ``msgspec.convert``, with a message naming the field; :mod:`relay.sandbox.server` answers
it with 230001.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

_JSON_OBJECT = msgspec.json.Decoder(dict[str, Any])


def _json_object(content: str) -> None:
    """The ``content`` rule of the message APIs: a JSON string encoding an object."""
    try:
        _JSON_OBJECT.decode(content)
    except msgspec.DecodeError:
        raise ValueError("`$.content` must be a JSON string encoding an object") from None


NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
Uuid = Annotated[str, msgspec.Meta(max_length=50)]  # docs/feishu-rules.md §3: uuid ≤ 50 chars
MsgType = Literal["text", "post", "image", "file", "audio", "media", "sticker", "interactive",
                  "share_chat", "share_user", "system"]
# docs/feishu-rules.md §5.5: https, ≤ 700
HttpsUrl = Annotated[str, msgspec.Meta(pattern=r"^https://", max_length=700)]


class AuthBody(msgspec.Struct):
    app_id: str = ""
    app_secret: str = ""


class AppTokenBody(AuthBody):  # auth-v3/auth/app_access_token (store apps)
    app_ticket: str = ""


class SendBody(msgspec.Struct):  # LO:server-docs/im-v1/message/create.md
    receive_id: NonEmpty
    msg_type: MsgType
    content: str
    uuid: Uuid | None = None

    def __post_init__(self) -> None:
        _json_object(self.content)


class ReplyBody(msgspec.Struct):  # .../message/reply.md
    msg_type: MsgType
    content: str
    reply_in_thread: bool = False
    uuid: Uuid | None = None

    def __post_init__(self) -> None:
        _json_object(self.content)


class EditBody(msgspec.Struct):  # .../message/update.md: text and post only
    msg_type: Literal["text", "post"]
    content: str

    def __post_init__(self) -> None:
        _json_object(self.content)


class ForwardBody(msgspec.Struct):  # .../message/forward.md
    receive_id: NonEmpty


class PatchBody(msgspec.Struct):  # .../message/patch.md
    content: str

    def __post_init__(self) -> None:
        _json_object(self.content)


class UrgentBody(msgspec.Struct):  # .../message/urgent_app.md
    user_id_list: Annotated[list[NonEmpty], msgspec.Meta(min_length=1)]


class ReactionType(msgspec.Struct):
    emoji_type: NonEmpty


class ReactionBody(msgspec.Struct):  # .../message-reaction/create.md
    reaction_type: ReactionType


class PinBody(msgspec.Struct):  # .../pin/create.md
    message_id: NonEmpty


class CardUpdateBody(msgspec.Struct):  # interactive/v1/card/update
    token: NonEmpty
    card: dict[str, Any]


class EphemeralSendBody(msgspec.Struct):  # ephemeral/v1/send: card messages in group chats
    chat_id: NonEmpty
    msg_type: Literal["interactive"]
    card: dict[str, Any]
    open_id: str | None = None
    user_id: str | None = None
    email: str | None = None

    def __post_init__(self) -> None:
        if not (self.open_id or self.user_id or self.email):
            raise ValueError("one of `$.open_id`, `$.user_id`, `$.email` is required")


class EphemeralDeleteBody(msgspec.Struct):
    message_id: NonEmpty


class UrlPreviewBody(msgspec.Struct):  # docs/feishu-rules.md §5.4
    preview_tokens: Annotated[list[NonEmpty], msgspec.Meta(min_length=1, max_length=10)]
    open_ids: Annotated[list[str], msgspec.Meta(max_length=100)] = msgspec.field(default_factory=list)


class ButtonUrls(msgspec.Struct):  # docs/feishu-rules.md §5.5: open_app_feed_card_url
    url: HttpsUrl | None = None
    android_url: HttpsUrl | None = None
    ios_url: HttpsUrl | None = None
    pc_url: HttpsUrl | None = None


class ButtonText(msgspec.Struct):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=30)]  # docs/feishu-rules.md §5.5: 1..30 characters


class Button(msgspec.Struct):  # docs/feishu-rules.md §5.5: open_app_feed_card_button
    action_type: Literal["url_page", "webhook"]
    text: ButtonText
    multi_url: ButtonUrls | None = None
    button_type: Literal["default", "primary", "success"] = "default"
    action_map: dict[str, str] | None = None


class Buttons(msgspec.Struct):
    buttons: Annotated[list[Button], msgspec.Meta(max_length=2)]  # docs/feishu-rules.md §5.5: 0..2


class ChatButtonBody(msgspec.Struct):  # docs/feishu-rules.md §5.5
    chat_id: NonEmpty
    user_ids: Annotated[list[str], msgspec.Meta(min_length=1, max_length=20)] | None = None
    buttons: Buttons | None = None


class BatchSendBody(msgspec.Struct):  # message/v4/batch_send
    msg_type: NonEmpty
    content: dict[str, Any] | None = None
    card: dict[str, Any] | None = None
    open_ids: list[str] = msgspec.field(default_factory=list)
    user_ids: list[str] = msgspec.field(default_factory=list)
    union_ids: list[str] = msgspec.field(default_factory=list)
    department_ids: Annotated[list[str], msgspec.Meta(max_length=200)] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.content is None and self.card is None:
            raise ValueError("one of `$.content`, `$.card` is required")
        if not (self.open_ids or self.user_ids or self.union_ids or self.department_ids):
            raise ValueError("no recipients (`$.open_ids`, `$.user_ids`, `$.union_ids`, `$.department_ids`)")


# --- CardKit v1 (docs/feishu-rules.md §5.7: card/create, card-element/content, card/settings, card/update) ----

# card-element/content: sequence "正整数 ... 取值范围为 int32 范围内的值"; uuid 1..64
Sequence = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
CardUuid = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class CardCreateBody(msgspec.Struct):  # cardkit-v1/card/create
    type: Literal["card_json", "template"]
    data: NonEmpty


class CardContentBody(msgspec.Struct):  # cardkit-v1/card-element/content: content 1..100000
    content: Annotated[str, msgspec.Meta(min_length=1, max_length=100_000)]
    sequence: Sequence
    uuid: CardUuid | None = None


class CardSettingsBody(msgspec.Struct):  # cardkit-v1/card/settings: settings is a JSON string
    settings: NonEmpty
    sequence: Sequence
    uuid: CardUuid | None = None


class CardJson(msgspec.Struct):
    type: Literal["card_json"]
    data: NonEmpty


class CardEntityBody(msgspec.Struct):  # cardkit-v1/card/update
    card: CardJson
    sequence: Sequence
    uuid: CardUuid | None = None
