"""What Feishu's answers teach about which target names are one chat: learning, resolving, forgetting."""

from __future__ import annotations

import pytest

from relay.targets import Aliases


def test_a_send_to_a_user_teaches_its_p2p_chat_and_the_message() -> None:
    aliases = Aliases(100)
    assert aliases.resolve("a", "user:open_id:ou_1") == "user:open_id:ou_1"  # unknown: its own name
    learnt = aliases.learn("a", "user:open_id:ou_1", {"chat_id": "oc_p", "message_id": "om_1", "x": 1})
    assert learnt == ("chat:oc_p", ["user:open_id:ou_1", "reply:om_1"])
    assert aliases.resolve("a", "user:open_id:ou_1") == "chat:oc_p"
    assert aliases.resolve("a", "reply:om_1") == "chat:oc_p"  # a reply to the message counts in its chat
    assert aliases.resolve("other-app", "user:open_id:ou_1") == "user:open_id:ou_1"  # per app
    # a second id of the same person answers with the same chat
    assert aliases.learn("a", "user:union_id:on_1", {"chat_id": "oc_p"}) == ("chat:oc_p", ["user:union_id:on_1"])
    assert aliases.learn("a", "user:union_id:on_1", {"chat_id": "oc_p"}) == ("chat:oc_p", [])  # nothing new


def test_a_reply_teaches_the_replied_message_and_the_new_one() -> None:
    aliases = Aliases(100)
    assert aliases.learn("a", "reply:om_1", {"chat_id": "oc_g", "message_id": "om_2"}) == (
        "chat:oc_g", ["reply:om_1", "reply:om_2"])
    assert aliases.resolve("a", "chat:oc_g") == "chat:oc_g"
    # a chat target teaches only its new message
    assert aliases.learn("a", "chat:oc_g", {"chat_id": "oc_g", "message_id": "om_3"}) == ("chat:oc_g", ["reply:om_3"])


@pytest.mark.parametrize("data", [None, [], "x", {}, {"chat_id": ""}, {"chat_id": 5}, {"message_id": "om_1"}])
def test_an_answer_without_a_chat_teaches_nothing(data: object) -> None:
    aliases = Aliases(100)
    assert aliases.learn("a", "user:open_id:ou_1", data) is None
    assert len(aliases) == 0


def test_the_memory_is_bounded_least_recently_used_first() -> None:
    aliases = Aliases(3)
    for i in range(3):
        aliases.learn("a", f"user:open_id:ou_{i}", {"chat_id": f"oc_{i}"})
    assert aliases.resolve("a", "user:open_id:ou_0") == "chat:oc_0"  # used: now the most recent
    aliases.learn("a", "user:open_id:ou_3", {"chat_id": "oc_3"})
    assert len(aliases) == 3
    assert aliases.resolve("a", "user:open_id:ou_1") == "user:open_id:ou_1"  # the least recently used went
    assert aliases.resolve("a", "user:open_id:ou_0") == "chat:oc_0"
    with pytest.raises(ValueError):
        Aliases(0)
