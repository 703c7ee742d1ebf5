"""Decoding intents: every example (one per kind, the shapes of docs/intents.md) decodes, every rule fails once
with a reason naming the field."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from relay.errors import IntentError
from relay.intents import (
    ApiCall,
    ChatButtonUpdate,
    ImageUpload,
    MessageBatchSend,
    MessageReply,
    MessageSend,
    UrlPreviewUpdate,
    decode_intent,
    ordering_key,
)
from relay.results import Result, encode_result, schema

# One example per kind (the shapes of docs/intents.md; tests/test_docs.py checks the page's own examples).
EXAMPLES: list[dict[str, Any]] = [
    {"kind": "message.send", "id": "n-1", "receive_id_type": "chat_id", "receive_id": "oc_1", "msg_type": "text",
     "content": {"text": "hi"}},
    {"kind": "message.reply", "id": "n-2", "message_id": "om_1", "chat_id": "oc_1", "msg_type": "text",
     "content": {"text": "ok"}, "reply_in_thread": False},
    {"kind": "message.edit", "id": "n-3", "message_id": "om_1", "msg_type": "text", "content": {"text": "edited"}},
    {"kind": "message.recall", "id": "n-4", "message_id": "om_1"},
    {"kind": "message.forward", "id": "n-5", "message_id": "om_1", "receive_id_type": "open_id", "receive_id": "ou_1"},
    {"kind": "card.patch", "id": "n-6", "message_id": "om_2",
     "content": {"config": {"update_multi": True}, "elements": []}},
    {"kind": "message.urgent", "id": "n-7", "message_id": "om_1", "channel": "app", "user_id_type": "open_id",
     "user_id_list": ["ou_1"]},
    {"kind": "reaction.add", "id": "n-8", "message_id": "om_1", "emoji_type": "THUMBSUP"},
    {"kind": "reaction.remove", "id": "n-9", "message_id": "om_1", "reaction_id": "r_1"},
    {"kind": "pin.add", "id": "n-10", "message_id": "om_1"},
    {"kind": "card.delay_update", "id": "n-11", "token": "c-xxx", "card": {"open_ids": ["ou_1"], "elements": []}},
    {"kind": "ephemeral.send", "id": "n-12", "chat_id": "oc_1", "open_id": "ou_1", "card": {"elements": []}},
    {"kind": "url_preview.update", "id": "n-13", "preview_tokens": ["952te0c8-9ccf"], "open_ids": ["ou_1"]},
    {"kind": "chat_button.update", "id": "n-14", "chat_id": "oc_1", "user_id_type": "open_id", "user_ids": ["ou_1"],
     "buttons": {"buttons": [{"action_type": "url_page", "text": {"text": "Open"},
                              "multi_url": {"url": "https://example.com/"}, "button_type": "primary"}]}},
    {"kind": "message.batch_send", "id": "n-15", "msg_type": "text", "content": {"text": "notice"},
     "open_ids": ["ou_1", "ou_2"]},
    {"kind": "api.call", "id": "n-16", "method": "GET", "path": "/open-apis/im/v1/messages/:message_id/read_users",
     "path_params": {"message_id": "om_1"}, "query": {"user_id_type": "open_id"},
     "rate": {"per_second": 50, "per_minute": 1000}},
    {"kind": "pin.remove", "id": "n-17", "message_id": "om_1"},
    {"kind": "ephemeral.delete", "id": "n-18", "message_id": "om_e"},
    # CardKit and uploads
    {"kind": "card.create", "id": "n-19", "card": {"schema": "2.0", "config": {"streaming_mode": True},
                                                 "body": {"elements": [{"tag": "markdown", "element_id": "md",
                                                                        "content": ""}]}}},
    {"kind": "card.send", "id": "n-20", "receive_id_type": "chat_id", "receive_id": "oc_1", "card_id": "7355_c"},
    {"kind": "card.stream", "id": "n-21", "card_id": "7355_c", "element_id": "md", "content": "Hello, wor"},
    {"kind": "card.settings", "id": "n-22", "card_id": "7355_c", "settings": {"config": {"streaming_mode": True}}},
    {"kind": "card.update", "id": "n-23", "card_id": "7355_c", "card": {"schema": "2.0", "body": {"elements": []}}},
    {"kind": "card.finish", "id": "n-24", "card_id": "7355_c", "summary": "Hello, world"},
    {"kind": "image.upload", "id": "n-25", "image_type": "message", "data": "iVBORw0KGgo="},
    {"kind": "file.upload", "id": "n-26", "file_type": "pdf", "file_name": "report.pdf", "data": "JVBERi0xLjQK"},
]


def enc(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``base`` with fields replaced (``...`` deletes the field)."""
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not ...}


