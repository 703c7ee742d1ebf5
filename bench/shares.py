"""Quota use of three replicas under skew: shares by owned partitions vs shares following demand.

    .venv/bin/python bench/shares.py [--quick]

Three replicas own two of six intent partitions each; 90 % of the backlog sits on one partition (so on one
replica). Each replica's limiter (:mod:`relay.limits`) is driven by its :class:`relay.shares.ShareBook` over one
shared coordination log, beats every 0.5 s with its calls waiting for a token as demand, and reads the log with up to
0.3 s of lag; IM's real windows (50/s and 1000/min), in virtual time (a loop whose clock jumps to the next timer),
so ten minutes take a second. Two splits:

    partition-proportional  floor 1.0: every share is owned partitions / all partitions (the issue's minimum)
    demand-following        floor 0.2 (the default): a fifth by partitions, the rest by waiting demand

It prints, per split, the time to drain the backlog, the quota use over the drain (calls / (1000/min x
minutes)), the busiest minute, and the windows broken by all replicas together (must be 0; exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import selectors
import sys
from typing import Any

from relay.buckets import Window
from relay.limits import Limiter, Requeue
from relay.shares import Beat, ShareBook

IM = (Window(50, 1.0), Window(1000, 60.0))
JITTER = 0.15
HORIZON = 60.0 + JITTER


class _Jumping(selectors.DefaultSelector):
    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if not events and timeout:
            self._clock[0] += max(timeout, 1e-6)
        return events


class _VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._now = [0.0]
        super().__init__(_Jumping(self._now))

    def time(self) -> float:
        return self._now[0]


def now() -> float:
    return asyncio.get_running_loop().time()


def busiest(times: list[float], seconds: float) -> int:
    ordered, most, first = sorted(times), 0, 0
    for last, t in enumerate(ordered):
        while ordered[first] < t - seconds:
            first += 1
        most = max(most, last - first + 1)
    return most


async def drain(backlogs: dict[str, int], floor: float, seed: int) -> list[float]:
    """Every replica drains its backlog through its limiter at its share; the instants of all calls."""
    rng = random.Random(seed)
    records: list[tuple[float, str, Beat]] = []
    calls: list[float] = []
    left = dict(backlogs)

    async def replica(me: str) -> None:
        limiter = Limiter(jitter=JITTER, utilization=0.975, clock=now, sleep=asyncio.sleep, dynamic=True)
        book = ShareBook(me, horizon=HORIZON, member_ttl=HORIZON + 6.0, floor=floor, margin=1.0, clock=now)
        read = n = 0

        async def worker() -> None:
            while left[me] > 0:
                left[me] -= 1
                grant = await limiter.acquire("app", "im.message", IM)
                while True:
                    try:
                        await limiter.admit(grant)
                        break
                    except Requeue as requeue:
                        await requeue.wait()
                limiter.answered(grant)  # answered at once: its place in the send log expires from now
                calls.append(now())

        workers = [asyncio.create_task(worker()) for _ in range(16)]
        while any(left.values()) or not all(w.done() for w in workers):
            n += 1
            book.wrote(n)
            records.append((now(), me, Beat(partitions=2, apis=limiter.waiting_by_api(), view=book.view, n=n)))
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            for offset in range(read, len(records)):
                book.read(offset, *records[offset])
            read = len(records)
            limiter.set_shares(book.share(), {"im.message": book.share("im.message")})
            await asyncio.sleep(0.5)
            limiter.set_shares(book.share(), {"im.message": book.share("im.message")})
        await asyncio.gather(*workers)

    await asyncio.gather(*(replica(me) for me in backlogs))
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller backlog")
    args = parser.parse_args()
    total = 3000 if args.quick else 6000
    backlogs = {"a": int(total * 0.9), "b": int(total * 0.05), "c": int(total * 0.05)}
    print(f"3 replicas x 2 partitions, backlog {total} IM calls, {backlogs['a']} of them (90 %) on one partition")
    print(f"{'split':<24} {'drained in':>10} {'quota use':>10} {'busiest minute':>15} {'violations':>11}")
    broken = False
    for name, floor in (("partition-proportional", 1.0), ("demand-following", 0.2)):
        loop = _VirtualLoop()
        try:
            calls = loop.run_until_complete(drain(backlogs, floor, seed=1))
        finally:
            loop.close()
        elapsed = max(calls) - min(calls)
        use = len(calls) / (1000 / 60 * elapsed)
        over = [w for w in IM if busiest(calls, w.seconds) > w.limit]
        broken = broken or bool(over)
        print(f"{name:<24} {elapsed:>9.0f}s {use:>10.3f} {busiest(calls, 60.0):>15} {len(over):>11}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
