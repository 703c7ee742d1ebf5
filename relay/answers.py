"""The answers Feishu takes to a callback, checked before they go out (pure, no I/O).

A service answers a callback (``relay.replies``) with the JSON Feishu expects in the HTTP response. The relay
forwards the bytes the service wrote, unchanged, once they decode as one of these shapes; anything else becomes
the fallback answer (:func:`fallback`) with a one-line reason, because Feishu shows the user an error for a
wrong answer (200673 "returned a wrong card") and never asks again.

    card.action.trigger   {"toast": Toast?, "card": Card?}          (either optional; {} = no change)
    url.preview.get       {"inline": Inline?, "card": Card?}
    other callback types  any JSON object

Shapes follow the SDK models (Go ``CardActionTriggerResponse`` / ``URLPreviewGetResponse``; the Python SDK's
``v2_new_callback`` branch; docs/feishu-rules.md). The envelope members are strict (an unknown member such as
``"tost"`` is a mistake, not a new Feishu field the relay should let through), the card's own JSON is not read
beyond being an object: Feishu owns that schema. The whole answer is capped at ``inbound.max_answer_bytes``
(default 30 KiB: a card may be at most 30 KB, docs/feishu-rules.md §5.1).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

CARD_ACTION: Final = "card.action.trigger"
URL_PREVIEW: Final = "url.preview.get"

ToastType = Literal["info", "success", "error", "warning"]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    pass


class Toast(_Strict, frozen=True):
    """``toast``: a short message shown to the clicking user. ``content`` or ``i18n`` (the SDKs make both
    optional; a toast with neither shows nothing, so one of them is required here)."""

    type: ToastType
    content: Annotated[str, Meta(min_length=1)] | None = None
    i18n: dict[str, str] | None = None  # zh_cn, en_us, ja_jp...: a map, Feishu adds languages

    def __post_init__(self) -> None:
        if self.content is None and not self.i18n:
            raise ValueError("toast: needs content or i18n")


class TemplateData(_Strict, frozen=True):
    """``card.data`` of a ``template`` card: a card built in the card builder, filled with variables."""

    template_id: Annotated[str, Meta(min_length=1)]
    template_variable: dict[str, Any] | None = None
    template_version_name: str | None = None


class RawCard(_Strict, frozen=True, tag="raw", tag_field="type"):
    """``{"type": "raw", "data": <card JSON object>}``: the card that replaces the clicked one."""

    data: dict[str, Any]


class TemplateCard(_Strict, frozen=True, tag="template", tag_field="type"):
    """``{"type": "template", "data": {"template_id", ...}}``."""

    data: TemplateData


Card = RawCard | TemplateCard


class PreviewUrl(_Strict, frozen=True):
    """``inline.url``: where the preview opens, per platform."""

    copy_url: str | None = None
    ios: str | None = None
    android: str | None = None
    pc: str | None = None
    web: str | None = None


class Inline(_Strict, frozen=True):
    """``inline``: the one-line preview of a link (title, optional icon)."""

    title: str | None = None
    i18n_title: dict[str, str] | None = None
    image_key: str | None = None
    url: PreviewUrl | None = None

    def __post_init__(self) -> None:
        if not self.title and not self.i18n_title:
            raise ValueError("inline: needs title or i18n_title")


class CardActionAnswer(_Strict, frozen=True):
    """The answer to ``card.action.trigger``."""

    toast: Toast | None = None
    card: Card | None = None


class PreviewAnswer(_Strict, frozen=True):
    """The answer to ``url.preview.get``."""

    inline: Inline | None = None
    card: Card | None = None


_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    CARD_ACTION: msgspec.json.Decoder(CardActionAnswer),
    URL_PREVIEW: msgspec.json.Decoder(PreviewAnswer),
}
_ANY_OBJECT: Final = msgspec.json.Decoder(dict[str, Any])
_encoder: Final = msgspec.json.Encoder()


class Malformed(Exception):
    """An answer the relay will not send; ``reason`` is one line (a JSON path and what was wrong, no body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_answer(event_type: str, answer: bytes, max_bytes: int) -> bytes:
    """``answer`` unchanged when it is a valid answer to ``event_type`` within ``max_bytes``; else
    :class:`Malformed` naming what was wrong."""
    if len(answer) > max_bytes:
        raise Malformed(f"too_large: {len(answer)} bytes (inbound.max_answer_bytes = {max_bytes})")
    decoder = _DECODERS.get(event_type, _ANY_OBJECT)
    try:
        decoder.decode(answer)
    except msgspec.ValidationError as err:
        raise Malformed(f"shape: {err}") from None
    except msgspec.DecodeError:
        raise Malformed("json: not a JSON document") from None
    return answer


def fallback(event_type: str, toast: str, toast_type: ToastType) -> bytes:
    """The answer when no valid one came: ``{}`` (no change), or for a card click with ``toast`` configured,
    that toast (so the user knows the click was received)."""
    if event_type == CARD_ACTION and toast:
        return _encoder.encode(CardActionAnswer(toast=Toast(type=toast_type, content=toast)))
    return b"{}"
