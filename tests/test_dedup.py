"""relay.dedup: TTL and size bounds on an injected clock; one publish per event, marked only after success."""

from __future__ import annotations

import asyncio

import pytest

from relay.dedup import Dedup, Outcome, PublishFailed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ttl_expiry() -> None:
    clock = Clock()
    dedup = Dedup(ttl=10, max_entries=100, clock=clock)
    assert not dedup.seen(["a"])
    dedup.mark(["a"])
    clock.now += 9.9
    assert dedup.seen(["a"]) and dedup.seen(["zz", "a"])
    clock.now += 0.2
    assert not dedup.seen(["a"])
    assert len(dedup) == 0  # expired entries are dropped, not just ignored


def test_oldest_evicted_beyond_max_entries_and_remark_refreshes() -> None:
    clock = Clock()
    dedup = Dedup(ttl=100, max_entries=3, clock=clock)
    for key in "abc":
        dedup.mark([key])
        clock.now += 1
    dedup.mark(["a"])  # refreshed: now the newest
    dedup.mark(["d"])
    assert len(dedup) == 3
    assert not dedup.seen(["b"])
    assert dedup.seen(["a"]) and dedup.seen(["c"]) and dedup.seen(["d"])
    clock.now += 99.5  # c expires (marked at 1002), a and d (1003) not yet
    assert not dedup.seen(["c"]) and dedup.seen(["a"])


async def test_marked_only_after_a_successful_publish() -> None:
    dedup = Dedup(ttl=10, max_entries=10, clock=Clock())
    sent: list[str] = []

    async def ok() -> None:
        sent.append("x")

    async def boom() -> None:
        raise ConnectionError("broker down")

    with pytest.raises(PublishFailed):
        await dedup.publish_once(["e1"], boom, 1)
    assert not dedup.seen(["e1"])
    assert await dedup.publish_once(["e1"], ok, 1) is Outcome.PUBLISHED
    assert dedup.seen(["e1"])
    assert await dedup.publish_once(["e1"], ok, 1) is Outcome.DUPLICATE
    assert sent == ["x"]


async def test_concurrent_duplicates_share_one_publish() -> None:
    dedup = Dedup(ttl=10, max_entries=10, clock=Clock())
    release = asyncio.Event()
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        await release.wait()

    first = asyncio.create_task(dedup.publish_once(["e", "m"], slow, 5))
    await asyncio.sleep(0)
    # a redelivery under a new event id but the same message id joins the publish in flight
    others = [asyncio.create_task(dedup.publish_once(keys, slow, 5)) for keys in (["e", "m"], ["e2", "m"])]
    await asyncio.sleep(0)
    assert dedup.in_flight == 1 and not dedup.seen(["e"])
    release.set()
    assert await first is Outcome.PUBLISHED
    assert [await t for t in others] == [Outcome.DUPLICATE, Outcome.DUPLICATE]
    assert calls == 1
    assert dedup.seen(["e2"]) and dedup.in_flight == 0


async def test_joiners_share_a_failure() -> None:
    dedup = Dedup(ttl=10, max_entries=10, clock=Clock())
    release = asyncio.Event()

    async def fails() -> None:
        await release.wait()
        raise ConnectionError("nope")

    tasks = [asyncio.create_task(dedup.publish_once(["e"], fails, 5)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, PublishFailed) for r in results)
    assert not dedup.seen(["e"]) and dedup.in_flight == 0


async def test_deadline_leaves_the_publish_running_and_a_late_ack_marks_seen() -> None:
    dedup = Dedup(ttl=10, max_entries=10, clock=Clock())
    release = asyncio.Event()
    calls = 0

    async def late() -> None:
        nonlocal calls
        calls += 1
        await release.wait()

    with pytest.raises(TimeoutError):
        await dedup.publish_once(["e"], late, 0.01)
    assert not dedup.seen(["e"]) and dedup.in_flight == 1
    with pytest.raises(TimeoutError):  # the redelivery waits for the same publish, it does not send again
        await dedup.publish_once(["e"], late, 0.01)
    release.set()
    await asyncio.sleep(0)
    assert dedup.seen(["e"]) and dedup.in_flight == 0
    assert await dedup.publish_once(["e"], late, 0.01) is Outcome.DUPLICATE
    assert calls == 1


