"""Callbacks benchmark: card clicks answered by a service over Kafka, click to answer, as Feishu would time them.

    .venv/bin/python bench/callbacks.py [--bootstrap 127.0.0.1:9092] [--quick]

Starts ``relay run`` as a child process (event URL only, on fresh topics), and a responder (``relay.responder``,
answering each click with a toast naming it) as another child process, then posts signed, encrypted
``card.action.trigger`` callbacks (built like Feishu's, by ``relay.sandbox.emit``) from 1 and from 64
concurrent clickers. Each click is timed from send to the full HTTP answer and judged the way Feishu judges it
(``relay.sandbox.callbacks``: within 3 s, the right shape); a click counts as answered by the service only when
the toast names that click. Prints a table; fails (exit 1) only if a click got an answer meant for another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

# runnable as a plain script from anywhere: the package is the parent directory
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.answers import CardActionAnswer, Toast  # noqa: E402  (after the path line above)
from relay.config import KafkaConfig  # noqa: E402
from relay.kafka import ensure_topics  # noqa: E402
from relay.responder import Callback, Responder  # noqa: E402
from relay.sandbox.callbacks import judge  # noqa: E402
from relay.sandbox.emit import Ids, envelope, request  # noqa: E402

ENCRYPT_KEY = "bench-encrypt-key"
TOKEN = "bench-verification-token"
APP_ID = "cli_bench"


def config_toml(bootstrap: str, prefix: str, port: int) -> str:
    return f"""
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}.relay"
intents_topics = ["{prefix}.intents"]
results_topic = "{prefix}.results"
dead_letter_topic = "{prefix}.dlq"
events_topic = "{prefix}.events"
callbacks_topic = "{prefix}.callbacks"
replies_topic = "{prefix}.replies"
preview_memory_topic = "{prefix}.preview-memory"
journal_topic = "{prefix}.journal"
topic_partitions = 6

[outbound]
enabled = false

[http]
port = {port}

