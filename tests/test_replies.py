"""Callbacks answered over Kafka: the correlator's bookkeeping (pure), then end to end on the real broker with a
real aiohttp server, Feishu-made requests and the real responder (``relay.responder``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.structs import ConsumerRecord
from feishu_requests import ENCRYPT_KEY, TOKEN, signed, v2

from relay.answers import CardActionAnswer, Toast
from relay.config import AppConfig, Config, InboundConfig, KafkaConfig, Secret
from relay.inbound import Inbound, KafkaPublisher
from relay.kafka import make_producer
from relay.metrics import Metrics
from relay.replies import CORRELATION_HEADER, DEADLINE_HEADER, REPLY_TOPIC_HEADER, Correlator, Delivery, Replies
from relay.responder import Callback, Responder

NewTopicMaker = Callable[..., Awaitable[str]]
JSON = {"Content-Type": "application/json; charset=utf-8"}


# --- the correlator (pure) -----------------------------------------------------------------------------------


async def test_a_reply_reaches_its_request_once_and_only_before_it_ended() -> None:
    table = Correlator("replies", replica="r1")
    first, second = table.open("card.action.trigger", 1000), table.open("url.preview.get", 2000)
    assert first.correlation_id != second.correlation_id and first.correlation_id.startswith("r1.")
    assert dict(first.headers) == {CORRELATION_HEADER: first.correlation_id.encode(),
                                   REPLY_TOPIC_HEADER: b"replies", DEADLINE_HEADER: b"1000"}
    assert table.deliver(first.correlation_id, b'{"a":1}') is Delivery.ANSWERED
    assert first.reply.result() == b'{"a":1}'
    assert table.deliver(first.correlation_id, b"{}") is Delivery.DUPLICATE  # still open, already answered
    table.close(first)
    assert table.deliver(first.correlation_id, b"{}") is Delivery.DUPLICATE  # ended answered
    table.close(second)  # ended without a reply: the deadline passed
    assert second.reply.cancelled()
    assert table.deliver(second.correlation_id, b"{}") is Delivery.LATE
    assert table.deliver("r1.999", b"{}") is Delivery.UNKNOWN
    assert table.deliver("r2.1", b"{}") is Delivery.FOREIGN
    assert table.deliver("no-dot", b"{}") is Delivery.FOREIGN
    assert table.deliver(None, b"{}") is Delivery.UNREADABLE
    assert len(table) == 0


async def test_ended_requests_are_remembered_within_a_bound() -> None:
    table = Correlator("replies", replica="r1", remember=2)
    pendings = [table.open("card.action.trigger", 0) for _ in range(3)]
    for pending in pendings:
        table.close(pending)
    # the oldest is forgotten: a reply to it is unknown, not late (still dropped)
    assert [table.deliver(p.correlation_id, b"{}") for p in pendings] == [Delivery.UNKNOWN, Delivery.LATE,
                                                                          Delivery.LATE]


async def test_replicas_draw_different_ids() -> None:
    assert Correlator("t").replica != Correlator("t").replica


# --- end to end ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    events: str
    callbacks: str
    replies: str


@pytest.fixture
async def topics(new_topic: NewTopicMaker) -> Topics:
    events, callbacks, replies = await asyncio.gather(new_topic("events"), new_topic("callbacks"),
                                                      new_topic("replies"))
    return Topics(events, callbacks, replies)


def make_config(bootstrap: str, topics: Topics, **inbound: Any) -> Config:
    app = AppConfig(name="default", app_id="cli_test", app_secret=Secret("s"), verification_token=Secret(TOKEN),
                    encrypt_key=Secret(ENCRYPT_KEY))
    return Config(kafka=KafkaConfig(bootstrap_servers=bootstrap, events_topic=topics.events,
                                    callbacks_topic=topics.callbacks, replies_topic=topics.replies,
                                    create_topics=False),
                  apps=[app], inbound=InboundConfig(**inbound))


@dataclass
class Relay:
    replies: Replies
    metrics: Metrics
    session: aiohttp.ClientSession
    base: str

    async def click(self, value: str, event_id: str | None = None) -> tuple[int, dict[str, Any], float]:
        """One card click, as Feishu posts it; (status, answer, seconds to the answer)."""
        headers, body = signed(v2("card.action.trigger", {
            "operator": {"open_id": "ou_1"}, "token": "c-1", "action": {"tag": "button", "value": {"v": value}},
            "context": {"open_message_id": "om_1", "open_chat_id": f"oc_{value}"}}, event_id=event_id))
        started = time.perf_counter()
        async with self.session.post(self.base + "/feishu/events", data=body, headers={**JSON, **headers}) as resp:
            answer = await resp.json(content_type=None)
            return resp.status, answer, time.perf_counter() - started

    async def preview(self, url: str) -> tuple[int, dict[str, Any], float]:
        """One link preview request, as Feishu posts it."""
        headers, body = signed(v2("url.preview.get", {
            "operator": {"open_id": "ou_1"}, "host": "im_message",
            "context": {"url": url, "preview_token": "pt-1", "open_chat_id": "oc_1"}}))
        started = time.perf_counter()
        async with self.session.post(self.base + "/feishu/events", data=body, headers={**JSON, **headers}) as resp:
            return resp.status, await resp.json(content_type=None), time.perf_counter() - started

    def answers(self, source: str) -> float:
        return self.metrics.value("relay_callback_answers_total", app="default", event_type="card.action.trigger",
                                  source=source)

    def replies_read(self, outcome: str) -> float:
        return self.metrics.value("relay_callback_replies_total", outcome=outcome)


class SlowPublisher:
    """Kafka takes ``delay`` seconds longer than usual to acknowledge (a busy broker)."""

    def __init__(self, publisher: KafkaPublisher, delay: float) -> None:
        self.publisher, self.delay = publisher, delay

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        await self.publisher.publish(topic, key, value, headers)
        await asyncio.sleep(self.delay)


@contextlib.asynccontextmanager
async def running(config: Config, *, ack_delay: float = 0.0, **replies_options: Any) -> AsyncIterator[Relay]:
    metrics = Metrics()
    publisher = KafkaPublisher(make_producer(config.kafka))
    replies = Replies(config, metrics, **replies_options)
    await publisher.start()
    try:
        await replies.start()
        app = web.Application()
        Inbound(config, SlowPublisher(publisher, ack_delay) if ack_delay else publisher, metrics,
                replies=replies).install(app)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                yield Relay(replies, metrics, session, str(server.make_url("")).rstrip("/"))
        finally:
            await server.close()
    finally:
        await replies.stop()
        await asyncio.wait_for(publisher.stop(), 30)


def value_of(callback: Callback) -> str:
    value: str = callback.event()["event"]["action"]["value"]["v"]
    return value


async def echo(callback: Callback) -> CardActionAnswer:
    """The test responder: a toast naming the click it answers."""
    return CardActionAnswer(toast=Toast(type="success", content=f"got {value_of(callback)}"))


@contextlib.asynccontextmanager
async def responding(bootstrap: str, topics: Topics, handler: Any, **options: Any) -> AsyncIterator[Responder]:
    responder = Responder(bootstrap, handler, callbacks_topic=topics.callbacks, group_id=f"{topics.callbacks}.r",
                          **options)
    await responder.start()
    task = asyncio.create_task(responder.run())
    try:
        await responder.assigned()
        yield responder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await responder.stop()


async def clicks(relay: Relay, values: list[str], concurrency: int) -> list[tuple[int, dict[str, Any], float]]:
    slots = asyncio.Semaphore(concurrency)

    async def one(value: str) -> tuple[int, dict[str, Any], float]:
        async with slots:
            return await relay.click(value)

    return await asyncio.gather(*(one(v) for v in values))


async def warm_up(relay: Relay) -> None:
    """One click answered end to end: a topic made a moment ago makes its first writes wait for its leaders and
    the clients' metadata (seconds, on a busy shared broker), which is not what the tests after it measure."""
    for _ in range(10):
        if (await relay.click("warm-up"))[1] == {"toast": {"type": "success", "content": "got warm-up"}}:
            return
    raise AssertionError("no click answered end to end after 10 tries")