def by_kind(kind: str) -> dict[str, Any]:
    return next(e for e in EXAMPLES if e["kind"] == kind)


def rejected(raw: bytes | None) -> IntentError:
    with pytest.raises(IntentError) as info:
        decode_intent(raw)
    return info.value


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e["kind"])
def test_every_example_decodes_and_keeps_its_fields(example: dict[str, Any]) -> None:
    intent = decode_intent(enc(example))
    as_json = msgspec.to_builtins(intent)
    assert {k: as_json[k] for k in example} == example
    assert intent.app == "default"


def test_common_fields() -> None:
    raw = with_(by_kind("pin.add"), app="lark", order_key="k", expires_at="2030-01-02T03:04:05+08:00")
    intent = decode_intent(enc(raw))
    assert intent.app == "lark"
    assert intent.order_key == "k"
    assert intent.expires_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=8)))
    assert decode_intent(enc(by_kind("pin.add"))).expires_at is None


def test_intents_are_frozen() -> None:
    intent = decode_intent(enc(by_kind("pin.add")))
    with pytest.raises(AttributeError):
        intent.message_id = "om_2"  # type: ignore[misc]


def test_content_may_be_the_json_string_feishu_expects() -> None:
    intent = decode_intent(enc(with_(by_kind("message.send"), content='{"text":"hi"}')))
    assert isinstance(intent, MessageSend)
    assert intent.content == '{"text":"hi"}'


def test_url_preview_open_ids_absent_and_empty_both_decode() -> None:
    base = by_kind("url_preview.update")
    absent = decode_intent(enc(with_(base, open_ids=...)))
    empty = decode_intent(enc(with_(base, open_ids=[])))
    assert isinstance(absent, UrlPreviewUpdate) and absent.open_ids is None
    assert isinstance(empty, UrlPreviewUpdate) and empty.open_ids == []


def test_chat_button_defaults_follow_the_seed() -> None:
    raw = {"kind": "chat_button.update", "id": "b", "chat_id": "oc_1",
           "buttons": {"buttons": [{"action_type": "webhook", "text": {"text": "x" * 30}, "action_map": {"a": "b"}}]}}
    intent = decode_intent(enc(raw))
    assert isinstance(intent, ChatButtonUpdate)
    assert intent.user_id_type == "open_id"
    assert intent.user_ids is None
    assert intent.buttons is not None and intent.buttons.buttons[0].button_type == "default"
    no_buttons = decode_intent(enc({"kind": "chat_button.update", "id": "b", "chat_id": "oc_1",
                                    "buttons": {"buttons": []}}))
    assert isinstance(no_buttons, ChatButtonUpdate)


def test_batch_send_interactive_takes_card() -> None:
    raw = {"kind": "message.batch_send", "id": "b", "msg_type": "interactive", "card": {"elements": []},
           "department_ids": ["od_1"] * 200}
    intent = decode_intent(enc(raw))
    assert isinstance(intent, MessageBatchSend) and intent.card == {"elements": []}