[[apps]]
name = "default"
app_id = "{APP_ID}"
app_secret = "x"
verification_token = "{TOKEN}"
encrypt_key = "{ENCRYPT_KEY}"
"""


async def respond(bootstrap: str, topic: str, group: str) -> None:
    """The responder child: a toast naming the click, until killed."""

    async def answer(callback: Callback) -> CardActionAnswer:
        return CardActionAnswer(toast=Toast(type="success", content=callback.event()["event"]["action"]["value"]["n"]))

    async with Responder(bootstrap, answer, callbacks_topic=topic, group_id=group) as responder:
        reading = asyncio.create_task(responder.run())
        await responder.assigned(timeout=120)
        print("assigned", flush=True)
        await reading


def click_request(n: str) -> tuple[dict[str, str], bytes]:
    now = time.time()
    plain = envelope("card.action.trigger", event_id=uuid.uuid4().hex, now=now, app_id=APP_ID,
                     verification_token=TOKEN, ids=Ids(chat_id=f"oc_{n}", action_value={"n": n}))
    return request(plain, encrypt_key=ENCRYPT_KEY, now=now, nonce=os.urandom(8).hex(), iv=os.urandom(16))


async def scenario(url: str, clickers: int, count: int, run: str) -> dict[str, Any]:
    requests = [(f"{run}-{i}", *click_request(f"{run}-{i}")) for i in range(count)]
    latencies: list[float] = []
    ok = own = wrong = 0
    queue = list(reversed(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def clicker() -> None:
            nonlocal ok, own, wrong
            while queue:
                n, headers, body = queue.pop()
                started = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as resp:
                    answer = await resp.read()
                    elapsed = time.perf_counter() - started
                latencies.append(elapsed)
                ok += judge("card.action.trigger", resp.status, answer, elapsed).ok
                content = json.loads(answer).get("toast", {}).get("content") if resp.status == 200 else None
                own += content == n
                wrong += content is not None and content != n

        started = time.perf_counter()
        await asyncio.gather(*(clicker() for _ in range(clickers)))
        seconds = time.perf_counter() - started
    latencies.sort()
    return {"clickers": clickers, "clicks": count, "seconds": seconds, "rate": count / seconds,
            "p50": 1000 * statistics.median(latencies), "p99": 1000 * latencies[int(0.99 * (count - 1))],
            "max": 1000 * latencies[-1], "ok": 100 * ok / count, "own": own, "wrong": wrong}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(1200):
            if proc.poll() is not None:
                raise SystemExit(f"relay exited with {proc.returncode}")
            try:
                async with http.get(base + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit("relay not ready after 60 s")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--quick", action="store_true", help="100 and 500 clicks instead of 300 and 3,000")
    parser.add_argument("--respond", nargs=2, metavar=("TOPIC", "GROUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.respond:
        await respond(args.bootstrap, *args.respond)
        return 0

    prefix = f"bench.callbacks.{uuid.uuid4().hex[:8]}"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "relay.toml"
        config.write_text(config_toml(args.bootstrap, prefix, port))
        log = (Path(tmp) / "relay.log").open("wb")
        # the callbacks topic first, so the responder can join its group while the relay starts
        await ensure_topics(KafkaConfig(bootstrap_servers=args.bootstrap, topic_partitions=6),
                            {f"{prefix}.callbacks": {}})
        # started once, before anything is timed: a blocking call is fine here
        command = [sys.executable, "-m", "relay", "--log-level", "WARNING", "run", "--config", str(config)]
        relay = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)  # noqa: ASYNC220
        respond_command = [sys.executable, __file__, "--bootstrap", args.bootstrap, "--respond",
                           f"{prefix}.callbacks", f"{prefix}.responder"]
        responder = subprocess.Popen(respond_command, stdout=subprocess.PIPE)  # noqa: ASYNC220
        try:
            await wait_ready(f"http://127.0.0.1:{port}", relay)
            assert responder.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(responder.stdout.readline), 120)
            if line.strip() != b"assigned":
                raise SystemExit("the responder did not start")
            url = f"http://127.0.0.1:{port}/feishu/events"
            await scenario(url, 8, 100, "warmup")
            plan = [(1, 100), (64, 500)] if args.quick else [(1, 300), (64, 3000)]
            rows = [await scenario(url, clickers, count, f"run{clickers}") for clickers, count in plan]
        finally:
            for proc in (responder, relay):
                proc.terminate()
                proc.wait(30)
            log.close()

    print(f"\ncallbacks: card.action.trigger -> relay -> {prefix}.callbacks -> responder -> {prefix}.replies "
          f"-> relay -> answer, on {args.bootstrap}\n")
    print(f"{'clickers':>8} {'clicks':>6} {'clicks/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'<=3 s ok %':>10} {'own answer':>10} {'wrong':>5}")
    for r in rows:
        print(f"{r['clickers']:>8} {r['clicks']:>6} {r['rate']:>8.0f} {r['p50']:>7.1f} {r['p99']:>7.1f} "
              f"{r['max']:>7.1f} {r['ok']:>10.1f} {r['own']:>10} {r['wrong']:>5}")
    print(
        "\nWhat this measured: each click is a distinct card.action.trigger, AES-256-CBC encrypted and signed "
        "(pre-built: the client's crypto is not timed), posted to the relay's event URL (relay run, a child "
        "process) over keep-alive TCP. Click -> answer runs from the send to the full HTTP answer and covers the "
        "relay's checks, the callback's publish (acks=all) until the broker acknowledged it, the responder (a "
        "second child process, a consumer group on the callbacks topic) reading it and writing its toast to the "
        "replies topic, and the relay's reply reader handing it to the waiting request. '<=3 s ok' is the share "
        "Feishu would take (relay.sandbox.callbacks.judge: HTTP 200, the right shape, within 3 s); 'own "
        "answer' counts clicks whose toast names that click (the responder's answer, not the fallback); "
        "'wrong' counts a toast meant for another click (must be 0). The clickers, the relay, the responder "
        "and the single local broker share this machine's cores (other work included)."
    )
    return 1 if any(r["wrong"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
