"""Intent → Feishu call: method, path, query, exact body bytes, API name, windows, target, uuid placement."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay.buckets import Window, stricter
from relay.calls import (
    API_WINDOWS,
    MAX_SEQUENCE,
    PREVIEW_TOKEN_WINDOWS,
    ROUTES,
    Call,
    api_name,
    build_call,
    card_sequence,
    check_share,
    unsendable,
    url_preview_call,
)
from relay.errors import IntentError
from relay.intents import decode_intent

IM = (Window(50, 1), Window(1000, 60))
FIVE = (Window(5, 1),)


def call(intent: dict[str, Any]) -> Call:
    return build_call(decode_intent(json.dumps(intent, ensure_ascii=False).encode()))


# (intent, method, path, query, body bytes, api, api windows, target, target windows, uuid_protected)
CASES: list[tuple[dict[str, Any], str, str, dict[str, str], bytes | None, str, tuple[Window, ...], str | None,
                  tuple[Window, ...], bool]] = [
    ({"kind": "message.send", "id": "n-1", "receive_id_type": "chat_id", "receive_id": "oc_1", "msg_type": "text",
      "content": {"text": "hi"}},
     "POST", "/open-apis/im/v1/messages", {"receive_id_type": "chat_id"},
     b'{"receive_id":"oc_1","msg_type":"text","content":"{\\"text\\":\\"hi\\"}","uuid":"n-1"}',
     "im.message.create", IM, "chat:oc_1", FIVE, True),
    ({"kind": "message.reply", "id": "n-2", "message_id": "om_1", "chat_id": "oc_1", "msg_type": "text",
      "content": {"text": "ok"}, "reply_in_thread": True},
     "POST", "/open-apis/im/v1/messages/om_1/reply", {},
     b'{"content":"{\\"text\\":\\"ok\\"}","msg_type":"text","reply_in_thread":true,"uuid":"n-2"}',
     "im.message.reply", IM, "chat:oc_1", FIVE, True),
    ({"kind": "message.reply", "id": "n-2b", "message_id": "om_1", "msg_type": "text", "content": '{"text":"ok"}'},
     "POST", "/open-apis/im/v1/messages/om_1/reply", {},
     b'{"content":"{\\"text\\":\\"ok\\"}","msg_type":"text","reply_in_thread":false,"uuid":"n-2b"}',
     "im.message.reply", IM, "reply:om_1", FIVE, True),
    ({"kind": "message.edit", "id": "n-3", "message_id": "om_1", "msg_type": "text", "content": {"text": "edited"}},
     "PUT", "/open-apis/im/v1/messages/om_1", {},
     b'{"msg_type":"text","content":"{\\"text\\":\\"edited\\"}"}',
     "im.message.update", IM, None, (), False),
    ({"kind": "message.recall", "id": "n-4", "message_id": "om_1"},
     "DELETE", "/open-apis/im/v1/messages/om_1", {}, None, "im.message.delete", IM, None, (), False),
    ({"kind": "message.forward", "id": "n-5", "message_id": "om_1", "receive_id_type": "open_id",
      "receive_id": "ou_1"},
     "POST", "/open-apis/im/v1/messages/om_1/forward", {"receive_id_type": "open_id", "uuid": "n-5"},
     b'{"receive_id":"ou_1"}', "im.message.forward", IM, "user:open_id:ou_1", FIVE, True),
    ({"kind": "card.patch", "id": "n-6", "message_id": "om_2",
      "content": {"config": {"update_multi": True}, "elements": []}},
     "PATCH", "/open-apis/im/v1/messages/om_2", {},
     b'{"content":"{\\"config\\":{\\"update_multi\\":true},\\"elements\\":[]}"}',
     "im.message.patch", IM, "message:om_2", FIVE, False),
    ({"kind": "message.urgent", "id": "n-7", "message_id": "om_1", "channel": "app", "user_id_type": "open_id",
      "user_id_list": ["ou_1"]},
     "PATCH", "/open-apis/im/v1/messages/om_1/urgent_app", {"user_id_type": "open_id"},
     b'{"user_id_list":["ou_1"]}', "im.message.urgent_app", IM, None, (), False),
    ({"kind": "message.urgent", "id": "n-7b", "message_id": "om_1", "channel": "phone", "user_id_type": "user_id",
      "user_id_list": ["u1", "u2"]},
     "PATCH", "/open-apis/im/v1/messages/om_1/urgent_phone", {"user_id_type": "user_id"},
     b'{"user_id_list":["u1","u2"]}', "im.message.urgent_phone", IM, None, (), False),
    ({"kind": "message.urgent", "id": "n-7c", "message_id": "om_1", "channel": "sms", "user_id_list": ["ou_1"]},
     "PATCH", "/open-apis/im/v1/messages/om_1/urgent_sms", {"user_id_type": "open_id"},
     b'{"user_id_list":["ou_1"]}', "im.message.urgent_sms", IM, None, (), False),
    ({"kind": "reaction.add", "id": "n-8", "message_id": "om_1", "emoji_type": "THUMBSUP"},
     "POST", "/open-apis/im/v1/messages/om_1/reactions", {}, b'{"reaction_type":{"emoji_type":"THUMBSUP"}}',
     "im.message_reaction.create", IM, None, (), False),
    ({"kind": "reaction.remove", "id": "n-9", "message_id": "om_1", "reaction_id": "r_1"},
     "DELETE", "/open-apis/im/v1/messages/om_1/reactions/r_1", {}, None,
     "im.message_reaction.delete", IM, None, (), False),
    ({"kind": "pin.add", "id": "n-10", "message_id": "om_1"},
     "POST", "/open-apis/im/v1/pins", {}, b'{"message_id":"om_1"}', "im.pin.create", IM, "message:om_1", FIVE,
     False),
    ({"kind": "pin.remove", "id": "n-10b", "message_id": "om_1"},
     "DELETE", "/open-apis/im/v1/pins/om_1", {}, None, "im.pin.delete", IM, "message:om_1", FIVE, False),
    ({"kind": "card.delay_update", "id": "n-11", "token": "c-xxx", "card": {"open_ids": ["ou_1"], "elements": []}},
     "POST", "/open-apis/interactive/v1/card/update", {},
     b'{"token":"c-xxx","card":{"open_ids":["ou_1"],"elements":[]}}',
     "interactive.card.update", IM, None, (), False),
    ({"kind": "ephemeral.send", "id": "n-12", "chat_id": "oc_1", "open_id": "ou_1", "card": {"elements": []}},
     "POST", "/open-apis/ephemeral/v1/send", {},
     b'{"chat_id":"oc_1","open_id":"ou_1","msg_type":"interactive","card":{"elements":[]}}',
     "ephemeral.send", IM, "ephemeral-chat:oc_1", (Window(40, 1),), False),
    ({"kind": "ephemeral.delete", "id": "n-12b", "message_id": "om_e"},
     "POST", "/open-apis/ephemeral/v1/delete", {}, b'{"message_id":"om_e"}', "ephemeral.delete", IM, None, (),
     False),
    ({"kind": "url_preview.update", "id": "n-13", "preview_tokens": ["952te0c8-9ccf"], "open_ids": ["ou_1"]},
     "POST", "/open-apis/im/v2/url_previews/batch_update", {},
     b'{"preview_tokens":["952te0c8-9ccf"],"open_ids":["ou_1"]}',
     "im.url_preview.batch_update", (Window(5, 1),), None, (), False),
    ({"kind": "url_preview.update", "id": "n-13b", "preview_tokens": ["t1", "t2"], "open_ids": []},
     "POST", "/open-apis/im/v2/url_previews/batch_update", {}, b'{"preview_tokens":["t1","t2"]}',
     "im.url_preview.batch_update", (Window(5, 1),), None, (), False),
    ({"kind": "chat_button.update", "id": "n-14", "chat_id": "oc_1", "user_id_type": "open_id",
      "user_ids": ["ou_1"],
      "buttons": {"buttons": [{"action_type": "url_page", "text": {"text": "Open"},
                               "multi_url": {"url": "https://example.com/"}, "button_type": "primary"}]}},
     "PUT", "/open-apis/im/v2/chat_button", {"user_id_type": "open_id"},
     b'{"chat_id":"oc_1","user_ids":["ou_1"],"buttons":{"buttons":[{"action_type":"url_page","text":{"text":"Open"},'
     b'"multi_url":{"url":"https://example.com/"},"button_type":"primary"}]}}',
     "im.chat_button.update", (Window(10, 1),), None, (), False),
    ({"kind": "chat_button.update", "id": "n-14b", "chat_id": "oc_1", "user_id_type": "union_id",
      "buttons": {"buttons": [{"action_type": "webhook", "text": {"text": "Go"}, "action_map": {"k": "v"}}]}},
     "PUT", "/open-apis/im/v2/chat_button", {"user_id_type": "union_id"},
     b'{"chat_id":"oc_1","buttons":{"buttons":[{"action_type":"webhook","text":{"text":"Go"},'
     b'"action_map":{"k":"v"}}]}}',
     "im.chat_button.update", (Window(10, 1),), None, (), False),
    ({"kind": "chat_button.update", "id": "n-14c", "chat_id": "oc_1", "buttons": {"buttons": []}},
     "PUT", "/open-apis/im/v2/chat_button", {"user_id_type": "open_id"},
     b'{"chat_id":"oc_1","buttons":{"buttons":[]}}',
     "im.chat_button.update", (Window(10, 1),), None, (), False),
    ({"kind": "message.batch_send", "id": "n-15", "msg_type": "text", "content": {"text": "notice"},
      "open_ids": ["ou_1", "ou_2"]},
     "POST", "/open-apis/message/v4/batch_send/", {},
     b'{"msg_type":"text","content":{"text":"notice"},"open_ids":["ou_1","ou_2"]}',
     "message.batch_send", IM, None, (), False),
    ({"kind": "message.batch_send", "id": "n-15b", "msg_type": "interactive", "card": '{"elements": []}',
      "department_ids": ["od_1"], "union_ids": ["on_1"], "user_ids": []},
     "POST", "/open-apis/message/v4/batch_send/", {},
     b'{"msg_type":"interactive","card":{"elements": []},"union_ids":["on_1"],"department_ids":["od_1"]}',
     "message.batch_send", IM, None, (), False),
    ({"kind": "api.call", "id": "n-16", "method": "GET",
      "path": "/open-apis/im/v1/messages/:message_id/read_users", "path_params": {"message_id": "om_1"},
      "query": {"user_id_type": "open_id"}, "rate": {"per_second": 50, "per_minute": 1000}},
     "GET", "/open-apis/im/v1/messages/om_1/read_users", {"user_id_type": "open_id"}, None,
     "api:GET /open-apis/im/v1/messages/:/read_users", IM, None, (), False),
    ({"kind": "api.call", "id": "n-16b", "method": "POST", "path": "/open-apis/im/v1/chats", "body": {"name": "群"},
      "rate": {"per_minute": 100}},
     "POST", "/open-apis/im/v1/chats", {}, '{"name":"群"}'.encode(),
     "api:POST /open-apis/im/v1/chats", (Window(100, 60),), None, (), False),
    ({"kind": "api.call", "id": "n-16c", "method": "PUT", "path": "/open-apis/x/:a/y/:b",
      "path_params": {"a": "1 2", "b": "é?"}, "body": [1, "two"], "rate": {"per_second": 3}},
     "PUT", "/open-apis/x/1%202/y/%C3%A9%3F", {}, b'[1,"two"]',
     "api:PUT /open-apis/x/:/y/:", (Window(3, 1),), None, (), False),
]


@pytest.mark.parametrize(
    ("intent", "method", "path", "query", "body", "api", "api_windows", "target", "target_windows", "uuid"),
    CASES, ids=[f"{c[0]['kind']}:{c[0]['id']}" for c in CASES],
)
def test_build_call(intent: dict[str, Any], method: str, path: str, query: dict[str, str], body: bytes | None,
                    api: str, api_windows: tuple[Window, ...], target: str | None,
                    target_windows: tuple[Window, ...], uuid: bool) -> None:
    built = call(intent)
    assert (built.method, built.path, built.query) == (method, path, query)
    assert built.body == body
    assert built.api == api
    assert built.api_windows == api_windows
    assert (built.target, built.target_windows) == (target, target_windows)
    assert built.uuid_protected is uuid


def test_every_kind_is_covered() -> None:
    kinds = {c[0]["kind"] for c in CASES}
    assert len(kinds) == 18


# kind -> safe to repeat (relay.calls "Safe to repeat"); api.call by method
REPEATABLE: dict[str, bool] = {
    "message.send": True, "message.reply": True, "message.forward": True, "message.edit": True,
    "card.patch": True, "message.recall": True, "reaction.remove": True, "pin.add": True, "pin.remove": True,
    "chat_button.update": True, "url_preview.update": True, "ephemeral.delete": True,
    "message.urgent": False, "reaction.add": False, "ephemeral.send": False, "card.delay_update": False,
    "message.batch_send": False,
}
API_CALL_REPEATABLE = {"GET": True, "PUT": True, "DELETE": True, "POST": False, "PATCH": False}


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]['kind']}:{c[0]['id']}" for c in CASES])
def test_repeatable_is_decided_per_api(case: tuple[Any, ...]) -> None:
    intent = case[0]
    built = call(intent)
    expected = API_CALL_REPEATABLE[intent["method"]] if intent["kind"] == "api.call" else REPEATABLE[intent["kind"]]
    assert built.repeatable is expected
    assert not built.uuid_protected or built.repeatable  # a uuid makes a call repeatable, never the reverse


@pytest.mark.parametrize(("method", "repeatable"), sorted(API_CALL_REPEATABLE.items()))
def test_api_call_is_repeatable_by_http_method(method: str, repeatable: bool) -> None:
    built = call({"kind": "api.call", "id": "a-1", "method": method, "path": "/open-apis/x/v1/y",
                  "rate": {"per_second": 5}})
    assert built.repeatable is repeatable


def test_every_kind_has_a_repeatable_answer() -> None:
    assert {c[0]["kind"] for c in CASES} - {"api.call"} == set(REPEATABLE)


def test_content_string_is_passed_through_untouched() -> None:
    given = '{"text": "hi",  "extra": 1}'
    built = call({"kind": "message.send", "id": "s", "receive_id_type": "open_id", "receive_id": "ou_1",
                  "msg_type": "text", "content": given})
    assert built.body is not None
    assert json.loads(built.body)["content"] == given


def test_content_object_becomes_the_json_string() -> None:
    card = {"config": {"update_multi": True}, "elements": [{"tag": "markdown", "content": "**中文**"}]}
    built = call({"kind": "card.patch", "id": "p", "message_id": "om_1", "content": card})
    assert built.body is not None
    content = json.loads(built.body)["content"]
    assert isinstance(content, str) and json.loads(content) == card


def test_ids_cannot_escape_their_path_segment() -> None:
    built = call({"kind": "message.recall", "id": "r", "message_id": "om_1?x=1#y"})
    assert built.path == "/open-apis/im/v1/messages/om_1%3Fx%3D1%23y"
    for hostile in ("om_1/../pins", "..", ".", "..;x", "a\\b", "a%2F", "a\x00"):  # refused at decode
        with pytest.raises(IntentError, match=r"\$\.message_id: must be one path segment"):
            call({"kind": "message.recall", "id": "r", "message_id": hostile})


def test_send_reply_forward_to_one_recipient_share_a_target() -> None:
    """Feishu's 5/s per chat or user counts send, reply and forward together: one target string for all three."""
    send = call({"kind": "message.send", "id": "a", "receive_id_type": "chat_id", "receive_id": "oc_9",
                 "msg_type": "text", "content": {"text": "x"}})
    forward = call({"kind": "message.forward", "id": "b", "message_id": "om_1", "receive_id_type": "chat_id",
                    "receive_id": "oc_9"})
    reply = call({"kind": "message.reply", "id": "c", "message_id": "om_1", "chat_id": "oc_9", "msg_type": "text",
                  "content": {"text": "x"}})
    assert send.target == forward.target == reply.target == "chat:oc_9"
    assert len({send.api, forward.api, reply.api}) == 3  # the limiter keys targets by (app, target) only
    to_user = call({"kind": "message.send", "id": "d", "receive_id_type": "union_id", "receive_id": "on_1",
                    "msg_type": "text", "content": {"text": "x"}})
    forward_to_user = call({"kind": "message.forward", "id": "e", "message_id": "om_1",
                            "receive_id_type": "union_id", "receive_id": "on_1"})
    assert to_user.target == forward_to_user.target == "user:union_id:on_1"
    patch = call({"kind": "card.patch", "id": "f", "message_id": "om_1", "content": {"elements": []}})
    pin = call({"kind": "pin.add", "id": "g", "message_id": "om_1"})
    assert patch.target == pin.target == "message:om_1"
    ephemeral = call({"kind": "ephemeral.send", "id": "h", "chat_id": "oc_9", "open_id": "ou_1",
                      "card": {"elements": []}})
    assert ephemeral.target == "ephemeral-chat:oc_9" and ephemeral.target_windows == (Window(40, 1),)


