"""The ``relay`` command's wiring: schema, unreachable Kafka, sandbox selection, topics created, dead parts noticed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.app import Health, check_limits, serve, topics_to_create, uses_sandbox, with_sandbox_url
from relay.config import parse_config
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


def test_run_with_kafka_unreachable_says_so_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:9"\n[http]\nenabled = false\n')
    proc = subprocess.run([sys.executable, "-m", "relay", "run", "--config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: Kafka: ")


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
            k.preview_memory_topic} == set(topics)
    assert "compact" in topics[k.preview_memory_topic]["cleanup.policy"]
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
