"""Long-connection benchmark: events pushed over the sandbox's WebSocket, published to the real broker, answered.

    .venv/bin/python bench/websocket.py [--bootstrap 127.0.0.1:9092] [--quick]

Runs the sandbox (``relay.sandbox.ws``) and one app's ``relay.ws.LongConnection`` with the webhook's publish path
(``relay.inbound.Inbound``, a real idempotent ``acks=all`` producer) against a fresh topic, in one process and
one event loop, so the figures include the sandbox's own work: the relay alone does better. Pushes distinct
``im.message.receive_v1`` events with 1, 100 and all of them unanswered at once, and times each from its
frame leaving the sandbox to the answer read back (the relay answers 200 only after the broker acknowledged).
Prints a table, checks the topic holds exactly one record per event and that the sandbox saw no violation.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

# runnable as a plain script from anywhere: the package is the parent directory
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.config import parse_config
from relay.inbound import Inbound, KafkaPublisher
from relay.kafka import ensure_topics, make_producer
from relay.metrics import Metrics
from relay.sandbox import Sandbox, SandboxOptions, WsOptions
from relay.sandbox.emit import Ids, envelope
from relay.ws import LongConnection, PushedEvents
from relay.ws.protocol import ClientConfig

APP_ID = "cli_bench_ws"
SECRET = "bench-secret"
TOKEN = "bench-token"


def payload(run: str, i: int) -> bytes:
    return envelope("im.message.receive_v1", event_id=f"{run}-{i}", now=time.time(), app_id=APP_ID,
                    verification_token=TOKEN, ids=Ids(chat_id=f"oc_{i % 50}", message_id=f"om_{run}_{i}"))


async def scenario(sandbox: Sandbox, run: str, count: int, in_flight: int) -> dict[str, float]:
    """Push ``count`` events keeping at most ``in_flight`` unanswered (a Feishu-like steady stream)."""
    events = [(f"{run}-{i}", payload(run, i)) for i in range(count)]
    window = asyncio.Semaphore(in_flight)
    deliveries = []

    async def one(event_id: str, body: bytes) -> None:
        async with window:
            delivery = sandbox.ws.push(APP_ID, body, event_id=event_id)
            deliveries.append(delivery)
            await delivery.done.wait()

    started = time.perf_counter()
    await asyncio.gather(*(one(eid, body) for eid, body in events))
    seconds = time.perf_counter() - started
    first_try = [d.answer_seconds for d in deliveries if d.answers == [200] and d.answer_seconds is not None]
    ms = sorted(1000 * s for s in first_try)
    return {"events": count, "seconds": seconds, "rate": count / seconds,
            "p50": statistics.median(ms) if ms else float("nan"),
            "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan"),
            "retried": sum(1 for d in deliveries if d.answers != [200]),
            "acked": sum(1 for d in deliveries if d.acknowledged)}


async def count_records(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    tps = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
        return sum(ends.values())
    finally:
        await consumer.stop()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--quick", action="store_true", help="a fifth of the events")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("relay.ws").setLevel(logging.WARNING)  # a reconnect would be worth seeing
    scale = 5 if args.quick else 1
    run = uuid.uuid4().hex[:8]
    topic = f"bench.ws.{run}.events"
    sandbox = Sandbox(SandboxOptions(apps={APP_ID: SECRET}, ws=WsOptions(ping_interval=30, redelivery=(1.0,) * 30)))
    await sandbox.start()
    config = parse_config({
        "kafka": {"bootstrap_servers": args.bootstrap, "events_topic": topic,
                  "callbacks_topic": f"bench.ws.{run}.callbacks", "topic_partitions": 6},
        "feishu": {"base_url": sandbox.url},
        "apps": [{"name": "ws", "app_id": APP_ID, "app_secret": SECRET, "verification_token": TOKEN,
                  "inbound": {"mode": "websocket"}}],
        "inbound": {"ws_max_in_flight": 10_000},
    }, env={})
    await ensure_topics(config.kafka, {topic: {}, config.kafka.callbacks_topic: {}})
    metrics = Metrics()
    publisher = KafkaPublisher(make_producer(config.kafka))
    await publisher.start()
    inbound = Inbound(config, publisher, metrics)
    session = aiohttp.ClientSession()
    conn = LongConnection(config.apps[0], config, PushedEvents(config.apps[0], config, inbound, metrics), session,
                          metrics, initial=ClientConfig(reconnect_interval=1, reconnect_nonce=0.1))
    task = asyncio.create_task(conn.run())
    try:
        while not conn.connected:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        await scenario(sandbox, run + "w", 50, 1)  # warm-up: metadata, connections
        plan = [("1 in flight", 500 // scale, 1), ("100 in flight", 5000 // scale, 100),
                ("all at once", 1000 // scale, 1000)]
        results = [(name, await scenario(sandbox, f"{run}{i}", count, in_flight))
                   for i, (name, count, in_flight) in enumerate(plan)]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await inbound.close()
        await session.close()
        await publisher.stop()
        await sandbox.stop()
    expected = 50 + sum(count for _, count, _ in plan)
    stored = await count_records(args.bootstrap, topic)
    print(f"\nwebsocket: im.message.receive_v1 over the sandbox's long connection -> {topic} on {args.bootstrap}")
    print("(sandbox and relay share one process and event loop: the sandbox's work is in these figures)\n")
    print(f"{'pushed':<14} {'events':>7} {'seconds':>8} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'retried':>8} {'acked':>6}")
    for name, r in results:
        print(f"{name:<14} {r['events']:>7.0f} {r['seconds']:>8.2f} {r['rate']:>9.0f} {r['p50']:>7.1f} "
              f"{r['p99']:>7.1f} {r['retried']:>8.0f} {r['acked']:>6.0f}")
    print("\np50/p99: first frame sent -> answer read, for events answered 200 at the first attempt; retried: "
          "events answered 500 or unanswered at first (then redelivered)")
    print(f"records in the topic: {stored} (expected {expected}, one per event incl. 50 warm-up)")
    print(f"sandbox violations: {len(sandbox.ws.violations)}")
    ok = stored == expected and not sandbox.ws.violations and all(r["acked"] == r["events"] for _, r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
