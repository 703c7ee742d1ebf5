"""The ``relay`` command's wiring: schema, unreachable Kafka, sandbox selection, topics created."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay.app import check_limits, topics_to_create, uses_sandbox, with_sandbox_url
from relay.config import parse_config
from relay.errors import ConfigError


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