async def eventually(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.mark.integration
async def test_500_clicks_each_get_their_own_answer(kafka_bootstrap: str, topics: Topics) -> None:
    config = make_config(kafka_bootstrap, topics)
    async with running(config) as relay, responding(kafka_bootstrap, topics, echo) as responder:
        await warm_up(relay)
        values = [f"c{i}" for i in range(500)]
        answers = await clicks(relay, values, concurrency=64)
        missed = [(i, round(a[2], 2)) for i, (v, a) in enumerate(zip(values, answers, strict=True))
                  if a[1] != {"toast": {"type": "success", "content": f"got {v}"}}]
        assert not missed, (missed[:20], {s: relay.answers(s) for s in ("reply", "timeout", "malformed")},
                            responder.stats)
        assert [a[0] for a in answers] == [200] * 500
        assert relay.answers("reply") == 501 and relay.answers("timeout") == 0
        assert relay.replies_read("answered") == 501
        assert responder.stats.answered == 501


@pytest.mark.integration
async def test_a_second_responder_joining_mid_stream_loses_no_click(kafka_bootstrap: str, topics: Topics) -> None:
    """A new group starts at the end of the topic; the rebalance a second member causes must not move it there
    again (callbacks published meanwhile would never be read: their clicks would all time out)."""
    config = make_config(kafka_bootstrap, topics)
    async with running(config) as relay, responding(kafka_bootstrap, topics, echo):
        await warm_up(relay)
        values = [f"c{i}" for i in range(300)]
        first = asyncio.create_task(clicks(relay, values[:150], concurrency=8))
        await eventually(lambda: relay.answers("reply") >= 20)
        async with responding(kafka_bootstrap, topics, echo):
            second = await clicks(relay, values[150:], concurrency=8)
        answers = [*await first, *second]
    assert [a[:2] for a in answers] == [(200, {"toast": {"type": "success", "content": f"got {v}"}})
                                        for v in values]


@pytest.mark.integration
async def test_an_acknowledgement_after_publish_timeout_still_leaves_the_reply_its_chance(
        kafka_bootstrap: str, topics: Topics) -> None:
    """publish_timeout bounds an event's wait for Kafka; a callback whose reply is awaited waits up to
    reply_timeout, since the answer would be the fallback either way."""
    config = make_config(kafka_bootstrap, topics, publish_timeout=0.2, reply_timeout=2.5)
    async with running(config, ack_delay=0.5) as relay, responding(kafka_bootstrap, topics, echo):
        assert (await relay.click("slow-ack"))[:2] == (200, {"toast": {"type": "success",
                                                                      "content": "got slow-ack"}})
    assert relay.answers("reply") == 1 and relay.answers("unpublished") == 0


@pytest.mark.integration
async def test_responder_down_every_click_gets_the_fallback_by_the_deadline(kafka_bootstrap: str,
                                                                           topics: Topics) -> None:
    config = make_config(kafka_bootstrap, topics, reply_timeout=0.5, fallback_toast="Received, working on it")
    async with running(config) as relay:
        answers = await clicks(relay, [f"c{i}" for i in range(20)], concurrency=20)
    fallback = {"toast": {"type": "info", "content": "Received, working on it"}}
    assert [a[:2] for a in answers] == [(200, fallback)] * 20
    assert max(a[2] for a in answers) < 3.0  # Feishu's own deadline (the budget is 0.5 s: a wide margin)
    assert relay.answers("timeout") == 20


@pytest.mark.integration
async def test_a_slow_responder_gets_its_late_replies_dropped_and_counted(kafka_bootstrap: str,
                                                                         topics: Topics) -> None:
    async def slow(callback: Callback) -> CardActionAnswer:
        await asyncio.sleep(1.0)
        return await echo(callback)

    config = make_config(kafka_bootstrap, topics, reply_timeout=0.3)
    # its clock runs 10 s behind, so it does not notice it is late and writes every reply anyway
    async with running(config) as relay, \
            responding(kafka_bootstrap, topics, slow, clock=lambda: time.time() - 10) as responder:
        answers = await clicks(relay, ["a", "b", "c"], concurrency=3)
        assert [a[:2] for a in answers] == [(200, {})] * 3
        await eventually(lambda: relay.replies_read("late") == 3)
        assert responder.stats.answered == 3
        assert relay.answers("timeout") == 3 and relay.answers("reply") == 0


class Manual:
    """A hand-made responder: reads the callbacks topic and lets the test write replies."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.consumer = AIOKafkaConsumer(topics.callbacks, bootstrap_servers=bootstrap, group_id=None,
                                         auto_offset_reset="earliest", fetch_max_wait_ms=20)
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)

    async def __aenter__(self) -> Manual:
        await self.consumer.start()
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()
        await self.producer.stop()

    async def next_callback(self) -> ConsumerRecord[bytes, bytes]:
        record: ConsumerRecord[bytes, bytes] = await asyncio.wait_for(self.consumer.getone(), 30)
        return record

    async def reply(self, record: ConsumerRecord[bytes, bytes], value: bytes, *, correlation: bytes | None = None,
                    as_key_only: bool = False, partition: int | None = None) -> None:
        headers = dict(record.headers)
        correlation = correlation or headers[CORRELATION_HEADER]
        topic = headers[REPLY_TOPIC_HEADER].decode()
        await self.producer.send_and_wait(topic, value, key=correlation, partition=partition,
                                          headers=[] if as_key_only else [(CORRELATION_HEADER, correlation)])


@pytest.mark.integration
async def test_late_second_and_stray_replies_are_dropped_and_counted(kafka_bootstrap: str, topics: Topics) -> None:
    config = make_config(kafka_bootstrap, topics, reply_timeout=0.3)
    async with running(config) as relay, Manual(kafka_bootstrap, topics) as manual:
        # no reply in time: the fallback; the reply written afterwards is late
        status, answer, _ = await relay.click("late")
        assert (status, answer) == (200, {})
        late = await manual.next_callback()
        await manual.reply(late, b'{"toast":{"type":"info","content":"too late"}}')
        await eventually(lambda: relay.replies_read("late") == 1)

        # answered by a reply keyed only (no header); a second reply to it is a duplicate
        click = asyncio.create_task(relay.click("keyed"))
        keyed = await manual.next_callback()
        await manual.reply(keyed, b'{"toast":{"type":"info","content":"by key"}}', as_key_only=True)
        assert (await click)[:2] == (200, {"toast": {"type": "info", "content": "by key"}})
        await manual.reply(keyed, b"{}")
        await eventually(lambda: relay.replies_read("duplicate") == 1)

        # another replica's id is skipped; this replica's id that it never issued is unknown
        await manual.reply(keyed, b"{}", correlation=b"someone-else.1")
        await manual.reply(keyed, b"{}", correlation=f"{relay.replies.replica}.999999".encode())
        await eventually(lambda: relay.replies_read("foreign") == 1 and relay.replies_read("unknown") == 1)
    assert relay.answers("timeout") == 1 and relay.answers("reply") == 1


@pytest.mark.integration
async def test_a_parked_reader_wakes_at_the_end_for_the_next_callback(kafka_bootstrap: str, topics: Topics) -> None:
    """With no request waiting the reader parks (no fetches); the next callback wakes it at the end of the topic
    before it is published, so its reply is read, and what was written while it slept is not."""
    config = make_config(kafka_bootstrap, topics)
    async with running(config, park_after=0.3) as relay, Manual(kafka_bootstrap, topics) as manual:
        for n in range(3):
            await eventually(lambda: relay.replies.parked)
            stray = f"someone-else.{n}".encode()  # written while parked
            await manual.producer.send_and_wait(topics.replies, b"{}", key=stray, headers=[(CORRELATION_HEADER, stray)])
            click = asyncio.create_task(relay.click(f"p{n}"))
            record = await manual.next_callback()
            assert not relay.replies.parked
            await manual.reply(record, b'{"toast":{"type":"info","content":"awake"}}')
            assert (await click)[:2] == (200, {"toast": {"type": "info", "content": "awake"}})
            assert relay.replies_read("answered") == n + 1
    assert relay.replies_read("foreign") == 0  # never read: each was before the end the reader woke at


@pytest.mark.parametrize(("reply", "reason"), [
    (b'{"toast":{"type":"loud","content":"x"}}', "shape: Invalid enum value 'loud' - at `$.toast.type`"),
    (b'{"tost":{"type":"info","content":"x"}}', "shape: Object contains unknown field `tost`"),
    (b'{"card":{"type":"raw"}}', "shape: Object missing required field `data`"),
    (b"not json", "json: not a JSON document"),
    (b'{"card":{"type":"raw","data":{"elements":["' + b"x" * 40000 + b'"]}}}', "too_large: 40"),
])
@pytest.mark.integration
async def test_a_malformed_reply_becomes_the_fallback_with_one_log_line(
        kafka_bootstrap: str, topics: Topics, reply: bytes, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(kafka_bootstrap, topics, fallback_toast="Sorry, try again", fallback_toast_type="error")
    caplog.set_level(logging.INFO, logger="relay.replies")
    async with running(config) as relay, Manual(kafka_bootstrap, topics) as manual:
        click = asyncio.create_task(relay.click("m"))
        await manual.reply(await manual.next_callback(), reply)
        status, answer, _ = await click
    assert (status, answer) == (200, {"toast": {"type": "error", "content": "Sorry, try again"}})
    assert relay.answers("malformed") == 1
    [line] = [r.getMessage() for r in caplog.records if r.name == "relay.replies" and r.levelno >= logging.WARNING]
    assert "malformed reply" in line and reason in line
    assert "x" * 100 not in line  # the reason, not the body


@pytest.mark.integration
async def test_two_relays_sharing_the_replies_topic_each_get_their_own_replies(kafka_bootstrap: str,
                                                                             topics: Topics) -> None:
    config = make_config(kafka_bootstrap, topics)
    async with running(config) as one, running(config) as two, responding(kafka_bootstrap, topics, echo):
        assert one.replies.replica != two.replies.replica
        await warm_up(one)
        await warm_up(two)
        values = [f"c{i}" for i in range(200)]

        async def click(i: int, value: str) -> tuple[int, dict[str, Any], float]:
            return await (one if i % 2 else two).click(value)

        answers = await asyncio.gather(*(click(i, v) for i, v in enumerate(values)))
        assert [a[:2] for a in answers] == [(200, {"toast": {"type": "success", "content": f"got {v}"}})
                                            for v in values]
        for relay in (one, two):
            assert relay.answers("reply") == 101
            # each read the other's 101 replies too, and left them alone
            await eventually(lambda r=relay: r.replies_read("foreign") == 101)  # type: ignore[misc]


@pytest.mark.integration
async def test_a_relay_started_after_old_replies_never_reads_them(kafka_bootstrap: str, topics: Topics) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i in range(30):
            await producer.send_and_wait(topics.replies, b"{}", key=f"old.{i}".encode())
    finally:
        await producer.stop()
    async with running(make_config(kafka_bootstrap, topics)) as relay, responding(kafka_bootstrap, topics, echo):
        assert (await relay.click("new"))[:2] == (200, {"toast": {"type": "success", "content": "got new"}})
        total = sum(relay.replies_read(d.value) for d in Delivery)
        assert total == 1, msgspec.json.encode({d.value: relay.replies_read(d.value) for d in Delivery})


@pytest.mark.integration
async def test_relay_run_answers_callbacks_with_the_replies_of_a_service(kafka_bootstrap: str,
                                                                        topic_prefix: str) -> None:
    """The wiring of ``relay run``: the replies topic created, its reader started before the event URL."""
    from relay import app
    from tests.relaykit import config_data, to_config

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = config_data(kafka_bootstrap, topic_prefix, "http://127.0.0.1:9", http={"enabled": True, "port": port},
                       outbound={"enabled": False})
    data["apps"][0]["encrypt_key"] = ENCRYPT_KEY
    data["apps"][0]["verification_token"] = TOKEN
    config = to_config(data)
    topics = Topics(config.kafka.events_topic, config.kafka.callbacks_topic, config.kafka.replies_topic)
    stop = asyncio.Event()
    metrics = Metrics()
    serving = asyncio.create_task(app.serve(config, stop, metrics=metrics))
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(base + "/readyz") as resp:
                        if resp.status == 200:
                            break
                assert not serving.done(), serving.result()
                await asyncio.sleep(0.05)
            relay = Relay(None, metrics, session, base)  # type: ignore[arg-type]  # only click() is used
            async with responding(kafka_bootstrap, topics, echo):
                assert (await relay.click("run"))[:2] == (200, {"toast": {"type": "success", "content": "got run"}})
            assert relay.answers("reply") == 1
    finally:
        stop.set()
        assert await asyncio.wait_for(serving, 60) == 0


@pytest.mark.integration
async def test_partitions_added_to_the_replies_topic_are_read(kafka_bootstrap: str, new_topic: NewTopicMaker) -> None:
    topics = Topics(await new_topic("events"), await new_topic("callbacks"), await new_topic("replies", partitions=1))
    config = make_config(kafka_bootstrap, topics)
    async with running(config, partition_check=0.2) as relay, Manual(kafka_bootstrap, topics) as manual:
        relay.metrics.render()  # gauges are read at a scrape
        assert relay.metrics.value("relay_callback_reply_partitions") == 1
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_partitions({topics.replies: NewPartitions(total_count=3)})
        finally:
            await admin.close()
        await eventually(lambda: (relay.metrics.render() and
                                  relay.metrics.value("relay_callback_reply_partitions") == 3))
        for partition in (2, 0):  # a new partition, and the old one (still where it was)
            click = asyncio.create_task(relay.click(f"p{partition}"))
            await manual.reply(await manual.next_callback(), b'{"toast":{"type":"info","content":"p"}}',
                               partition=partition)
            assert (await click)[:2] == (200, {"toast": {"type": "info", "content": "p"}})
    assert relay.answers("reply") == 2


@pytest.mark.integration
async def test_a_responder_killed_mid_stream_costs_clicks_the_fallback_until_the_group_moves_on(
        kafka_bootstrap: str, topics: Topics) -> None:
    """SIGKILL one of two responders: its partitions' clicks get the fallback until its session times out, then
    the other answers them all; what the dead one read but never committed is re-read, past its deadline, and
    skipped (no reply written for it: the relay counts no late reply)."""
    config = make_config(kafka_bootstrap, topics, reply_timeout=1.0)
    group = f"{topics.callbacks}.r"
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("responder_child.py")), kafka_bootstrap, topics.callbacks,
        group, stdout=asyncio.subprocess.PIPE)
    try:
        async with running(config) as relay, responding(kafka_bootstrap, topics, echo,
                                                        session_timeout_ms=6000) as survivor:
            assert child.stdout is not None
            assert await asyncio.wait_for(child.stdout.readline(), 120) == b"assigned\n"
            await warm_up(relay)
            before = await clicks(relay, [f"a{i}" for i in range(40)], concurrency=4)
            assert all(a[1] == {"toast": {"type": "success", "content": f"got a{i}"}} for i, a in enumerate(before))
            child.kill()
            await child.wait()
            # click on until 40 clicks in a row are answered by a responder (the survivor, once it owns all)
            streak, total, fallback = 0, 0, 0
            while streak < 40:
                assert total < 2000, f"no 40 answered in a row after {total} clicks ({fallback} fallbacks)"
                value = f"b{total}"
                status, answer, _ = await relay.click(value)
                total += 1
                if answer == {}:
                    fallback, streak = fallback + 1, 0
                else:
                    assert (status, answer) == (200, {"toast": {"type": "success", "content": f"got {value}"}})
                    streak += 1
            assert fallback > 0  # the dead one held partitions for a while: proof the kill landed mid-stream
            assert survivor.stats.expired > 0  # re-read what the dead one never committed, and skipped it
            assert relay.replies_read("late") == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


@pytest.mark.integration
async def test_link_previews_are_answered_by_their_own_shape(kafka_bootstrap: str, topics: Topics) -> None:
    async def preview(callback: Callback) -> dict[str, Any]:
        url = callback.event()["event"]["context"]["url"]
        if url.endswith("/toast"):  # a click's answer to a preview: the responder would not write it
            return {"toast": {"type": "info", "content": "x"}}
        return {"inline": {"title": f"Title of {url}", "url": {"pc": url}}}

    config = make_config(kafka_bootstrap, topics, reply_timeout=1.0, fallback_toast="not for previews")
    async with running(config) as relay, responding(kafka_bootstrap, topics, preview) as responder:
        ok = await relay.preview("https://example.com/1")
        wrong = await relay.preview("https://example.com/toast")
    assert ok[:2] == (200, {"inline": {"title": "Title of https://example.com/1",
                                       "url": {"pc": "https://example.com/1"}}})
    assert wrong[:2] == (200, {})  # a preview's fallback is {}: a toast means nothing there
    assert responder.stats.malformed == 1
    count = relay.metrics.value
    assert count("relay_callback_answers_total", app="default", event_type="url.preview.get", source="reply") == 1
    assert count("relay_callback_answers_total", app="default", event_type="url.preview.get", source="timeout") == 1
