"""The event URL end to end: a real aiohttp server, the real broker, requests built like Feishu's, and requests
written byte by byte by a hostile client (aiohttp's own client cannot send a non-UTF-8 header or stall)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord
from conftest import KAFKA_SH, create_topics
from feishu_requests import (
    ENCRYPT_KEY,
    TOKEN,
    challenge,
    encrypt,
    receive,
    sign_raw,
    signed,
    v1,
    v2,
)

from relay.config import AppConfig, Config, InboundConfig, KafkaConfig, Secret
from relay.events import RECEIVE_V1
from relay.inbound import Inbound, KafkaPublisher
from relay.kafka import make_producer
from relay.metrics import Metrics

pytestmark = pytest.mark.integration

NewTopicMaker = Callable[..., Awaitable[str]]

OTHER_TOKEN = "v-token-of-the-other-app"
OTHER_KEY = "encrypt-key-of-the-other-app"
JSON = {"Content-Type": "application/json; charset=utf-8"}


def make_config(bootstrap: str, events: str, callbacks: str, **inbound: Any) -> Config:
    apps = [
        AppConfig(name="default", app_id="cli_test", app_secret=Secret("s"), verification_token=Secret(TOKEN),
                  encrypt_key=Secret(ENCRYPT_KEY)),
        AppConfig(name="plain", app_id="cli_plain", app_secret=Secret("s"), verification_token=Secret(TOKEN)),
        AppConfig(name="other", app_id="cli_other", app_secret=Secret("s"), verification_token=Secret(OTHER_TOKEN),
                  encrypt_key=Secret(OTHER_KEY)),
        AppConfig(name="open", app_id="cli_open", app_secret=Secret("s")),  # no token: never served
    ]
    return Config(kafka=KafkaConfig(bootstrap_servers=bootstrap, events_topic=events, callbacks_topic=callbacks,
                                    create_topics=False),
                  apps=apps, inbound=InboundConfig(**inbound))


def without_token(plain: bytes, token: str = TOKEN) -> bytes:
    """What the relay publishes for ``v2()``'s indented JSON: the same bytes minus the header's token member."""
    member = f'"token": "{token}",\n  '.encode()
    assert plain.count(member) == 1
    return plain.replace(member, b"")


@dataclass
class Relay:
    inbound: Inbound
    metrics: Metrics
    session: aiohttp.ClientSession
    base: str

    async def post(self, body: bytes, headers: dict[str, str] | None = None,
                   path: str = "/feishu/events", *, chunked: bool = False) -> tuple[int, Any]:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 65536):
                yield body[i:i + 65536]

        data = chunks() if chunked else io.BytesIO(body)  # chunked: no Content-Length, the cap still holds
        async with self.session.post(self.base + path, data=data, headers={**JSON, **(headers or {})}) as resp:
            return resp.status, await resp.json(content_type=None)

    async def send(self, request: tuple[dict[str, str], bytes], path: str = "/feishu/events") -> tuple[int, Any]:
        headers, body = request
        return await self.post(body, headers, path)

    async def raw(self, request: RawRequest) -> tuple[int, Any]:
        return await send_raw(self.base, request)


@contextlib.asynccontextmanager
async def running(config: Config, **producer: Any) -> AsyncIterator[Relay]:
    metrics = Metrics()
    settings = {"request_timeout_ms": 5000, "retry_backoff_ms": 200, **producer}
    publisher = KafkaPublisher(make_producer(config.kafka, **settings))
    await publisher.start()
    inbound = Inbound(config, publisher, metrics)
    app = web.Application()
    inbound.install(app)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Relay(inbound, metrics, session, str(server.make_url("")).rstrip("/"))
    finally:
        await server.close()  # shuts the app down: inbound.close() via its on_shutdown hook
        await asyncio.wait_for(publisher.stop(), 30)


# --- a client that writes requests byte by byte -------------------------------------------------------------------

@dataclass
class RawRequest:
    """``framing``: "length" (Content-Length), "chunked", "stall-length" (half the body, then silence),
    "stall-chunked" (one chunk, never the last)."""

    path: str
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    body: bytes = b""
    framing: str = "length"


def raw_headers(headers: dict[str, str], **extra: bytes) -> list[tuple[str, bytes]]:
    """Header pairs as bytes; ``extra`` (``X_Lark_Signature=b"..."``) replaces or adds raw values."""
    out = {name: value.encode() for name, value in {**JSON, **headers}.items()}
    out.update({name.replace("_", "-"): value for name, value in extra.items()})
    return list(out.items())


async def send_raw(base: str, request: RawRequest) -> tuple[int, Any]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        lines = [f"POST {request.path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
        lines += [name.encode() + b": " + value for name, value in request.headers]
        body = request.body
        if request.framing in ("length", "stall-length"):
            lines.append(b"Content-Length: %d" % len(body))
        else:
            lines.append(b"Transfer-Encoding: chunked")
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        if request.framing == "length":
            writer.write(body)
        elif request.framing == "chunked":
            for i in range(0, len(body), 65536):
                writer.write(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536]))
            writer.write(b"0\r\n\r\n")
        elif request.framing == "stall-length":
            writer.write(body[: len(body) // 2])
        else:
            writer.write(b"%x\r\n%s\r\n" % (len(body) // 2, body[: len(body) // 2]))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 60)  # until the server closes (Connection: close)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(payload) if payload else None


async def read_all(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record in the topic, reading up to the end offsets taken now."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    tps = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    assert tps, topic
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        for tp in tps:
            while await consumer.position(tp) < end[tp]:
                batch = await consumer.getmany(tp, timeout_ms=2000)
                records.extend(batch.get(tp, []))
        return records
    finally:
        await consumer.stop()


async def eventually(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


@pytest.fixture
async def topics(new_topic: NewTopicMaker) -> tuple[str, str]:
    events, callbacks = await asyncio.gather(new_topic("events"), new_topic("callbacks"))
    return events, callbacks


async def test_challenge_plain_and_encrypted(kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    async with running(make_config(kafka_bootstrap, *topics)) as relay:
        started = time.perf_counter()
        assert await relay.post(challenge("c-plain")) == (200, {"challenge": "c-plain"})
        encrypted = json.dumps({"encrypt": encrypt(challenge("c-enc"))}).encode()
        assert await relay.post(encrypted) == (200, {"challenge": "c-enc"})
        assert await relay.post(challenge("c-app"), path="/feishu/events/plain") == (200, {"challenge": "c-app"})
        assert time.perf_counter() - started < 1.0
        assert (await relay.post(challenge("c", token="wrong")))[0] == 401
        assert await relay.post(challenge("c"), path="/feishu/events/nobody") == (404, {"error": "unknown_app"})
    assert await read_all(kafka_bootstrap, topics[0]) == []


async def test_event_published_once_with_key_headers_and_the_bytes_minus_the_token(
        kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    events, _ = topics
    plain = receive("om_1", chat_id="oc_1", event_id="ev-1")
    headers, body = signed(plain)
    async with running(make_config(kafka_bootstrap, *topics)) as relay:
        assert await relay.post(body, headers) == (200, {"msg": "success"})
        # acknowledged before the answer: the record is there now; the verification token is not in it, and
        # every other byte is as Feishu sent it
        [record] = await read_all(kafka_bootstrap, events)
        assert record.value == without_token(plain)
        assert TOKEN.encode() not in record.value
        assert record.key == b"oc_1"
        assert list(record.headers) == [("event_type", RECEIVE_V1.encode()), ("event_id", b"ev-1"),
                                        ("app", b"default"), ("tenant_key", b"tenant-1")]
        # the same delivery twice more, concurrently; then a redelivery under a new event id, same message id
        results = await asyncio.gather(relay.post(body, headers), relay.post(body, headers))
        assert [status for status, _ in results] == [200, 200]
        again_headers, again = signed(receive("om_1", chat_id="oc_1", event_id="ev-2"))
        assert (await relay.post(again, again_headers))[0] == 200
        assert relay.metrics.value("relay_inbound_events_total", app="default", outcome="duplicate") == 3
    assert len(await read_all(kafka_bootstrap, events)) == 1


async def test_v1_record_has_no_token_either(kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    plain = v1("message", {"app_id": "cli_plain", "open_chat_id": "oc_v1", "text": "hello"}, uuid="u-1")
    async with running(make_config(kafka_bootstrap, *topics)) as relay:
        assert (await relay.post(plain, path="/feishu/events/plain"))[0] == 200
    [record] = await read_all(kafka_bootstrap, topics[0])
    assert record.value == plain.replace(f'"token": "{TOKEN}", '.encode(), b"")
    assert record.key == b"oc_v1"


async def test_three_concurrent_copies_make_one_record(kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    headers, body = signed(v2("im.message.recalled_v1", {"message_id": "om_r", "chat_id": "oc_r"}))
    async with running(make_config(kafka_bootstrap, *topics)) as relay:
        results = await asyncio.gather(*(relay.post(body, headers) for _ in range(3)))
        assert [status for status, _ in results] == [200, 200, 200]
    [record] = await read_all(kafka_bootstrap, topics[0])
    assert record.key == b"oc_r"


# --- the hostile-request table ---------------------------------------------------------------------------------

CAP = 1 << 20
READ_TIMEOUT = 2.0


def hostile_cases() -> dict[str, tuple[RawRequest, int, str]]:
    """kind -> (request, expected status, expected reason). Every one must publish nothing."""
    now = int(time.time())
    plain = receive("om_hostile", event_id="ev-hostile")
    headers, body = signed(plain)
    other_body = json.dumps({"encrypt": encrypt(receive("om_other"))}).encode()
    big = json.dumps({"encrypt": encrypt(receive("om_big", chat_id="oc_" + "x" * 4000))}).encode()
    good_cipher = json.loads(body)["encrypt"]

    def post(headers: dict[str, str], body: bytes, path: str = "/feishu/events", framing: str = "length",
             **extra: bytes) -> RawRequest:
        return RawRequest(path, raw_headers(headers, **extra), body, framing)

    def signed_raw(raw: bytes, **kw: Any) -> RawRequest:
        return post(sign_raw(raw), raw, **kw)

    def encrypted(value: str) -> bytes:
        return json.dumps({"encrypt": value}).encode()

    injected = json.dumps({"schema": "2.0", "event": {}, "header": {
        "event_id": "ev-inj", "event_type": "im.message.receive_v1\r\nX-Forged: 1\nINFO relay forged line",
        "token": TOKEN, "app_id": "cli_test"}}).encode()
    over_cap = b"{" + b" " * (CAP - 1) + b"}"
    return {
        # signature and replay
        "unsigned event": (post({}, body), 401, "signature"),
        "unsigned body over the challenge size": (post({}, big), 401, "signature"),
        "bad signature": (post({**headers, "X-Lark-Signature": "ab" * 32}, body), 401, "signature"),
        "signature over another body": (post(sign_raw(other_body), body), 401, "signature"),
        "signed with another app's key": (post(*signed(plain, sign_key=OTHER_KEY)), 401, "signature"),
        "replay of a signed request (past the tolerance)": (post(*signed(plain, timestamp=now - 8 * 3600)),
                                                            401, "timestamp_stale"),
        "timestamp from the future": (post(*signed(plain, timestamp=now + 600)), 401, "timestamp_future"),
        # malformed headers
        "non-UTF-8 byte in X-Lark-Signature": (post(headers, body, X_Lark_Signature=b"\xff" + b"0" * 63), 400,
                                               "header"),
        "non-UTF-8 byte in X-Lark-Request-Nonce": (post(headers, body, X_Lark_Request_Nonce=b"n\xc3\x28"), 400,
                                                   "header"),
        "timestamp that is not a number": (post(headers, body, X_Lark_Request_Timestamp=b"17e9"), 400, "header"),
        "repeated X-Lark-Signature": (RawRequest("/feishu/events", [*raw_headers(headers),
                                                                    ("X-Lark-Signature", b"0" * 64)], body),
                                      400, "header"),
        "wrong content type": (post(headers, body, Content_Type=b"text/plain"), 415, "content_type"),
        "form content type": (post(headers, body, Content_Type=b"application/x-www-form-urlencoded"), 415,
                              "content_type"),
        # size and time
        "body just over the cap": (signed_raw(over_cap), 413, "too_large"),
        "body over the cap, chunked": (signed_raw(over_cap, framing="chunked"), 413, "too_large"),
        "partial body, then a stall": (post(headers, body, framing="stall-length"), 408, "read_timeout"),
        "chunked body with no end": (post(headers, body, framing="stall-chunked"), 408, "read_timeout"),
        # crypto: signed, one answer for every failure
        "bad base64 (signed)": (signed_raw(encrypted("***not base64***")), 400, "decrypt"),
        "bad padding (signed)": (signed_raw(encrypted(good_cipher[:-24] + "A" * 22 + "==")), 400, "decrypt"),
        "encrypted with another key (signed)": (post(*signed(plain, encrypt_key=OTHER_KEY)), 400, "decrypt"),
        "not JSON after decryption (signed)": (post(*signed(b"<xml>hello</xml>")), 400, "decrypt"),
        "bad padding (unsigned)": (post({}, encrypted(good_cipher[:-24] + "A" * 22 + "==")), 401, "signature"),
        # envelope, token, app
        "header injection in event_type": (post(*signed(injected)), 400, "envelope"),
        "no event id": (post(*signed(b'{"schema": "2.0", "header": {"event_type": "x", "app_id": "cli_test"}}')),
                        400, "envelope"),
        "v2 event with a forged token": (post(*signed(receive("om_f", token="forged-token"))), 401, "token"),
        "v1 envelope with a forged token": (post({}, v1("message", {"app_id": "cli_plain"}, token="forged-token"),
                                                 "/feishu/events/plain"), 401, "token"),
        "challenge with a wrong token": (post({}, challenge("c", token="forged-token")), 401, "token"),
        "another app's event with this app's token and key": (
            post(*signed(receive("om_a", token=OTHER_TOKEN), key=OTHER_KEY), "/feishu/events/other"),
            403, "app_id"),
        "not JSON (app without encrypt key)": (post({}, b"nope", "/feishu/events/plain"), 400, "json"),
        "encrypted body for an app without encrypt key": (post({}, body, "/feishu/events/plain"), 400,
                                                          "no_encrypt_key"),
        "event for an unknown app": (post(headers, body, "/feishu/events/ghost"), 404, "unknown_app"),
        "unknown app with a newline in its name": (post(headers, body, "/feishu/events/gh%0Aost%0DINFO%20x"), 404,
                                                   "unknown_app"),
        "app without a verification token": (post({}, v2("x.y_v1", {}, token="", app_id="cli_open"),
                                                  "/feishu/events/open"), 404, "unknown_app"),
    }


async def test_hostile_requests_get_a_4xx_publish_nothing_log_one_line_and_count(
        kafka_bootstrap: str, topics: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    cases = hostile_cases()
    assert len(cases) >= 20
    secrets = [TOKEN, ENCRYPT_KEY, OTHER_TOKEN, OTHER_KEY, "forged-token", "X-Forged", "om_hostile", "你好"]
    config = make_config(kafka_bootstrap, *topics, read_timeout=READ_TIMEOUT)
    async with running(config) as relay:
        for kind, (request, status, reason) in cases.items():
            before = relay.metrics.value("relay_inbound_rejected_total", reason=reason)
            caplog.clear()
            with caplog.at_level(logging.INFO):
                assert await relay.raw(request) == (status, {"error": reason}), kind
            assert relay.metrics.value("relay_inbound_rejected_total", reason=reason) == before + 1, kind
            lines = [r for r in caplog.records if r.name.startswith("relay")]
            assert len(lines) == 1, (kind, [r.getMessage() for r in lines])
            message = lines[0].getMessage()
            assert "\n" not in message and "\r" not in message, kind
            assert not [s for s in secrets if s in message], (kind, message)
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR], kind  # no traceback anywhere
        # a replay of a request already published: answered 200 as the duplicate it is (Feishu's own
        # redeliveries may be byte-identical), and still published only once
        headers, body = signed(receive("om_replayed", event_id="ev-replayed"))
        assert (await relay.post(body, headers))[0] == 200
        assert (await relay.post(body, headers))[0] == 200
    [record] = await read_all(kafka_bootstrap, topics[0])
    assert dict(record.headers)["event_id"] == b"ev-replayed"
    assert await read_all(kafka_bootstrap, topics[1]) == []


async def test_a_stalled_body_releases_the_handler_and_the_next_request_is_served(
        kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    headers, body = signed(receive("om_slow", event_id="ev-slow"))
    async with running(make_config(kafka_bootstrap, *topics, read_timeout=READ_TIMEOUT)) as relay:
        stalls = [relay.raw(RawRequest("/feishu/events", raw_headers(headers), body, framing))
                  for framing in ("stall-length", "stall-chunked") for _ in range(5)]
        answers = await asyncio.gather(*stalls)
        assert answers == [(408, {"error": "read_timeout"})] * 10
        assert await relay.post(body, headers) == (200, {"msg": "success"})
    assert len(await read_all(kafka_bootstrap, topics[0])) == 1


async def test_body_just_under_the_cap_is_published(kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    padding = "x" * ((1 << 20) - 1000)
    plain = v2("custom.big_v1", {"blob": padding}, event_id="ev-big", app_id="cli_plain")
    assert len(plain) < (1 << 20)
    async with running(make_config(kafka_bootstrap, *topics)) as relay:
        assert (await relay.post(plain, path="/feishu/events/plain"))[0] == 200
    [record] = await read_all(kafka_bootstrap, topics[0])
    assert record.value == without_token(plain) and record.key == b"ev-big"


async def test_callbacks_and_routes(kafka_bootstrap: str, topics: tuple[str, str], new_topic: NewTopicMaker) -> None:
    events, callbacks = topics
    routed = await new_topic("reactions")
    config = make_config(kafka_bootstrap, events, callbacks, routes={"im.message.reaction.created_v1": routed})
    card = v2("card.action.trigger", {"operator": {"open_id": "ou_1"}, "token": "c-1",
                                      "action": {"value": {"k": "v"}, "tag": "button"},
                                      "context": {"open_message_id": "om_c", "open_chat_id": "oc_c"}},
              event_id="cb-1")
    reaction = v2("im.message.reaction.created_v1", {"message_id": "om_5"}, event_id="re-1")
    async with running(config) as relay:
        assert await relay.send(signed(card)) == (200, {})
        assert (await relay.send(signed(reaction)))[0] == 200
    [cb] = await read_all(kafka_bootstrap, callbacks)
    assert (cb.value, cb.key, dict(cb.headers)["event_type"]) == (without_token(card), b"oc_c",
                                                                 b"card.action.trigger")
    assert json.loads(cb.value)["event"]["token"] == "c-1"  # the card's own token stays
    [re] = await read_all(kafka_bootstrap, routed)
    assert (re.value, re.key) == (without_token(reaction), b"om_5")
    assert await read_all(kafka_bootstrap, events) == []


async def small_records_topic(bootstrap: str, name: str) -> str:
    """A topic whose records may not exceed 2,000 bytes: the broker itself refuses a larger one."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs={"max.message.bytes": "2000"})])
        for _ in range(300):  # a busy shared broker can take seconds to show a new topic
            [described] = await admin.describe_topics([name])
            if not described.get("error_code") and described.get("partitions"):
                return name
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    raise AssertionError(f"{name} not visible")


