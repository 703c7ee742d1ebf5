"""The ``relay`` command's wiring: schema, unreachable Kafka, sandbox selection, topics created, dead parts noticed."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay import app
from relay.app import GC_YOUNG_THRESHOLD, Health, check_limits, serve, topics_to_create, uses_sandbox, with_sandbox_url
from relay.config import check_inbound, parse_config
from relay.errors import ConfigError
from relay.metrics import Metrics
from relay.previews.memory import KafkaPreviewMemory
from relay.previews.planner import PreviewPlanner
from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import APP_ID, APP_SECRET


def test_schema_prints_intents_and_results() -> None:
    proc = subprocess.run([sys.executable, "-m", "relay", "schema"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert {"Intent", "Result"} <= set(schema["$defs"])
    assert schema["$ref"] == "#/$defs/Intent"  # the root validates an intent (tests/test_docs.py uses it)


def test_run_with_kafka_unreachable_says_so_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:9"\n[http]\nenabled = false\n')
    proc = subprocess.run([sys.executable, "-m", "relay", "run", "--config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: Kafka: ")


def test_run_raises_the_collectors_young_threshold_before_it_starts(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[http]\nenabled = false\n")
    seen: list[tuple[int, int, int]] = []

    async def started(config: Any, *, with_sandbox: bool) -> int:
        seen.append(gc.get_threshold())
        return 0

    monkeypatch.setattr(app, "run", started)
    monkeypatch.setattr(app.logs, "configure", lambda *args, **kwargs: None)
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, *before[1:])
        args = argparse.Namespace(command="run", config=str(path), log_level="INFO", log_format=None,
                                  with_sandbox=False)
        assert app.main(args) == 0
    finally:
        gc.set_threshold(*before)
    assert seen == [(GC_YOUNG_THRESHOLD, before[1], before[2])]


def test_sandbox_only_without_real_credentials() -> None:
    placeholder = parse_config({"apps": [{"name": "default", "app_id": "cli_sandbox", "app_secret": "x"}]}, env={})
    real = parse_config({"apps": [{"name": "default", "app_id": "cli_a1b2", "app_secret": "x"}]}, env={})
    assert uses_sandbox(placeholder) and uses_sandbox(parse_config({}, env={}))
    assert not uses_sandbox(real)
    local = with_sandbox_url(parse_config({}, env={}), "http://127.0.0.1:8090")
    assert local.feishu.base_url == "http://127.0.0.1:8090" and local.app("default") is not None


def test_topics_to_create_cover_every_topic_with_its_settings() -> None:
    config = parse_config({"inbound": {"routes": {"im.message.receive_v1": "msgs"}}}, env={})
    topics = topics_to_create(config)
    k = config.kafka
    assert {*k.intents_topics, k.results_topic, k.dead_letter_topic, k.events_topic, k.callbacks_topic, "msgs",
            k.preview_memory_topic, k.journal_topic, k.replies_topic, k.dedup_topic} == set(topics)
    # replies matter for seconds: kept an hour, not the broker's week
    assert int(topics[k.replies_topic]["retention.ms"]) == 3600 * 1000
    off = parse_config({"inbound": {"callback_replies": False}}, env={})
    assert off.kafka.replies_topic not in topics_to_create(off)
    assert "compact" in topics[k.preview_memory_topic]["cleanup.policy"]
    assert "compact" in topics[k.dedup_topic]["cleanup.policy"]
    assert int(topics[k.dedup_topic]["retention.ms"]) == config.inbound.dedup_ttl * 1000
    group = topics_to_create(parse_config({"feishu": {"share_mode": "group"}}, env={}))
    assert group[k.coordination_topic]["message.timestamp.type"] == "LogAppendTime"
    journal = topics[k.journal_topic]  # deleted by age, never compacted; holds a Finished entry with a result
    assert journal["cleanup.policy"] == "delete" and int(journal["retention.ms"]) >= 7 * 24 * 3600 * 1000
    assert journal["max.message.bytes"] == topics[k.results_topic]["max.message.bytes"]
    assert int(topics[k.events_topic]["max.message.bytes"]) > config.inbound.max_body_bytes


def test_check_limits_refuses_a_share_that_leaves_url_previews_no_call() -> None:
    check_limits(parse_config({"feishu": {"quota_share": 0.2}}, env={}))
    with pytest.raises(ConfigError) as caught:
        check_limits(parse_config({"feishu": {"quota_share": 0.1}}, env={}))
    assert caught.value.key == "feishu.quota_share" and "im.url_preview.batch_update" in caught.value.why


def test_check_and_run_refuse_a_share_too_small_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    # an unreachable broker too: run must refuse the share before it ever tries Kafka
    path.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:9"\n[feishu]\nquota_share = 0.1\n')
    for command in ("check", "run"):
        proc = subprocess.run([sys.executable, "-m", "relay", command, "--config", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith("config error: feishu.quota_share: ") and "url_preview" in proc.stderr


def test_check_and_run_refuse_an_app_without_verification_token_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    app = '[[apps]]\nname = "open"\napp_id = "cli_1"\napp_secret = "s3cr3t"\n'
    # an unreachable broker too: run must refuse the app before it ever tries Kafka
    path.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:9"\n' + app)
    for command in ("check", "run"):
        proc = subprocess.run([sys.executable, "-m", "relay", command, "--config", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith("config error: apps[open].verification_token: required while inbound")
        assert "s3cr3t" not in proc.stderr
    # without inbound (or without http) the token is not needed
    path.write_text('[inbound]\nenabled = false\n' + app)
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_check_warns_once_about_an_app_without_encrypt_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[[apps]]\nname = "plain"\napp_id = "cli_1"\napp_secret = "s"\nverification_token = "t0k3n"\n')
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [warning] = proc.stderr.strip().splitlines()
    assert warning.startswith("warning: apps[plain] has no encrypt_key: ") and "t0k3n" not in warning


def test_check_inbound_refuses_only_while_the_event_url_is_served() -> None:
    data = {"apps": [{"name": "a", "app_id": "cli_1", "app_secret": "s"}]}
    with pytest.raises(ConfigError) as caught:
        check_inbound(parse_config(data, env={}))
    assert caught.value.key == "apps[a].verification_token"
    assert check_inbound(parse_config({**data, "http": {"enabled": False}}, env={})) == []
    assert check_inbound(parse_config({**data, "inbound": {"enabled": False}}, env={})) == []
    keyed = {"apps": [{"name": "a", "app_id": "cli_1", "app_secret": "s", "verification_token": "t",
                       "encrypt_key": "k"}]}
    assert check_inbound(parse_config(keyed, env={})) == []


@pytest.mark.integration
async def test_run_starts_with_kubernetes_service_variables_set(tmp_path: Path, kafka_bootstrap: str,
                                                                topic_prefix: str) -> None:
    """A Service named ``relay`` puts RELAY_PORT=tcp://... (and more) into every pod: ``relay run`` must start."""
    import asyncio
    import os
    import signal
    import socket

    import aiohttp

    from relay.sandbox import Sandbox, SandboxOptions
    from tests.relaykit import config_data, to_toml
    from tests.test_config import K8S_SERVICE_ENV

    box = Sandbox(SandboxOptions())
    await box.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(config_data(kafka_bootstrap, topic_prefix, box.url, http={"enabled": True})))
    env = {**os.environ, **K8S_SERVICE_ENV, "RELAY_HTTP__PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "relay", "run", "--config", str(path),
                                                env=env, stderr=asyncio.subprocess.PIPE)
    try:
        ready = False
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                if proc.returncode is not None:
                    break
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            ready = True
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert ready, stderr.decode()[-2000:]
        assert proc.returncode == 0, stderr.decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await box.stop()
