"""CardKit card entities as Feishu keeps them, for the sandbox: sequence, streaming mode, elements (pure).

docs/feishu-rules.md §5.7; what each operation checks, in this order (a refusal is a :class:`CardRefused`):

    the card exists and was created by this app        else 230099 (invalid card_id; the send page's code)
    the same ``uuid`` on this card was performed       answered again, not performed (相同批次的操作只进行一次)
    ``sequence`` > the card's last accepted one         else 300317 "sequence number compare failed" (one
                                                         counter per card, shared by every operation)
    content updates only: streaming mode is open       else 300309 "streaming mode is closed": closed by
                                                         settings, or ``streaming_window`` (10 min) after it
                                                         was last opened
    content updates only: the element exists          else 300313 (element not found)

Creating takes JSON 2.0 cards only and refuses ``update_multi: false`` (230001); ``config.streaming_mode: true``
opens streaming mode at creation. A card entity can be sent once (a second send: 230099). Times are the
sandbox clock; ``streaming_window`` is already scaled by the caller.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import msgspec

__all__ = ["CardEntity", "CardRefused", "Cards"]

_JSON = msgspec.json.Decoder()


class CardRefused(Exception):
    """Feishu's answer ``code`` (and its message) instead of the operation."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(code)
        self.code = code
        self.msg = msg


class CardEntity(msgspec.Struct, kw_only=True):
    card_id: str
    app_id: str
    card: dict[str, Any]
    elements: set[str] | None  # None: a template card, whose elements the sandbox does not know
    texts: dict[str, str] = msgspec.field(default_factory=dict)  # element_id -> the last streamed text
    streaming: bool = False
    opened_at: float | None = None
    sequence: int = 0  # the last accepted
    sequences: list[int] = msgspec.field(default_factory=list)  # every accepted, in order (for tests)
    uuids: set[str] = msgspec.field(default_factory=set)
    sent: bool = False
    summary: str | None = None


def _element_ids(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        element_id = node.get("element_id")
        if isinstance(element_id, str):
            yield element_id
        for value in node.values():
            yield from _element_ids(value)
    elif isinstance(node, list):
        for value in node:
            yield from _element_ids(value)


def _card_json(data: str) -> dict[str, Any]:
    try:
        card = _JSON.decode(data)
    except msgspec.DecodeError:
        raise CardRefused(230001, "param is invalid: data is not a JSON string") from None
    if not isinstance(card, dict):
        raise CardRefused(230001, "param is invalid: data must encode a JSON object")
    if card.get("schema") != "2.0":
        raise CardRefused(230001, "param is invalid: CardKit takes card JSON 2.0 only")
    config = card.get("config")
    if isinstance(config, dict) and config.get("update_multi") is False:
        raise CardRefused(230001, "param is invalid: update_multi=false is not supported")
    return card


class Cards:
    """Every card entity the sandbox created, by ``card_id``."""

    def __init__(self, streaming_window: float) -> None:
        self.streaming_window = streaming_window
        self.by_id: dict[str, CardEntity] = {}
        self._ids = itertools.count(7_355_372_766_134_157_313)

    def clear(self) -> None:
        self.by_id.clear()

    def create(self, app_id: str, kind: str, data: str, now: float) -> CardEntity:
        if kind == "card_json":
            card = _card_json(data)
            elements: set[str] | None = set(_element_ids(card.get("body", card.get("elements"))))
        elif kind == "template":
            card, elements = {"template": data}, None
        else:
            raise CardRefused(230001, "param is invalid: type must be card_json or template")
        entity = CardEntity(card_id=str(next(self._ids)), app_id=app_id, card=card, elements=elements)
        config = card.get("config")
        if isinstance(config, dict) and config.get("streaming_mode") is True:
            entity.streaming, entity.opened_at = True, now
        self.by_id[entity.card_id] = entity
        return entity

    def _entity(self, app_id: str, card_id: str) -> CardEntity:
        entity = self.by_id.get(card_id)
        if entity is None or entity.app_id != app_id:
            raise CardRefused(230099, "invalid card_id")
        return entity

    def _sequenced(self, app_id: str, card_id: str, sequence: int, uuid: str | None) -> CardEntity | None:
        """The entity when the operation must be performed; None when its uuid was (answer, don't perform)."""
        entity = self._entity(app_id, card_id)
        if uuid is not None and uuid in entity.uuids:
            return None
        if sequence <= entity.sequence:
            raise CardRefused(300317, f"sequence number compare failed: {sequence} after {entity.sequence}")
        return entity

    def _accept(self, entity: CardEntity, sequence: int, uuid: str | None) -> None:
        entity.sequence = sequence
        entity.sequences.append(sequence)
        if uuid is not None:
            entity.uuids.add(uuid)

    def streaming_open(self, entity: CardEntity, now: float) -> bool:
        if entity.streaming and entity.opened_at is not None and now - entity.opened_at >= self.streaming_window:
            entity.streaming = False  # Feishu closes it 10 min after it was opened
        return entity.streaming

    def content(self, app_id: str, card_id: str, element_id: str, text: str, sequence: int, uuid: str | None,
                now: float) -> bool:
        """Stream ``text`` into the element; False when answered from the uuid (not performed)."""
        entity = self._sequenced(app_id, card_id, sequence, uuid)
        if entity is None:
            return False
        if not self.streaming_open(entity, now):
            raise CardRefused(300309, "streaming mode is closed")
        if entity.elements is not None and element_id not in entity.elements:
            raise CardRefused(300313, f"element {element_id} not found")
        entity.texts[element_id] = text
        self._accept(entity, sequence, uuid)
        return True

    def settings(self, app_id: str, card_id: str, settings: str, sequence: int, uuid: str | None,
                 now: float) -> bool:
        entity = self._sequenced(app_id, card_id, sequence, uuid)
        if entity is None:
            return False
        try:
            parsed = _JSON.decode(settings)
        except msgspec.DecodeError:
            raise CardRefused(230001, "param is invalid: settings is not a JSON string") from None
        config = parsed.get("config") if isinstance(parsed, dict) else None
        if isinstance(config, dict):
            if config.get("streaming_mode") is True:
                entity.streaming, entity.opened_at = True, now  # a new 10 minutes
            elif config.get("streaming_mode") is False:
                entity.streaming = False
            summary = config.get("summary")
            if isinstance(summary, dict) and isinstance(summary.get("content"), str):
                entity.summary = summary["content"]
        self._accept(entity, sequence, uuid)
        return True

    def update(self, app_id: str, card_id: str, kind: str, data: str, sequence: int, uuid: str | None) -> bool:
        entity = self._sequenced(app_id, card_id, sequence, uuid)
        if entity is None:
            return False
        if kind != "card_json":
            raise CardRefused(230001, "param is invalid: card.type must be card_json")
        entity.card = _card_json(data)
        entity.elements = set(_element_ids(entity.card.get("body", entity.card.get("elements"))))
        self._accept(entity, sequence, uuid)
        return True

    def send(self, app_id: str, card_id: str) -> None:
        """A message.send of the entity: once only."""
        entity = self._entity(app_id, card_id)
        if entity.sent:
            raise CardRefused(230099, "the card entity was sent already")
        entity.sent = True
