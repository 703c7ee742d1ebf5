"""aiokafka clients built from the config: one place for security settings and delivery settings.

Producers are idempotent with ``acks="all"``: a result, dead letter or event counts as written only when every
in-sync replica has it. Consumers never auto-commit and start from the earliest offset of a new group: the
relay commits explicit offsets itself (see ``offsets``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from relay.config import KafkaConfig
from relay.errors import RelayError

log = logging.getLogger(__name__)

# room for a 1 MiB inbound body plus headers and batch overhead; the local broker allows 2 MiB
MAX_REQUEST_SIZE = 2 * 1024 * 1024
MAX_BATCH_SIZE = 1 << 20
# what a topic's max.message.bytes must leave beside one record (results.record_size): the batch header (61 bytes
# in format v2) and the record's own framing
BATCH_OVERHEAD = 96


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
        # no linger: the outbound's results finishing together are already sent in one event-loop turn (its
        # Gather), and aiokafka holds new batches for a broker while a request to it is in flight; a 2 ms linger
        # only woke the process once more per batch (0.31 blocking wake-ups per call at quota, the same 0.31
        # produce requests per call without it)
        "linger_ms": 0,
        # the default 16 KiB batch fills when ~100 results finish together, and every sender then waits on the
        # drain with a timer of its own (6,518 waits for 6,000 records in the engine benchmark; 2 with 1 MiB)
        "max_batch_size": MAX_BATCH_SIZE,
        "max_request_size": MAX_REQUEST_SIZE,
        **overrides,
    }
    return AIOKafkaProducer(**settings)


# a follower of a compacted topic (preview memory, app tickets, dedup seen-log, coordination) is never paused, so
# nothing waits for its fetch to come back: the broker answers as soon as a record arrives whatever this is, and an
# idle follower asks once a second instead of ten times (measured: the idle relay's fetches were most of its idle
# CPU)
FOLLOWER_FETCH_WAIT_MS: Final = 1000
# once a follower has read its topic whole (read_to_end) it asks only for what comes next, and it sends nothing
# else on its connection but a metadata refresh, which a held fetch delays (a broker answers one request of a
# connection at a time): the broker may hold its fetches this long (an idle relay: one fetch per follower every
# 5 s, not every second)
FOLLOWING_FETCH_WAIT_MS: Final = 5000


async def read_to_end(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition],
                      take: Callable[[list[Any]], object]) -> None:
    """Read the assigned ``tps`` from their beginning up to their end offsets as of now, handing ``take`` one
    partition's fetched records at a time: a compacted topic's state, read whole before it is followed live. The
    caller bounds the time (``asyncio.timeout``). Its later fetches may be held :data:`FOLLOWING_FETCH_WAIT_MS`
    (the offsets requests of the read are behind it)."""
    await consumer.seek_to_beginning(*tps)
    end: dict[TopicPartition, int] = await consumer.end_offsets(list(tps))
    todo = {tp for tp in tps if await consumer.position(tp) < end[tp]}
    while todo:
        for records in (await consumer.getmany(*todo, timeout_ms=500)).values():
            take(records)
        todo = {tp for tp in todo if await consumer.position(tp) < end[tp]}
    set_fetch_wait(consumer, FOLLOWING_FETCH_WAIT_MS)


# how long the broker may hold an outbound fetch: long while nothing is paused (an idle relay asks once a second,
# not ten times; records that arrive end the wait at once), short while partitions are paused for backpressure,
# because a partition resumed then waits for the fetch in flight to come back (500 ms throughout cost the engine
# benchmark a fifth of its rate)
IDLE_FETCH_WAIT_MS: Final = 1000
PAUSED_FETCH_WAIT_MS: Final = 100
# an outbound consumer that has read nothing for a while (relay.outbound.QUIET_AFTER), with nothing in flight,
# lets the broker hold its fetches this long: records that arrive still end the wait at once. The price is paid
# only at a rebalance: the broker answers one request of a connection at a time, so the first fetch for newly
# assigned partitions may wait behind the one held (up to this long, once)
QUIET_FETCH_WAIT_MS: Final = 5000


def paused_fetch_wait_ms(rate: float, refill: int) -> int:
    """How long the broker may hold an outbound fetch while partitions are paused.

    A partition resumed then waits for the fetch in flight to come back, so the long hold (IDLE_FETCH_WAIT_MS) is
    kept only while the calls still in flight when a partition resumes (``refill``: the fewest there can be) last
    at least twice that long at the recent finishing ``rate`` (records a second; ``inf`` when not known): at one
    app's quota, 16 a second against the 250 a partition resumes with, the short hold made ten fetches a second
    for nothing. Otherwise (a fast fan-out, or a partition paused for its commit metadata, which may resume with
    nothing in flight) PAUSED_FETCH_WAIT_MS."""
    if refill > 0 and rate * 2 * IDLE_FETCH_WAIT_MS / 1000 <= refill:
        return IDLE_FETCH_WAIT_MS
    return PAUSED_FETCH_WAIT_MS


def _set_fetcher(consumer: AIOKafkaConsumer, attribute: str, value: float) -> None:
    """Set an option of a started consumer's ``Fetcher``, which aiokafka exposes no other way (aiokafka is pinned;
    tests check each attribute used is there and used). Without a fetcher (not started) nothing changes."""
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None and hasattr(fetcher, attribute):
        setattr(fetcher, attribute, value)


def set_fetch_wait(consumer: AIOKafkaConsumer, wait_ms: int) -> None:
    """Change the ``fetch_max_wait_ms`` of the fetches ``consumer`` sends from now on (the fetcher reads
    ``_fetch_max_wait_ms`` as it builds each request)."""
    _set_fetcher(consumer, "_fetch_max_wait_ms", wait_ms)


# aiokafka's fetch routine also wakes every ``fetcher_timeout`` (0.2 s) when nothing happened: everything that
# gives it work (a fetch answered, records taken, a seek, a resume, a new assignment, a metadata update, the
# prefetch backoff of records not taken) wakes it anyway, so the timeout only ends waits with nothing in flight
# (a paused reader). On a VM a wake-up of an idle process costs a few hundred microseconds of CPU, so five a
# second per consumer showed in the idle relay's CPU (1.3 % -> 0.7 % of a core with 1 s, measured)
FETCHER_TIMEOUT: Final = 5.0


class Consumer(AIOKafkaConsumer):
    """An ``AIOKafkaConsumer`` whose fetch routine looks for work every :data:`FETCHER_TIMEOUT` seconds without
    an event. aiokafka takes ``fetcher_timeout`` only in its ``Fetcher``, which ``start()`` makes (pinned; a test
    checks the routine uses it).

    A ``start()`` that fails or is cancelled half-way stops the consumer before it raises: aiokafka's leaves its
    connections and routines open, and a caller that only stops what started would leak them. ``stop()`` right
    after ``start()`` closes everything too (aio-libs/aiokafka#647, below)."""

    async def start(self) -> None:
        try:
            await super().start()  # type: ignore[no-untyped-call]
        except BaseException:
            await self.stop()
            raise
        _set_fetcher(self, "_fetcher_timeout", FETCHER_TIMEOUT)

    async def stop(self) -> None:
        # without a group, the consumer's coordinator runs a routine it cancels and awaits on close: one that has
        # not taken its first step yet (stop in the turn start returned) raises CancelledError out of stop(), which
        # then ends before closing the fetcher and the connections (aio-libs/aiokafka#647). One turn lets it start
        # and take its cancellation as it means to
        routine = getattr(self._coordinator, "_reset_committed_task", None)
        if routine is not None and not routine.done():
            await asyncio.sleep(0)
        await super().stop()  # type: ignore[no-untyped-call]


def make_consumer(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaConsumer:
    settings: dict[str, Any] = {
        **client_settings(cfg),
        "group_id": cfg.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": MAX_REQUEST_SIZE,
        # the broker holds a fetch up to this long when the fetched partitions have nothing new (records that
        # arrive end it at once). The outbound consumer shortens it while it pauses partitions (set_fetch_wait)
        "fetch_max_wait_ms": IDLE_FETCH_WAIT_MS,
        **overrides,
    }
    return new_consumer(**settings)


def new_consumer(**settings: Any) -> AIOKafkaConsumer:
    """A :class:`Consumer` of aiokafka's own ``settings`` (the client library's, without a relay config)."""
    return Consumer(**settings)  # type: ignore[no-untyped-call]


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
        # asked to create them all: an existing one answers TOPIC_ALREADY_EXISTS. Listing the cluster's topics
        # first costs a metadata response as large as the cluster (thousands of topics: seconds, and memory)
        response = await admin.create_topics(new_topics(cfg, topics, set()))
        # (topic, error_code) in v0, (topic, error_code, error_message) from v1 on
        answers: list[tuple[Any, ...]] = getattr(response, "topic_errors", [])
        refused = [answer for answer in answers if answer[1] not in (0, TopicAlreadyExistsError.errno)]
        if refused:  # e.g. not authorized to create: not a problem for a topic that exists
            existing = set(await admin.list_topics())
            refused = [answer for answer in refused if answer[0] not in existing]
        if refused:
            topic, code = refused[0][:2]
            why = (refused[0][2] if len(refused[0]) > 2 else None) or for_code(code).__name__
            raise RelayError(f"Kafka refused to create topic {topic!r} (replication factor "
                             f"{cfg.topic_replication_factor}): {why}")
        if created := [answer[0] for answer in answers if answer[1] == 0]:
            log.info("created topics %s", ", ".join(created))
            await _until_led(admin, created)
    finally:
        await admin.close()


async def _until_led(admin: AIOKafkaAdminClient, topics: list[str], timeout: float = 10.0) -> None:
    """Wait (a little) until every partition of new ``topics`` has a leader: a client using a topic the instant it
    is created is answered NOT_LEADER_OR_FOLLOWER meanwhile (retried, but logged as an error by aiokafka)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        described = await admin.describe_topics(topics)
        if all(not d.get("error_code") and d.get("partitions")
               and all(p.get("leader", -1) >= 0 for p in d["partitions"]) for d in described):
            return
        await asyncio.sleep(0.05)


async def max_message_bytes(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` (the most a batch may hold); a topic the broker does not tell about (no
    DescribeConfigs permission, unknown topic) is left out."""
    wanted = [ConfigResource(ConfigResourceType.TOPIC, t, configs={"max.message.bytes": None}) for t in topics]
    try:
        responses = await admin.describe_configs(wanted)
    except KafkaError as err:
        log.warning("cannot read max.message.bytes of %s: %s", ", ".join(topics), err)
        return {}
    limits: dict[str, int] = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            for entry in resource["config_entries"] if not resource["error_code"] else ():
                if entry["config_names"] == "max.message.bytes" and str(entry["config_value"]).isdigit():
                    limits[resource["resource_name"]] = int(entry["config_value"])
    return limits