# --- a part that dies is noticed: serve exits 1 and /readyz says why (real broker, sandbox) -----------------


async def serve_until_it_exits(bootstrap: str, prefix: str, intents: list[dict[str, Any]]) -> tuple[int, Health]:
    from tests.relaykit import config_data, produce, to_config

    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=10.0))
    await box.start()
    try:
        config = to_config(config_data(bootstrap, prefix, box.url, time_scale=10.0))
        stop = asyncio.Event()
        health = Health(Metrics())
        served = asyncio.create_task(serve(config, stop, health=health))
        if intents:
            await produce(bootstrap, config.kafka.intents_topics[0], intents)
        try:
            code = await asyncio.wait_for(asyncio.shield(served), 60)
        finally:
            stop.set()
            await asyncio.wait_for(served, 60)
        return code, health
    finally:
        await box.stop()


async def readyz(health: Health) -> tuple[int, dict[str, Any]]:
    response = await health.readyz(None)  # type: ignore[arg-type]
    assert response.text is not None
    return response.status, json.loads(response.text)


@pytest.mark.integration
async def test_serve_exits_1_and_readyz_says_why_when_the_preview_loop_dies(
        kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: PreviewPlanner, now: float) -> None:
        raise RuntimeError("planner exploded")

    monkeypatch.setattr(PreviewPlanner, "next_call", broken)
    code, health = await serve_until_it_exits(kafka_bootstrap, topic_prefix, [])
    assert code == 1
    status, body = await readyz(health)
    assert status == 503 and body["reason"].startswith("previews died: ") and "planner exploded" in body["reason"]


@pytest.mark.integration
async def test_serve_exits_1_and_readyz_says_why_when_the_preview_memory_tail_dies(
        kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    original = KafkaPreviewMemory._apply

    def apply(self: KafkaPreviewMemory, record: Any, arbiter: Any, seen: Any) -> float:
        if self._tail is not None:  # following live (past the start-up read): the first claim kills the tail
            raise RuntimeError("memory record unreadable")
        return original(self, record, arbiter, seen)

    monkeypatch.setattr(KafkaPreviewMemory, "_apply", apply)
    preview = {"kind": "url_preview.update", "id": "p1", "preview_tokens": ["t1"]}
    code, health = await serve_until_it_exits(kafka_bootstrap, topic_prefix, [preview])
    assert code == 1
    status, body = await readyz(health)
    assert status == 503 and "preview-memory" in body["reason"] and "memory record unreadable" in body["reason"]


def test_run_refuses_a_drain_that_does_not_fit_the_rebalance_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    # an unreachable broker too: run must refuse before it ever tries Kafka
    path.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:9"\n[outbound]\ndrain_timeout = 25.0\n')
    for command in ("check", "run"):
        proc = subprocess.run([sys.executable, "-m", "relay", command, "--config", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith("config error: outbound.drain_timeout: ") and "rebalance" in proc.stderr


def test_a_sandbox_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "relay", "sandbox", "--port", str(port)], capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: sandbox: 127.0.0.1:{port} is in use"], proc.stderr


async def test_readyz_follows_a_part_whose_readiness_comes_and_goes() -> None:
    health = Health(Metrics())
    waiting: list[str | None] = ["websocket apps[ws]: endpoint call timed out after 15 s"]
    health.checks.append(lambda: waiting[0])
    health.ready = True
    assert await readyz(health) == (503, {"status": "not ready", "reason": waiting[0]})
    waiting[0] = None
    assert await readyz(health) == (200, {"status": "ready"})
    health.problem = "outbound died: boom"
    assert await readyz(health) == (503, {"status": "not ready", "reason": "outbound died: boom"})