# (kind, changes, expected start of the reason): each Feishu rule broken once.
RULES: list[tuple[str, dict[str, Any], str]] = [
    ("message.send", {"receive_id_type": "phone"}, "$.receive_id_type: invalid enum value"),
    ("message.send", {"msg_type": "video"}, "$.msg_type: invalid enum value"),
    ("message.send", {"receive_id": ""}, "$.receive_id: expected `str` of length >= 1"),
    ("message.send", {"content": "not json"}, "$.content: string is not JSON"),
    ("message.send", {"content": "[1]"}, "$.content: string must encode a JSON object"),
    ("message.send", {"content": 5}, "$.content: expected `str | object | null`, got `int`"),
    ("message.reply", {"reply_in_thread": "yes"}, "$.reply_in_thread: expected `bool`"),
    ("message.edit", {"msg_type": "interactive"}, "$.msg_type: invalid enum value"),
    ("message.urgent", {"channel": "email"}, "$.channel: invalid enum value"),
    ("message.urgent", {"user_id_type": "email"}, "$.user_id_type: invalid enum value"),
    ("message.urgent", {"user_id_list": []}, "$.user_id_list: expected `array` of length >= 1"),
    ("reaction.add", {"emoji_type": ...}, "$.emoji_type: required field missing"),
    ("reaction.add", {"reaction_type": {"emoji_type": "OK"}}, "$.reaction_type: unknown field"),
    ("card.delay_update", {"card": "{"}, "$.card: string is not JSON"),
    ("ephemeral.send", {"open_id": ...}, "$.open_id: required field missing"),
    ("url_preview.update", {"preview_tokens": []}, "$.preview_tokens: expected `array` of length >= 1"),
    ("url_preview.update", {"preview_tokens": [f"t{i}" for i in range(11)]},
     "$.preview_tokens: expected `array` of length <= 10"),
    ("url_preview.update", {"preview_tokens": ["a", "b", "a"]}, "$.preview_tokens: must be distinct"),
    ("url_preview.update", {"preview_tokens": [""]}, "$.preview_tokens[0]: expected `str` of length >= 1"),
    ("url_preview.update", {"open_ids": [f"ou_{i}" for i in range(101)]},
     "$.open_ids: expected `array` of length <= 100"),
    ("chat_button.update", {"chat_id": ...}, "$.chat_id: required field missing"),
    ("chat_button.update", {"user_id_type": "email"}, "$.user_id_type: invalid enum value"),
    ("chat_button.update", {"user_ids": []}, "$.user_ids: expected `array` of length >= 1"),
    ("chat_button.update", {"user_ids": [f"ou_{i}" for i in range(21)]},
     "$.user_ids: expected `array` of length <= 20"),
    ("chat_button.update", {"bot_id": "cli_1"}, "$.bot_id: unknown field"),
    ("chat_button.update", {"buttons": [{"action_type": "url_page", "text": {"text": "x"}}]},
     "$.buttons: expected `object | null`, got `array`"),
    ("chat_button.update", {"buttons": {"buttons": [{"action_type": "webhook", "text": {"text": "x"}}] * 3}},
     "$.buttons.buttons: expected `array` of length <= 2"),
    ("chat_button.update", {"buttons": {"buttons": [{"text": {"text": "x"}}]}},
     "$.buttons.buttons[0].action_type: required field missing"),
    ("chat_button.update", {"buttons": {"buttons": [{"action_type": "link", "text": {"text": "x"}}]}},
     "$.buttons.buttons[0].action_type: invalid enum value"),
    ("chat_button.update", {"buttons": {"buttons": [{"action_type": "webhook", "text": {"text": "x" * 31}}]}},
     "$.buttons.buttons[0].text.text: expected `str` of length <= 30"),
    ("chat_button.update", {"buttons": {"buttons": [{"action_type": "webhook", "text": {"text": ""}}]}},
     "$.buttons.buttons[0].text.text: expected `str` of length >= 1"),
    ("chat_button.update", {"buttons": {"buttons": [{"action_type": "webhook", "text": {"text": "x"},
                                                     "button_type": "danger"}]}},
     "$.buttons.buttons[0].button_type: invalid enum value"),
    ("chat_button.update", {"buttons": {"buttons": [{"action_type": "url_page", "text": {"text": "x"},
                                                     "multi_url": {"pc_url": "http://example.com/"}}]}},
     "$.buttons.buttons[0].multi_url.pc_url: expected `str` matching regex '^https://'"),
    ("chat_button.update", {"buttons": {"buttons": [{"action_type": "url_page", "text": {"text": "x"},
                                                     "multi_url": {"ios_url": "https://e.com/" + "a" * 687}}]}},
     "$.buttons.buttons[0].multi_url.ios_url: expected `str` of length <= 700"),
    ("chat_button.update", {"buttons": {"buttons": [{"action_type": "webhook", "text": {"text": "x"},
                                                     "action_map": {"a": 1}}]}},
     "$.buttons.buttons[0].action_map[...]: expected `str`, got `int`"),
    ("chat_button.update", {"buttons": {"buttons": [{"action_type": "webhook", "text": {"text": "x", "i18n": {}}}]}},
     "$.buttons.buttons[0].text.i18n: unknown field"),
    ("api.call", {"rate": {"per_second": 1, "per_hour": 9}}, "$.rate.per_hour: unknown field"),
    ("message.batch_send", {"open_ids": ...}, "$: give at least one target"),
    ("message.batch_send", {"open_ids": [], "user_ids": []}, "$: give at least one target"),
    ("message.batch_send", {"content": ...}, "$.content: required when msg_type is text"),
    ("message.batch_send", {"card": {"elements": []}}, "$.card: only allowed when msg_type is interactive"),
    ("message.batch_send", {"msg_type": "interactive"}, "$.card: required when msg_type is interactive"),
    ("message.batch_send", {"department_ids": ["od"] * 201}, "$.department_ids: expected `array` of length <= 200"),
    ("api.call", {"method": "HEAD"}, "$.method: invalid enum value"),
    ("api.call", {"path": "/im/v1/messages"}, "$.path: expected `str` matching regex '^/open-apis/'"),
    ("api.call", {"path_params": {}}, "$.path_params.message_id: required by the path template"),
    ("api.call", {"path_params": {"message_id": "om_1", "chat_id": "oc"}},
     "$.path_params.chat_id: not a :chat_id segment"),
    ("api.call", {"path_params": {"message_id": ""}}, "$.path_params[...]: expected `str` of length >= 1"),
    ("api.call", {"path": "/open-apis/im/v1/chats?page_size=1", "path_params": {}}, "$.path: put the query"),
    ("api.call", {"path": "/open-apis/../admin", "path_params": {}}, "$.path: must not contain '.' or '..' segments"),
    ("api.call", {"query": {"page_size": 20}}, "$.query[...]: expected `str`, got `int`"),
    ("api.call", {"rate": ...}, "$.rate: required field missing"),
    ("api.call", {"rate": {}}, "$.rate: give per_second and/or per_minute"),
    ("api.call", {"rate": {"per_second": 0}}, "$.rate.per_second: expected `int` >= 1"),
    ("api.call", {"rate": {"per_minute": -5}}, "$.rate.per_minute: expected `int` >= 1"),
]


