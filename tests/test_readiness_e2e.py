"""``/readyz`` tells the truth, against real faults.

The broker outage runs on a broker of the test's own (a second single-node KRaft broker from ``deploy/kafka/kafka.sh``
on free ports with its own state directory), stopped and started again by its pid, never the shared one: the
relay (``relay run`` as a child process, logging JSON because its stderr is a file) answers 503 while the broker
is gone, 200 once it is back, and the log of the outage is a few dozen lines, not thousands. The token outage
uses the sandbox's token endpoint on the shared broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.sandbox import Sandbox, SandboxOptions
from tests.conftest import KAFKA_SH
from tests.relaykit import (
    APP_ID,
    APP_SECRET,
    Collector,
    RelayProcess,
    config_data,
    free_port,
    produce,
    relay_in_process,
    to_config,
    to_toml,
)

pytestmark = pytest.mark.integration

UNREACHABLE_AFTER = 3.0
REPEAT_INTERVAL = 10.0
OUTAGE = 20.0  # seconds the broker stays down after /readyz said 503 (then its restart adds its start time)


class OwnBroker:
    """A single-node KRaft broker of this test only: its own ports and state directory."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.port, self.controller_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHON": sys.executable, "KAFKA_PORT": str(self.port),
               "KAFKA_CONTROLLER_PORT": str(self.controller_port), "KAFKA_STATE_DIR": str(self.state),
               "KAFKA_HEAP_OPTS": "-Xms128m -Xmx512m", "KAFKA_START_TIMEOUT": "180"}
        subprocess.run(["bash", str(KAFKA_SH), "start"], check=True, env=env, timeout=240)

    def stop(self) -> None:
        """SIGTERM the broker this object started (its own pid file), SIGKILL if it is still up after 30 s."""
        pidfile = self.state / "kafka.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
        pidfile.unlink()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    broker = OwnBroker(tmp_path / "kafka")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}))
    await box.start()
    yield box
    await box.stop()


async def readyz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as resp:
            return resp.status, await resp.json()
    except aiohttp.ClientError as err:
        return 0, {"error": str(err)}


async def until_ready(url: str, status: int, timeout: float, proc: RelayProcess | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    answer: tuple[int, dict[str, Any]] = (0, {})
    while time.monotonic() < deadline:
        answer = await readyz(url)
        if answer[0] == status:
            return answer[1]
        await asyncio.sleep(0.2)
    tail = proc.log_tail() if proc else ""
    raise AssertionError(f"/readyz never answered {status} in {timeout:.0f}s (last {answer}):\n{tail}")


def send(i: int) -> dict[str, Any]:
    return {"kind": "message.send", "id": f"r-{i}", "receive_id_type": "chat_id", "receive_id": "oc_1",
            "msg_type": "text", "content": {"text": "hi"}}


async def test_readyz_follows_a_broker_outage_and_its_log_is_short(own_broker: OwnBroker, topic_prefix: str,
                                                                   sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = config_data(own_broker.bootstrap, topic_prefix, sandbox.url, http={"enabled": True, "port": port},
                       log={"repeat_interval": REPEAT_INTERVAL})
    data["kafka"]["unreachable_after"] = UNREACHABLE_AFTER
    config_path, log_path = tmp_path / "relay.toml", tmp_path / "relay.log"
    config_path.write_text(to_toml(data))
    relay = RelayProcess(config_path, log_path, log_format=None)  # the default: JSON, stderr being a file
    await relay.start()
    try:
        await until_ready(url, 200, 120, relay)
        results_topic = data["kafka"]["results_topic"]
        async with Collector(own_broker.bootstrap, results_topic) as results:
            await produce(own_broker.bootstrap, data["kafka"]["intents_topics"][0], [send(1)])
            await results.wait_for(1, 60)

        before = len(log_path.read_text().splitlines())
        own_broker.stop()
        down = await until_ready(url, 503, 30, relay)
        assert "Kafka broker unreachable" in down["reason"], down
        await asyncio.sleep(OUTAGE)  # the outage goes on: aiokafka retries every connection meanwhile
        assert (await readyz(url))[0] == 503
        await asyncio.to_thread(own_broker.start)
        await until_ready(url, 200, 120, relay)
        outage = log_path.read_text().splitlines()[before:]

        async with Collector(own_broker.bootstrap, results_topic) as results:  # and it works again
            await produce(own_broker.bootstrap, data["kafka"]["intents_topics"][0], [send(2)])
            await results.wait_for(1, 90)
        relay.send(signal.SIGTERM)
        assert await relay.wait(90) == 0
    finally:
        await relay.kill()

    # the finished-intent line: its fields as JSON keys, never the message's content
    (finished,) = [x for x in map(json.loads, log_path.read_text().splitlines()) if x.get("intent_id") == "r-1"]
    assert {k: finished[k] for k in ("kind", "app", "status", "attempts")} == {
        "kind": "message.send", "app": "default", "status": "ok", "attempts": 1}, finished
    assert finished["latency_ms"] >= 0 and '"hi"' not in json.dumps(finished), finished
    lines = [json.loads(line) for line in outage]  # JSON lines: stderr is not a terminal
    seconds = lines[-1]["time"], lines[0]["time"]
    summary = "\n".join(f'{x["level"]} {x["logger"]} {x["message"][:150]}' for x in lines)
    print(f"{len(lines)} log lines during the outage ({seconds[1]} .. {seconds[0]}):\n{summary}")
    assert len(lines) <= 80, summary
    assert any(x.get("repeated", 0) > 0 for x in lines), summary  # the repeats were counted, not written
    assert any("has not answered" in x["message"] for x in lines), summary
    assert any("answers again" in x["message"] for x in lines), summary
    assert sandbox.violations() == []


async def test_readyz_follows_the_token_endpoint(kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, http={"enabled": True, "port": port}))
    async with relay_in_process(config):
        await until_ready(url, 200, 30)
        sandbox.set_token_outage(True)
        async with Collector(kafka_bootstrap, config.kafka.results_topic) as results:
            await produce(kafka_bootstrap, config.kafka.intents_topics[0], [send(1)])  # needs a token: fails
            down = await until_ready(url, 503, 30)
            assert down["reason"].startswith("apps[default]: tenant_access_token unavailable"), down
            sandbox.set_token_outage(False)  # no new intent: the readiness retry notices the recovery itself
            await until_ready(url, 200, 30)
            await results.wait_for(1, 60)
    assert results.by_id()["r-1"][0]["status"] == "ok"
