"""The responder services use: how it reads a callback record and writes an answer (pure), then against the
real broker and a real relay (the harness of test_replies)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord
from test_replies import Topics, echo, make_config, responding, running

from relay.answers import CardActionAnswer, Toast
from relay.replies import CORRELATION_HEADER, DEADLINE_HEADER, REPLY_TOPIC_HEADER
from relay.responder import Callback, encode_answer, read_callback


def record(headers: list[tuple[str, bytes]], value: bytes = b'{"schema":"2.0"}') -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic="cb", partition=0, offset=0, timestamp=0, timestamp_type=0, key=b"oc_1",
                          value=value, checksum=None, serialized_key_size=4, serialized_value_size=len(value),
                          headers=headers)


def test_a_callback_record_is_read_with_its_request_reply_headers() -> None:
    callback = read_callback(record([("event_type", b"card.action.trigger"), ("event_id", b"e1"), ("app", b"a"),
                                     (CORRELATION_HEADER, b"r.1"), (REPLY_TOPIC_HEADER, b"replies"),
                                     (DEADLINE_HEADER, b"1700000002500")]))
    assert callback == Callback(event_type="card.action.trigger", event_id="e1", app="a", body=b'{"schema":"2.0"}',
                                correlation_id="r.1", reply_topic="replies", deadline=1700000002.5)
    assert callback.event() == {"schema": "2.0"}
    bare = read_callback(record([("event_type", b"url.preview.get"), (DEADLINE_HEADER, b"soon")]))
    assert (bare.correlation_id, bare.reply_topic, bare.deadline, bare.event_id) == (None, None, None, "")


def test_answers_are_encoded_from_structs_dicts_or_bytes() -> None:
    assert encode_answer(None) == b"{}"
    assert encode_answer(b'{"a": 1}') == b'{"a": 1}'
    assert encode_answer({"toast": {"type": "info", "content": "x"}}) == b'{"toast":{"type":"info","content":"x"}}'
    assert encode_answer(CardActionAnswer(toast=Toast(type="info", content="x"))) == \
        b'{"toast":{"type":"info","content":"x"}}'


@pytest.mark.integration
async def test_sync_and_none_answers_and_failures(kafka_bootstrap: str, new_topic: Any) -> None:
    topics = Topics(*await asyncio.gather(new_topic("events"), new_topic("callbacks"), new_topic("replies")))
    threads: set[int] = set()

    def handler(callback: Callback) -> dict[str, Any] | None:
        threads.add(threading.get_ident())
        value = callback.event()["event"]["action"]["value"]["v"]
        if value == "boom":
            raise RuntimeError("the service's own bug")
        if value == "bad":
            return {"toast": {"type": "loud"}}
        if value == "none":
            return None
        return {"toast": {"type": "info", "content": value}}

    config = make_config(kafka_bootstrap, topics, reply_timeout=1.0, fallback_toast="fallback")
    fallback = {"toast": {"type": "info", "content": "fallback"}}
    async with running(config) as relay, responding(kafka_bootstrap, topics, handler) as responder:
        answers = [await relay.click(v) for v in ("sync", "none", "boom", "bad")]
    assert [a[:2] for a in answers] == [(200, {"toast": {"type": "info", "content": "sync"}}), (200, {}),
                                        (200, fallback), (200, fallback)]
    assert answers[1][2] < 1.0  # None is written as {} at once, not left to time out
    assert threading.get_ident() not in threads  # a sync handler runs in a thread, never on the loop
    assert (responder.stats.answered, responder.stats.failed, responder.stats.malformed) == (2, 1, 1)
    assert relay.answers("reply") == 2 and relay.answers("timeout") == 2


@pytest.mark.integration
async def test_callbacks_past_their_deadline_are_not_handled(kafka_bootstrap: str, new_topic: Any) -> None:
    topics = Topics(*await asyncio.gather(new_topic("events"), new_topic("callbacks"), new_topic("replies")))
    seen: list[str] = []

    async def handler(callback: Callback) -> CardActionAnswer:
        seen.append(callback.event()["event"]["action"]["value"]["v"])
        return await echo(callback)

    # the responder's clock runs 10 s ahead: every callback it reads is past its deadline
    async with running(make_config(kafka_bootstrap, topics, reply_timeout=0.5)) as relay, \
            responding(kafka_bootstrap, topics, handler, clock=lambda: time.time() + 10) as responder:
        assert (await relay.click("old"))[:2] == (200, {})
        deadline = time.monotonic() + 30
        while responder.stats.expired < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert seen == [] and responder.stats.answered == 0


async def test_a_responder_whose_start_fails_leaves_nothing_open() -> None:
    """No broker at the address: ``async with Responder(...)`` raises, and neither its producer nor its consumer is
    left for the collector to find unclosed (the ``async with`` never entered, so nobody would stop them)."""
    from aiokafka.errors import KafkaConnectionError

    from relay.responder import Responder
    from tests.relaykit import unclosed_resources

    unclosed_resources()
    responder = Responder("127.0.0.1:9", echo)
    with pytest.raises(KafkaConnectionError):
        async with responder:
            pass
    del responder
    assert unclosed_resources() == []