@pytest.mark.parametrize(("kind", "changes", "reason"), RULES, ids=[f"{k}:{r}" for k, _, r in RULES])
def test_each_rule_broken_once_names_the_field(kind: str, changes: dict[str, Any], reason: str) -> None:
    base = by_kind(kind)
    error = rejected(enc(with_(base, **changes)))
    assert error.error == "invalid"
    assert error.reason.startswith(reason), error.reason
    assert error.id == base["id"]
    assert error.kind == kind
    assert error.app == "default"


SEND = by_kind("message.send")

# (raw value, error class, start of the reason, recovered id, recovered kind)
BAD_SHAPES: list[tuple[bytes | None, str, str, str | None, str | None]] = [
    (None, "decode", "value is empty", None, None),
    (b"", "decode", "value is empty", None, None),
    (b"\xff\xfe{}", "decode", "value is not UTF-8", None, None),
    (b'{"kind":"message.send","id":"\xc3\x28"}', "decode", "value is not UTF-8 (invalid byte at offset 29)", None,
     None),
    (b"kind=message.send", "decode", "value is not JSON", None, None),
    (b'{"kind":"message.send","id":"n-1"', "decode", "value is not JSON (Input data was truncated)", None, None),
    (b"[1, 2]", "decode", "value is not a JSON object (got an array)", None, None),
    (b'"n-1"', "decode", "value is not a JSON object (got a string)", None, None),
    (b"null", "decode", "value is not a JSON object (got null)", None, None),
    (enc({"kind": "message.shout", "id": "n-1"}), "invalid", "$.kind: unknown kind 'message.shout'", "n-1",
     "message.shout"),
    (enc({"id": "n-1"}), "invalid", "$.kind: required field missing", "n-1", None),
    (enc({"kind": 7, "id": "n-1"}), "invalid", "$.kind: expected `str`", "n-1", None),
    (enc(with_(SEND, receive_id=...)), "invalid", "$.receive_id: required field missing", "n-1", "message.send"),
    (enc(with_(SEND, receive_id=42)), "invalid", "$.receive_id: expected `str`, got `int`", "n-1", "message.send"),
    (enc(with_(SEND, id="x" * 51)), "invalid", "$.id: expected `str` of length <= 50", None, "message.send"),
    (enc(with_(SEND, id="")), "invalid", "$.id: expected `str` of length >= 1", None, "message.send"),
    (enc(with_(SEND, id=12)), "invalid", "$.id: expected `str`, got `int`", None, "message.send"),
    (enc(with_(SEND, uuid="u-1")), "invalid", "$.uuid: unknown field", "n-1", "message.send"),
    (enc(with_(SEND, expires_at="tomorrow")), "invalid", "$.expires_at: invalid RFC3339", "n-1", "message.send"),
    (enc(with_(SEND, expires_at="2030-01-01T00:00:00")), "invalid",
     "$.expires_at: expected `datetime` with a timezone component", "n-1", "message.send"),
    (enc(with_(SEND, expires_at=1700000000)), "invalid", "$.expires_at: expected `datetime | null`, got `int`",
     "n-1", "message.send"),
    (enc(with_(SEND, app=None)), "invalid", "$.app: expected `str`, got `null`", "n-1", "message.send"),
    (enc(with_(SEND, order_key="")), "invalid", "$.order_key: expected `str` of length >= 1", "n-1", "message.send"),
]


