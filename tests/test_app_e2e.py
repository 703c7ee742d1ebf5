"""The ``relay`` command end to end, against the real broker and the sandbox: ``relay send`` gets the result of
every kind whatever partition of the results topic it lands on; a port already in use is one line."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from relay import app
from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import (
    APP_ID,
    APP_SECRET,
    config_data,
    create_relay_topics,
    relay_in_process,
    to_config,
    to_toml,
)

pytestmark = pytest.mark.integration

# one intent of each of the 18 kinds (docs/intents.md), with ids spread over the results topic's 4 partitions
EVERY_KIND: list[dict[str, Any]] = [
    {"kind": "message.send", "receive_id_type": "chat_id", "receive_id": "oc_1", "msg_type": "text",
     "content": {"text": "hi"}},
    {"kind": "message.reply", "message_id": "om_1", "chat_id": "oc_1", "msg_type": "text", "content": {"text": "ok"}},
    {"kind": "message.edit", "message_id": "om_1", "msg_type": "text", "content": {"text": "edited"}},
    {"kind": "message.recall", "message_id": "om_2"},
    {"kind": "message.forward", "message_id": "om_1", "receive_id_type": "open_id", "receive_id": "ou_1"},
    {"kind": "card.patch", "message_id": "om_3", "content": {"config": {"update_multi": True}, "elements": []}},
    {"kind": "message.urgent", "message_id": "om_1", "channel": "app", "user_id_list": ["ou_1"]},
    {"kind": "reaction.add", "message_id": "om_1", "emoji_type": "THUMBSUP"},
    {"kind": "reaction.remove", "message_id": "om_1", "reaction_id": "r_1"},
    {"kind": "pin.add", "message_id": "om_4"},
    {"kind": "pin.remove", "message_id": "om_4"},
    {"kind": "card.delay_update", "token": "c-xxx", "card": {"open_ids": ["ou_1"], "elements": []}},
    {"kind": "ephemeral.send", "chat_id": "oc_1", "open_id": "ou_1", "card": {"elements": []}},
    {"kind": "ephemeral.delete", "message_id": "om_e"},
    {"kind": "url_preview.update", "preview_tokens": ["t-1"], "open_ids": ["ou_1"]},
    {"kind": "chat_button.update", "chat_id": "oc_1", "buttons": {"buttons": []}},
    {"kind": "message.batch_send", "msg_type": "text", "content": {"text": "notice"}, "open_ids": ["ou_1"]},
    {"kind": "api.call", "method": "GET", "path": "/open-apis/im/v1/chats", "rate": {"per_second": 10}},
]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=4.0))
    await box.start()
    yield box
    await box.stop()


async def test_relay_send_gets_the_result_of_every_kind_whatever_its_partition(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's first command once timed out for 11 of 18 kinds: it listened to partition 0 only, because
    the consumer's metadata did not list the results topic yet. 17 kinds in process (``app.send`` is what the
    command runs), one through the command itself."""
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=4.0)
    config = to_config(data)
    await create_relay_topics(config)
    intents = [{**intent, "id": f"every-{i}"} for i, intent in enumerate(EVERY_KIND)]
    partitions = {DefaultPartitioner()(i["id"].encode(), [0, 1, 2, 3], [0, 1, 2, 3]) for i in intents}
    assert len(partitions) >= 3, "the ids must spread over the results partitions for this test to mean anything"
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(data))
    async with relay_in_process(config):
        codes = await asyncio.gather(*(app.send(config, json.dumps(i), timeout=60) for i in intents[1:]))
        command = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "--log-level", "WARNING", "send", "--config", str(path), "--timeout",
            "60", json.dumps(intents[0]), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(command.communicate(), 120)
    assert codes == [0] * (len(intents) - 1) and command.returncode == 0, err.decode()
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() + out.decode().splitlines()]
    assert sorted(r["id"] for r in printed) == sorted(i["id"] for i in intents)
    assert {r["kind"] for r in printed} == {i["kind"] for i in EVERY_KIND}
    assert all(r["status"] in ("ok", "failed", "partial") for r in printed), printed


def test_an_http_port_in_use_is_one_line(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = config_data(kafka_bootstrap, topic_prefix, "http://127.0.0.1:9", http={"enabled": True, "port": port},
                           outbound={"enabled": False}, kafka={"create_topics": False})
        path = tmp_path / "relay.toml"
        path.write_text(to_toml(data))
        proc = subprocess.run([sys.executable, "-m", "relay", "run", "--config", str(path)], capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if " INFO " not in line and " WARNING " not in line]
    assert lines == [f"error: http: 127.0.0.1:{port} is in use"], proc.stderr  # one line, no traceback
