"""The answer shapes Feishu takes to callbacks: valid ones pass byte for byte, every other one is named."""

from __future__ import annotations

import pytest

from relay.answers import CARD_ACTION, URL_PREVIEW, Malformed, check_answer, fallback

CAP = 30 * 1024

VALID = [
    (CARD_ACTION, b"{}"),
    (CARD_ACTION, b'{"toast": {"type": "success", "content": "Approved"}}'),
    (CARD_ACTION, b'{"toast":{"type":"info","i18n":{"zh_cn":"\xe5\xa5\xbd","en_us":"ok"}}}'),
    (CARD_ACTION, b'{"card":{"type":"raw","data":{"config":{"update_multi":true},"elements":[]}}}'),
    (CARD_ACTION, b'{"toast":{"type":"warning","content":"x"},"card":{"type":"template","data":'
                  b'{"template_id":"AAq1","template_variable":{"n":1},"template_version_name":"1.0.0"}}}'),
    (URL_PREVIEW, b'{"inline":{"title":"Order 1841","image_key":"img_1","url":{"pc":"https://e.x/1"}}}'),
    (URL_PREVIEW, b'{"inline":{"i18n_title":{"en_us":"Order"}},"card":{"type":"raw","data":{"elements":[]}}}'),
    ("some.other.callback", b'{"anything": [1, 2]}'),
]


@pytest.mark.parametrize(("event_type", "answer"), VALID)
def test_valid_answers_pass_unchanged(event_type: str, answer: bytes) -> None:
    assert check_answer(event_type, answer, CAP) is answer


MALFORMED = [
    (CARD_ACTION, b'{"toast":{"type":"loud","content":"x"}}', "Invalid enum value 'loud' - at `$.toast.type`"),
    (CARD_ACTION, b'{"toast":{"type":"info"}}', "toast: needs content or i18n"),
    (CARD_ACTION, b'{"toast":{"type":"info","content":""}}', "at `$.toast.content`"),
    (CARD_ACTION, b'{"tost":{}}', "unknown field `tost`"),
    (CARD_ACTION, b'{"inline":{"title":"x"}}', "unknown field `inline`"),  # a preview's answer to a click
    (CARD_ACTION, b'{"card":{"type":"json","data":{}}}', "Invalid value 'json' - at `$.card.type`"),
    (CARD_ACTION, b'{"card":{"type":"raw","data":"{\\"elements\\":[]}"}}', "Expected `object`, got `str`"),
    (CARD_ACTION, b'{"card":{"type":"template","data":{"template_variable":{}}}}', "`template_id`"),
    (CARD_ACTION, b'{"card":{"type":"template","data":{"template_id":""}}}', "at `$.card.data.template_id`"),
    (CARD_ACTION, b"[]", "Expected `object`, got `array`"),
    (CARD_ACTION, b"null", "Expected `object`, got `null`"),
    (CARD_ACTION, b"", "json: not a JSON document"),
    (CARD_ACTION, b'{"toast":', "json: not a JSON document"),
    (URL_PREVIEW, b'{"inline":{"image_key":"img"}}', "inline: needs title or i18n_title"),
    (URL_PREVIEW, b'{"toast":{"type":"info","content":"x"}}', "unknown field `toast`"),
    (URL_PREVIEW, b'{"inline":{"title":"x","url":{"desktop":"u"}}}', "unknown field `desktop`"),
    ("some.other.callback", b'"text"', "Expected `object`, got `str`"),
]


@pytest.mark.parametrize(("event_type", "answer", "reason"), MALFORMED)
def test_malformed_answers_are_named(event_type: str, answer: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as caught:
        check_answer(event_type, answer, CAP)
    assert reason in caught.value.reason
    assert "\n" not in caught.value.reason


def test_the_size_cap_counts_bytes() -> None:
    answer = b'{"toast":{"type":"info","content":"' + b"x" * 100 + b'"}}'
    assert check_answer(CARD_ACTION, answer, len(answer)) is answer
    with pytest.raises(Malformed, match=r"too_large: 138 bytes \(inbound.max_answer_bytes = 137\)"):
        check_answer(CARD_ACTION, answer, len(answer) - 1)


def test_fallback_is_empty_or_the_configured_toast_for_clicks_only() -> None:
    assert fallback(CARD_ACTION, "", "info") == b"{}"
    toast = fallback(CARD_ACTION, "Received", "warning")
    assert toast == b'{"toast":{"type":"warning","content":"Received"}}'
    assert check_answer(CARD_ACTION, toast, CAP) is toast
    assert fallback(URL_PREVIEW, "Received", "info") == b"{}"  # a preview has no toast
