"""Shared fixtures: the real local Kafka broker and per-test unique topic names.

The broker is the one ``deploy/kafka/kafka.sh start`` runs (``make kafka``); ``KAFKA_BOOTSTRAP`` points the
tests elsewhere. If none answers, the session fixture starts it (so ``pytest`` alone works too).
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "deploy" / "kafka" / "kafka.sh"


@pytest.fixture(autouse=True)
def _collect_after_integration_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each integration test (and its other fixtures: this one is torn down last), collect its garbage now:
    a Kafka client it left unclosed warns, an error by the ``filterwarnings`` setting, in its own teardown and not
    in whichever later test the collector happens to run."""
    yield
    if request.node.get_closest_marker("integration") is not None:
        gc.collect()


def _start_broker() -> str:
    port = os.environ.get("KAFKA_PORT", "9092")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(KAFKA_SH), "start"], check=True, env=env, timeout=300)
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The bootstrap address of a running broker (started here if none answers)."""
    explicit = os.environ.get("KAFKA_BOOTSTRAP")
    if explicit:
        return explicit
    return _start_broker()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """A prefix no other test (or earlier run) uses: ``t.<test name>.<random>``."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60].strip("-")
    return f"t.{name}.{uuid.uuid4().hex[:8]}"


async def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    """Create topics and wait until their metadata is visible."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
        for _ in range(100):
            described = await admin.describe_topics(names)
            if all(not d.get("error_code") and d.get("partitions") for d in described):
                return
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


@pytest.fixture
async def new_topic(kafka_bootstrap: str, topic_prefix: str) -> AsyncIterator[object]:
    """``await new_topic("intents", partitions=3)`` creates ``<prefix>.intents`` and returns its name."""
    created: list[str] = []

    async def make(suffix: str, partitions: int = 3) -> str:
        name = f"{topic_prefix}.{suffix}"
        await create_topics(kafka_bootstrap, [name], partitions)
        created.append(name)
        return name

    yield make
