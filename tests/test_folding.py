"""Latest-wins among a lane's waiting records: which update supersedes which, and what breaks a run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from relay.folding import Folding, foldable, supersedes
from relay.intents import CardPatch, CardSettings, CardStream, Intent, MessageEdit

LANE = ("topic-0", "c1")


def stream(id: str, content: str, *, element: str = "md", card: str = "c1", **extra: Any) -> CardStream:
    return CardStream(id=id, card_id=card, element_id=element, content=content, **extra)


def patch(id: str, *, latest_wins: bool = True, message: str = "om_1") -> CardPatch:
    return CardPatch(id=id, message_id=message, content={"elements": []}, latest_wins=latest_wins)


def folding(*intents: Intent) -> Folding:
    fold = Folding()
    for offset, intent in enumerate(intents):
        fold.add(LANE, offset, intent)
    return fold


def test_a_longer_text_of_the_same_element_supersedes() -> None:
    assert supersedes(stream("a", "Hel"), stream("b", "Hello"))
    assert not supersedes(stream("a", "Hello"), stream("b", "Help"))  # not the whole answer so far
    assert not supersedes(stream("a", "Hel"), stream("b", "Hello", element="other"))
    assert not supersedes(stream("a", "Hel"), stream("b", "Hello", card="c2"))
    assert not supersedes(stream("a", "Hel"), stream("b", "Hello", app="other"))


def test_a_later_update_must_live_as_long() -> None:
    soon, late = datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 2, tzinfo=UTC)
    assert not supersedes(stream("a", "x", expires_at=late), stream("b", "xy", expires_at=soon))
    assert not supersedes(stream("a", "x"), stream("b", "xy", expires_at=late))
    assert supersedes(stream("a", "x", expires_at=soon), stream("b", "xy", expires_at=late))
    assert supersedes(stream("a", "x", expires_at=soon), stream("b", "xy"))


def test_card_patch_folds_only_when_opted_in() -> None:
    assert foldable(patch("a")) and not foldable(patch("a", latest_wins=False))
    assert supersedes(patch("a"), patch("b", latest_wins=False))
    assert not supersedes(patch("a", latest_wins=False), patch("b"))
    assert not supersedes(patch("a"), patch("b", message="om_2"))


def test_every_waiting_update_but_the_last_is_superseded_by_the_last() -> None:
    texts = ["The", "The answer", "The answer is", "The answer is 42."]
    fold = folding(*(stream(f"s{i}", text) for i, text in enumerate(texts)))
    assert [fold.superseded_by(LANE, offset) for offset in range(4)] == ["s3", "s3", "s3", None]


def test_the_last_read_is_sent_and_later_arrivals_supersede_again() -> None:
    fold = folding(stream("s0", "a"), stream("s1", "ab"))
    assert fold.superseded_by(LANE, 0) == "s1"
    fold.done(LANE, 0)
    fold.add(LANE, 2, stream("s2", "abc"))
    assert fold.superseded_by(LANE, 1) == "s2"
    fold.done(LANE, 1)
    assert fold.superseded_by(LANE, 2) is None
    fold.done(LANE, 2)
    assert len(fold) == 0


def test_another_operation_in_between_breaks_the_run() -> None:
    close = CardSettings(id="set", card_id="c1", settings={"config": {"streaming_mode": False}})
    fold = folding(stream("s0", "a"), close, stream("s2", "ab"))
    assert fold.superseded_by(LANE, 0) is None  # it must be seen before streaming closes
    edit = MessageEdit(id="e", message_id="om_1", msg_type="text", content={"text": "x"})
    fold = folding(patch("p0"), edit, patch("p2"))
    assert fold.superseded_by(LANE, 0) is None


def test_updates_of_other_elements_do_not_break_the_run() -> None:
    fold = folding(stream("s0", "a"), stream("t1", "other", element="title"), stream("s2", "ab"))
    assert fold.superseded_by(LANE, 0) == "s2"
    assert fold.superseded_by(LANE, 1) is None


def test_a_rewrite_supersedes_nothing_but_a_later_extension_still_does() -> None:
    fold = folding(stream("s0", "draft"), stream("s1", "final"), stream("s2", "final text"))
    assert fold.superseded_by(LANE, 0) is None  # s1 is not an extension of s0; s2 neither
    assert fold.superseded_by(LANE, 1) == "s2"


def test_lanes_without_foldable_records_keep_nothing_and_forget_drops_a_partition() -> None:
    fold = Folding()
    fold.add(("t-0", "om_1"), 0, patch("p", latest_wins=False))
    assert len(fold) == 0
    fold.add(("t-0", "c1"), 1, stream("s", "a"))
    fold.add(("t-1", "c2"), 2, stream("s", "a", card="c2"))
    fold.forget(["t-0"])
    assert len(fold) == 1


def test_a_stream_refused_for_its_sequence_was_overtaken_other_operations_were_not() -> None:
    from relay.folding import overtaken
    assert overtaken(stream("s", "a"), 300317)
    assert not overtaken(stream("s", "a"), 300309)
    assert not overtaken(CardSettings(id="x", card_id="c1", settings={"config": {}}), 300317)