async def test_close_cancels_publishes_in_flight() -> None:
    dedup = Dedup(ttl=10, max_entries=10, clock=Clock())

    async def forever() -> None:
        await asyncio.Event().wait()

    with pytest.raises(TimeoutError):
        await dedup.publish_once(["e"], forever, 0.01)
    await dedup.close()
    assert dedup.in_flight == 0 and not dedup.seen(["e"])


def test_memory_per_entry() -> None:
    """Measured, not estimated: the figure in the module docstring and the example config comes from here."""
    import tracemalloc

    clock = Clock()
    entries = 200_000
    dedup = Dedup(ttl=7 * 3600, max_entries=entries, clock=clock)
    tracemalloc.start()
    try:
        for i in range(entries):
            # a key made per request (so it is traced), as relay.events builds them: a 32-hex event id
            dedup.mark([f"default\0event\0{i:032x}"])
            clock.now += 0.001  # 200 s: entries share their expiry stamps per second
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(dedup) == entries
    per_entry = current / entries
    assert per_entry < 110, per_entry  # the key strings themselves took 157 bytes, tuples of strings 205


def test_evictions_before_the_ttl_are_counted() -> None:
    dedup = Dedup(ttl=100, max_entries=2, clock=Clock())
    dedup.mark(["a", "b", "c"])
    assert len(dedup) == 2 and dedup.evicted == 1
    assert not dedup.seen(["a"]) and dedup.seen(["b"])


def test_beyond_the_cap_the_oldest_percent_goes_at_once() -> None:
    """One pass over the dict's front per 1% of the cap, not one per mark: CPython keeps deleted slots at a
    dict's front until it resizes, and each next(iter(d)) rescans them (bench/inbound.py measures the rate)."""
    clock = Clock()
    dedup = Dedup(ttl=100, max_entries=1000, clock=clock)
    dedup.mark([f"k{i}" for i in range(1000)])
    assert len(dedup) == 1000 and dedup.evicted == 0
    dedup.mark(["new"])
    assert len(dedup) == 990 and dedup.evicted == 11  # 1 over the cap, plus 1% of it
    assert not dedup.seen(["k10"]) and dedup.seen(["k11"]) and dedup.seen(["new"])
    dedup.mark([f"m{i}" for i in range(9)])
    assert len(dedup) == 999 and dedup.evicted == 11  # under the cap again: nothing more goes


def test_expired_entries_are_swept_once_the_oldest_is_due() -> None:
    clock = Clock()
    dedup = Dedup(ttl=10, max_entries=100, clock=clock)
    dedup.mark(["a"])
    clock.now += 5
    dedup.mark(["b"])
    clock.now += 5.5  # a is due (1010 <= 1010.5), b not (1015)
    assert not dedup.seen(["a"]) and len(dedup) == 1 and dedup.seen(["b"])
    clock.now += 10
    assert not dedup.seen(["b"]) and len(dedup) == 0
    dedup.mark(["c"])  # an empty memory starts over
    clock.now += 9
    assert dedup.seen(["c"])


async def test_a_late_outcome_is_reported_after_the_deadline() -> None:
    dedup = Dedup(ttl=10, max_entries=10, clock=Clock())
    reported: list[str] = []

    def on_late(error: BaseException | None) -> None:
        reported.append("ok" if error is None else type(error).__name__)

    for name, ends in (("ok", None), ("fails", ConnectionError("broker down"))):
        release = asyncio.Event()

        async def slow(ends: BaseException | None = ends, release: asyncio.Event = release) -> None:
            await release.wait()
            if ends is not None:
                raise ends

        with pytest.raises(TimeoutError):
            await dedup.publish_once([name], slow, 0.01, on_late=on_late)
        assert reported == (["ok"] if name == "fails" else [])
        release.set()
        for _ in range(5):
            await asyncio.sleep(0)
    assert reported == ["ok", "ConnectionError"]
    assert dedup.seen(["ok"]) and not dedup.seen(["fails"])

    async def forever() -> None:
        await asyncio.Event().wait()

    with pytest.raises(TimeoutError):
        await dedup.publish_once(["cut"], forever, 0.01, on_late=on_late)
    await dedup.close()  # shutdown cancels it: reported too
    assert reported == ["ok", "ConnectionError", "CancelledError"]


async def test_no_late_report_when_answered_in_time() -> None:
    dedup = Dedup(ttl=10, max_entries=10, clock=Clock())
    reported: list[BaseException | None] = []

    async def ok() -> None:
        pass

    assert await dedup.publish_once(["e"], ok, 1, on_late=reported.append) is Outcome.PUBLISHED
    await asyncio.sleep(0)
    assert reported == []
