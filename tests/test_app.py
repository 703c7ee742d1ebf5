"""The ``relay`` command's wiring: schema, unreachable Kafka, sandbox selection, topics created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay.app import check_limits, topics_to_create, uses_sandbox, with_sandbox_url
from relay.config import check_inbound, parse_config
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
