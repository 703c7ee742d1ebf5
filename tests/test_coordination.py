"""Coordinators on the real broker: shares split, a joiner waits its horizon, a leaver hands back at once, a dead
one's share returns after its expiry, and a throttle on one replica slows the others."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from relay.buckets import Window
from relay.config import Config
from relay.coordination import Coordinator, horizon, member_ttl
from relay.kafka import make_producer
from relay.limits import Limiter
from tests.relaykit import config_data, to_config

pytestmark = pytest.mark.integration

IM = (Window(50, 1.0), Window(1000, 60.0))


def _config(bootstrap: str, prefix: str) -> Config:
    data = config_data(bootstrap, prefix, "http://127.0.0.1:1", time_scale=20.0)
    data["feishu"].update({"share_mode": "group", "beat_interval": 0.25})
    return to_config(data)


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


class Replica:
    def __init__(self, config: Config, producer: object, partitions: int) -> None:
        self.limiter = Limiter.from_config(config.feishu, clock=time.monotonic, sleep=asyncio.sleep)
        self.partitions = partitions

        async def demand() -> tuple[int, int]:
            return self.partitions, 5000

        self.coordinator = Coordinator(config, producer, self.limiter, demand)  # type: ignore[arg-type]

    @property
    def share(self) -> float:
        return self.limiter.share


async def test_shares_follow_joins_leaves_and_deaths(kafka_bootstrap: str, topic_prefix: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relay.coordination")
    config = _config(kafka_bootstrap, topic_prefix)
    h, ttl = horizon(config), member_ttl(config)
    producer = make_producer(config.kafka)
    await producer.start()
    try:
        a = Replica(config, producer, 2)
        await a.coordinator.start()
        await _until(lambda: a.share > 0.99, 5, "a lone replica takes the whole quota at once")

        b = Replica(config, producer, 2)
        await b.coordinator.start()
        await _until(lambda: a.share < 0.51, 3, "a shrinks the moment it reads b's beat")
        assert b.share == 0.0  # and b waits: a has not acknowledged it a horizon ago
        grew = await _until(lambda: b.share > 0.49, h + 5, "b grows to its half")
        assert grew >= h - 0.5, f"b grew after {grew:.2f}s, before the horizon {h:.2f}s"
        assert a.share + b.share <= 1.0
        shown = [r.getMessage() for r in caplog.records if "quota shares now" in r.getMessage()]
        assert shown[0].endswith("other APIs 1.000") and sum(m.endswith("other APIs 0.500") for m in shown) == 2, \
            shown  # a alone, then a shrunk and b grown: one line each when a share changes

        c = Replica(config, producer, 2)
        await c.coordinator.start()
        await _until(lambda: c.share > 0.32 and a.share < 0.34 and b.share < 0.34, h + 6, "thirds")

        # c is killed: its tasks stop without a word
        for task in c.coordinator._tasks:
            task.cancel()
        await asyncio.gather(*c.coordinator._tasks, return_exceptions=True)
        took = await _until(lambda: a.share > 0.49 and b.share > 0.49, ttl + h + 5, "c's share comes back")
        assert took >= ttl - h - 1.0  # not before c could have fenced itself
        await c.coordinator.stop()  # (its "left" beat changes nothing now)

        # b stops cleanly: its "left" beat hands its share back (a still waits a horizon to grow)
        await b.coordinator.stop()
        await _until(lambda: a.share > 0.99, h + 5, "a takes b's share")
        await a.coordinator.stop()
    finally:
        await producer.stop()


async def test_a_throttle_on_one_replica_slows_the_others(kafka_bootstrap: str, topic_prefix: str) -> None:
    config = _config(kafka_bootstrap, topic_prefix)
    producer = make_producer(config.kafka)
    await producer.start()
    try:
        a, b = Replica(config, producer, 1), Replica(config, producer, 1)
        await a.coordinator.start()
        await b.coordinator.start()
        for replica in (a, b):  # both have used the API, so both have its bucket
            await replica.limiter.acquire("default", "im.message", IM)
        before = b.limiter.bucket(("app", "default", "im.message"))
        assert before is not None
        epoch = before.epoch
        a.limiter.throttled("default", "im.message", retry_after=2.0)
        await _until(lambda: b.coordinator.applied_throttles == 1, 5, "b hears of a's throttle")
        assert before.epoch == epoch + 1  # b's bucket paused and slowed too
        assert before.delay(time.monotonic()) > 1.0
        assert a.coordinator.applied_throttles == 0  # a does not apply its own twice
        await a.coordinator.stop()
        await b.coordinator.stop()
    finally:
        await producer.stop()