@pytest.mark.parametrize(("raw", "error_class", "reason", "ident", "kind"), BAD_SHAPES,
                         ids=[r for _, _, r, _, _ in BAD_SHAPES])
def test_bad_shapes(raw: bytes | None, error_class: str, reason: str, ident: str | None, kind: str | None) -> None:
    error = rejected(raw)
    assert error.error == error_class
    assert error.reason.startswith(reason), error.reason
    assert "\n" not in error.reason
    assert (error.id, error.kind) == (ident, kind)


DEEP = b"[" * 10_000 + b"]" * 10_000
DEEP_OBJECT = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
API_CALL = b'{"kind":"api.call","id":"n-1","method":"POST","path":"/open-apis/x","rate":{"per_second":5}'


@pytest.mark.parametrize("raw", [
    DEEP,
    API_CALL + b',"body":' + DEEP + b"}",
    b'{"kind":"message.send","id":"n-1","receive_id_type":"chat_id","receive_id":"oc_1","msg_type":"text",'
    b'"content":' + DEEP_OBJECT + b"}",
    b'{"kind":"message.send","id":"n-1","receive_id_type":"chat_id","receive_id":"oc_1","msg_type":"text",'
    b'"content":' + msgspec.json.encode(DEEP_OBJECT.decode()) + b"}",  # a JSON string holding the deep object
    b'{"kind":"card.delay_update","id":"n-1","token":"c-1","card":' + DEEP_OBJECT + b"}",
], ids=["array", "api.call body", "content", "content as a string", "card"])
def test_a_value_too_deeply_nested_to_read_is_rejected_not_raised(raw: bytes) -> None:
    error = rejected(raw)  # used to raise RecursionError, which killed the consumer loop
    assert error.error == "decode" and "nested" in error.reason


def test_numbers_the_relay_cannot_use_are_rejected() -> None:
    assert rejected(API_CALL.replace(b"5}", b"9" * 400 + b"}") + b"}").reason.startswith("$.rate.per_second")
    assert rejected(API_CALL + b',"body":{"n":1e999}}').error == "decode"  # out of range for a float
    assert rejected(API_CALL + b',"body":{"n":NaN}}').error == "decode"  # not JSON


def test_app_is_recovered_when_readable() -> None:
    assert rejected(enc(with_(SEND, app="lark", receive_id=...))).app == "lark"
    assert rejected(enc(with_(SEND, app=5))).app is None


def test_reason_never_quotes_the_body() -> None:
    secret = "s3cr3t-message-text"
    for raw in (
        enc(with_(SEND, content={"text": secret}, receive_id=...)),
        enc(with_(SEND, content=secret)),
        b'{"text":"' + secret.encode() + b'" garbage',
        b'["' + secret.encode() + b'"]',
    ):
        assert secret not in rejected(raw).reason


def test_reason_is_one_bounded_line() -> None:
    error = rejected(enc({"kind": "k" * 10_000, "id": "n-1"}))
    assert len(error.reason) <= 300
    assert "\n" not in error.reason


