"""Config: the contract's keys, env overrides, masked secrets, and one-line errors naming the bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import Secret, apply_env, load_config, parse_config, redacted
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
APP = '[[apps]]\nname = "default"\napp_id = "cli_1"\napp_secret = "s3cr3t-value"\n'


def test_example_and_local_configs_are_valid() -> None:
    for name in ("relay.example.toml", "relay.local.toml"):
        config = load_config(ROOT / "deploy" / name, env={})
        assert config.app("default") is not None


def test_defaults_follow_the_contract() -> None:
    config = parse_config({}, env={})
    assert config.kafka.intents_topics == ["feishu.intents"]
    assert config.kafka.results_topic == "feishu.results"
    assert config.kafka.dead_letter_topic == "feishu.dead-letter"
    assert config.kafka.events_topic == "feishu.events"
    assert config.feishu.base_url == "https://open.feishu.cn"
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8080)


def test_env_overrides_every_section_and_apps() -> None:
    config = parse_config(
        {"apps": [{"name": "default", "app_id": "cli_1", "app_secret": "a"}]},
        env={
            "RELAY_KAFKA__BOOTSTRAP_SERVERS": "broker:29092",
            "RELAY_KAFKA__INTENTS_TOPICS": "a,b",
            "RELAY_HTTP__PORT": "8081",
            "RELAY_FEISHU__QUOTA_SHARE": "0.5",
            "RELAY_INBOUND__ROUTES": '{"im.message.receive_v1": "msgs"}',
            "RELAY_APPS__DEFAULT__APP_SECRET": "from-env",
            "RELAY_APPS__LARK__APP_ID": "cli_2",
            "RELAY_APPS__LARK__APP_SECRET": "x",
            "RELAY_APPS__LARK__BASE_URL": "https://open.larksuite.com",
            "UNRELATED": "ignored",
        },
    )
    assert config.kafka.bootstrap_servers == "broker:29092"
    assert config.kafka.intents_topics == ["a", "b"]
    assert config.http.port == 8081
    assert config.feishu.quota_share == 0.5
    assert config.inbound.routes == {"im.message.receive_v1": "msgs"}
    default, lark = config.app("default"), config.app("lark")
    assert default is not None and default.app_secret.reveal() == "from-env"
    assert lark is not None and config.base_url_for(lark) == "https://open.larksuite.com"


def test_secrets_never_print() -> None:
    config = parse_config({"apps": [{"name": "default", "app_id": "cli_1", "app_secret": "s3cr3t-value",
                                     "encrypt_key": "k3y-value"}]}, env={})
    app = config.app("default")
    assert app is not None
    for text in (repr(config), str(app), f"{app.app_secret}", str(redacted(config))):
        assert "s3cr3t-value" not in text and "k3y-value" not in text
    assert app.app_secret.reveal() == "s3cr3t-value"
    assert Secret("x") == Secret("x") and not Secret("")


@pytest.mark.parametrize(
    ("toml", "env", "key", "why"),
    [
        ("[http]\nport = \"eighty\"\n", {}, "http.port", "expected int"),
        ("[kafka]\nbootstrap_server = \"x:1\"\n", {}, "kafka.bootstrap_server", "unknown key"),
        ("[nope]\nx = 1\n", {}, "nope", "unknown key"),
        ('[[apps]]\nname = "default"\napp_id = "cli_1"\n', {}, "apps[default].app_secret", "missing"),
        ('[feishu]\nbase_url = "open.feishu.cn"\n', {}, "feishu.base_url", "http(s) URL"),
        (APP + APP, {}, "apps", "duplicate app name 'default'"),
        ("[kafka]\nintents_topics = []\n", {}, "kafka.intents_topics", "length"),
        ("[kafka]\nbootstrap_servers = \"nohost\"\n", {}, "kafka.bootstrap_servers", "host:port"),
        ("[feishu]\nquota_share = 2.0\n", {}, "feishu.quota_share", "<= 1"),
        ("", {"RELAY_HTTP__PORTT": "1"}, "http.portt", "unknown key"),
        ("", {"RELAY_HTTP__PORT": "x"}, "http.port", "expected int"),
        ("[http\n", {}, "", "not valid TOML"),
        # the drain and the commit after it must fit in the time the group waits for a rebalance
        ("[outbound]\ndrain_timeout = 25.0\n", {}, "outbound.drain_timeout", "rebalance_timeout_ms"),
        ("[outbound]\nrebalance_timeout_ms = 20000\n", {}, "outbound.drain_timeout", "does not fit"),
        ("", {"RELAY_OUTBOUND__DRAIN_TIMEOUT": "60"}, "outbound.drain_timeout", "30000 ms"),
        ("[outbound]\ncommit_metadata_max_bytes = 10\n", {}, "outbound.commit_metadata_max_bytes", ">= 64"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, env: dict[str, str], key: str, why: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=env)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: ") if key else True
    assert why in message


def test_unknown_env_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="RELAY_BOGUS__X"):
        apply_env({}, {"RELAY_BOGUS__X": "1"})


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[http]\nport = -1\n", "http.port"),
        ("[kafka]\ngroupid = \"g\"\n", "kafka.groupid"),
        ('[[apps]]\nname = "default"\napp_secret = "s"\n', "apps[default].app_id"),
        ('[feishu]\nbase_url = "ftp://x"\n', "feishu.base_url"),
        (APP + APP, "apps"),
        ("[outbound]\nmax_attempts = \"many\"\n", "outbound.max_attempts"),
        ("[outbound]\ndrain_timeout = 30.0\n", "outbound.drain_timeout"),
    ],
)
def test_relay_check_cli_one_line(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml + APP.replace('"default"', '"other"'))
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"config error: {key}: ")
    assert "s3cr3t" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_drain_that_fits_with_its_margin_is_accepted() -> None:
    out = parse_config({"outbound": {"drain_timeout": 35.0, "rebalance_timeout_ms": 45000}}, env={}).outbound
    assert (out.drain_timeout, out.rebalance_timeout_ms) == (35.0, 45000)


def test_relay_check_cli_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(APP)
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(path), "--print"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ok (1 app(s))" in proc.stdout
    assert "s3cr3t-value" not in proc.stdout and '"***"' in proc.stdout
