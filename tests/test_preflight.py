"""``relay check``: warnings (exit 0) for a config that runs but not as meant; ``--connect`` probes; ``--version``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay import __version__
from relay.config import parse_config
from relay.preflight import config_warnings

APP = '[[apps]]\nname = "default"\napp_id = "cli_a1b2c3d4e5f60718"\napp_secret = "Zk3s9fj2LQ"\n'


def keys(data: dict[str, object]) -> list[str]:
    return [w.key for w in config_warnings(parse_config(data, env={}))]


def test_a_real_looking_config_has_no_warnings() -> None:
    assert keys({"apps": [{"name": "default", "app_id": "cli_a1b2c3d4e5f60718", "app_secret": "Zk3s9fj2LQ",
                           "verification_token": "v-8d1", "encrypt_key": "k-29a"}]}) == []


def test_zero_apps_and_placeholders_warn() -> None:
    assert keys({}) == ["apps"]
    assert keys({"apps": [{"name": "default", "app_id": "cli_xxx", "app_secret": "...",
                           "verification_token": "replace-with-the-token", "encrypt_key": "<your encrypt key>"}]}) == [
        "apps[default].app_id", "apps[default].app_secret", "apps[default].verification_token",
        "apps[default].encrypt_key"]
    assert keys({"apps": [{"name": "box", "app_id": "cli_sandbox", "app_secret": "sandbox-secret"}]}) == [
        "apps[box].app_id", "apps[box].app_secret"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=120)


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"relay {__version__}"


def test_check_warns_but_passes(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    app = '[[apps]]\nname = "default"\napp_id = "cli_xxx"\napp_secret = "..."\n'
    path.write_text(app)  # no verification token: refused while inbound is enabled (test_app.py)
    assert run("check", "--config", str(path)).returncode == 2
    path.write_text("[inbound]\nenabled = false\n" + app)
    proc = run("check", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{path}: ok (1 app(s), 2 warning(s))"
    lines = proc.stderr.strip().splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["apps[default].app_id", "apps[default].app_secret"]
    assert all(line.startswith("warning: ") for line in lines) and "..." not in proc.stderr.replace("'...'", "")


@pytest.mark.integration
async def test_check_connect_reports_the_broker_and_each_token(tmp_path: Path, kafka_bootstrap: str) -> None:
    import asyncio

    from relay.sandbox import Sandbox, SandboxOptions

    box = Sandbox(SandboxOptions(apps={"cli_a1b2c3d4e5f60718": "Zk3s9fj2LQ"}))
    await box.start()
    try:
        path = tmp_path / "relay.toml"
        # outbound only: these apps have no verification token, which inbound would refuse (test_app)
        path.write_text(f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\n[feishu]\nbase_url = "{box.url}"\n'
                        '[inbound]\nenabled = false\n'
                        + APP + '[[apps]]\nname = "wrong"\napp_id = "cli_a1b2c3d4e5f60718"\napp_secret = "nope"\n')
        proc = await asyncio.to_thread(run, "check", "--config", str(path), "--connect")
        assert proc.returncode == 1, proc.stderr
        lines = proc.stdout.strip().splitlines()[1:]
        assert len(lines) == 3, proc.stdout
        assert lines[0].startswith(f"kafka {kafka_bootstrap}: ok (1 broker(s)")
        assert lines[1].startswith("app default (cli_a1b2c3d4e5f60718 at http://127.0.0.1:") and ": ok (" in lines[1]
        assert lines[2].startswith("app wrong ") and ": FAILED (" in lines[2] and "10014" in lines[2]
        assert "Zk3s9fj2LQ" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr

        path.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:9"\n' + f'[feishu]\nbase_url = "{box.url}"\n'
                        '[inbound]\nenabled = false\n' + APP)
        proc = await asyncio.to_thread(run, "check", "--config", str(path), "--connect", "--timeout", "3")
        assert proc.returncode == 1
        assert "kafka 127.0.0.1:9: FAILED (unreachable" in proc.stdout and "app default" in proc.stdout
    finally:
        await box.stop()
