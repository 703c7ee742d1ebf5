"""The event URL end to end: a real aiohttp server and client, the real broker, requests built like Feishu's."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
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
    v2,
)

from relay.config import AppConfig, Config, InboundConfig, KafkaConfig, Secret
from relay.events import RECEIVE_V1
from relay.inbound import Inbound, KafkaPublisher
from relay.kafka import make_producer
from relay.metrics import Metrics

pytestmark = pytest.mark.integration

NewTopic = Callable[..., Awaitable[str]]


def make_config(bootstrap: str, events: str, callbacks: str, **inbound: Any) -> Config:
    apps = [
        AppConfig(name="default", app_id="cli_test", app_secret=Secret("s"), verification_token=Secret(TOKEN),
                  encrypt_key=Secret(ENCRYPT_KEY)),
        AppConfig(name="plain", app_id="cli_plain", app_secret=Secret("s"), verification_token=Secret(TOKEN)),
    ]
    return Config(kafka=KafkaConfig(bootstrap_servers=bootstrap, events_topic=events, callbacks_topic=callbacks,
                                    create_topics=False),
                  apps=apps, inbound=InboundConfig(**inbound))


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
        async with self.session.post(self.base + path, data=data, headers=headers or {}) as resp:
            return resp.status, await resp.json(content_type=None)

    async def send(self, request: tuple[dict[str, str], bytes], path: str = "/feishu/events") -> tuple[int, Any]:
        headers, body = request
        return await self.post(body, headers, path)


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[Relay]:
    metrics = Metrics()
    publisher = KafkaPublisher(make_producer(config.kafka, request_timeout_ms=5000, retry_backoff_ms=200))
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


@pytest.fixture
async def topics(new_topic: NewTopic) -> tuple[str, str]:
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


async def test_event_published_once_with_key_headers_and_exact_bytes(
        kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    events, _ = topics
    plain = receive("om_1", chat_id="oc_1", event_id="ev-1")
    headers, body = signed(plain)
    async with running(make_config(kafka_bootstrap, *topics)) as relay:
        assert await relay.post(body, headers) == (200, {"msg": "success"})
        # acknowledged before the answer: the record is there now
        [record] = await read_all(kafka_bootstrap, events)
        assert record.value == plain
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


async def test_three_concurrent_copies_make_one_record(kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    headers, body = signed(v2("im.message.recalled_v1", {"message_id": "om_r", "chat_id": "oc_r"}))
    async with running(make_config(kafka_bootstrap, *topics)) as relay:
        results = await asyncio.gather(*(relay.post(body, headers) for _ in range(3)))
        assert [status for status, _ in results] == [200, 200, 200]
    [record] = await read_all(kafka_bootstrap, topics[0])
    assert record.key == b"oc_r"


async def test_every_bad_request_gets_4xx_and_nothing_is_published(
        kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    now = int(time.time())
    plain = receive("om_bad")
    headers, body = signed(plain)
    other_body = json.dumps({"encrypt": encrypt(receive("om_other"))}).encode()

    def signed_raw(raw: bytes) -> tuple[dict[str, str], bytes]:
        return sign_raw(raw), raw

    cases: dict[str, tuple[dict[str, str], bytes, str]] = {
        "bad signature": ({**headers, "X-Lark-Signature": "ab" * 32}, body, "/feishu/events"),
        "signature over another body": (sign_raw(other_body), body, "/feishu/events"),
        "stale timestamp": (*signed(plain, timestamp=now - 8 * 3600), "/feishu/events"),
        "future timestamp": (*signed(plain, timestamp=now + 600), "/feishu/events"),
        "wrong token": (*signed(receive("om_bad", token="stolen?")), "/feishu/events"),
        "oversize": (*signed_raw(b"{" + b" " * (1 << 20) + b"}"), "/feishu/events"),
        "non-JSON": (*signed_raw(b"<xml>hello</xml>"), "/feishu/events"),
        "non-JSON, unsigned app": ({}, b"nope", "/feishu/events/plain"),
        "bad base64": (*signed_raw(b'{"encrypt": "***not base64***"}'), "/feishu/events"),
        "bad padding": (*signed_raw(json.dumps({"encrypt": encrypt(plain)[:-24] + "A" * 22 + "=="}).encode()),
                        "/feishu/events"),
        "wrong key": (*signed(plain, encrypt_key="someone else's key"), "/feishu/events"),
        "unknown app": (headers, body, "/feishu/events/ghost"),
    }
    async with running(make_config(kafka_bootstrap, *topics)) as relay:
        for name, (h, b, path) in cases.items():
            status, answer = await relay.post(b, h, path)
            assert 400 <= status < 500, (name, status)
            assert set(answer) == {"error"}, name
        oversize = cases["oversize"]
        assert (await relay.post(oversize[1], oversize[0], chunked=True)) == (413, {"error": "too_large"})
        assert (await relay.post(oversize[1], oversize[0]))[0] == 413
        rejected = relay.metrics.render()
        assert 'relay_inbound_rejected_total{reason="signature"} 2' in rejected
        assert 'relay_inbound_rejected_total{reason="too_large"} 3' in rejected
        assert 'relay_inbound_rejected_total{reason="timestamp_stale"} 1' in rejected
    assert await read_all(kafka_bootstrap, topics[0]) == []


async def test_body_just_under_the_cap_is_published(kafka_bootstrap: str, topics: tuple[str, str]) -> None:
    padding = "x" * ((1 << 20) - 1000)
    plain = v2("custom.big_v1", {"blob": padding}, event_id="ev-big")
    assert len(plain) < (1 << 20)
    async with running(make_config(kafka_bootstrap, *topics)) as relay:
        assert (await relay.post(plain, path="/feishu/events/plain"))[0] == 200
    [record] = await read_all(kafka_bootstrap, topics[0])
    assert record.value == plain and record.key == b"ev-big"


async def test_callbacks_and_routes(kafka_bootstrap: str, topics: tuple[str, str], new_topic: NewTopic) -> None:
    events, callbacks = topics
    routed = await new_topic("reactions")
    config = make_config(kafka_bootstrap, events, callbacks, routes={"im.message.reaction.created_v1": routed})
    card = v2("card.action.trigger", {"operator": {"open_id": "ou_1"}, "token": "c-1",
                                      "action": {"value": {"k": "v"}, "tag": "button"}}, event_id="cb-1")
    reaction = v2("im.message.reaction.created_v1", {"message_id": "om_5"}, event_id="re-1")
    async with running(config) as relay:
        assert await relay.send(signed(card)) == (200, {})
        assert (await relay.send(signed(reaction)))[0] == 200
    [cb] = await read_all(kafka_bootstrap, callbacks)
    assert (cb.value, cb.key, dict(cb.headers)["event_type"]) == (card, b"cb-1", b"card.action.trigger")
    [re] = await read_all(kafka_bootstrap, routed)
    assert (re.value, re.key) == (reaction, b"om_5")
    assert await read_all(kafka_bootstrap, events) == []


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
        await control("stop")
        headers, body = signed(plain)
        started = time.perf_counter()
        assert await relay.post(body, headers) == (503, {"error": "unavailable"})
        assert time.perf_counter() - started < 2.0
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
    records = await read_all(bootstrap, "outage.events")
    assert sorted(dict(r.headers)["event_id"] for r in records) == [b"ev-out", b"ev-warm"]
    assert [r.value for r in records if r.key == b"oc_chat1"][-1] == plain
