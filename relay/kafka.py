"""aiokafka clients built from the config: one place for security settings and delivery settings.

Producers are idempotent with ``acks="all"``: a result, dead letter or event counts as written only when every
in-sync replica has it. Consumers never auto-commit and start from the earliest offset of a new group: the
relay commits explicit offsets itself (see ``offsets``).
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from relay.config import KafkaConfig
from relay.errors import RelayError

log = logging.getLogger(__name__)

# room for a 1 MiB inbound body plus headers and batch overhead; the local broker allows 2 MiB
MAX_REQUEST_SIZE = 2 * 1024 * 1024


def client_settings(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection and security settings shared by every client."""
    settings: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
    }
    if cfg.sasl_mechanism:
        settings["sasl_mechanism"] = cfg.sasl_mechanism
    if cfg.sasl_username is not None:
        settings["sasl_plain_username"] = cfg.sasl_username
    if cfg.sasl_password is not None:
        settings["sasl_plain_password"] = cfg.sasl_password.reveal()
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        settings["ssl_context"] = create_ssl_context(cafile=cfg.ssl_cafile)
    return settings


def make_producer(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaProducer:
    settings: dict[str, Any] = {
        **client_settings(cfg),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 2,
        # the default 16 KiB batch fills when ~100 results finish together, and every sender then waits on the
        # drain with a timer of its own (6,518 waits for 6,000 records in the engine benchmark; 2 with 1 MiB)
        "max_batch_size": 1 << 20,
        "max_request_size": MAX_REQUEST_SIZE,
        **overrides,
    }
    return AIOKafkaProducer(**settings)


def make_consumer(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaConsumer:
    settings: dict[str, Any] = {
        **client_settings(cfg),
        "group_id": cfg.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": MAX_REQUEST_SIZE,
        # the broker holds a fetch up to this long when the fetched partitions have nothing new; a partition
        # resumed after backpressure waits for that fetch to come back (default 500 ms stalled resumed partitions)
        "fetch_max_wait_ms": 100,
        **overrides,
    }
    return AIOKafkaConsumer(**settings)


def new_topics(cfg: KafkaConfig, topics: dict[str, dict[str, str]], existing: set[str]) -> list[NewTopic]:
    """The topics of ``topics`` not in ``existing``, with the partitions, replicas and configs of ``cfg``."""
    shared = {} if cfg.topic_min_insync_replicas is None else {
        "min.insync.replicas": str(cfg.topic_min_insync_replicas)}
    return [
        NewTopic(name, num_partitions=cfg.topic_partitions, replication_factor=cfg.topic_replication_factor,
                 topic_configs={**shared, **configs})
        for name, configs in topics.items() if name not in existing
    ]


async def ensure_topics(cfg: KafkaConfig, topics: dict[str, dict[str, str]]) -> None:
    """Create each missing topic (``{name: topic configs}``) with the partitions and replicas of ``cfg``.

    Raises RelayError naming the topic when the broker refuses one (e.g. more replicas than brokers): aiokafka
    returns those refusals in the response instead of raising them, and a relay that went on would fail later
    with a far less useful error. A topic another replica created first is not an error.
    """
    if not topics:
        return
    admin = AIOKafkaAdminClient(**client_settings(cfg))
    await admin.start()
    try:
        missing = new_topics(cfg, topics, set(await admin.list_topics()))
        if not missing:
            return
        response = await admin.create_topics(missing)
        # (topic, error_code) in v0, (topic, error_code, error_message) from v1 on
        answers: list[tuple[Any, ...]] = getattr(response, "topic_errors", [])
        refused = [answer for answer in answers if answer[1] not in (0, TopicAlreadyExistsError.errno)]
        if refused:
            topic, code = refused[0][:2]
            why = (refused[0][2] if len(refused[0]) > 2 else None) or for_code(code).__name__
            raise RelayError(f"Kafka refused to create topic {topic!r} (replication factor "
                             f"{cfg.topic_replication_factor}): {why}")
        log.info("created topics %s", ", ".join(t.name for t in missing))
    finally:
        await admin.close()
