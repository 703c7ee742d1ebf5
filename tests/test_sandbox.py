"""The Feishu sandbox: pure window arithmetic with plain numbers, then the real HTTP server with an injected clock.

Nothing here sleeps: every limit and expiry is driven by a ``FakeClock`` the sandbox reads.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from relay.sandbox import Control, Sandbox, SandboxOptions, SandboxStoreApp, SandboxUser
from relay.sandbox.windows import Limit, SlidingWindows

TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
MESSAGES = "/open-apis/im/v1/messages"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Client:
    """One app talking to one sandbox over real HTTP."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base
        self.token = ""

    async def raw(self, method: str, path: str, *, json_body: Any = None, params: dict[str, str] | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with self.session.request(method, self.base + path, json=json_body, params=params,
                                        headers=headers) as resp:
            assert "X-Tt-Logid" in resp.headers
            return resp.status, await resp.json(), dict(resp.headers)

    async def login(self, app_id: str = "cli_a", secret: str = "s") -> dict[str, Any]:
        status, body, _ = await self.raw("POST", TOKEN_PATH, json_body={"app_id": app_id, "app_secret": secret})
        if body.get("code") == 0:
            self.token = body["tenant_access_token"]
        return {"status": status, **body}

    async def call(self, method: str, path: str, json_body: Any = None,
                   params: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
        return await self.raw(method, path, json_body=json_body, params=params,
                              headers={"Authorization": f"Bearer {self.token}"})

    async def send(self, receive_id: str, uuid: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
        body: dict[str, Any] = {"receive_id": receive_id, "msg_type": "text", "content": json.dumps({"text": "hi"})}
        if uuid is not None:
            body["uuid"] = uuid
        return await self.call("POST", MESSAGES, body, {"receive_id_type": "chat_id"})

    async def react(self, message_id: str = "om_x") -> tuple[int, dict[str, Any], dict[str, str]]:
        return await self.call("POST", f"{MESSAGES}/{message_id}/reactions",
                               {"reaction_type": {"emoji_type": "THUMBSUP"}})


Factory = Callable[..., Any]


@pytest_asyncio.fixture(loop_scope="function")  # the tests' loop; the default fixture loop is the session's
async def make() -> AsyncIterator[Factory]:
    """``sandbox, client, clock = await make(**options)``: a started sandbox and a logged-in client."""
    sandboxes: list[Sandbox] = []
    session = aiohttp.ClientSession()

    async def factory(**options: Any) -> tuple[Sandbox, Client, FakeClock]:
        clock = FakeClock()
        sandbox = Sandbox(SandboxOptions(**options), clock=clock)
        sandboxes.append(sandbox)
        client = Client(session, await sandbox.start())
        await client.login()
        return sandbox, client, clock

    try:
        yield factory
    finally:
        await session.close()
        for sandbox in sandboxes:
            await sandbox.stop()


# ---- windows: plain numbers, no server ---------------------------------------------------------------------


def test_window_admits_limit_then_refuses_until_oldest_leaves() -> None:
    windows: SlidingWindows[str] = SlidingWindows()
    per_second = (Limit(50, 1.0),)
    assert all(windows.admit("k", per_second, 10.0 + i * 0.01) is None for i in range(50))
    refusal = windows.admit("k", per_second, 10.5)
    assert refusal is not None and refusal.limit == Limit(50, 1.0)
    assert refusal.retry_after == pytest.approx(0.5)
    assert windows.count("k", Limit(50, 1.0), 10.5) == 50  # the refused call was not recorded
    assert windows.admit("other", per_second, 10.5) is None  # keys are independent
    assert windows.admit("k", per_second, 10.999) is not None
    assert windows.admit("k", per_second, 11.0) is None  # (now - 1 s, now]: the call at 10.0 has left


def test_window_1001st_call_in_a_minute_is_refused_by_the_minute_window() -> None:
    windows: SlidingWindows[str] = SlidingWindows()
    im = (Limit(50, 1.0), Limit(1000, 60.0))
    now = 0.0
    for second in range(20):
        for i in range(50):
            now = second + i * 0.001
            assert windows.admit("send", im, now) is None
    refusal = windows.admit("send", im, 20.5)
    assert refusal is not None and refusal.limit == Limit(1000, 60.0)
    assert refusal.retry_after == pytest.approx(39.5)
    assert windows.admit("send", im, 59.999) is not None
    assert windows.admit("send", im, 60.0) is None


def test_window_last_reports_most_recent_admission() -> None:
    windows: SlidingWindows[str] = SlidingWindows()
    token = (Limit(1, 5.0),)
    assert windows.last("t", token[0]) is None
    assert windows.admit("t", token, 1.0) is None
    assert windows.admit("t", token, 4.0) is not None
    assert windows.last("t", token[0]) == 1.0
    assert windows.admit("t", token, 6.0) is None


# ---- tokens ------------------------------------------------------------------------------------------------


async def test_token_issue_reuse_and_30_minute_rule(make: Factory) -> None:
    sandbox, client, clock = await make(apps={"cli_a": "s"})
    first = client.token
    again = await client.login()
    assert again["tenant_access_token"] == first and again["msg"] == "ok"
    clock.advance(7200 - 1800 - 1)  # 30 min + 1 s left: same token
    assert (await client.login())["tenant_access_token"] == first
    clock.advance(2)  # < 30 min left: a new one, the old one still valid
    fresh = await client.login()
    assert fresh["tenant_access_token"] != first and fresh["expire"] == 7200
    client.token = first
    assert (await client.react())[1]["code"] == 0
    clock.advance(1800)  # the old token's own expiry
    status, body, _ = await client.react()
    assert (status, body["code"]) == (400, 99991663)
    client.token = fresh["tenant_access_token"]
    assert (await client.react())[1]["code"] == 0
    assert sandbox.token_requests == 4


async def test_token_refuses_unknown_app_and_wrong_secret(make: Factory) -> None:
    sandbox, client, _ = await make(apps={"cli_a": "s"})
    assert (await client.login("cli_a", "wrong"))["code"] == 10014
    bad = await client.login("cli_zzz", "s")
    assert (bad["status"], bad["code"]) == (400, 10014)
    assert all(c.body["app_secret"] == "***" for c in sandbox.calls_for("auth.tenant_access_token"))


async def test_missing_and_expired_tokens(make: Factory) -> None:
    sandbox, client, _ = await make()
    status, body, _ = await client.raw("POST", f"{MESSAGES}/om_1/reactions", json_body={})
    assert (status, body["code"]) == (400, 99991661)
    sandbox.expire_tokens()
    status, body, _ = await client.react()
    assert (status, body["code"]) == (400, 99991663)
    await client.login()
    assert (await client.react())[1]["code"] == 0


# ---- app-wide limits ---------------------------------------------------------------------------------------


async def test_51st_call_in_one_second_gets_429(make: Factory) -> None:
    sandbox, client, clock = await make()
    results = await asyncio.gather(*(client.react() for _ in range(50)))
    assert all(body["code"] == 0 for _, body, _ in results)
    clock.advance(0.6)
    status, body, headers = await client.react()
    assert (status, body["code"], body["msg"]) == (429, 99991400, "request trigger frequency limit")
    assert headers["x-ogw-ratelimit-limit"] == "50"
    assert headers["x-ogw-ratelimit-reset"] == "1"
    assert sandbox.throttled_count() == 1 and len(sandbox.violations()) == 1
    assert (await client.send("oc_other"))[1]["code"] == 0  # another API has its own window
    clock.advance(0.4)
    assert (await client.react())[1]["code"] == 0


async def test_1001st_call_in_a_minute_gets_429(make: Factory) -> None:
    sandbox, client, clock = await make(time_scale=60.0)  # 60 s → 1 s, 1 s → 1/60 s
    for _ in range(20):
        results = await asyncio.gather(*(client.react() for _ in range(50)))
        assert all(body["code"] == 0 for _, body, _ in results)
        clock.advance(1 / 60)
    status, body, headers = await client.react()
    assert (status, body["code"]) == (429, 99991400)
    assert headers["x-ogw-ratelimit-limit"] == "1000"
    assert "1000 per 60s" in (sandbox.violations()[0].violation or "")


async def test_limits_can_be_lifted(make: Factory) -> None:
    sandbox, client, _ = await make(enforce_limits=False)
    results = await asyncio.gather(*(client.send("oc_1") for _ in range(60)))
    assert all(body["code"] == 0 for _, body, _ in results)
    assert sandbox.violations() == []


# ---- per-target limits -------------------------------------------------------------------------------------


async def test_6th_send_to_one_receive_id_in_a_second_gets_230020(make: Factory) -> None:
    sandbox, client, clock = await make()
    for _ in range(5):
        assert (await client.send("oc_1"))[1]["code"] == 0
    status, body, _ = await client.send("oc_1")
    assert (status, body["code"], body["msg"]) == (400, 230020, "This operation triggers the frequency limit")
    assert (await client.send("oc_2"))[1]["code"] == 0
    [violation] = sandbox.violations()
    assert violation.targets == ["receive:oc_1"] and "5 per 1s" in (violation.violation or "")
    clock.advance(1.0)
    assert (await client.send("oc_1"))[1]["code"] == 0


async def test_reply_is_limited_per_chat_of_the_replied_message(make: Factory) -> None:
    sandbox, client, clock = await make()
    parents = []
    for _ in range(3):
        parents.append((await client.send("oc_1"))[1]["data"]["message_id"])
        clock.advance(0.4)
    clock.advance(1.0)
    reply = {"msg_type": "text", "content": json.dumps({"text": "ok"})}
    codes = [(await client.call("POST", f"{MESSAGES}/{parents[i % 3]}/reply", reply))[1]["code"] for i in range(6)]
    assert codes == [0, 0, 0, 0, 0, 230020]
    assert sandbox.violations()[0].targets == ["chat:oc_1"]


async def test_a_person_gets_five_per_second_under_all_their_ids_and_their_p2p_chat(make: Factory) -> None:
    person = SandboxUser(open_id="ou_p", union_id="on_p", user_id="u_p", email="p@x.cn", chat_id="oc_pp")
    sandbox, client, clock = await make(users=(person,))
    hi = json.dumps({"text": "hi"})
    answers = []
    for id_type, receive_id in (("open_id", "ou_p"), ("union_id", "on_p"), ("user_id", "u_p"), ("email", "p@x.cn"),
                                ("chat_id", "oc_pp")):
        answers.append(await client.call("POST", MESSAGES, {"receive_id": receive_id, "msg_type": "text",
                                                            "content": hi}, {"receive_id_type": id_type}))
    assert [body["code"] for _, body, _ in answers] == [0] * 5
    assert {body["data"]["chat_id"] for _, body, _ in answers} == {"oc_pp"}  # one p2p chat, as Feishu answers
    message_id = answers[0][1]["data"]["message_id"]
    reply = {"msg_type": "text", "content": hi}
    assert (await client.call("POST", f"{MESSAGES}/{message_id}/reply", reply))[1]["code"] == 230020
    _, body, _ = await client.call("POST", f"{MESSAGES}/{message_id}/forward", {"receive_id": "on_p"},
                                   {"receive_id_type": "union_id"})
    assert body["code"] == 230020
    assert len(sandbox.violations()) == 2
    clock.advance(1.0)
    other = await client.call("POST", MESSAGES, {"receive_id": "ou_q", "msg_type": "text", "content": hi},
                              {"receive_id_type": "open_id"})
    assert other[1]["data"]["chat_id"] == "oc_p2p_ou_q"  # an id nobody lists: a person of its own


async def test_a_reply_to_a_message_posted_by_somebody_else_counts_in_its_chat(make: Factory) -> None:
    _, client, _ = await make(messages={"om_seen": "oc_g"})
    for _ in range(4):
        assert (await client.send("oc_g"))[1]["code"] == 0
    reply = {"msg_type": "text", "content": json.dumps({"text": "ok"})}
    _, body, _ = await client.call("POST", f"{MESSAGES}/om_seen/reply", reply)
    assert body["code"] == 0 and body["data"]["chat_id"] == "oc_g"
    assert (await client.call("POST", f"{MESSAGES}/om_seen/reply", reply))[1]["code"] == 230020
    _, body, _ = await client.call("POST", f"{MESSAGES}/om_never_seen/reply", reply)  # a chat of its own
    assert body["code"] == 0 and body["data"]["chat_id"] == "oc_of_om_never_seen"


async def test_a_throttled_api_answers_429_with_the_reset_left(make: Factory) -> None:
    sandbox, client, clock = await make()
    sandbox.throttle_api("message.send", 3.0)
    status, body, headers = await client.send("oc_1")
    assert (status, body["code"], headers["x-ogw-ratelimit-reset"]) == (429, 99991400, "3")
    clock.advance(1.2)
    assert (await client.send("oc_1"))[2]["x-ogw-ratelimit-reset"] == "2"
    assert (await client.react())[1]["code"] == 0  # other APIs are not throttled
    clock.advance(1.8)
    assert (await client.send("oc_1"))[1]["code"] == 0
    assert sandbox.violations() == [] and sandbox.throttled_count() == 2  # injected, not the client's doing


@pytest.mark.parametrize("path", ["/open-apis/%2e%2e/auth/v3/x", "/open-apis/im/v1/..%2Fchats", "/open-apis/a/..;/b",
                                  "/open-apis/a/%252e%252E/b", "/open-apis/a/%5Cb", "/auth/v3/x", "/"])
async def test_a_path_outside_open_apis_is_a_violation(make: Factory, path: str) -> None:
    sandbox, client, _ = await make()
    async with client.session.get(URL(client.base + path, encoded=True)) as resp:
        assert resp.status in (400, 404)
    (call,) = sandbox.violations()
    assert call.raw_path == path and ("/open-apis/" in (call.violation or "") or "dot" in (call.violation or "")
                                      or "slash" in (call.violation or ""))


async def test_preview_token_updated_twice_within_5_seconds(make: Factory) -> None:
    sandbox, client, clock = await make()
    path = "/open-apis/im/v2/url_previews/batch_update"
    assert (await client.call("POST", path, {"preview_tokens": ["tok-a"], "open_ids": ["ou_1"]}))[1]["code"] == 0
    clock.advance(4.9)
    status, body, _ = await client.call("POST", path, {"preview_tokens": ["tok-b", "tok-a"]})
    assert (status, body["code"]) == (400, 230020)
    assert "preview-token:tok-a updated 4.900s ago" in (sandbox.violations()[0].violation or "")
    assert (await client.call("POST", path, {"preview_tokens": ["tok-b"]}))[1]["code"] == 0  # not consumed above
    clock.advance(0.1)
    assert (await client.call("POST", path, {"preview_tokens": ["tok-a"]}))[1]["code"] == 0


async def test_url_preview_validation(make: Factory) -> None:
    _, client, _ = await make()
    path = "/open-apis/im/v2/url_previews/batch_update"
    for body, field in [({"preview_tokens": []}, "$.preview_tokens"),
                        ({"preview_tokens": [f"t{i}" for i in range(11)]}, "$.preview_tokens"),
                        ({"preview_tokens": ["t"], "open_ids": [f"ou_{i}" for i in range(101)]}, "$.open_ids")]:
        status, answer, _ = await client.call("POST", path, body)
        assert (status, answer["code"]) == (400, 230001)
        assert field in answer["msg"]


# ---- uuid dedup --------------------------------------------------------------------------------------------


async def test_uuid_dedup_returns_the_same_message(make: Factory) -> None:
    sandbox, client, clock = await make()
    first = (await client.send("oc_1", uuid="n-1"))[1]["data"]["message_id"]
    again = (await client.send("oc_1", uuid="n-1"))[1]["data"]["message_id"]
    assert again == first and sandbox.messages_by_uuid["n-1"] == [first]
    assert [c.deduped for c in sandbox.calls_for("message.send")] == [False, True]
    forward = {"receive_id": "ou_9"}
    params = {"receive_id_type": "open_id", "uuid": "f-1"}
    fwd = [(await client.call("POST", f"{MESSAGES}/{first}/forward", forward, params))[1]["data"]["message_id"]
           for _ in range(2)]
    assert fwd[0] == fwd[1] and len(sandbox.messages_by_uuid["f-1"]) == 1
    clock.advance(3600)  # the 1 h window is over: Feishu performs the uuid again
    assert (await client.send("oc_1", uuid="n-1"))[1]["data"]["message_id"] != first


# ---- validation --------------------------------------------------------------------------------------------


async def test_send_content_must_be_a_json_string(make: Factory) -> None:
    _, client, _ = await make()
    body = {"receive_id": "oc_1", "msg_type": "text", "content": {"text": "an object, not a string"}}
    status, answer, _ = await client.call("POST", MESSAGES, body, {"receive_id_type": "chat_id"})
    assert (status, answer["code"]) == (400, 230001) and "$.content" in answer["msg"]
    body["content"] = "{not json"
    answer = (await client.call("POST", MESSAGES, body, {"receive_id_type": "chat_id"}))[1]
    assert answer["code"] == 230001 and "$.content" in answer["msg"]
    answer = (await client.call("POST", MESSAGES, {**body, "content": "{}"}, {"receive_id_type": "nope"}))[1]
    assert answer["code"] == 230001 and "receive_id_type" in answer["msg"]


GOOD_BUTTONS: dict[str, Any] = {
    "chat_id": "oc_1",
    "user_ids": ["ou_1"],
    "buttons": {"buttons": [{"action_type": "url_page", "text": {"text": "Open"}, "button_type": "primary",
                             "multi_url": {"url": "https://example.com/", "pc_url": "https://example.com/pc"},
                             "action_map": {"foo": "bar"}}]},
}


def _broken(path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(GOOD_BUTTONS)
    node: Any = body
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return body


@pytest.mark.parametrize(("path", "value", "field"), [
    ("chat_id", KeyError, "chat_id"),
    ("user_ids", [], "$.user_ids"),
    ("user_ids", [f"ou_{i}" for i in range(21)], "$.user_ids"),
    ("buttons.buttons", [GOOD_BUTTONS["buttons"]["buttons"][0]] * 3, "$.buttons.buttons"),
    ("buttons.buttons.0.action_type", KeyError, "action_type"),
    ("buttons.buttons.0.action_type", "open", "$.buttons.buttons[0].action_type"),
    ("buttons.buttons.0.text", KeyError, "text"),
    ("buttons.buttons.0.text.text", "", "$.buttons.buttons[0].text.text"),
    ("buttons.buttons.0.text.text", "x" * 31, "$.buttons.buttons[0].text.text"),
    ("buttons.buttons.0.button_type", "danger", "$.buttons.buttons[0].button_type"),
    ("buttons.buttons.0.multi_url.url", "http://example.com/", "$.buttons.buttons[0].multi_url.url"),
    ("buttons.buttons.0.multi_url.ios_url", "https://e.com/" + "a" * 700, "$.buttons.buttons[0].multi_url.ios_url"),
    ("buttons.buttons.0.action_map", {"foo": 1}, "$.buttons.buttons[0].action_map"),
])
async def test_chat_button_validation(make: Factory, path: str, value: Any, field: str) -> None:
    _, client, _ = await make()
    assert (await client.call("PUT", "/open-apis/im/v2/chat_button", GOOD_BUTTONS))[1]["code"] == 0
    status, body, _ = await client.call("PUT", "/open-apis/im/v2/chat_button", _broken(path, value))
    assert (status, body["code"]) == (400, 230001)
    assert field in body["msg"]


async def test_chat_button_user_id_type_partial_failures_and_230027(make: Factory) -> None:
    _, client, _ = await make(failed_users=frozenset({"ou_gone"}), chats_without_bot=frozenset({"oc_out"}))
    path = "/open-apis/im/v2/chat_button"
    status, body, _ = await client.call("PUT", path, GOOD_BUTTONS, {"user_id_type": "email"})
    assert (status, body["code"]) == (400, 230001) and "user_id_type" in body["msg"]
    status, body, _ = await client.call("PUT", path, {**GOOD_BUTTONS, "user_ids": ["ou_1", "ou_gone"]},
                                        {"user_id_type": "open_id"})
    assert (status, body["code"]) == (200, 0)
    assert body["data"]["failed_user_reasons"] == [
        {"error_code": 0, "error_message": "The user is not in the chat", "user_id": "ou_gone"}]
    status, body, _ = await client.call("PUT", path, {**GOOD_BUTTONS, "chat_id": "oc_out"})
    assert (status, body["code"], body["msg"]) == (400, 230027, "no permission, bot not in the chat")


async def test_recalled_message_answers_230011(make: Factory) -> None:
    _, client, _ = await make()
    mid = (await client.send("oc_1"))[1]["data"]["message_id"]
    assert (await client.call("DELETE", f"{MESSAGES}/{mid}"))[1]["code"] == 0
    assert (await client.call("PATCH", f"{MESSAGES}/{mid}", {"content": "{}"}))[1]["code"] == 230011


async def test_every_kind_answers_success(make: Factory) -> None:
    sandbox, client, _ = await make()
    mid = (await client.send("oc_1", uuid="u"))[1]["data"]["message_id"]
    text = {"msg_type": "text", "content": json.dumps({"text": "x"})}
    reaction = (await client.react(mid))[1]["data"]["reaction_id"]
    calls: list[tuple[str, str, Any, dict[str, str] | None]] = [
        ("POST", f"{MESSAGES}/{mid}/reply", {**text, "reply_in_thread": True, "uuid": "r"}, None),
        ("PUT", f"{MESSAGES}/{mid}", text, None),
        ("PATCH", f"{MESSAGES}/{mid}", {"content": json.dumps({"elements": []})}, None),
        ("PATCH", f"{MESSAGES}/{mid}/urgent_app", {"user_id_list": ["ou_1"]}, {"user_id_type": "open_id"}),
        ("PATCH", f"{MESSAGES}/{mid}/urgent_phone", {"user_id_list": ["ou_1"]}, {"user_id_type": "open_id"}),
        ("DELETE", f"{MESSAGES}/{mid}/reactions/{reaction}", None, None),
        ("POST", "/open-apis/im/v1/pins", {"message_id": mid}, None),
        ("DELETE", f"/open-apis/im/v1/pins/{mid}", None, None),
        ("POST", "/open-apis/interactive/v1/card/update", {"token": "c-1", "card": {"elements": []}}, None),
        ("POST", "/open-apis/ephemeral/v1/send",
         {"chat_id": "oc_1", "open_id": "ou_1", "msg_type": "interactive", "card": {"elements": []}}, None),
        ("POST", "/open-apis/ephemeral/v1/delete", {"message_id": "om_e"}, None),
        ("POST", "/open-apis/message/v4/batch_send/", {"msg_type": "text", "content": {"text": "n"},
                                                        "open_ids": ["ou_1"]}, None),
        ("GET", f"{MESSAGES}/{mid}/read_users", None, {"user_id_type": "open_id"}),
        ("DELETE", f"{MESSAGES}/{mid}", None, None),
    ]
    for method, path, body, params in calls:
        status, answer, _ = await client.call(method, path, body, params)
        assert (status, answer["code"]) == (200, 0), (method, path, answer)
    apis = [c.api for c in sandbox.calls if c.api != "auth.tenant_access_token"]
    assert apis == ["message.send", "reaction.add", "message.reply", "message.edit", "card.patch",
                    "message.urgent_app", "message.urgent_phone", "reaction.remove", "pin.add", "pin.remove",
                    "card.delay_update", "ephemeral.send", "ephemeral.delete", "message.batch_send", "api.call",
                    "message.recall"]


# ---- faults and forced answers -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "status"), [("http500", 500), ("http502", 502), ("http503", 503)])
async def test_gateway_faults(make: Factory, kind: str, status: int) -> None:
    sandbox, client, _ = await make(fault_rate=1.0, fault_kinds=(kind,))
    async with client.session.post(f"{client.base}/open-apis/im/v1/messages/om_1/reactions", json={},
                                   headers={"Authorization": f"Bearer {client.token}"}) as resp:
        assert resp.status == status and "X-Tt-Logid" in resp.headers
    assert sandbox.calls[-1].fault == kind


async def test_code_1500_and_dropped_connection(make: Factory) -> None:
    sandbox, client, _ = await make()
    sandbox.set_faults(fault_rate=1.0, fault_kinds=("code1500",))
    status, body, _ = await client.react()
    assert (status, body["code"]) == (500, 1500)
    sandbox.set_faults(fault_kinds=("drop",))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.react()
    assert sandbox.calls[-1].fault == "drop" and sandbox.calls[-1].status == 0
    sandbox.set_faults(fault_rate=0.0)
    assert (await client.react())[1]["code"] == 0


async def test_lost_and_hang_perform_the_operation_then_lose_its_answer(make: Factory) -> None:
    sandbox, client, _ = await make(fault_rate=1.0, fault_kinds=("lost",), hang_seconds=5.0)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.react("om_lost")
    lost = sandbox.calls[-1]
    assert (lost.fault, lost.performed, lost.status) == ("lost", True, 0)
    sandbox.set_faults(fault_kinds=("hang",))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await client.react("om_hang")
    hung = sandbox.calls[-1]
    assert (hung.fault, hung.performed) == ("hang", True)
    # a refusal is answered as usual even with an after-fault rolled: nothing was performed, nothing is lost
    status, body, _ = await client.call("POST", f"{MESSAGES}/om_1/reactions", {"reaction_type": {}})
    assert (status, body["code"]) == (400, 230001)
    assert (sandbox.calls[-1].fault, sandbox.calls[-1].performed) == (None, False)
    sandbox.set_faults(fault_kinds=("drop",))  # before the operation: not performed
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.react("om_drop")
    assert (sandbox.calls[-1].fault, sandbox.calls[-1].performed) == ("drop", False)


async def test_a_uuid_answered_from_the_dedup_cache_is_not_performed_again(make: Factory) -> None:
    sandbox, client, _ = await make()
    assert (await client.send("oc_1", uuid="u-1"))[1]["code"] == 0
    assert (await client.send("oc_1", uuid="u-1"))[1]["code"] == 0
    sends = sandbox.calls_for("message.send")
    assert [(c.performed, c.deduped) for c in sends] == [(True, False), (False, True)]


async def test_token_outage_answers_a_gateway_503_until_cleared(make: Factory) -> None:
    sandbox, client, _ = await make()
    sandbox.apply(Control(token_outage=True))
    async with client.session.post(client.base + TOKEN_PATH, json={"app_id": "cli_a", "app_secret": "s"}) as resp:
        assert resp.status == 503 and "gateway" in await resp.text()
    assert sandbox.calls[-1].fault == "token_outage"
    sandbox.apply(Control(token_outage=False))
    assert (await client.login())["code"] == 0


async def test_http_controls(make: Factory) -> None:
    sandbox, client, clock = await make()
    control = f"{client.base}/_sandbox/control"
    async with client.session.post(control, json={"throttle": [{"target": "receive:oc_hot", "seconds": 10}],
                                                  "fail": [{"target": "oc_bad", "code": 230001}]}) as resp:
        assert resp.status == 200
    assert (await client.send("oc_hot"))[1]["code"] == 230020
    assert (await client.send("oc_cold"))[1]["code"] == 0
    assert (await client.send("oc_bad"))[1]["code"] == 230001
    clock.advance(10)
    assert (await client.send("oc_hot"))[1]["code"] == 0
    assert sandbox.throttled_count() == 1 and sandbox.violations() == []  # injected, not the relay's fault
    async with client.session.get(f"{client.base}/_sandbox/calls", params={"api": "message.send"}) as resp:
        calls = await resp.json()
    assert [c["targets"] for c in calls] == [["receive:oc_hot"], ["receive:oc_cold"], ["receive:oc_bad"],
                                            ["receive:oc_hot"]]
    assert calls[0]["throttled"] and calls[0]["fault"] == "throttle_target receive:oc_hot"
    async with client.session.post(control, json={"expire_tokens": True, "faults": {"latency": 0.0}}) as resp:
        assert resp.status == 200
    assert (await client.send("oc_cold"))[1]["code"] == 99991663
    async with client.session.post(control, json={"unknown": 1}) as resp:
        assert resp.status == 400
    async with client.session.post(f"{client.base}/_sandbox/reset") as resp:
        assert resp.status == 200
    async with client.session.get(f"{client.base}/_sandbox/stats") as resp:
        stats = await resp.json()
    assert stats == {"calls": 0, "token_requests": 0, "app_ticket_resends": 0, "app_ticket_pushes": [],
                     "throttled": 0, "violations": [], "messages_by_uuid": {}}


async def test_forced_codes_per_target(make: Factory) -> None:
    sandbox, client, _ = await make(target_errors={"message:om_gone": 230011}, log_bodies=False)
    assert (await client.react("om_gone"))[1]["code"] == 230011
    sandbox.fail_target("om_busy", 99991400)
    status, body, headers = await client.react("om_busy")
    assert (status, body["code"]) == (429, 99991400) and headers["x-ogw-ratelimit-reset"] == "1"
    sandbox.fail_target("om_busy", 0)
    assert (await client.react("om_busy"))[1]["code"] == 0
    assert sandbox.violations() == [] and all(c.body is None for c in sandbox.calls_for("reaction.add"))


async def test_time_scale_shortens_token_lifetime(make: Factory) -> None:
    _, client, clock = await make(time_scale=100.0)
    assert (await client.login())["expire"] == 72
    clock.advance(72)
    assert (await client.react())[1]["code"] == 99991663


async def test_send_reply_and_forward_share_a_recipients_five_per_second(make: Factory) -> None:
    """docs/feishu-rules.md §2.3: at most 5 per second to the same group (or user), whichever API reaches it."""
    sandbox, client, _clock = await make()
    codes = [(await client.send("oc_g"))[1]["code"] for _ in range(2)]
    parent = sandbox.calls_for("message.send")[0].message_id  # a message the sandbox knows is in oc_g
    reply = {"msg_type": "text", "content": json.dumps({"text": "ok"})}
    codes += [(await client.call("POST", f"{MESSAGES}/{parent}/reply", reply))[1]["code"] for _ in range(2)]
    forward = {"receive_id": "oc_g"}
    codes += [(await client.call("POST", f"{MESSAGES}/om_other/forward", forward,
                                 {"receive_id_type": "chat_id"}))[1]["code"] for _ in range(2)]
    assert codes == [0, 0, 0, 0, 0, 230020]  # the clock stood still: six calls to one group in one second
    assert sandbox.violations()[-1].api == "message.forward"


# ---- CardKit and uploads ----------------------------------------------------------------------------------

CARDS = "/open-apis/cardkit/v1/cards"
STREAM_CARD = {"schema": "2.0", "config": {"streaming_mode": True},
               "body": {"elements": [{"tag": "markdown", "element_id": "md", "content": ""}]}}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


async def new_card(client: Client, card: dict[str, Any] | None = None) -> str:
    status, body, _ = await client.call("POST", CARDS, {"type": "card_json", "data": json.dumps(card or STREAM_CARD)})
    assert (status, body["code"]) == (200, 0), body
    return str(body["data"]["card_id"])


async def stream(client: Client, card_id: str, text: str, sequence: int, uuid: str | None = None,
                 element: str = "md") -> dict[str, Any]:
    body: dict[str, Any] = {"content": text, "sequence": sequence}
    if uuid is not None:
        body["uuid"] = uuid
    return (await client.call("PUT", f"{CARDS}/{card_id}/elements/{element}/content", body))[1]


async def test_cardkit_sequence_must_strictly_increase_per_card(make: Factory) -> None:
    sandbox, client, _ = await make()
    card = await new_card(client)
    assert (await stream(client, card, "He", 5))["code"] == 0
    assert (await stream(client, card, "Hel", 5))["code"] == 300317  # not greater
    assert (await stream(client, card, "Hel", 4))["code"] == 300317
    settings = {"settings": json.dumps({"config": {"summary": {"content": "x"}}}), "sequence": 6}
    assert (await client.call("PATCH", f"{CARDS}/{card}/settings", settings))[1]["code"] == 0
    assert (await stream(client, card, "Hello", 6))["code"] == 300317  # one counter for every operation
    assert (await stream(client, card, "Hello", 7))["code"] == 0
    assert sandbox.cards.by_id[card].sequences == [5, 6, 7] and sandbox.cards.by_id[card].texts["md"] == "Hello"
    body = (await client.call("PUT", f"{CARDS}/{card}/elements/md/content", {"content": "x", "sequence": 0}))[1]
    assert body["code"] == 230001  # a positive int32


async def test_cardkit_uuid_is_performed_once(make: Factory) -> None:
    sandbox, client, _ = await make()
    card = await new_card(client)
    assert (await stream(client, card, "a", 1, uuid="u1"))["code"] == 0
    assert (await stream(client, card, "a", 1, uuid="u1"))["code"] == 0  # the same operation again: answered
    assert [c.performed for c in sandbox.calls_for("card.stream")] == [True, False]


async def test_streaming_mode_closes_ten_minutes_after_it_opened(make: Factory) -> None:
    _, client, clock = await make()
    card = await new_card(client)
    assert (await stream(client, card, "a", 1))["code"] == 0
    clock.advance(600)
    assert (await stream(client, card, "ab", 2))["code"] == 300309
    reopen = {"settings": json.dumps({"config": {"streaming_mode": True}}), "sequence": 3}
    assert (await client.call("PATCH", f"{CARDS}/{card}/settings", reopen))[1]["code"] == 0  # settings still work
    assert (await stream(client, card, "ab", 4))["code"] == 0
    close = {"settings": json.dumps({"config": {"streaming_mode": False}}), "sequence": 5}
    assert (await client.call("PATCH", f"{CARDS}/{card}/settings", close))[1]["code"] == 0
    assert (await stream(client, card, "abc", 6))["code"] == 300309


async def test_cardkit_per_card_rate_is_ten_per_second_across_its_apis(make: Factory) -> None:
    sandbox, client, clock = await make()
    card, other = await new_card(client), await new_card(client)
    codes = [(await stream(client, card, "x" * (i + 1), i + 1))["code"] for i in range(10)]
    settings = {"settings": json.dumps({"config": {}}), "sequence": 11}
    codes.append((await client.call("PATCH", f"{CARDS}/{card}/settings", settings))[1]["code"])
    assert codes == [0] * 10 + [230020]
    assert len(sandbox.violations()) == 1 and "card:" in (sandbox.violations()[0].violation or "")
    assert (await stream(client, other, "x", 1))["code"] == 0  # another card has its own 10
    clock.advance(1.0)
    assert (await stream(client, card, "y", 12))["code"] == 0


async def test_cardkit_refuses_what_feishu_refuses(make: Factory) -> None:
    _, client, _ = await make()
    for card in ({"config": {}}, {"schema": "2.0", "config": {"update_multi": False}}):
        assert (await client.call("POST", CARDS, {"type": "card_json", "data": json.dumps(card)}))[1]["code"] == 230001
    assert (await stream(client, "7000", "x", 1))["code"] == 230099  # no such card
    card = await new_card(client)
    assert (await stream(client, card, "x", 1, element="nope"))["code"] == 300313
    other = Client(client.session, client.base)
    await other.login("cli_other")
    assert (await stream(other, card, "x", 2))["code"] == 230099  # another app's card


async def test_a_card_entity_is_sent_once(make: Factory) -> None:
    _, client, _ = await make()
    card = await new_card(client)
    content = json.dumps({"type": "card", "data": {"card_id": card}})
    body = {"receive_id": "oc_1", "msg_type": "interactive", "content": content}
    assert (await client.call("POST", MESSAGES, body, {"receive_id_type": "chat_id"}))[1]["code"] == 0
    assert (await client.call("POST", MESSAGES, body, {"receive_id_type": "chat_id"}))[1]["code"] == 230099
    unknown = {**body, "content": json.dumps({"type": "card", "data": {"card_id": "1"}})}
    assert (await client.call("POST", MESSAGES, unknown, {"receive_id_type": "chat_id"}))[1]["code"] == 230099


async def upload(client: Client, path: str, fields: dict[str, str], file: tuple[str, bytes] | None
                 ) -> dict[str, Any]:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    if file is not None:
        form.add_field(file[0], io.BytesIO(file[1]), filename="x.bin", content_type="application/octet-stream")
    async with client.session.post(client.base + path, data=form,
                                   headers={"Authorization": f"Bearer {client.token}"}) as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def test_uploads_parse_multipart_and_refuse_what_feishu_refuses(make: Factory) -> None:
    sandbox, client, _ = await make()
    images, files = "/open-apis/im/v1/images", "/open-apis/im/v1/files"
    ok = await upload(client, images, {"image_type": "message"}, ("image", PNG))
    assert ok["code"] == 0 and ok["data"]["image_key"].startswith("img_")
    assert sandbox.uploads.images[ok["data"]["image_key"]].data == PNG
    assert (await upload(client, images, {"image_type": "message"}, ("image", b"%PDF-1.4")))["code"] == 234001
    assert (await upload(client, images, {"image_type": "message"}, ("image", b"")))["code"] == 234010
    big = PNG + b"\x00" * (10 * 1024 * 1024)
    assert (await upload(client, images, {"image_type": "message"}, ("image", big)))["code"] == 234006
    assert (await upload(client, images, {"image_type": "message"}, None))["code"] == 234001
    assert (await client.call("POST", images, {"image_type": "message", "image": "aGk="}))[1]["code"] == 234001
    fine = await upload(client, files, {"file_type": "pdf", "file_name": "a.pdf"}, ("file", b"%PDF-1.4"))
    assert fine["code"] == 0 and fine["data"]["file_key"].startswith("file_")
    assert (await upload(client, files, {"file_type": "pdf"}, ("file", b"%PDF")))["code"] == 234001  # no name
    assert (await upload(client, files, {"file_type": "exe", "file_name": "a.exe"}, ("file", b"MZ")))["code"] == 234001
    # a message may send only keys this app uploaded
    send = {"receive_id": "oc_1", "msg_type": "image", "content": json.dumps({"image_key": ok["data"]["image_key"]})}
    assert (await client.call("POST", MESSAGES, send, {"receive_id_type": "chat_id"}))[1]["code"] == 0
    forged = {**send, "content": json.dumps({"image_key": "img_v3_forged"})}
    assert (await client.call("POST", MESSAGES, forged, {"receive_id_type": "chat_id"}))[1]["code"] == 230001


async def test_store_app_tokens_are_per_tenant_and_so_are_its_windows() -> None:
    shop = SandboxStoreApp(app_secret="s", tenants=frozenset({"t1", "t2"}))
    # time_scale 0.1: "50 in any 1 s" becomes any 10 s, so a slow machine cannot spread the calls past it
    box = Sandbox(SandboxOptions(store_apps={"cli_shop": shop}, ticket_interval=0, log_bodies=False, time_scale=0.1))
    await box.start()
    try:
        async with aiohttp.ClientSession() as http:
            async def post(path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with http.post(box.url + path, json=body, headers=headers,
                                     params={"receive_id_type": "chat_id"} if token else None) as resp:
                    answer: dict[str, Any] = await resp.json()
                    return answer

            auth = "/open-apis/auth/v3/"
            internal = await post(auth + "tenant_access_token/internal", {"app_id": "cli_shop", "app_secret": "s"})
            assert internal["code"] == 10014  # a store app has no internal token
            no_ticket = await post(auth + "app_access_token", {"app_id": "cli_shop", "app_secret": "s",
                                                                "app_ticket": "made-up"})
            assert no_ticket["code"] == 10012
            ticket = box.store.new_ticket("cli_shop").value  # what a push would carry
            app = await post(auth + "app_access_token", {"app_id": "cli_shop", "app_secret": "s",
                                                          "app_ticket": ticket})
            assert app["code"] == 0
            stranger = await post(auth + "tenant_access_token", {"app_access_token": app["app_access_token"],
                                                                  "tenant_key": "t9"})
            assert stranger["code"] == 10003
            tokens = {}
            for tenant in ("t1", "t2"):
                answer = await post(auth + "tenant_access_token", {"app_access_token": app["app_access_token"],
                                                                    "tenant_key": tenant})
                tokens[tenant] = answer["tenant_access_token"]
            body = {"msg_type": "text", "content": '{"text":"x"}'}
            codes: dict[str, list[int]] = {"t1": [], "t2": []}
            for i in range(51):
                for tenant, token in tokens.items():
                    answer = await post("/open-apis/im/v1/messages", {**body, "receive_id": f"oc_{tenant}_{i}"},
                                        token)
                    codes[tenant].append(answer["code"])
    finally:
        await box.stop()
    for tenant in ("t1", "t2"):  # 50 in any 1 s for each tenant: the 51st of each refused, not the 26th
        assert codes[tenant][:50] == [0] * 50 and codes[tenant][50] == 99991400
    assert {c.tenant_key for c in box.calls_for("message.send")} == {"t1", "t2"}