def test_check_share_names_the_api_and_window_that_gets_no_call(monkeypatch: pytest.MonkeyPatch) -> None:
    check_share(1.0, 1.0, 0.15, 0.975)
    check_share(0.2, 10.0, 0.15, 0.975)  # 1 URL preview per second per replica: still a call
    with pytest.raises(ValueError, match=r"im\.url_preview\.batch_update's 5 calls per 1 s leaves no call"):
        check_share(0.19, 1.0, 0.15, 0.975)
    # with URL previews excused, chat buttons (10/s) are the next window a small share empties
    monkeypatch.delitem(API_WINDOWS, "im.url_preview.batch_update")
    check_share(0.1, 1.0, 0.15, 0.975)
    with pytest.raises(ValueError, match=r"im\.chat_button\.update's 10 calls per 1 s"):
        check_share(0.09, 1.0, 0.15, 0.975)


def test_api_call_buckets_share_the_template() -> None:
    def read_users(message_id: str) -> Call:
        return call({"kind": "api.call", "id": message_id, "method": "GET",
                     "path": "/open-apis/im/v1/messages/:message_id/read_users",
                     "path_params": {"message_id": message_id}, "rate": {"per_second": 5}})

    assert read_users("om_1").api == read_users("om_2").api
    assert read_users("om_1").path != read_users("om_2").path


