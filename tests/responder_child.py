"""A responder in a process of its own, for tests that kill it: ``python tests/responder_child.py BOOTSTRAP
CALLBACKS_TOPIC GROUP``. Answers each click with a toast naming it; prints ``assigned`` once it has partitions;
commits once, where it starts, then never on its own (a kill leaves everything it read after ``assigned``
uncommitted, and the next owner re-reads it: without that first commit a partition the group never committed
would be taken over at its end, nothing re-read)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.answers import CardActionAnswer, Toast
from relay.responder import Callback, Responder


async def answer(callback: Callback) -> CardActionAnswer:
    value = callback.event()["event"]["action"]["value"]["v"]
    return CardActionAnswer(toast=Toast(type="success", content=f"got {value}"))


async def main(bootstrap: str, topic: str, group: str) -> None:
    async with Responder(bootstrap, answer, callbacks_topic=topic, group_id=group, session_timeout_ms=6000,
                         commit_interval_ms=3_600_000) as responder:
        reading = asyncio.create_task(responder.run())
        await responder.assigned(timeout=120)
        # where each partition starts, committed, whichever of the two responders joined first: the partitions
        # this one was given may have come with no committed offset (both joined in the same generation)
        await responder._consumer.commit()
        print("assigned", flush=True)
        await reading


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
