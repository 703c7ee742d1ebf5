"""Config: the contract's keys, env overrides, masked secrets, and one-line errors naming the bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import Secret, apply_env, load_config, parse_config, redacted
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
APP = ('[[apps]]\nname = "default"\napp_id = "cli_1"\napp_secret = "s3cr3t-value"\n'
       'verification_token = "v-t0ken-value"\nencrypt_key = "k3y-value"\n')


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
        ("[inbound]\ndedup_ttl = 3600.0\n", {}, "inbound.dedup_ttl", "at least timestamp_tolerance"),
        ("", {"RELAY_HTTP__PORTT": "1"}, "http.portt", "unknown key"),
        ("", {"RELAY_HTTP__PORT": "x"}, "http.port", "expected int"),
        ("[http\n", {}, "", "not valid TOML"),
        (APP + '[apps.inbound]\nmode = "socket"\n', {}, "apps[default].inbound.mode", "invalid enum value"),
        (APP + '[apps.inbound]\nmod = "websocket"\n', {}, "apps[default].inbound.mod", "unknown key"),
        ("", {"RELAY_APPS__DEFAULT__INBOUND": '{"mode":"ws"}'}, "apps[default].inbound.mode", "invalid enum"),
        ("[inbound]\nws_liveness_grace = 0\n", {}, "inbound.ws_liveness_grace", "> 0"),
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
    assert "s3cr3t-value" not in proc.stdout and "v-t0ken-value" not in proc.stdout and '"***"' in proc.stdout


# What Kubernetes injects into every pod for a Service named ``relay`` (docker links look the same).
K8S_SERVICE_ENV = {
    "RELAY_SERVICE_HOST": "10.96.0.12",
    "RELAY_SERVICE_PORT": "8080",
    "RELAY_SERVICE_PORT_HTTP": "8080",
    "RELAY_PORT": "tcp://10.96.0.12:8080",
    "RELAY_PORT_8080_TCP": "tcp://10.96.0.12:8080",
    "RELAY_PORT_8080_TCP_PROTO": "tcp",
    "RELAY_PORT_8080_TCP_PORT": "8080",
    "RELAY_PORT_8080_TCP_ADDR": "10.96.0.12",
}


def test_kubernetes_service_variables_are_not_overrides() -> None:
    config = parse_config({}, env={**K8S_SERVICE_ENV, "RELAY_HTTP__PORT": "9000"})
    assert config.http.port == 9000  # the real override still applies


@pytest.mark.parametrize("var", ["RELAY_HTTP__PORTT", "RELAY_BOGUS__X", "RELAY_APPS__DEFAULT__APP_IDD",
                                 "RELAY_KAFKA__GROUP_ID__X", "RELAY_APPS__DEFAULT"])
def test_a_misspelt_override_is_an_error_naming_the_variable(var: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({}, env={**K8S_SERVICE_ENV, var: "1"})
    assert var in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"RELAY_HTTP__PORT": "eighty"}, "http.port"),
        ({"RELAY_OUTBOUND__MAX_ATTEMPTS": "-3"}, "outbound.max_attempts"),
        ({"RELAY_KAFKA__BOOTSTRAP_SERVERS": "nohost"}, "kafka.bootstrap_servers"),
        ({"RELAY_INBOUND__ROUTES": '{"im.message.receive_v1": 5}'}, "inbound.routes"),
        ({"RELAY_APPS__DEFAULT__BASE_URL": "ftp://x"}, "apps[default].base_url"),
    ],
)
def test_a_bad_env_value_names_the_variable(env: dict[str, str], key: str) -> None:
    data = {"apps": [{"name": "default", "app_id": "cli_1", "app_secret": "s"}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env=env)
    message = str(caught.value)
    assert message.startswith(key) and f"(from {next(iter(env))})" in message, message


def test_relay_check_cli_ignores_kubernetes_variables_but_not_a_misspelt_override(tmp_path: Path) -> None:
    import os

    path = tmp_path / "good.toml"
    path.write_text(APP)
    env = {**os.environ, **K8S_SERVICE_ENV}
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(path)],
                          env={**env, "RELAY_HTTP__PROT": "1"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "RELAY_HTTP__PROT" in proc.stderr and "Traceback" not in proc.stderr


def test_replication_settings() -> None:
    kafka = parse_config({}, env={}).kafka
    assert (kafka.topic_replication_factor, kafka.topic_min_insync_replicas) == (1, None)
    kafka = parse_config({}, env={"RELAY_KAFKA__TOPIC_REPLICATION_FACTOR": "3",
                                  "RELAY_KAFKA__TOPIC_MIN_INSYNC_REPLICAS": "2"}).kafka
    assert (kafka.topic_replication_factor, kafka.topic_min_insync_replicas) == (3, 2)
    with pytest.raises(ConfigError) as caught:
        parse_config({"kafka": {"topic_replication_factor": 2, "topic_min_insync_replicas": 3}}, env={})
    assert caught.value.key == "kafka.topic_min_insync_replicas"


def test_an_app_in_websocket_mode_needs_no_verification_token() -> None:
    from relay.config import check_inbound

    data = {"apps": [{"name": "ws", "app_id": "cli_1", "app_secret": "s", "inbound": {"mode": "websocket"}},
                     {"name": "hook", "app_id": "cli_2", "app_secret": "s", "verification_token": "t",
                      "encrypt_key": "k"}]}
    config = parse_config(data, env={})
    assert [app.inbound.mode for app in config.apps] == ["websocket", "webhook"]
    assert check_inbound(config) == []  # no warning either: the ws app's events never come unsigned over HTTP
    data["apps"][1].pop("verification_token")
    with pytest.raises(ConfigError, match=r"^apps\[hook\]\.verification_token: required"):
        check_inbound(parse_config(data, env={}))
    env = {"RELAY_APPS__WS__INBOUND": '{"mode": "webhook"}'}
    assert parse_config({"apps": data["apps"][:1]}, env=env).apps[0].inbound.mode == "webhook"


def test_an_app_is_custom_by_default_and_a_bad_type_names_the_key() -> None:
    base = {"name": "default", "app_id": "cli_1", "app_secret": "a"}
    assert parse_config({"apps": [base]}, env={}).apps[0].type == "custom"
    assert parse_config({"apps": [{**base, "type": "store"}]}, env={}).apps[0].type == "store"
    with pytest.raises(ConfigError) as err:
        parse_config({"apps": [{**base, "type": "isv"}]}, env={})
    assert err.value.key == "apps[default].type" and "\n" not in str(err.value)
    env = {"RELAY_APPS__DEFAULT__TYPE": "store"}
    assert parse_config({"apps": [base]}, env=env).apps[0].type == "store"