def test_url_preview_call_for_the_coalescer() -> None:
    everyone = url_preview_call(["a", "b"], None)
    assert everyone.body == b'{"preview_tokens":["a","b"]}'
    assert url_preview_call(("a",), []).body == b'{"preview_tokens":["a"]}'
    some = url_preview_call(["a"], ("ou_1", "ou_2"))
    assert some.body == b'{"preview_tokens":["a"],"open_ids":["ou_1","ou_2"]}'
    assert some.api == "im.url_preview.batch_update" and some.target is None
    assert tuple(PREVIEW_TOKEN_WINDOWS) == (Window(1, 5),)


@pytest.mark.parametrize(("tokens", "open_ids"), [([], None), ([str(i) for i in range(11)], None),
                                                  (["a"], [f"ou_{i}" for i in range(101)])])
def test_url_preview_call_refuses_what_feishu_would(tokens: list[str], open_ids: list[str] | None) -> None:
    with pytest.raises(ValueError, match="url_preview_call"):
        url_preview_call(tokens, open_ids)


def test_every_named_api_has_windows_inside_feishus() -> None:
    for api, windows in API_WINDOWS.items():
        assert windows, api
        for window in windows:
            assert window.limit > 0 and window.seconds > 0
    assert API_WINDOWS["im.chat_button.update"] == (Window(10, 1),)
    assert API_WINDOWS["im.url_preview.batch_update"] == (Window(5, 1),)