def card(event_id: str, pad: int = 0) -> tuple[dict[str, str], bytes]:
    return signed(v2("card.action.trigger", {"action": {"tag": "button", "value": {"pad": "x" * pad}},
                                             "context": {"open_chat_id": "oc_1"}}, event_id=event_id))


async def test_a_callback_the_broker_refuses_is_answered_and_counted_lost(
        kafka_bootstrap: str, topic_prefix: str, new_topic: NewTopicMaker, caplog: pytest.LogCaptureFixture) -> None:
    """Feishu never redelivers a callback and shows the user an error for a non-200: answer {} regardless."""
    events = await new_topic("events")
    small = await small_records_topic(kafka_bootstrap, f"{topic_prefix}.small-callbacks")
    caplog.set_level(logging.INFO, logger="relay.inbound")
    async with running(make_config(kafka_bootstrap, events, small)) as relay:
        assert await relay.send(card("cb-big", pad=5000)) == (200, {})  # refused before the deadline
        assert relay.metrics.value("relay_inbound_callbacks_lost_total", app="default") == 1
        assert relay.metrics.value("relay_inbound_events_total", app="default", outcome="unacknowledged") == 1
    [lost] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "LOST" in lost and "cb-big" in lost
    assert await read_all(kafka_bootstrap, small) == []


