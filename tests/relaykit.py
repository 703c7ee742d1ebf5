"""Integration-test kit: a relay config on unique topics, the relay in-process or as a real subprocess,
producing intents and collecting results from the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
import warnings
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from relay import app
from relay.config import Config, parse_config
from relay.intents import decode_intent, ordering_key
from relay.kafka import ensure_topics
from relay.metrics import Metrics
from relay.sandbox import CallRecord

APP_ID = "cli_test"
APP_SECRET = "test-secret"  # the sandbox's test credentials


def config_data(bootstrap: str, prefix: str, base_url: str, *, time_scale: float = 1.0,
                **sections: dict[str, Any]) -> dict[str, Any]:
    """Plain config data (TOML-shaped) for a relay on ``prefix``-named topics talking to ``base_url``."""
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": f"{prefix}.relay",
            "intents_topics": [f"{prefix}.intents"],
            "results_topic": f"{prefix}.results",
            "dead_letter_topic": f"{prefix}.dlq",
            "events_topic": f"{prefix}.events",
            "callbacks_topic": f"{prefix}.callbacks",
            "replies_topic": f"{prefix}.replies",
            "preview_memory_topic": f"{prefix}.preview-memory",
            "journal_topic": f"{prefix}.journal",
            "coordination_topic": f"{prefix}.coordination",
            "dedup_topic": f"{prefix}.dedup",
            "topic_partitions": 4,
        },
        "feishu": {"base_url": base_url, "time_scale": time_scale, "token_refresh_margin": 60.0},
        # a verification token: `relay run` refuses to serve the event URL for an app without one
        "apps": [{"name": "default", "app_id": APP_ID, "app_secret": APP_SECRET,
                  "verification_token": "test-verification-token"}],
        "http": {"enabled": False},
        "outbound": {"session_timeout_ms": 6000, "commit_interval": 0.2, "drain_timeout": 10.0,
                     "backoff_base": 0.05, "backoff_cap": 1.0, "max_retry_seconds": 60.0},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def to_config(data: dict[str, Any]) -> Config:
    return parse_config(data, env={})


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for ``config_data``: tables of scalars/lists/inline tables and the ``apps`` array."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return msgspec.json.encode(v).decode()
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{msgspec.json.encode(k).decode()} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    lines: list[str] = []
    for section, table in data.items():
        rows = table if isinstance(table, list) else [table]
        for row in rows:
            lines.append(f"[[{section}]]" if isinstance(table, list) else f"[{section}]")
            lines.extend(f"{k} = {value(v)}" for k, v in row.items())
            lines.append("")
    return "\n".join(lines)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unclosed_resources() -> list[str]:
    """What the collector finds left open now: the ResourceWarnings of sockets and of Kafka clients never closed
    (aiokafka's ``__del__`` warns). Call it once first to clear what earlier tests left."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


async def create_relay_topics(config: Config) -> None:
    """The topics ``relay run`` would create, created now (for a test that reads them before it starts)."""
    await ensure_topics(config.kafka, app.topics_to_create(config))


@contextlib.asynccontextmanager
async def relay_in_process(config: Config) -> AsyncIterator[Metrics]:
    """The whole relay (``app.serve``) in this event loop; stopped (drained) on exit."""
    stop = asyncio.Event()
    metrics = Metrics()
    task = asyncio.create_task(app.serve(config, stop, metrics=metrics))
    try:
        for _ in range(600):  # until the consumer owns partitions (or the relay died)
            if metrics.value("relay_outbound_assigned_partitions") > 0 or task.done():
                break
            await asyncio.sleep(0.05)
        if task.done():
            task.result()
        yield metrics
    finally:
        stop.set()
        code = await asyncio.wait_for(task, 60)
        assert code == 0, f"relay exited with {code}"


class SandboxProcess:
    """The sandbox as a child process (``relay sandbox --options``), for tests whose zero-violation check must not
    depend on the relay's event loop: in one process, a loop that lags reads a backlog of requests in one turn and
    the sandbox stamps them as arriving together, which Feishu's own servers would not."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.url = ""
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "--log-level", "WARNING", "sandbox", "--port", str(port),
            "--options", msgspec.json.encode(self.options).decode())
        self.url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.url}/_sandbox/stats") as resp:
                        if resp.status == 200:
                            return self.url
                await asyncio.sleep(0.05)
        raise AssertionError("the sandbox child did not start")

    async def calls(self) -> list[CallRecord]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/_sandbox/calls") as resp:
            return msgspec.json.decode(await resp.read(), type=list[CallRecord])

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


class RelayProcess:
    """``python -m relay run`` as a real child process (for SIGKILL / SIGTERM tests)."""

    def __init__(self, config_path: Path, log_path: Path, *, log_format: str | None = "text") -> None:
        """``log_format``: ``--log-format`` (text by default, for tests reading lines; None: the relay's default,
        JSON, since its stderr is a file)."""
        self.config_path = config_path
        self.log_path = log_path
        self.log_format = log_format
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = self.log_path.open("ab")
        chosen = ["--log-format", self.log_format] if self.log_format else []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "--log-level", "INFO", "run", "--config", str(self.config_path), *chosen,
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


async def produce(bootstrap: str, topic: str, intents: Iterable[dict[str, Any] | bytes],
                  headers: list[tuple[str, bytes]] | None = None) -> None:
    """Write intents (dicts, keyed by their ordering key, or raw values keyed b"raw") in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for item in intents:
            if isinstance(item, bytes):
                value, key = item, b"raw"
            else:
                value = msgspec.json.encode(item)
                try:
                    key = ordering_key(decode_intent(value)).encode()
                except Exception:
                    key = str(item.get("id", "bad")).encode()
            futures.append(await producer.send(topic, value, key=key, headers=headers or []))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class Collector:
    """Reads a topic from the beginning in the background: ``records`` grows as the relay writes."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Collector:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          auto_offset_reset="earliest")
        await self._consumer.start()
        try:
            await self._assign()
        except BaseException:
            await self._consumer.stop()
            raise
        self._task = asyncio.create_task(self._run())
        return self

    async def _assign(self) -> None:
        assert self._consumer is not None
        partitions = self._consumer.partitions_for_topic(self.topic)
        for _ in range(50):
            if partitions:
                break
            await asyncio.sleep(0.1)
            await self._consumer._client.force_metadata_update()
            partitions = self._consumer.partitions_for_topic(self.topic)
        assert partitions, f"topic {self.topic} has no partitions"
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                self.records.extend(records)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    def values(self) -> list[dict[str, Any]]:
        return [msgspec.json.decode(r.value) for r in self.records]

    def by_id(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for value in self.values():
            out.setdefault(value["id"], []).append(value)
        return out

    async def wait_for(self, count: int, timeout: float, *, what: str = "records",
                       distinct_ids: bool = True) -> None:
        """Wait until ``count`` records (distinct ids by default) arrived; progress in the failure message."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            have = len(self.by_id()) if distinct_ids else len(self.records)
            if have >= count:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"only {have} of {count} {what} on {self.topic} after {timeout:.0f}s")
            await asyncio.sleep(0.2)