def _api_call(method: str, path: str, params: dict[str, str] | None = None, **fields: Any) -> Call:
    return call({"kind": "api.call", "id": "a", "method": method, "path": path, "path_params": params or {},
                 "rate": fields.pop("rate", {"per_second": 50, "per_minute": 1000}), **fields})


# (method, path, params, extra fields) -> the built-in API, its target
BUILT_INS: list[tuple[str, str, dict[str, str], dict[str, Any], str, str | None]] = [
    ("POST", "/open-apis/im/v1/messages", {}, {"query": {"receive_id_type": "chat_id"},
                                               "body": {"receive_id": "oc_1", "msg_type": "text", "content": "{}"}},
     "im.message.create", "chat:oc_1"),
    ("POST", "/open-apis/im/v1/messages/", {}, {"query": {"receive_id_type": "union_id"},
                                                "body": {"receive_id": "on_1"}},
     "im.message.create", "user:union_id:on_1"),
    ("POST", "/open-apis/im/v1/messages", {}, {"body": {"receive_id": "oc_1"}}, "im.message.create", None),
    ("POST", "/open-apis/im/v1/messages/:id/reply", {"id": "om_1"}, {}, "im.message.reply", "reply:om_1"),
    ("POST", "/open-apis/im/v1/messages/om_1/reply", {}, {}, "im.message.reply", "reply:om_1"),
    ("POST", "/open-apis/im/v1/:what/:m/forward", {"what": "messages", "m": "om_1"},
     {"query": {"receive_id_type": "open_id"}, "body": {"receive_id": "ou_1"}},
     "im.message.forward", "user:open_id:ou_1"),
    ("PUT", "/open-apis/im/v1/messages/:x", {"x": "om_1"}, {}, "im.message.update", None),
    ("DELETE", "/open-apis/im/v1/messages/om_1", {}, {}, "im.message.delete", None),
    ("PATCH", "/open-apis/im/v1/messages/:message", {"message": "om_1"}, {}, "im.message.patch", "message:om_1"),
    ("PATCH", "/open-apis/im/v1/messages/:m/urgent_sms", {"m": "om_1"}, {}, "im.message.urgent_sms", None),
    ("POST", "/open-apis/im/v1/messages/:m/reactions", {"m": "om_1"}, {}, "im.message_reaction.create", None),
    ("DELETE", "/open-apis/im/v1/messages/:m/reactions/:r", {"m": "om_1", "r": "r_1"}, {},
     "im.message_reaction.delete", None),
    ("POST", "/open-apis/im/v1/pins", {}, {"body": {"message_id": "om_1"}}, "im.pin.create", "message:om_1"),
    ("DELETE", "/open-apis/im/v1/pins/:p", {"p": "om_1"}, {}, "im.pin.delete", "message:om_1"),
    ("POST", "/open-apis/interactive/v1/card/update", {}, {}, "interactive.card.update", None),
    ("POST", "/open-apis/ephemeral/v1/send", {}, {"body": {"chat_id": "oc_1"}}, "ephemeral.send",
     "ephemeral-chat:oc_1"),
    ("POST", "/open-apis/ephemeral/v1/delete", {}, {}, "ephemeral.delete", None),
    ("PUT", "/open-apis/im/v2/chat_button", {}, {}, "im.chat_button.update", None),
    ("POST", "/open-apis/message/v4/batch_send", {}, {}, "message.batch_send", None),
    ("POST", "/open-apis/message/v4/batch_send/", {}, {}, "message.batch_send", None),
]