async def test_a_callback_answered_before_its_ack_ends_in_a_log_line_published_late_or_lost(
        kafka_bootstrap: str, topic_prefix: str, new_topic: NewTopicMaker, caplog: pytest.LogCaptureFixture) -> None:
    """A deadline that always passes first: each publish finishes after its answer, and is accounted for."""
    events = await new_topic("events")
    small = await small_records_topic(kafka_bootstrap, f"{topic_prefix}.small-callbacks")
    caplog.set_level(logging.INFO, logger="relay.inbound")
    async with running(make_config(kafka_bootstrap, events, small, publish_timeout=1e-6)) as relay:
        assert await relay.send(card("cb-fits")) == (200, {})
        await eventually(lambda: relay.metrics.value("relay_inbound_callbacks_late_total", app="default") == 1)
        # (one at a time: in one producer batch the broker would refuse both)
        assert await relay.send(card("cb-refused", pad=5000)) == (200, {})
        await eventually(lambda: relay.metrics.value("relay_inbound_callbacks_lost_total", app="default") == 1)
        assert relay.metrics.value("relay_inbound_events_total", app="default", outcome="unacknowledged") == 2
        assert relay.metrics.value("relay_inbound_callbacks_late_total", app="default") == 1
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "cb-fits" in m and "published after the answer" in m]
    assert [m for m in messages if "cb-refused" in m and "LOST" in m]
    assert [dict(r.headers)["event_id"] for r in await read_all(kafka_bootstrap, small)] == [b"cb-fits"]


