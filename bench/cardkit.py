"""CardKit streaming benchmark: answers streamed into cards at several speeds, through the whole relay.

    .venv/bin/python bench/cardkit.py [--updates 500] [--rates 20,50,200,0] [--bootstrap 127.0.0.1:9092]

For each rate (updates per second a model writes; 0 = all at once), fresh topics on the real broker, the relay
(``app.serve``) in this process and the sandbox at real time (10 calls per second per card, 50/s per API). One
``card.create``, then ``--updates`` ``card.stream`` intents of one growing answer (each the whole text so far) at
that rate, each produced as its own record. Measured: content calls made, updates superseded, the most calls in
any 1 s, whether the card ends with the final text and the sequences the sandbox accepted strictly increase,
and the lag from the last update written to Kafka to the final text at the sandbox. Prints a table; exit status
1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer

# runnable as a plain script from anywhere: the package is the parent directory
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import APP_ID, APP_SECRET, Collector, config_data, relay_in_process, to_config

CARD = {"schema": "2.0", "config": {"streaming_mode": True},
        "body": {"elements": [{"tag": "markdown", "element_id": "answer", "content": ""}]}}


async def one(bootstrap: str, updates: int, rate: float) -> dict[str, object]:
    sandbox = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, log_bodies=False))
    await sandbox.start()
    prefix = f"bench.cardkit.{uuid.uuid4().hex[:8]}"
    config = to_config(config_data(bootstrap, prefix, sandbox.url))
    topic = config.kafka.intents_topics[0]
    texts = [" ".join(f"w{i}" for i in range((n + 1) * 20)) for n in range(updates)]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=1)
    try:
        async with relay_in_process(config), Collector(bootstrap, config.kafka.results_topic) as results:
            await producer.start()
            create = {"kind": "card.create", "id": "create", "card": CARD}
            await producer.send_and_wait(topic, json.dumps(create).encode(), key=b"create")
            await results.wait_for(1, 60)
            card_id = str(results.by_id()["create"][0]["data"]["card_id"])
            start = time.monotonic()
            for i, text in enumerate(texts):
                value = json.dumps({"kind": "card.stream", "id": f"s-{i}", "card_id": card_id,
                                    "element_id": "answer", "content": text}).encode()
                await producer.send(topic, value, key=card_id.encode())
                if rate:
                    await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
            await producer.flush()
            written = time.monotonic()
            entity = sandbox.cards.by_id[card_id]
            # polled: the sandbox's card state has no event to wait on, and 5 ms is below what is measured
            while entity.texts.get("answer") != texts[-1] and time.monotonic() - written < 120:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            lag = time.monotonic() - written
            await results.wait_for(updates + 1, 120)
            by_id = results.by_id()
    finally:
        await producer.stop()
        await sandbox.stop()
    performed = [c.at for c in sandbox.calls_for("card.stream") if c.performed]
    busiest = max((sum(1 for t in performed if s <= t < s + 1) for s in performed), default=0)
    superseded = sum(1 for i in range(updates) if by_id[f"s-{i}"][0]["status"] == "superseded")
    ok = (entity.texts.get("answer") == texts[-1] and entity.sequences == sorted(set(entity.sequences))
          and not sandbox.violations() and by_id[f"s-{updates - 1}"][0]["status"] == "ok"
          and len(performed) + superseded == updates)
    return {"rate": rate or "burst", "calls": len(performed), "superseded": superseded, "busiest 1 s": busiest,
            "final lag s": round(lag, 2), "checks": "ok" if ok else "FAILED"}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--updates", type=int, default=500)
    parser.add_argument("--rates", default="20,50,200,0")
    parser.add_argument("--quick", action="store_true", help="100 updates at two speeds (make bench --quick)")
    args = parser.parse_args()
    if args.quick:
        args.updates, args.rates = 100, "50,0"
    rows = [await one(args.bootstrap, args.updates, float(rate)) for rate in args.rates.split(",")]
    columns = list(rows[0])
    print(f"\n{args.updates} updates of one answer into one card (sandbox at real time, 10 calls/s per card)")
    print("  ".join(f"{c:>12}" for c in columns))
    for row in rows:
        print("  ".join(f"{row[c]!s:>12}" for c in columns))
    return 0 if all(row["checks"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