@pytest.mark.parametrize(("method", "path", "params", "fields", "api", "target"), BUILT_INS,
                         ids=[f"{c[0]} {c[1]}" for c in BUILT_INS])
def test_an_api_call_to_a_built_in_api_is_that_api(method: str, path: str, params: dict[str, str],
                                                   fields: dict[str, Any], api: str, target: str | None) -> None:
    """Same method and path shape as a built-in (any param names, literal ids, a trailing slash): the same API
    name, so the same app-wide bucket, and the built-in's per-target key where the call names the target."""
    built = _api_call(method, path, params, **fields)
    assert built.api == api
    # 50/s and 1000/min given: the built-in's own windows (a 10/s chat_button also gets the lax minute window)
    assert built.api_windows == stricter(API_WINDOWS[api], IM)
    assert built.target == target
    assert built.target_windows == (() if target is None else
                                    (Window(40, 1),) if api == "ephemeral.send" else FIVE)
    assert built.learns is (api in ("im.message.create", "im.message.reply", "im.message.forward"))


def test_every_built_in_route_is_a_named_api() -> None:
    assert {route.api for route in ROUTES} == set(API_WINDOWS) - {"im.url_preview.batch_update"}


def test_a_stricter_rate_on_a_built_in_tightens_its_windows() -> None:
    built = _api_call("POST", "/open-apis/im/v1/messages/om_1/reactions", rate={"per_second": 10})
    assert built.api == "im.message_reaction.create"
    assert built.api_windows == (Window(10, 1), Window(1000, 60))


