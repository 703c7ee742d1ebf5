"""``serve`` leaves nothing running or open behind it, however it ends: a part that fails to start (whatever was
started before it is stopped), or the serving task cancelled from outside (the outbound stops with it). Real broker
and sandbox; the leftovers are read from the garbage collector's ResourceWarnings and the loop's tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from relay import kafka
from relay.app import Health, serve
from relay.errors import RelayError
from relay.fetch import Fetcher
from relay.metrics import Metrics
from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import APP_ID, APP_SECRET, config_data, free_port, to_config, unclosed_resources

pytestmark = pytest.mark.integration


def outbound_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "outbound" and not t.done()]


def fail_reading(topic_part: str) -> Callable[..., Any]:
    """``read_to_end`` that gives up (as its load timeout would) on the topic whose name ends with ``topic_part``."""
    real = kafka.read_to_end

    async def read_to_end(consumer: Any, tps: Any, take: Any) -> None:
        if tps and tps[0].topic.endswith(topic_part):
            raise TimeoutError(f"{topic_part} not read in time")
        await real(consumer, tps, take)

    return read_to_end


def break_fetcher(monkeypatch: pytest.MonkeyPatch) -> None:
    async def start(self: Fetcher) -> None:
        raise RelayError("fetcher could not start")

    monkeypatch.setattr(Fetcher, "start", start)


FAULTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    # the last part before the outbound runs: its consumer is made, not started yet
    "fetcher": break_fetcher,
    # parts that read a topic whole at start: their consumer is started when the read gives up
    "dedup memory": lambda mp: mp.setattr(kafka, "read_to_end", fail_reading(".dedup")),
    "coordination": lambda mp: mp.setattr(kafka, "read_to_end", fail_reading(".coordination")),
    "preview memory": lambda mp: mp.setattr(kafka, "read_to_end", fail_reading(".preview-memory")),
}


def relay_config(bootstrap: str, prefix: str, base_url: str) -> Any:
    return to_config(config_data(bootstrap, prefix, base_url, time_scale=10.0,
                                 http={"enabled": True, "host": "127.0.0.1", "port": free_port()},
                                 feishu={"share_mode": "group"}))


@pytest.mark.parametrize("part", sorted(FAULTS))
async def test_a_part_that_fails_to_start_leaves_no_kafka_client_open(
        kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch, part: str) -> None:
    unclosed_resources()  # what earlier tests left is not this test's
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=10.0))
    await box.start()
    try:
        config = relay_config(kafka_bootstrap, topic_prefix, box.url)
        FAULTS[part](monkeypatch)
        with pytest.raises((RelayError, TimeoutError)):
            await asyncio.wait_for(serve(config, asyncio.Event()), 120)
        await asyncio.sleep(0.1)  # anything still running would show below
        assert outbound_tasks() == []
    finally:
        await box.stop()
    assert unclosed_resources() == []


async def test_serve_cancelled_from_outside_stops_the_outbound_and_closes_every_kafka_client(
        kafka_bootstrap: str, topic_prefix: str) -> None:
    unclosed_resources()
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=10.0))
    await box.start()
    try:
        config = relay_config(kafka_bootstrap, topic_prefix, box.url)
        health = Health(Metrics())
        served = asyncio.create_task(serve(config, asyncio.Event(), health=health))
        for _ in range(1200):
            if health.ready or served.done():
                break
            await asyncio.sleep(0.05)
        assert health.ready and not served.done()
        served.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(served, 60)
        await asyncio.sleep(0.1)
        assert outbound_tasks() == []  # not left consuming (and calling Feishu) with no one to stop it
    finally:
        await box.stop()
    assert unclosed_resources() == []
