"""chat_button.update end to end (docs/feishu-rules.md §5.5): intents on the real broker, the whole relay
in-process, the sandbox as Feishu. Every validation rule of the page broken once, the partial-failure answer,
230027, and the order of successive (full-replacement) updates for one chat."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import APP_ID, APP_SECRET, Collector, config_data, produce, relay_in_process, to_config

pytestmark = pytest.mark.integration

KIND = "chat_button.update"
BUTTON: dict[str, Any] = {"action_type": "url_page", "text": {"text": "Open"},
                          "multi_url": {"url": "https://www.feishu.cn/"}}
GOOD: dict[str, Any] = {"kind": KIND, "id": "good", "chat_id": "oc_good", "user_ids": ["ou_1"],
                        "buttons": {"buttons": [BUTTON]}}


def with_button(**changes: Any) -> dict[str, Any]:
    return {**GOOD, "buttons": {"buttons": [{**BUTTON, **changes}]}}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != name}


# (case, intent without id, the field path the reason must name) - one rule of §5.5 broken each
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("chat_id required", without("chat_id"), "$.chat_id"),
    ("chat_id non-empty", {**GOOD, "chat_id": ""}, "$.chat_id"),
    ("user_id_type enum", {**GOOD, "user_id_type": "email"}, "$.user_id_type"),
    ("user_ids at least 1", {**GOOD, "user_ids": []}, "$.user_ids"),
    ("user_ids at most 20", {**GOOD, "user_ids": [f"ou_{i}" for i in range(21)]}, "$.user_ids"),
    ("buttons.buttons required", {**GOOD, "buttons": {}}, "$.buttons.buttons"),
    ("buttons.buttons at most 2", {**GOOD, "buttons": {"buttons": [BUTTON] * 3}}, "$.buttons.buttons"),
    ("action_type required", {**GOOD, "buttons": {"buttons": [{k: v for k, v in BUTTON.items()
                                                              if k != "action_type"}]}},
     "$.buttons.buttons[0].action_type"),
    ("action_type enum", with_button(action_type="open"), "$.buttons.buttons[0].action_type"),
    ("text required", {**GOOD, "buttons": {"buttons": [{k: v for k, v in BUTTON.items() if k != "text"}]}},
     "$.buttons.buttons[0].text"),
    ("text.text at least 1", with_button(text={"text": ""}), "$.buttons.buttons[0].text.text"),
    ("text.text at most 30", with_button(text={"text": "x" * 31}), "$.buttons.buttons[0].text.text"),
    ("multi_url https only", with_button(multi_url={"url": "http://www.feishu.cn/"}),
     "$.buttons.buttons[0].multi_url.url"),
    ("multi_url at most 700", with_button(multi_url={"pc_url": "https://" + "x" * 693}),
     "$.buttons.buttons[0].multi_url.pc_url"),
    ("button_type enum", with_button(button_type="danger"), "$.buttons.buttons[0].button_type"),
    ("action_map string to string", with_button(action_map={"foo": 1}), "$.buttons.buttons[0].action_map"),
]

# each bound of the page met exactly: accepted and sent as given
BOUNDS: list[dict[str, Any]] = [
    {**GOOD, "chat_id": "oc_bounds", "user_id_type": "union_id", "user_ids": [f"on_{i}" for i in range(20)],
     "buttons": {"buttons": [
         {"action_type": "webhook", "text": {"text": "y" * 30}, "button_type": "success",
          "action_map": {"foo": "bar"}},
         {"action_type": "url_page", "text": {"text": "z"}, "button_type": "primary",
          "multi_url": {"url": "https://" + "u" * 692, "android_url": "https://a.example/",
                        "ios_url": "https://i.example/", "pc_url": "https://p.example/"}},
     ]}},
    {**GOOD, "chat_id": "oc_cleared", "buttons": {"buttons": []}},  # full replacement: remove every button
    {k: v for k, v in GOOD.items() if k not in ("user_ids", "buttons")} | {"chat_id": "oc_bare"},
]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=5.0, log_bodies=True,
                                 failed_users=frozenset({"ou_left"}), chats_without_bot=frozenset({"oc_nobot"})))
    await box.start()
    yield box
    await box.stop()


async def test_each_rule_rejected_partial_failure_and_bot_not_in_chat(kafka_bootstrap: str, topic_prefix: str,
                                                                       sandbox: Sandbox) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=5.0))
    bad = [{**copy.deepcopy(intent), "id": f"bad-{i}"} for i, (_, intent, _) in enumerate(BAD)]
    bounds = [{**copy.deepcopy(intent), "id": f"bound-{i}"} for i, intent in enumerate(BOUNDS)]
    partial = {**GOOD, "id": "partial", "chat_id": "oc_partial", "user_ids": ["ou_1", "ou_left", "ou_2"]}
    nobot = {**GOOD, "id": "nobot", "chat_id": "oc_nobot"}
    topic = config.kafka.intents_topics[0]
    async with relay_in_process(config):
        await produce(kafka_bootstrap, topic, [*bad, *bounds, partial, nobot])
        async with Collector(kafka_bootstrap, config.kafka.results_topic) as results, \
                Collector(kafka_bootstrap, config.kafka.dead_letter_topic) as dead:
            await results.wait_for(len(bad) + len(bounds) + 2, 30, what="chat_button results")
            await dead.wait_for(len(bad) + 1, 30, what="dead letters", distinct_ids=False)
    got = results.by_id()
    assert all(len(v) == 1 for v in got.values()), "one result per intent"
    letters = {msgspec.json.decode(r.value)["id"]: (r, dict(r.headers)) for r in dead.records}
    assert set(letters) == {*(i["id"] for i in bad), "nobot"}

    # (a) every rule: rejected, the reason names the field, dead-lettered with the same reason; nothing sent
    for (case, _, path), intent in zip(BAD, bad, strict=True):
        (result,) = got[intent["id"]]
        assert result["status"] == "rejected", (case, result)
        assert result["msg"].startswith(path), (case, result["msg"])
        assert result["attempts"] == 0 and result["kind"] == KIND, case
        record, headers = letters[intent["id"]]
        assert record.value == msgspec.json.encode(intent), case
        assert headers["relay.error"] == b"invalid", case
        assert headers["relay.reason"].decode().startswith(path), (case, headers["relay.reason"])
        assert headers["relay.source.topic"] == topic.encode(), case
        assert int(headers["relay.source.offset"]) >= 0 and int(headers["relay.source.partition"]) >= 0
    sent = {c.body["chat_id"]: c for c in sandbox.calls_for(KIND)}
    assert set(sent) == {"oc_bounds", "oc_cleared", "oc_bare", "oc_partial", "oc_nobot"}

    # the bounds themselves are accepted and sent exactly as given (user_id_type goes in the query)
    for intent in bounds:
        (result,) = got[intent["id"]]
        assert result["status"] == "ok", result
        call = sent[intent["chat_id"]]
        assert call.method == "PUT" and call.path == "/open-apis/im/v2/chat_button"
        expected = {k: v for k, v in intent.items() if k not in ("kind", "id", "user_id_type")}
        assert call.body == expected, (call.body, expected)
    assert sent["oc_cleared"].body["buttons"] == {"buttons": []}

    # (b) failed_user_reasons inside a success: partial, the list in data, no dead letter
    (result,) = got["partial"]
    assert result["status"] == "partial" and result["code"] == 0, result
    assert [r["user_id"] for r in result["data"]["failed_user_reasons"]] == ["ou_left"]

    # (c) 230027 bot not in the chat: failed at once with Feishu's code, dead-lettered as a Feishu refusal
    (result,) = got["nobot"]
    assert result["status"] == "failed" and result["attempts"] == 1 and result["code"] == 230027, result
    assert len([c for c in sandbox.calls_for(KIND) if c.body["chat_id"] == "oc_nobot"]) == 1
    _, headers = letters["nobot"]
    assert headers["relay.error"] == b"feishu" and b"bot not in the chat" in headers["relay.reason"], headers
    assert sandbox.violations() == [] and sandbox.throttled_count() == 0


async def test_successive_updates_for_one_chat_are_called_in_partition_order(
        kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=5.0))
    chats = ["oc_a", "oc_b", "oc_c"]
    intents = []
    for i in range(60):  # interleaved: three chats, 20 full replacements each
        chat = chats[i % 3]
        buttons = [] if i % 7 == 0 else [{**BUTTON, "text": {"text": f"v{i}"}}]
        intents.append({**GOOD, "id": f"order-{i}", "chat_id": chat, "buttons": {"buttons": buttons}})
    async with relay_in_process(config):
        await produce(kafka_bootstrap, config.kafka.intents_topics[0], intents)
        async with Collector(kafka_bootstrap, config.kafka.results_topic) as results:
            await results.wait_for(len(intents), 60, what="chat_button results")
    assert {r["status"] for rs in results.by_id().values() for r in rs} == {"ok"}
    calls = sandbox.calls_for(KIND)
    assert sandbox.violations() == [] and sandbox.throttled_count() == 0
    for chat in chats:
        produced = [i["buttons"] for i in intents if i["chat_id"] == chat]
        called = [c.body["buttons"] for c in calls if c.body["chat_id"] == chat]  # the log is in arrival order
        assert called == produced, chat