def test_other_api_calls_are_one_api_whatever_the_param_names_or_literal_ids() -> None:
    names = {_api_call("GET", path, params).api for path, params in [
        ("/open-apis/im/v1/chats/:chat_id/members", {"chat_id": "oc_1"}),
        ("/open-apis/im/v1/chats/:id/members", {"id": "oc_2"}),
        ("/open-apis/im/v1/chats/oc_3/members", {}),
        ("/open-apis/im/v1/chats/oc_3/members/", {}),
    ]}
    assert names == {"api:GET /open-apis/im/v1/chats/:/members"}
    assert api_name("GET", "/open-apis/contact/v3/users/a@b.cn") == "api:GET /open-apis/contact/v3/users/:"
    assert api_name("GET", "/open-apis/contact/v3/users/batch") == "api:GET /open-apis/contact/v3/users/batch"
    assert _api_call("GET", "/open-apis/im/v1/messages/om_1").api == "api:GET /open-apis/im/v1/messages/:"


# --- CardKit and uploads -------------------------------------------------------------------------------------

CARD = (Window(10, 1),)


def card_call(intent: dict[str, Any], sequence: int | None = 7) -> Call:
    return build_call(decode_intent(json.dumps(intent).encode()), sequence=sequence)


def test_card_sequence_is_the_offset_plus_one_within_int32() -> None:
    assert [card_sequence(offset) for offset in (0, 1, 41)] == [1, 2, 42]
    assert card_sequence(MAX_SEQUENCE - 1) == MAX_SEQUENCE
    assert card_sequence(MAX_SEQUENCE) is None  # Feishu takes int32 only: refused, never wrapped
    offsets = [3, 9, 10, 200]  # any increasing offsets (gaps where records were superseded) stay increasing
    sequences = [card_sequence(o) or 0 for o in offsets]
    assert sequences == sorted(set(sequences)) and 0 not in sequences