# --- broker outage, on a broker of this test's own ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _kafka(command: str, env: dict[str, str]) -> None:
    proc = await asyncio.create_subprocess_exec("bash", str(KAFKA_SH), command, env=env,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]


@pytest.fixture
async def own_broker(tmp_path: Path) -> AsyncIterator[tuple[str, Callable[[str], Awaitable[None]]]]:
    """A broker only this test uses (free ports, its own state dir), and ``control("stop"|"start")``."""
    port = _free_port()
    env = {**os.environ, "KAFKA_PORT": str(port), "KAFKA_CONTROLLER_PORT": str(_free_port()),
           "KAFKA_STATE_DIR": str(tmp_path / "kafka"), "PYTHON": sys.executable,
           "KAFKA_HEAP_OPTS": "-Xms64m -Xmx256m"}

    async def control(command: str) -> None:
        await _kafka(command, env)

    await control("start")
    try:
        yield f"127.0.0.1:{port}", control
    finally:
        await control("stop")


async def test_broker_outage_503_then_exactly_once(
        own_broker: tuple[str, Callable[[str], Awaitable[None]]]) -> None:
    bootstrap, control = own_broker
    await create_topics(bootstrap, ["outage.events", "outage.callbacks"], partitions=1)
    config = make_config(bootstrap, "outage.events", "outage.callbacks", publish_timeout=1.0)
    warm_headers, warm = signed(receive("om_warm", event_id="ev-warm"))
    plain = receive("om_out", event_id="ev-out")
    async with running(config) as relay:
        assert (await relay.post(warm, warm_headers))[0] == 200
        assert await relay.send(card("cb-warm")) == (200, {})
        await control("stop")
        headers, body = signed(plain)
        started = time.perf_counter()
        assert await relay.post(body, headers) == (503, {"error": "unavailable"})
        assert time.perf_counter() - started < 2.0
        # a callback is never answered 503 (Feishu would show the user error 200671 and not redeliver): {}
        # within Feishu's 3 s, and its publish goes on
        started = time.perf_counter()
        assert await relay.send(card("cb-out")) == (200, {})
        assert time.perf_counter() - started < 3.0
        keys = ("default\0event\0ev-out", "default\0message\0om_out")
        assert not relay.inbound.dedup.seen(keys)
        await control("start")
        # Feishu redelivers (a fresh signature, the same event) until it gets a 200
        for _ in range(60):
            status, _ = await relay.send(signed(plain))
            if status == 200:
                break
            assert status == 503
            await asyncio.sleep(0.5)
        assert status == 200
        assert relay.inbound.dedup.seen(keys)
        assert (await relay.send(signed(plain)))[0] == 200
        # the callback answered during the outage is published once the broker is back
        await eventually(lambda: relay.metrics.value("relay_inbound_callbacks_late_total", app="default") == 1)
        assert relay.metrics.value("relay_inbound_callbacks_lost_total", app="default") == 0
    records = await read_all(bootstrap, "outage.events")
    assert sorted(dict(r.headers)["event_id"] for r in records) == [b"ev-out", b"ev-warm"]
    assert [r.value for r in records if r.key == b"oc_chat1"][-1] == without_token(plain)
    callbacks = await read_all(bootstrap, "outage.callbacks")
    assert sorted(dict(r.headers)["event_id"] for r in callbacks) == [b"cb-out", b"cb-warm"]
