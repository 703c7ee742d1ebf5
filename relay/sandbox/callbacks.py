"""How Feishu judges the answer to a callback it sent, as the user would see it (pure: the referee's rules).

Feishu posts ``card.action.trigger`` and ``url.preview.get`` and waits 3 s for the HTTP answer; it never asks
again. What the clicking user sees (codes from docs/feishu-rules.md and the callback pages; the sandbox uses
one code per kind of failure, the "-style" of the name):

    code     when                                                            what the user sees
    0        HTTP 200 within 3 s with an answer of the right shape           the toast / new card / preview
    200671   no answer within 3 s, a status other than 200, or a body that   "no valid response" error toast
             is not a JSON object
    200673   a JSON object of the wrong shape: an unknown member, a toast    "returned a wrong card" error
             without type or text, a card that is neither ``raw`` with an
             object nor ``template`` with a ``template_id``

Not judged: the card JSON itself. A third-party report has Feishu refuse a JSON 2.0 card sent as ``raw`` (the
SDK models take a 1.0 card there); unconfirmed, so neither the sandbox nor the relay refuses one.

These rules are written here from the documented shapes on purpose, not imported from ``relay.answers``: the
sandbox is the referee of the relay's answers, so it does not share their code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

DEADLINE: Final = 3.0  # seconds Feishu waits for the answer
NO_VALID_ANSWER: Final = 200671
WRONG_ANSWER: Final = 200673

_TOAST_TYPES: Final = frozenset({"info", "success", "error", "warning"})
_MEMBERS: Final[dict[str, frozenset[str]]] = {
    "card.action.trigger": frozenset({"toast", "card"}),
    "url.preview.get": frozenset({"inline", "card"}),
}
_URL_KEYS: Final = frozenset({"copy_url", "ios", "android", "pc", "web"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """``code`` 0 when Feishu would take the answer; else the error code the user gets and why (one line)."""

    code: int
    why: str

    @property
    def ok(self) -> bool:
        return self.code == 0


def _card_problem(card: Any) -> str | None:
    if not isinstance(card, dict) or set(card) - {"type", "data"}:
        return "card: an object of type and data"
    data = card.get("data")
    if card.get("type") == "raw":
        return None if isinstance(data, dict) else "card.data: a raw card is a JSON object"
    if card.get("type") == "template":
        if not isinstance(data, dict) or not isinstance(data.get("template_id"), str) or not data["template_id"]:
            return "card.data.template_id: required for a template card"
        return None
    return "card.type: raw or template"


def _toast_problem(toast: Any) -> str | None:
    if not isinstance(toast, dict) or toast.get("type") not in _TOAST_TYPES:
        return "toast.type: info, success, error or warning"
    if not toast.get("content") and not toast.get("i18n"):
        return "toast: content or i18n"
    return None


def _inline_problem(inline: Any) -> str | None:
    if not isinstance(inline, dict) or not (inline.get("title") or inline.get("i18n_title")):
        return "inline: title or i18n_title"
    url = inline.get("url")
    if url is not None and (not isinstance(url, dict) or set(url) - _URL_KEYS):
        return "inline.url: copy_url, ios, android, pc, web"
    return None


def shape_problem(event_type: str, answer: dict[str, Any]) -> str | None:
    """What is wrong with the answer's shape, or None."""
    allowed = _MEMBERS.get(event_type)
    if allowed is None:
        return None  # a callback type with no documented answer: any object
    unknown = sorted(set(answer) - allowed)
    if unknown:
        return f"unknown member {unknown[0]!r}"
    checks = {"toast": _toast_problem, "card": _card_problem, "inline": _inline_problem}
    for member, value in answer.items():
        problem = checks[member](value)
        if problem:
            return problem
    return None


def judge(event_type: str, status: int, body: bytes, elapsed: float) -> Verdict:
    """Feishu's verdict on one answer: ``status`` and ``body`` of the HTTP response, ``elapsed`` seconds after
    the request was sent."""
    if elapsed > DEADLINE:
        return Verdict(NO_VALID_ANSWER, f"answered after {elapsed:.2f} s (Feishu waits {DEADLINE:g} s)")
    if status != 200:
        return Verdict(NO_VALID_ANSWER, f"HTTP {status}")
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return Verdict(NO_VALID_ANSWER, "the body is not JSON")
    if not isinstance(answer, dict):
        return Verdict(NO_VALID_ANSWER, "the body is not a JSON object")
    problem = shape_problem(event_type, answer)
    if problem:
        return Verdict(WRONG_ANSWER, problem)
    return Verdict(0, "ok")