def test_card_create_sends_the_card_as_a_json_string() -> None:
    c = call({"kind": "card.create", "id": "k1", "card": {"schema": "2.0", "body": {"elements": []}}})
    assert (c.method, c.path, c.api, c.target, c.repeatable) == (
        "POST", "/open-apis/cardkit/v1/cards", "cardkit.card.create", None, False)
    assert json.loads(c.body or b"") == {"type": "card_json",
                                         "data": '{"schema":"2.0","body":{"elements":[]}}'}
    t = call({"kind": "card.create", "id": "k2", "template": {"template_id": "AAq1", "template_variable": {"a": 1}}})
    assert json.loads(t.body or b"") == {"type": "template",
                                         "data": '{"template_id":"AAq1","template_variable":{"a":1}}'}


def test_card_send_is_a_message_send_of_the_entity() -> None:
    c = call({"kind": "card.send", "id": "k3", "receive_id_type": "chat_id", "receive_id": "oc_1", "card_id": "c1"})
    assert (c.method, c.path, c.query, c.api, c.target, c.target_windows) == (
        "POST", "/open-apis/im/v1/messages", {"receive_id_type": "chat_id"}, "im.message.create", "chat:oc_1", FIVE)
    assert c.body == (b'{"receive_id":"oc_1","msg_type":"interactive",'
                      b'"content":"{\\"type\\":\\"card\\",\\"data\\":{\\"card_id\\":\\"c1\\"}}","uuid":"k3"}')