ORDERING: list[tuple[str, str]] = [
    ("message.send", "oc_1"),
    ("message.reply", "om_1"),
    ("message.edit", "om_1"),
    ("message.recall", "om_1"),
    ("message.forward", "ou_1"),
    ("card.patch", "om_2"),
    ("message.urgent", "om_1"),
    ("reaction.add", "om_1"),
    ("reaction.remove", "om_1"),
    ("pin.add", "om_1"),
    ("pin.remove", "om_1"),
    ("card.delay_update", "c-xxx"),
    ("ephemeral.send", "oc_1"),
    ("ephemeral.delete", "om_e"),
    ("url_preview.update", "952te0c8-9ccf"),
    ("chat_button.update", "oc_1"),
    ("message.batch_send", "n-15"),
    ("api.call", "/open-apis/im/v1/messages/om_1/read_users"),
    ("card.create", "n-19"),
    ("card.send", "oc_1"),
    ("card.stream", "7355_c"),
    ("card.settings", "7355_c"),
    ("card.update", "7355_c"),
    ("card.finish", "7355_c"),
    ("image.upload", "n-25"),
    ("file.upload", "n-26"),
]
SEQUENCED = ("card.stream", "card.settings", "card.update", "card.finish")


@pytest.mark.parametrize(("kind", "key"), ORDERING)
def test_default_ordering_key(kind: str, key: str) -> None:
    assert ordering_key(decode_intent(enc(by_kind(kind)))) == key


@pytest.mark.parametrize("kind", [k for k, _ in ORDERING if k not in SEQUENCED])
def test_order_key_overrides(kind: str) -> None:
    assert ordering_key(decode_intent(enc(with_(by_kind(kind), order_key="mine")))) == "mine"


@pytest.mark.parametrize("kind", SEQUENCED)
def test_sequenced_card_ops_refuse_order_key(kind: str) -> None:
    """Their sequence comes from the offset: one card's operations must share the card_id's partition."""
    with pytest.raises(IntentError, match=r"order_key: not allowed"):
        decode_intent(enc(with_(by_kind(kind), order_key="mine")))


@pytest.mark.parametrize(("change", "reason"), [
    ({"card": {"config": {}}}, r"\$.card: CardKit takes JSON 2.0 cards only"),
    ({"card": {"schema": "2.0", "config": {"update_multi": False}}}, r"update_multi = false"),
    ({"card": None, "template": None}, r"exactly one of card and template"),
])
def test_card_create_refuses_what_cardkit_refuses(change: dict[str, Any], reason: str) -> None:
    raw = {k: v for k, v in {**by_kind("card.create"), **change}.items() if v is not None}
    with pytest.raises(IntentError, match=reason):
        decode_intent(enc(raw))


@pytest.mark.parametrize(("kind", "change", "reason"), [
    ("card.stream", {"element_id": "1md"}, r"element_id"),
    ("card.stream", {"card_id": "x" * 21}, r"card_id"),
    ("card.settings", {"settings": {"streaming": True}}, r"unknown key 'streaming'"),
    ("card.settings", {"settings": {}}, r"give config and/or card_link"),
    ("image.upload", {"data": "not base64!"}, r"\$.data"),
    ("image.upload", {"data": ""}, r"\$.data"),
    ("file.upload", {"file_name": "noext"}, r"file_name"),
    ("file.upload", {"duration": 1000}, r"duration: only for file_type opus or mp4"),
    ("image.upload", {"url": "https://files.example/a.png"}, r"exactly one of data \(base64 bytes\) and url"),
    ("file.upload", {"data": ..., "url": "file:///etc/passwd"}, r"\$.url"),
    ("image.upload", {"data": ...}, r"exactly one of data"),
    ("message.send", {"upload": {"url": "https://f.example/a.png"}}, r"exactly one of content and upload"),
    ("message.send", {"content": ..., "upload": {"url": "https://f.example/a.png"}}, r"upload: msg_type must be"),
    ("message.send", {"content": ..., "msg_type": "file", "upload": {"url": "https://f.example/a"}},
     r"upload.file_name: required"),
    ("message.send", {"content": ..., "msg_type": "image", "upload": {"url": "https://f.example/a", "duration": 5}},
     r"upload.duration: only for msg_type audio or media"),
])
def test_cardkit_and_upload_field_rules(kind: str, change: dict[str, Any], reason: str) -> None:
    with pytest.raises(IntentError, match=reason):
        decode_intent(enc(with_(by_kind(kind), **change)))


