"""deploy/kafka/kafka.sh, the local broker every test run starts: formatting a new state dir must work for every
cluster id it can be given or make. A random url-safe id starts with "-" once in 64 times, and Kafka's storage tool
read such an id as an option (``-t -Xy…``: "expected one argument"), which failed a CI run before any test ran."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "kafka.sh"


def format_state(state: Path, cluster_id: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_CLUSTER_ID"}
    env["KAFKA_STATE_DIR"] = str(state)
    if cluster_id is not None:
        env["KAFKA_CLUSTER_ID"] = cluster_id
    return subprocess.run(["bash", str(SCRIPT), "format"], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def meta(state: Path) -> dict[str, str]:
    lines = (state / "data" / "meta.properties").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


@pytest.mark.parametrize("cluster_id", ["-k2JmQn5RS_eXb8hc0ZQ6w", "_k2JmQn5RS-eXb8hc0ZQ6w"])
def test_a_cluster_id_that_looks_like_an_option_still_formats(tmp_path: Path, cluster_id: str) -> None:
    done = format_state(tmp_path, cluster_id)
    assert done.returncode == 0, done.stderr
    assert meta(tmp_path)["cluster.id"] == cluster_id


def test_a_made_up_cluster_id_formats_once_and_is_kept(tmp_path: Path) -> None:
    done = format_state(tmp_path, None)
    assert done.returncode == 0, done.stderr
    first = meta(tmp_path)["cluster.id"]
    assert len(first) == 22 and not first.startswith("-")
    again = format_state(tmp_path, "AAAAAAAAAAAAAAAAAAAAAA")
    assert again.returncode == 0, again.stderr
    assert meta(tmp_path)["cluster.id"] == first