@pytest.mark.parametrize(("intent", "method", "path", "api", "body"), [
    ({"kind": "card.stream", "id": "s1", "card_id": "c1", "element_id": "md", "content": "Hel"},
     "PUT", "/open-apis/cardkit/v1/cards/c1/elements/md/content", "cardkit.card_element.content",
     {"content": "Hel", "sequence": 7, "uuid": "s1"}),
    ({"kind": "card.settings", "id": "s2", "card_id": "c1", "settings": {"config": {"streaming_mode": True}}},
     "PATCH", "/open-apis/cardkit/v1/cards/c1/settings", "cardkit.card.settings",
     {"settings": '{"config":{"streaming_mode":true}}', "sequence": 7, "uuid": "s2"}),
    ({"kind": "card.update", "id": "s3", "card_id": "c1", "card": {"schema": "2.0", "body": {"elements": []}}},
     "PUT", "/open-apis/cardkit/v1/cards/c1", "cardkit.card.update",
     {"card": {"type": "card_json", "data": '{"schema":"2.0","body":{"elements":[]}}'}, "sequence": 7,
      "uuid": "s3"}),
    ({"kind": "card.finish", "id": "s4", "card_id": "c1", "summary": "Hi"},
     "PATCH", "/open-apis/cardkit/v1/cards/c1/settings", "cardkit.card.settings",
     {"settings": '{"config":{"streaming_mode":false,"summary":{"content":"Hi"}}}', "sequence": 7, "uuid": "s4"}),
    ({"kind": "card.finish", "id": "s5", "card_id": "c1"},
     "PATCH", "/open-apis/cardkit/v1/cards/c1/settings", "cardkit.card.settings",
     {"settings": '{"config":{"streaming_mode":false}}', "sequence": 7, "uuid": "s5"}),
])
def test_card_operations_carry_sequence_and_uuid_and_the_card_limit(
        intent: dict[str, Any], method: str, path: str, api: str, body: dict[str, Any]) -> None:
    c = card_call(intent)
    assert (c.method, c.path, c.api, c.api_windows, c.target, c.target_windows, c.repeatable) == (
        method, path, api, IM, "card:c1", CARD, True)
    assert json.loads(c.body or b"") == body
    with pytest.raises(ValueError, match="needs its sequence"):
        card_call(intent, sequence=None)


def test_uploads_are_multipart_forms_with_the_file_last() -> None:
    image = call({"kind": "image.upload", "id": "u1", "data": "iVBORw0KGgo="})
    assert (image.method, image.path, image.api, image.body, image.repeatable) == (
        "POST", "/open-apis/im/v1/images", "im.image.create", None, False)
    assert [(f.name, f.value, f.filename) for f in image.form] == [
        ("image_type", "message", None), ("image", b"\x89PNG\r\n\x1a\n", "image")]
    file = call({"kind": "file.upload", "id": "u2", "file_type": "mp4", "file_name": "clip.mp4", "duration": 3000,
                 "data": "AAAA"})
    assert (file.path, file.api) == ("/open-apis/im/v1/files", "im.file.create")
    assert [(f.name, f.value, f.filename) for f in file.form] == [
        ("file_type", "mp4", None), ("file_name", "clip.mp4", None), ("duration", "3000", None),
        ("file", b"\x00\x00\x00", "clip.mp4")]


def test_unsendable_card_operations_and_uploads() -> None:
    stream = decode_intent(b'{"kind":"card.stream","id":"s","card_id":"c1","element_id":"md","content":"x"}')
    assert unsendable(stream, key=b"c1", offset=0, max_upload_bytes=1) is None
    assert (unsendable(stream, key=b"other", offset=0, max_upload_bytes=1) or "").startswith("key: ")
    assert (unsendable(stream, key=None, offset=0, max_upload_bytes=1) or "").startswith("key: ")
    assert (unsendable(stream, key=b"c1", offset=MAX_SEQUENCE, max_upload_bytes=1) or "").startswith("sequence: ")
    image = decode_intent(b'{"kind":"image.upload","id":"u","data":"iVBORw0KGgo="}')
    assert unsendable(image, key=b"u", offset=0, max_upload_bytes=8) is None
    assert (unsendable(image, key=b"u", offset=0, max_upload_bytes=7) or "").startswith("data: ")


def test_api_calls_to_cardkit_and_upload_paths_are_those_apis() -> None:
    c = call({"kind": "api.call", "id": "a", "method": "PUT",
              "path": "/open-apis/cardkit/v1/cards/c9/elements/e/content",
              "body": {"content": "x", "sequence": 1}, "rate": {"per_second": 50}})
    assert (c.api, c.target, c.target_windows) == ("cardkit.card_element.content", "card:c9", CARD)
    up = call({"kind": "api.call", "id": "b", "method": "POST", "path": "/open-apis/im/v1/images",
               "rate": {"per_second": 50}})
    assert up.api == "im.image.create"