def test_upload_bytes_are_base64() -> None:
    intent = decode_intent(enc(by_kind("image.upload")))
    assert isinstance(intent, ImageUpload) and intent.data == b"\x89PNG\r\n\x1a\n"


def test_all_kinds_have_an_ordering_case() -> None:
    assert {e["kind"] for e in EXAMPLES} == {k for k, _ in ORDERING}


def test_reply_ordering_is_the_message_even_with_chat_id() -> None:
    intent = decode_intent(enc(by_kind("message.reply")))
    assert isinstance(intent, MessageReply) and intent.chat_id == "oc_1"
    assert ordering_key(intent) == "om_1"


def test_api_call_filled_path_quotes_values() -> None:
    raw = with_(by_kind("api.call"), path_params={"message_id": "om 1?x#é"})
    intent = decode_intent(enc(raw))
    assert isinstance(intent, ApiCall)
    assert intent.filled_path == "/open-apis/im/v1/messages/om%201%3Fx%23%C3%A9/read_users"
    assert ordering_key(intent) == intent.filled_path


T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def test_result_encodes_every_field() -> None:
    result = Result(id="n-1", kind="message.send", app="default", status="ok", code=0, msg="success",
                    data={"message_id": "om_9"}, http_status=200, attempts=1, log_id="L1",
                    received_at=T0, finished_at=T0 + timedelta(milliseconds=250))
    assert json.loads(encode_result(result)) == {
        "id": "n-1", "kind": "message.send", "app": "default", "status": "ok", "superseded_by": None,
        "code": 0, "msg": "success", "data": {"message_id": "om_9"}, "http_status": 200, "attempts": 1,
        "log_id": "L1", "received_at": "2024-05-01T12:00:00Z", "finished_at": "2024-05-01T12:00:00.250000Z",
        "tenant_key": None,
    }


def test_result_for_an_unreadable_intent() -> None:
    result = Result(id=None, kind=None, app=None, status="rejected", msg="value is empty",
                    received_at=T0, finished_at=T0)
    out = json.loads(encode_result(result))
    assert out["status"] == "rejected" and out["id"] is None and out["code"] is None and out["attempts"] == 0
    assert list(out) == ["id", "kind", "app", "status", "superseded_by", "code", "msg", "data", "http_status",
                         "attempts", "log_id", "received_at", "finished_at", "tenant_key"]


def test_result_refuses_naive_times() -> None:
    with pytest.raises(ValueError, match="received_at"):
        Result(id="n", kind="pin.add", app="default", status="ok", received_at=datetime(2024, 1, 1),
               finished_at=T0)


def test_result_status_is_closed() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"id":"n","kind":null,"app":null,"status":"done","received_at":"2024-01-01T00:00:00Z",'
            b'"finished_at":"2024-01-01T00:00:00Z"}', type=Result)


def test_schema_describes_intents_and_results() -> None:
    doc = schema()
    json.dumps(doc)  # serialisable
    intent = doc["$defs"]["Intent"]
    kinds = {m["$ref"].rsplit("/", 1)[1] for m in intent["anyOf"]}
    assert len(kinds) == len(EXAMPLES)
    assert intent["discriminator"]["propertyName"] == "kind"
    assert set(intent["discriminator"]["mapping"]) == {e["kind"] for e in EXAMPLES}
    assert set(doc["$defs"]["Result"]["properties"]["status"]["enum"]) == {
        "ok", "partial", "superseded", "expired", "failed", "rejected"}
    assert doc["$defs"]["MessageSend"]["properties"]["id"]["maxLength"] == 50


