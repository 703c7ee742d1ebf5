"""CardKit streaming and uploads end to end: intents on the real broker, the strict sandbox as Feishu.

A streamed answer of 500 updates reaches the card in few calls, never over 10/s per card, with strictly
increasing sequences and the final text; so it does when the relay is SIGKILLed mid-stream and restarted. Uploads
go as real multipart bodies and come back with their keys; what Feishu would refuse is refused (by the relay
before any call where it can tell, else by the sandbox, classified).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import (
    APP_ID,
    APP_SECRET,
    Collector,
    RelayProcess,
    config_data,
    create_relay_topics,
    produce,
    relay_in_process,
    to_config,
    to_toml,
)

pytestmark = pytest.mark.integration

CARD = {"schema": "2.0", "config": {"streaming_mode": True, "summary": {"content": "Thinking…"}},
        "body": {"elements": [{"tag": "markdown", "element_id": "answer", "content": ""}]}}
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9"
                       "awAAAABJRU5ErkJggg==")


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}))
    await box.start()
    yield box
    await box.stop()


def answer(n: int) -> list[str]:
    """The texts of an answer streamed as ``n`` updates, each the whole answer so far (about 20 tokens more)."""
    words = [f"word{i}" for i in range(n * 20)]
    return [" ".join(words[: (i + 1) * 20]) for i in range(n)]


def updates(card_id: str, texts: list[str], prefix: str = "s") -> list[dict[str, Any]]:
    return [{"kind": "card.stream", "id": f"{prefix}-{i}", "card_id": card_id, "element_id": "answer",
             "content": text} for i, text in enumerate(texts)]


async def create_card(bootstrap: str, topic: str, results: Collector, id: str = "create") -> str:
    await produce(bootstrap, topic, [{"kind": "card.create", "id": id, "card": CARD}])
    await results.wait_for(1, 60, what="the card.create result")
    (created,) = results.by_id()[id]
    assert created["status"] == "ok", created
    return str(created["data"]["card_id"])


def check_stream(sandbox: Sandbox, card_id: str, texts: list[str], by_id: dict[str, list[dict[str, Any]]],
                 prefix: str = "s") -> int:
    """Every update ok or superseded (by a later one), the last ok, the card shows the final text, the sequences
    Feishu accepted strictly increase, no limit broken. Returns the content calls made."""
    last = f"{prefix}-{len(texts) - 1}"
    for i in range(len(texts)):
        for result in by_id[f"{prefix}-{i}"]:
            assert result["status"] in ("ok", "superseded"), result
            if result["status"] == "superseded" and result["superseded_by"] is not None:
                assert int(result["superseded_by"].rsplit("-", 1)[1]) > i, result
    assert all(r["status"] == "ok" for r in by_id[last]), by_id[last]
    entity = sandbox.cards.by_id[card_id]
    assert entity.texts["answer"] == texts[-1]
    assert entity.sequences == sorted(set(entity.sequences)), "sequences must strictly increase"
    assert sandbox.violations() == []
    return len([c for c in sandbox.calls_for("card.stream") if c.performed])


async def test_a_500_update_stream_reaches_the_card_in_few_calls_with_the_final_text(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox
) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url))
    topic = config.kafka.intents_topics[0]
    texts = answer(500)
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results:
        card_id = await create_card(kafka_bootstrap, topic, results)
        send = {"kind": "card.send", "id": "send", "receive_id_type": "chat_id", "receive_id": "oc_ai",
                "card_id": card_id}
        finish = {"kind": "card.finish", "id": "finish", "card_id": card_id, "summary": texts[-1][:40]}
        await produce(kafka_bootstrap, topic, [send])
        for start in range(0, 500, 50):  # the answer arrives over time, as a model writes it
            await produce(kafka_bootstrap, topic, updates(card_id, texts)[start:start + 50])
            await asyncio.sleep(0.05)
        await produce(kafka_bootstrap, topic, [finish])
        await results.wait_for(503, 120, what="results")
    by_id = results.by_id()
    assert by_id["send"][0]["status"] == "ok" and sandbox.cards.by_id[card_id].sent
    calls = check_stream(sandbox, card_id, texts, by_id)
    superseded = sum(1 for i in range(500) if by_id[f"s-{i}"][0]["status"] == "superseded")
    assert calls + superseded == 500
    performed = [c.at for c in sandbox.calls_for("card.stream") if c.performed]
    span = performed[-1] - performed[0]
    # as few as the card's 10/s allows while the answer streams (the sandbox's window saw none over), and fewer
    # than the updates: the rest were superseded
    assert calls <= 10 * span + 10 and superseded > 0, f"{calls} content calls over {span:.1f}s"
    print(f"500 updates over {span:.1f}s -> {calls} calls, {superseded} superseded")
    assert by_id["finish"][0]["status"] == "ok"
    entity = sandbox.cards.by_id[card_id]
    assert not entity.streaming and entity.summary == texts[-1][:40]


async def test_sigkill_mid_stream_and_restart_keeps_sequences_increasing_and_delivers_the_final_text(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url)
    await create_relay_topics(to_config(data))
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(data))
    topic = data["kafka"]["intents_topics"][0]
    relay = RelayProcess(path, tmp_path / "relay.log")
    texts = answer(500)
    async with Collector(kafka_bootstrap, data["kafka"]["results_topic"]) as results:
        await relay.start()
        try:
            card_id = await create_card(kafka_bootstrap, topic, results)
            stream = updates(card_id, texts)
            for start in range(0, 250, 25):
                await produce(kafka_bootstrap, topic, stream[start:start + 25])
                await asyncio.sleep(0.1)
            await results.wait_for(100, 60, what="100 stream results")
            await relay.kill()  # SIGKILL mid-stream: no drain, no commit
            before = len([c for c in sandbox.calls_for("card.stream") if c.performed])
            await produce(kafka_bootstrap, topic, stream[250:])  # the model goes on while the relay is down
            await relay.start()
            await results.wait_for(501, 120, what="every update's result")
        finally:
            await relay.kill()
    assert before > 0, "nothing was streamed before the kill"
    calls = check_stream(sandbox, card_id, texts, results.by_id())
    assert calls > before, relay.log_tail()  # the restarted relay streamed too


async def test_streaming_mode_closed_is_a_failure_the_card_can_be_reopened(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, streaming_window=0.5))
    await box.start()
    try:
        config = to_config(config_data(kafka_bootstrap, topic_prefix, box.url))
        topic = config.kafka.intents_topics[0]
        async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results:
            card_id = await create_card(kafka_bootstrap, topic, results)
            await asyncio.sleep(0.6)  # the sandbox's streaming window (Feishu's 10 min, shortened) has passed
            reopen = {"kind": "card.settings", "id": "reopen", "card_id": card_id,
                      "settings": {"config": {"streaming_mode": True}}}
            await produce(kafka_bootstrap, topic, [*updates(card_id, ["late"], "late"), reopen,
                                                   *updates(card_id, ["again"], "again")])
            await results.wait_for(4, 60, what="results")
        by_id = results.by_id()
        late = by_id["late-0"][0]
        assert (late["status"], late["code"]) == ("failed", 300309), late
        assert by_id["reopen"][0]["status"] == "ok" and by_id["again-0"][0]["status"] == "ok"
        assert box.cards.by_id[card_id].texts["answer"] == "again"
    finally:
        await box.stop()


async def test_uploads_end_to_end_and_what_is_refused(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox
) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url,
                                   outbound={"max_upload_bytes": 4096}))
    topic = config.kafka.intents_topics[0]
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731  # a one-line helper
    pdf = b"%PDF-1.4\n" + b"x" * 1000
    intents = [
        {"kind": "image.upload", "id": "img", "data": b64(PNG)},
        {"kind": "file.upload", "id": "doc", "file_type": "pdf", "file_name": "report.pdf", "data": b64(pdf)},
        {"kind": "image.upload", "id": "not-image", "data": b64(pdf)},  # refused by the relay: not an image
        {"kind": "file.upload", "id": "too-big", "file_name": "big.bin", "data": b64(b"\x00" * 4097)},  # the cap
        # an api.call to the upload path with a JSON body: Feishu takes multipart only (234001), so does the sandbox
        {"kind": "api.call", "id": "json-upload", "method": "POST", "path": "/open-apis/im/v1/images",
         "body": {"image_type": "message", "image": b64(PNG)}, "rate": {"per_second": 50}},
    ]
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results, \
            Collector(kafka_bootstrap, config.kafka.dead_letter_topic) as dead:
        await produce(kafka_bootstrap, topic, intents)
        await results.wait_for(len(intents), 60, what="upload results")
        by_id = results.by_id()
        image_key, file_key = by_id["img"][0]["data"]["image_key"], by_id["doc"][0]["data"]["file_key"]
        sends = [{"kind": "message.send", "id": "send-img", "receive_id_type": "chat_id", "receive_id": "oc_u",
                  "msg_type": "image", "content": {"image_key": image_key}},
                 {"kind": "message.send", "id": "send-doc", "receive_id_type": "chat_id", "receive_id": "oc_u",
                  "msg_type": "file", "content": {"file_key": file_key}}]
        await produce(kafka_bootstrap, topic, sends)
        await results.wait_for(len(intents) + 2, 60, what="send results")
        await dead.wait_for(3, 30, distinct_ids=False)
    by_id = results.by_id()
    assert by_id["img"][0]["status"] == "ok" and sandbox.uploads.images[image_key].data == PNG
    assert by_id["doc"][0]["status"] == "ok" and sandbox.uploads.files[file_key].data == pdf
    assert by_id["send-img"][0]["status"] == "ok" and by_id["send-doc"][0]["status"] == "ok"
    for id, reason in (("not-image", "data: not an image"), ("too-big", "outbound.max_upload_bytes")):
        (result,) = by_id[id]
        assert result["status"] == "rejected" and reason in result["msg"] and result["attempts"] == 0, result
    images = sandbox.calls_for("image.upload")
    assert len(images) == 2 and len(sandbox.calls_for("file.upload")) == 1  # nothing refused was sent
    refused = by_id["json-upload"][0]
    assert (refused["status"], refused["code"]) == ("failed", 234001), refused
    errors = sorted(dict(r.headers)["relay.error"] for r in dead.records)
    assert errors == [b"feishu", b"invalid", b"invalid"]
    assert json.loads(sandbox.messages[by_id["send-img"][0]["data"]["message_id"]].content) == {
        "image_key": image_key}


async def test_card_patch_latest_wins_is_opt_in(kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url))

    def patches(message: str, latest_wins: bool) -> list[dict[str, Any]]:
        return [{"kind": "card.patch", "id": f"{message}-{i}", "message_id": message, "latest_wins": latest_wins,
                 "content": {"elements": [{"tag": "div", "text": {"tag": "plain_text", "content": f"{i}%"}}]}}
                for i in range(40)]

    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results:
        await produce(kafka_bootstrap, config.kafka.intents_topics[0],
                      patches("om_fold", True) + patches("om_each", False))
        await results.wait_for(80, 60, what="patch results")
    by_id = results.by_id()
    folded = [c for c in sandbox.calls_for("card.patch") if c.path.endswith("om_fold")]
    each = [c for c in sandbox.calls_for("card.patch") if c.path.endswith("om_each")]
    assert len(each) == 40 and all(by_id[f"om_each-{i}"][0]["status"] == "ok" for i in range(40))
    assert len(folded) < 40 and by_id["om_fold-39"][0]["status"] == "ok"
    statuses = {by_id[f"om_fold-{i}"][0]["status"] for i in range(39)}
    assert statuses <= {"ok", "superseded"} and "superseded" in statuses
    assert json.loads(folded[-1].body["content"])["elements"][0]["text"]["content"] == "39%"
    assert sandbox.violations() == []


class FileServer:
    """A loopback HTTP server holding a few files, counting the requests it gets."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        self.url = ""
        self._runner: Any = None

    async def __aenter__(self) -> FileServer:
        from aiohttp import web

        async def serve(request: web.Request) -> web.StreamResponse:
            self.requests.append(request.path)
            if request.path == "/moved.png":
                raise web.HTTPFound("/logo.png")
            body = self.files.get(request.path)
            return web.Response(body=body) if body is not None else web.Response(status=404)

        app = web.Application()
        app.router.add_get("/{tail:.*}", serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


async def test_uploads_by_url_from_an_allow_listed_server(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox
) -> None:
    pdf = b"%PDF-1.4\n" + b"y" * 5000
    files = {"/logo.png": PNG, "/doc.pdf": pdf, "/big.png": PNG + b"\x00" * (10 * 1024 * 1024)}
    async with FileServer(files) as server:
        config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url,
                                       outbound={"fetch_allowed_networks": ["127.0.0.1/32"]}))
        intents = [
            {"kind": "image.upload", "id": "logo", "url": f"{server.url}/logo.png"},
            {"kind": "image.upload", "id": "moved", "url": f"{server.url}/moved.png"},  # a redirect, checked
            {"kind": "file.upload", "id": "doc", "file_type": "pdf", "file_name": "doc.pdf",
             "url": f"{server.url}/doc.pdf"},
            {"kind": "image.upload", "id": "big", "url": f"{server.url}/big.png"},  # over Feishu's 10 MB
            {"kind": "image.upload", "id": "gone", "url": f"{server.url}/missing.png"},
            # one intent: download, upload, send the key
            {"kind": "message.send", "id": "send-logo", "receive_id_type": "chat_id", "receive_id": "oc_u",
             "msg_type": "image", "upload": {"url": f"{server.url}/logo.png"}},
            {"kind": "message.send", "id": "send-doc", "receive_id_type": "chat_id", "receive_id": "oc_u",
             "msg_type": "file", "upload": {"url": f"{server.url}/doc.pdf", "file_name": "doc.pdf"}},
            {"kind": "message.send", "id": "send-gone", "receive_id_type": "chat_id", "receive_id": "oc_u",
             "msg_type": "image", "upload": {"url": f"{server.url}/missing.png"}},
        ]
        async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results:
            await produce(kafka_bootstrap, config.kafka.intents_topics[0], intents)
            await results.wait_for(len(intents), 60, what="results")
    by_id = {id: rs[0] for id, rs in results.by_id().items()}
    for id in ("logo", "moved"):
        assert by_id[id]["status"] == "ok", by_id[id]
        assert sandbox.uploads.images[by_id[id]["data"]["image_key"]].data == PNG
    assert sandbox.uploads.files[by_id["doc"]["data"]["file_key"]].data == pdf
    assert by_id["big"]["status"] == "rejected" and "more than Feishu takes" in by_id["big"]["msg"]
    assert (by_id["gone"]["status"], by_id["gone"]["msg"]) == ("failed", "url: HTTP 404 from 127.0.0.1")
    for id, name, store in (("send-logo", "image_key", sandbox.uploads.images),
                            ("send-doc", "file_key", sandbox.uploads.files)):
        result = by_id[id]
        assert result["status"] == "ok", result
        key = json.loads(sandbox.messages[result["data"]["message_id"]].content)[name]
        assert key in store  # the sandbox refuses a key nobody uploaded
    assert (by_id["send-gone"]["status"], by_id["send-gone"]["msg"]) == ("failed", "url: HTTP 404 from 127.0.0.1")
    assert len(sandbox.calls_for("image.upload")) == 3  # nothing refused was uploaded
    assert len(sandbox.calls_for("message.send")) == 2


async def test_a_url_to_loopback_is_refused_before_any_connection_without_the_allow_list(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox
) -> None:
    async with FileServer({"/logo.png": PNG}) as server:
        config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url))
        intent = {"kind": "image.upload", "id": "inside", "url": f"{server.url}/logo.png"}
        async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results, \
                Collector(kafka_bootstrap, config.kafka.dead_letter_topic) as dead:
            await produce(kafka_bootstrap, config.kafka.intents_topics[0], [intent])
            await results.wait_for(1, 60, what="the result")
            await dead.wait_for(1, 30, distinct_ids=False)
    (result,) = results.by_id()["inside"]
    assert result["status"] == "rejected" and result["msg"] == "url: 127.0.0.1 is a loopback address", result
    assert server.requests == [] and sandbox.calls_for("image.upload") == []
    assert dict(dead.records[0].headers)["relay.error"] == b"invalid"
