"""``/metrics`` after a real workload (real broker, real sandbox, the relay in-process), parsed by prometheus-client's
own parser: the counters moved by exactly what was done, and no label value came from a producer."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.sandbox import Sandbox, SandboxOptions
from relay.sandbox.emit import envelope, post
from tests.relaykit import APP_ID, APP_SECRET, Collector, config_data, free_port, produce, relay_in_process, to_config

pytestmark = pytest.mark.integration

HOSTILE_KIND = 'message.send"} 1\nrelay_pwned{x="'
HOSTILE_TYPE = "pwned.by_producer_v1"  # a well-formed event type no Feishu app sends: "other"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}))
    await box.start()
    yield box
    await box.stop()


async def scrape(url: str) -> tuple[str, Samples]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        content_type, text = resp.headers["Content-Type"], await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return content_type, samples


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_after_a_workload(kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox) -> None:
    port = free_port()
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, http={"enabled": True, "port": port}))
    url = f"http://127.0.0.1:{port}"
    sends: list[dict[str, Any] | bytes] = [
        {"kind": "message.send", "id": f"m-{i}", "receive_id_type": "chat_id", "receive_id": f"oc_{i}",
         "msg_type": "text", "content": {"text": "hi"}} for i in range(3)]
    hostile: dict[str, Any] = {"kind": HOSTILE_KIND, "id": "h-1", "receive_id_type": "chat_id", "receive_id": "oc_1"}
    async with relay_in_process(config):
        content_type, before = await scrape(url)
        assert content_type.startswith("text/plain; version=") and "charset=utf-8" in content_type
        async with Collector(kafka_bootstrap, config.kafka.results_topic) as results:
            await produce(kafka_bootstrap, config.kafka.intents_topics[0], [*sends, hostile])
            await results.wait_for(4, 60)
        emitted = await post(f"{url}/feishu/events", "im.message.receive_v1",
                             verification_token="test-verification-token", app_id=APP_ID)
        assert emitted.status == 200, emitted
        assert await post_plain(f"{url}/feishu/events", HOSTILE_TYPE) == 200
        _, after = await scrape(url)
        text = (await aiohttp_text(f"{url}/metrics"))
    statuses = {r["id"]: r["status"] for r in results.values()}
    assert statuses == {"m-0": "ok", "m-1": "ok", "m-2": "ok", "h-1": "rejected"}, statuses

    assert moved(before, after, "relay_intents_total", kind="message.send", status="ok") == 3
    assert moved(before, after, "relay_intents_total", kind="unknown", status="rejected") == 1
    assert moved(before, after, "relay_intent_seconds_count", status="ok") == 3
    api = "im.message.create"
    assert moved(before, after, "relay_feishu_calls_total", app="default", api=api, outcome="ok") == 3
    assert moved(before, after, "relay_feishu_call_seconds_count", api=api) == 3
    assert moved(before, after, "relay_limiter_wait_seconds_count", api=api) == 3
    assert moved(before, after, "relay_feishu_token_refreshes_total", app="default", outcome="ok") == 1
    assert moved(before, after, "relay_inbound_events_total", app="default", type="im.message.receive_v1",
                 outcome="published") == 1
    assert moved(before, after, "relay_inbound_events_total", app="default", type="other", outcome="published") == 1
    assert len(sandbox.calls_for("message.send")) == 3  # the referee agrees with the counters
    # every finished record is committed: no partition lags
    lags = {labels: v for (name, labels), v in after.items() if name == "relay_outbound_consumer_lag"}
    assert lags and all(v == 0 for v in lags.values()), lags
    # the hostile kind is no label value, no series name, nowhere in the exposition
    labels = {value for (_, pairs) in after for _, value in pairs}
    assert HOSTILE_KIND not in labels and HOSTILE_TYPE not in labels and "pwned" not in text
    assert all(name.startswith(("relay_", "python_", "process_")) or name.endswith("_created")
               for name, _ in after), sorted({n for n, _ in after})


async def post_plain(url: str, event_type: str) -> int:
    """An unencrypted schema 2.0 event of any type (the app has no encrypt key: its verification token checks it)."""
    plaintext = json.loads(envelope("im.message.receive_v1", event_id=os.urandom(16).hex(), now=time.time(),
                                    app_id=APP_ID, verification_token="test-verification-token"))
    plaintext["header"]["event_type"] = event_type
    async with aiohttp.ClientSession() as http, http.post(url, json=plaintext) as resp:
        return resp.status


async def aiohttp_text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.text()
