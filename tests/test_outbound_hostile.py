"""Hostile records through the real broker: each is rejected with a reason (a dead letter, and a result when
its id can be read), the records behind it on the same key flow, and the relay keeps running."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from relay.sandbox import Sandbox, SandboxOptions
from tests.relaykit import APP_ID, APP_SECRET, Collector, config_data, relay_in_process, to_config

pytestmark = pytest.mark.integration

KEY = b"oc_h"
DEEP = b"[" * 10_000 + b"]" * 10_000
DEEP_OBJECT = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
SEND = b'{"kind":"message.send","id":"%s","receive_id_type":"chat_id","receive_id":"oc_h","msg_type":"text",'
API_CALL = b'{"kind":"api.call","id":"%s","method":"POST","path":"/open-apis/x","rate":{"per_second":5}'


class NotUtf8(str):
    """A header name whose bytes are not UTF-8: what a non-Java client can write, and aiokafka cannot read."""

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        return b"\xff\xfename"


# (name, value, headers, relay.error or None when it is a valid intent, a word of the reason, readable id)
HOSTILE: list[tuple[str, bytes | None, list[tuple[str, bytes | None]], str | None, str, str | None]] = [
    ("nested value", DEEP, [], "decode", "nested", None),
    ("nested api.call body", API_CALL % b"x-1" + b',"body":' + DEEP + b"}", [], "decode", "nested", None),
    ("nested content", SEND % b"x-2" + b'"content":' + DEEP_OBJECT + b"}", [], "decode", "nested", None),
    ("nested card string", b'{"kind":"card.delay_update","id":"x-3","token":"c","card":'
     + msgspec.json.encode(DEEP_OBJECT.decode()) + b"}", [], "decode", "nested", None),
    ("NaN", API_CALL % b"x-4" + b',"body":{"n":NaN}}', [], "decode", "JSON", None),
    ("number out of range", API_CALL % b"x-5" + b',"body":{"n":1e999}}', [], "decode", "JSON", None),
    ("rate too large", (API_CALL % b"x-6").replace(b"5}", b"9" * 400 + b"}") + b"}", [], "invalid",
     "per_second", "x-6"),
    ("value not UTF-8", SEND % b"x-7" + b'"content":{"text":"\xff\xfe"}}', [], "decode", "UTF-8", None),
    ("lone surrogate", SEND % b"x-8" + b'"content":{"text":"\\ud800"}}', [], "decode", "JSON", None),
    ("null value", None, [], "decode", "empty", None),
    ("2.5 MB", SEND % b"x-9" + b'"content":{"text":"x"},"pad":"' + b"p" * 2_500_000 + b'"}', [],
     "invalid", "pad", "x-9"),
    ("header name not UTF-8", SEND % b"x-10" + b'"content":{"text":"x"}}', [(NotUtf8("h"), b"v")], "decode",
     "cannot be read", None),
    ("50,000 headers", SEND % b"x-11" + b'"content":{"text":"x"},"colour":1}',
     [(f"h{i}", b"v") for i in range(50_000)], "invalid", "colour", "x-11"),
    ("header value not UTF-8, and null", SEND % b"x-12" + b'"content":{"text":"x"}}',
     [("traceparent", b"\xff\xfe"), ("n", None)], None, "", "x-12"),
]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=4.0))
    await box.start()
    yield box
    await box.stop()


async def produce_hostile(bootstrap: str, topic: str) -> None:
    """Each hostile record, then a valid send on the same key; every record a batch of its own (one that aiokafka
    cannot parse spoils the rest of its batch for every client of its kind)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 << 20)
    await producer.start()
    try:
        partition = min(await producer.partitions_for(topic))
        for i, (_, value, headers, _, _, _) in enumerate(HOSTILE):
            batch = producer.create_batch()
            batch._builder = _DefaultRecordBatchBuilderPy(  # the pure-Python builder: it writes any header name
                2, 0, is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=0, batch_size=4 << 20)
            assert batch.append(key=KEY if i % 2 else None, value=value, timestamp=None, headers=headers)
            await (await producer.send_batch(batch, topic, partition=partition))
            after = SEND % f"after-{i}".encode() + b'"content":{"text":"ok"}}'
            await (await producer.send(topic, after, key=KEY, partition=partition))
    finally:
        await producer.stop()


async def test_hostile_records_are_rejected_with_a_reason_and_the_records_behind_them_flow(
    kafka_bootstrap: str, topic_prefix: str, sandbox: Sandbox
) -> None:
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=4.0))
    # intents up to 4 MiB (the relay's dead-letter topic takes 2 MiB: the 2.5 MB one's letter must be cut)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(config.kafka.intents_topics[0], num_partitions=2, replication_factor=1,
                                            topic_configs={"max.message.bytes": str(4 << 20)})])
    finally:
        await admin.close()
    rejected = [h for h in HOSTILE if h[3] is not None]
    with_id = [h for h in HOSTILE if h[5] is not None]
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results, \
            Collector(kafka_bootstrap, config.kafka.dead_letter_topic) as dead:
        await produce_hostile(kafka_bootstrap, config.kafka.intents_topics[0])
        await results.wait_for(len(HOSTILE) + len(with_id), timeout=120, what="results")
        await dead.wait_for(len(rejected), timeout=60, distinct_ids=False)
    # the relay stopped cleanly (relay_in_process checks exit code 0): nothing killed it
    by_id = {k: v for k, v in results.by_id().items()}
    assert all(len(v) == 1 for v in by_id.values()), "an intent got two results"
    for i in range(len(HOSTILE)):
        assert by_id[f"after-{i}"][0]["status"] == "ok", (HOSTILE[i][0], by_id[f"after-{i}"])
    letters = sorted(dead.records, key=lambda r: int(dict(r.headers)["relay.source.offset"]))
    assert len(letters) == len(rejected)
    for letter, (name, _, _, error, word, id) in zip(letters, rejected, strict=True):
        headers = dict(letter.headers)
        assert headers["relay.error"] == error.encode(), (name, headers["relay.reason"])
        reason = headers["relay.reason"].decode()
        assert word.lower() in reason.lower() and "\n" not in reason, (name, reason)
        if id is not None:
            assert by_id[id][0]["status"] == "rejected" and word.lower() in by_id[id][0]["msg"].lower(), name
    (big,) = [r for r in dead.records if "relay.truncated" in dict(r.headers)]
    assert dict(big.headers)["relay.error"] == b"invalid"  # the 2.5 MB one: its dead letter did not fit
    assert by_id["x-12"][0]["status"] == "ok"
    assert {c.uuid for c in sandbox.calls_for("message.send")} == {"x-12", *(f"after-{i}" for i in range(len(HOSTILE)))}
