"""relay.outbound.Gather: result writes finishing together are sent in one event-loop turn, in order."""

from __future__ import annotations

import asyncio

import pytest

from relay.outbound import Gather


async def test_callers_within_the_window_go_on_together_in_the_order_they_came() -> None:
    gather = Gather(0.05)
    went: list[tuple[str, int]] = []
    turn = 0

    async def count_turns() -> None:
        nonlocal turn
        while True:
            await asyncio.sleep(0)
            turn += 1

    async def caller(name: str, after: float) -> None:
        await asyncio.sleep(after)
        await gather.wait()
        went.append((name, turn))

    counter = asyncio.create_task(count_turns())
    try:
        await asyncio.gather(caller("a", 0), caller("b", 0.01), caller("c", 0.02), caller("late", 0.2))
    finally:
        counter.cancel()
    assert [name for name, _ in went] == ["a", "b", "c", "late"]
    assert len({at for name, at in went if name != "late"}) == 1  # a, b and c in one turn
    assert went[-1][1] > went[0][1]  # the late one in a gather of its own


async def test_a_cancelled_caller_does_not_cancel_the_others_and_no_window_means_at_once() -> None:
    gather = Gather(0.05)
    first = asyncio.create_task(gather.wait())
    second = asyncio.create_task(gather.wait())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(second, 1.0)
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(Gather(0).wait(), 0.01)


async def test_the_last_of_a_group_releases_it_at_once_and_leaves_no_timer() -> None:
    on_their_way = 3
    gather = Gather(10.0, coming=lambda: on_their_way > 0)
    went: list[str] = []

    async def caller(name: str) -> None:
        nonlocal on_their_way
        on_their_way -= 1  # its answer is in: it is no longer on its way
        await gather.wait()
        went.append(name)

    loop = asyncio.get_running_loop()
    timers = len(loop._scheduled)  # type: ignore[attr-defined]
    tasks = [asyncio.create_task(caller(name)) for name in ("a", "b")]
    await asyncio.sleep(0.01)
    assert went == []  # one more is on its way: the window holds them
    last = asyncio.create_task(caller("c"))
    await asyncio.wait_for(asyncio.gather(*tasks, last), 0.5)  # not the 10 s window
    assert went == ["a", "b", "c"]
    assert sum(not h.cancelled() for h in loop._scheduled) == timers  # type: ignore[attr-defined]


async def test_a_caller_alone_with_none_coming_goes_on_without_a_turn() -> None:
    gather = Gather(10.0, coming=lambda: False)
    waited = gather.wait()
    with pytest.raises(StopIteration):
        waited.send(None)  # finished on its first step: it never waited