# (path, path_params) -> the field the rejection names: every way a URL library, a gateway or a servlet container
# could turn the path into one outside /open-apis/ (or into another API than the one validated)
HOSTILE_PATHS: list[tuple[str, dict[str, str], str]] = [
    ("/open-apis/../admin", {}, "$.path: must not contain '.' or '..' segments"),
    ("/open-apis/%2e%2e/%2e%2e/auth/v3/tenant_access_token/internal", {}, "$.path: must not contain '.' or '..'"),
    ("/open-apis/a/%2E%2E/b", {}, "$.path: must not contain '.' or '..'"),
    ("/open-apis/a/.%2e/b", {}, "$.path: must not contain '.' or '..'"),
    ("/open-apis/a/./b", {}, "$.path: must not contain '.' or '..'"),
    ("/open-apis/a/%2e/b", {}, "$.path: must not contain '.' or '..'"),
    ("/open-apis/a/..;x/b", {}, "$.path: must not contain '.' or '..'"),
    ("/open-apis/a/..", {}, "$.path: must not contain '.' or '..'"),
    ("/open-apis/a/..%2Fb", {}, "$.path: must not contain an encoded slash"),
    ("/open-apis/a/%2f/b", {}, "$.path: must not contain an encoded slash"),
    ("/open-apis/a/%5C..%5Cb", {}, "$.path: must not contain an encoded slash"),
    ("/open-apis/a\\..\\b", {}, "$.path: must not contain a backslash"),
    ("/open-apis/a/%252e%252e/b", {}, "$.path: must not be percent-encoded twice"),
    ("/open-apis/a/%zz", {}, "$.path: '%' must start a percent-encoding"),
    ("/open-apis/a/%", {}, "$.path: '%' must start a percent-encoding"),
    ("/open-apis//b", {}, "$.path: must not contain empty segments"),
    ("/open-apis/a/\x00", {}, "$.path: must not contain control characters"),
    ("/open-apis/a/%0d%0aHost:x", {}, "$.path: must not contain control characters"),
    ("/open-apis/a b", {}, "$.path: character ' ' must be percent-encoded"),
    ("/open-apis/é", {}, "$.path: character 'é' must be percent-encoded"),
    ("/open-apisx/a", {}, "$.path: expected `str` matching regex"),
    ("/x/open-apis/a", {}, "$.path: expected `str` matching regex"),
    ("/open-apis/im/v2/url_previews/batch_update", {}, "$.path: URL previews are kind url_preview.update"),
    ("/open-apis/:a/b", {"a": ".."}, "$.path_params.a: must not be '.' or '..'"),
    ("/open-apis/:a/b", {"a": "."}, "$.path_params.a: must not be '.' or '..'"),
    ("/open-apis/:a/b", {"a": "..;x"}, "$.path_params.a: must not be '.' or '..'"),
    ("/open-apis/:a/b", {"a": "../../auth"}, "$.path_params.a: must not contain '/'"),
    ("/open-apis/:a/b", {"a": "x\\y"}, "$.path_params.a: must not contain '/' or '\\'"),
    ("/open-apis/:a/b", {"a": "%2e%2e"}, "$.path_params.a: must not contain '%'"),
    ("/open-apis/:a/b", {"a": "x\ny"}, "$.path_params.a: must not contain control characters"),
]


@pytest.mark.parametrize(("path", "params", "reason"), HOSTILE_PATHS, ids=[p[0] + str(p[1]) for p in HOSTILE_PATHS])
def test_an_api_call_path_cannot_leave_open_apis(path: str, params: dict[str, str], reason: str) -> None:
    method = "POST" if "url_previews" in path else "GET"
    error = rejected(enc(with_(by_kind("api.call"), method=method, path=path, path_params=params)))
    assert error.reason.startswith(reason), error.reason
    assert "\n" not in error.reason


def test_a_path_that_stays_is_sent_as_written() -> None:
    for path in ("/open-apis/im/v1/chats", "/open-apis/message/v4/batch_send/", "/open-apis/a/...",
                 "/open-apis/a/%C3%A9/b~c", "/open-apis/a/x.y@w:1"):
        intent = decode_intent(enc(with_(by_kind("api.call"), path=path, path_params={})))
        assert isinstance(intent, ApiCall) and intent.filled_path == path


def test_tenant_key_is_optional_and_printable() -> None:
    base = {"kind": "message.send", "id": "n-1", "receive_id_type": "chat_id", "receive_id": "oc_1",
            "msg_type": "text", "content": {"text": "x"}}
    assert decode_intent(msgspec.json.encode(base)).tenant_key is None
    assert decode_intent(msgspec.json.encode({**base, "tenant_key": "736588c9260f175d"})).tenant_key == \
        "736588c9260f175d"
    for bad in ("", "a b", "x" * 129):
        with pytest.raises(IntentError) as err:
            decode_intent(msgspec.json.encode({**base, "tenant_key": bad}))
        assert err.value.reason.startswith("$.tenant_key:") and err.value.id == "n-1"
