"""Feishu's verdict on a callback's answer, as the sandbox gives it: the deadline, the status, the shapes."""

from __future__ import annotations

import pytest

from relay.sandbox.callbacks import NO_VALID_ANSWER, WRONG_ANSWER, judge

CLICK, PREVIEW = "card.action.trigger", "url.preview.get"


@pytest.mark.parametrize(("event_type", "body"), [
    (CLICK, b"{}"),
    (CLICK, b'{"toast":{"type":"success","content":"ok"}}'),
    (CLICK, b'{"toast":{"type":"info","i18n":{"en_us":"ok"}},"card":{"type":"raw","data":{"elements":[]}}}'),
    (CLICK, b'{"card":{"type":"template","data":{"template_id":"AAq1","template_variable":{}}}}'),
    (PREVIEW, b'{"inline":{"title":"Order 1841","url":{"pc":"https://e.x/1"}}}'),
    ("other.callback", b'{"x":1}'),
])
def test_answers_feishu_takes(event_type: str, body: bytes) -> None:
    assert judge(event_type, 200, body, 0.2).ok


@pytest.mark.parametrize(("status", "body", "elapsed", "code", "why"), [
    (200, b"{}", 3.01, NO_VALID_ANSWER, "after 3.01 s"),
    (500, b'{"msg":"boom"}', 0.1, NO_VALID_ANSWER, "HTTP 500"),
    (503, b"{}", 0.1, NO_VALID_ANSWER, "HTTP 503"),
    (200, b"success", 0.1, NO_VALID_ANSWER, "not JSON"),
    (200, b"[]", 0.1, NO_VALID_ANSWER, "not a JSON object"),
    (200, b'{"tost":{}}', 0.1, WRONG_ANSWER, "unknown member 'tost'"),
    (200, b'{"toast":{"type":"loud","content":"x"}}', 0.1, WRONG_ANSWER, "toast.type"),
    (200, b'{"toast":{"type":"info"}}', 0.1, WRONG_ANSWER, "toast: content or i18n"),
    (200, b'{"card":{"type":"raw","data":"{}"}}', 0.1, WRONG_ANSWER, "card.data"),
    (200, b'{"card":{"type":"template","data":{}}}', 0.1, WRONG_ANSWER, "template_id"),
    (200, b'{"card":{"type":"json","data":{}}}', 0.1, WRONG_ANSWER, "card.type"),
    (200, b'{"inline":{"title":"x"}}', 0.1, WRONG_ANSWER, "unknown member 'inline'"),
])
def test_what_the_clicking_user_would_get_instead(status: int, body: bytes, elapsed: float, code: int,
                                                  why: str) -> None:
    verdict = judge(CLICK, status, body, elapsed)
    assert (verdict.code, verdict.ok) == (code, False) and why in verdict.why


def test_a_preview_answer_is_judged_by_its_own_shape() -> None:
    assert judge(PREVIEW, 200, b'{"inline":{"image_key":"img"}}', 0.1).code == WRONG_ANSWER
    assert judge(PREVIEW, 200, b'{"inline":{"title":"x","url":{"desktop":"u"}}}', 0.1).code == WRONG_ANSWER
    assert judge(PREVIEW, 200, b'{"toast":{"type":"info","content":"x"}}', 0.1).code == WRONG_ANSWER
