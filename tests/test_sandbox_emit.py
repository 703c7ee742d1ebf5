"""relay sandbox emit: sample events encrypted and signed as Feishu does it (the official SDK accepts them), and the
relay's own webhook verifies, publishes and deduplicates them, through the CLI, on the real broker."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from lark_oapi.core.utils import AESCipher
from multidict import CIMultiDict

from relay.config import AppConfig, InboundConfig, Secret
from relay.events import Event, read_signature_headers, verify_request
from relay.sandbox.emit import SAMPLES, Ids, envelope, request
from tests.feishu_requests import ENCRYPT_KEY, TOKEN, sdk_status
from tests.relaykit import Collector, config_data, relay_in_process, to_config

APP = AppConfig(name="default", app_id="cli_test", app_secret=Secret("s"), verification_token=Secret(TOKEN),
                encrypt_key=Secret(ENCRYPT_KEY))


def build(event_type: str, key: str | None = ENCRYPT_KEY) -> tuple[bytes, dict[str, str], bytes]:
    now = time.time()
    plain = envelope(event_type, event_id=f"e-{event_type}", now=now, app_id="cli_test", verification_token=TOKEN,
                     ids=Ids(chat_id="oc_emit"))
    headers, body = request(plain, encrypt_key=key, now=now, nonce="n0nce", iv=bytes(range(16)))
    return plain, headers, body


@pytest.mark.parametrize("event_type", list(SAMPLES))
def test_the_official_sdk_accepts_every_sample(event_type: str) -> None:
    plain, headers, body = build(event_type)
    encrypted = json.loads(body)["encrypt"]
    assert AESCipher(ENCRYPT_KEY).decrypt(base64.b64decode(encrypted)) == plain  # Feishu's own cipher reads it
    assert sdk_status(headers, body, event_type) == 200  # decryption, signature and token, by the SDK


@pytest.mark.parametrize("event_type", list(SAMPLES))
def test_the_relay_verifies_every_sample(event_type: str) -> None:
    plain, headers, body = build(event_type)
    event = verify_request(APP, read_signature_headers(CIMultiDict(headers)), body, time.time(), InboundConfig())
    assert isinstance(event, Event)
    record = plain.replace(f'"token": "{TOKEN}", '.encode(), b"")  # the relay publishes it without the token
    assert (event.event_type, event.event_id, event.record) == (event_type, f"e-{event_type}", record)
    # the chat where the event names one, else the message
    expected_key = {"im.message.message_read_v1": "om_sandbox_message", "im.message.reaction.created_v1":
                    "om_sandbox_message", "im.message.reaction.deleted_v1": "om_sandbox_message"}
    assert event.key == expected_key.get(event_type, "oc_emit")


def test_without_an_encrypt_key_the_body_is_plain_and_unsigned() -> None:
    plain, headers, body = build("im.message.receive_v1", key=None)
    assert body == plain and "X-Lark-Signature" not in headers
    unsigned = AppConfig(name="default", app_id="cli_test", app_secret=Secret("s"),
                         verification_token=Secret(TOKEN))
    assert isinstance(verify_request(unsigned, None, body, time.time(), InboundConfig()), Event)


def test_an_unknown_event_type_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "relay", "sandbox", "emit", "--url", "http://127.0.0.1:9/x",
                           "--event-type", "im.chat.nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "im.chat.nope" in proc.stderr and "im.message.receive_v1" in proc.stderr


async def emit(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "relay", "sandbox", "emit", "--url", url, "--encrypt-key", ENCRYPT_KEY,
               "--verification-token", TOKEN, "--app-id", "cli_test", "--chat-id", "oc_emit", *args]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)


@pytest.mark.integration
async def test_the_relay_webhook_accepts_publishes_and_deduplicates_emitted_events(
        kafka_bootstrap: str, topic_prefix: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data: dict[str, Any] = config_data(kafka_bootstrap, topic_prefix, "http://127.0.0.1:9",
                                       http={"enabled": True, "port": port})
    data["apps"][0].update(verification_token=TOKEN, encrypt_key=ENCRYPT_KEY)
    config = to_config(data)
    url = f"http://127.0.0.1:{port}/feishu/events"
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.events_topic) as events, \
            Collector(kafka_bootstrap, config.kafka.callbacks_topic) as callbacks:
        first = await emit(url, "--event-type", "im.message.receive_v1", "--event-id", "ev-1")
        again = await emit(url, "--event-type", "im.message.receive_v1", "--event-id", "ev-1")
        click = await emit(url, "--event-type", "card.action.trigger", "--event-id", "ev-2")
        wrong = await emit(url, "--event-type", "im.message.recalled_v1", "--encrypt-key", "not-the-key")
        await events.wait_for(1, 30, distinct_ids=False)
        await callbacks.wait_for(1, 30, distinct_ids=False)
        await asyncio.sleep(0.5)  # a duplicate published by mistake would show up by now
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.strip() == 'im.message.receive_v1 ev-1 -> HTTP 200 {"msg":"success"}'
    assert again.returncode == 0 and "HTTP 200" in again.stdout  # a redelivery: answered, not published again
    # nobody answers the click: the relay's fallback {} by its deadline, which Feishu takes
    assert click.returncode == 0 and re.search(r"HTTP 200 \{\} in \d+ ms: ok$", click.stdout.strip()), click.stdout
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stdout and "signature" in wrong.stdout
    (record,) = events.records
    assert record.key == b"oc_emit"
    headers = dict(record.headers)
    assert (headers["event_type"], headers["event_id"], headers["app"]) == (b"im.message.receive_v1", b"ev-1",
                                                                            b"default")
    published = json.loads(record.value)
    assert published["header"]["event_id"] == "ev-1" and published["event"]["message"]["chat_id"] == "oc_emit"
    (callback,) = callbacks.records
    assert dict(callback.headers)["event_type"] == b"card.action.trigger"


@pytest.mark.integration
async def test_emit_judges_a_click_answered_by_a_service_as_feishu_would(kafka_bootstrap: str,
                                                                        topic_prefix: str) -> None:
    from relay.answers import CardActionAnswer, Toast
    from relay.responder import Callback, Responder

    async def answer(callback: Callback) -> CardActionAnswer:
        return CardActionAnswer(toast=Toast(type="success", content=str(callback.event()["event"]["action"]["value"])))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data: dict[str, Any] = config_data(kafka_bootstrap, topic_prefix, "http://127.0.0.1:9",
                                       http={"enabled": True, "port": port})
    data["apps"][0].update(verification_token=TOKEN, encrypt_key=ENCRYPT_KEY)
    config = to_config(data)
    url = f"http://127.0.0.1:{port}/feishu/events"
    async with relay_in_process(config), Responder(kafka_bootstrap, answer, group_id=f"{topic_prefix}.responder",
                                                   callbacks_topic=config.kafka.callbacks_topic) as responder:
        reading = asyncio.create_task(responder.run())
        try:
            await responder.assigned()
            click = await emit(url, "--event-type", "card.action.trigger", "--action-value", '{"order": 1841}')
            nowhere = await emit(url + "/nobody", "--event-type", "card.action.trigger")
        finally:
            reading.cancel()
    assert click.returncode == 0, click.stdout + click.stderr
    assert re.search(r'HTTP 200 \{"toast":\{"type":"success","content":"\{\'order\': 1841\}"\}\} in \d+ ms: ok$',
                     click.stdout.strip()), click.stdout
    # an app the relay does not serve: Feishu's user gets "no valid response"
    assert nowhere.returncode == 1 and "Feishu error 200671: HTTP 404" in nowhere.stdout


def test_a_bad_action_value_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "relay", "sandbox", "emit", "--url", "http://127.0.0.1:9/x",
                           "--event-type", "card.action.trigger", "--action-value", "[1]"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --action-value: must be a JSON object"
