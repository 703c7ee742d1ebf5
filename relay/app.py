"""Wiring and lifetime: the one owner of the running relay.

``relay run`` starts, in order, and stops in reverse (each only if it started): the sandbox (``--with-sandbox``
and no real credentials), the relay's topics, the Kafka producer, the HTTP server (inbound webhooks,
``/healthz``, ``/readyz``, ``/metrics``), the Feishu client and the outbound consumer. SIGTERM/SIGINT set one
stop event: the consumer stops fetching, drains, commits and leaves its group; then the rest closes; exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import logging
import random
import signal
import sys
import time
from typing import Any

import msgspec
from aiohttp import web

from relay import logs
from relay.backoff import RetryPolicy
from relay.calls import check_share
from relay.config import AppConfig, Config, Secret, check_inbound, load_config
from relay.coordination import Coordinator
from relay.errors import ConfigError, ListenError, RelayError
from relay.executor import Executor
from relay.feishu import FAILED_TOKEN_HOLD, FeishuClient
from relay.fetch import Fetcher
from relay.intents import decode_intent, ordering_key
from relay.journal import KafkaJournal
from relay.kafka import MAX_REQUEST_SIZE, ensure_topics, make_consumer, make_producer
from relay.limits import Limiter
from relay.membership import Membership, Standing
from relay.metrics import Metrics
from relay.outbound import CONSUMER_STOP_SECONDS, Outbound
from relay.previews import KafkaPreviewMemory, PreviewCoalescer
from relay.readiness import BrokerWatch, Health, probe_interval, retry_tokens, token_problem, watch_broker
from relay.replies import Replies
from relay.results import schema
from relay.tickets import KafkaTickets

log = logging.getLogger(__name__)

# credentials that mean "no real app": `make run` talks to the local sandbox
SANDBOX_APP_ID = "cli_sandbox"
SANDBOX_SECRET = "sandbox-secret"  # a placeholder only the local sandbox accepts
SANDBOX_PORT = 8090

# The collector's young-generation threshold for a running relay (Python's default is 700). Python runs a
# young pass each time that many more containers were allocated than freed. The relay makes some sixty per
# intent: coroutines, futures, handles, records, result structs. Reference counting frees nearly all of them
# within milliseconds. So the default passes found little garbage, yet took 0.41-0.51 s of the relay's 1.8-2.1 s
# of CPU in the engine benchmark (463-483 young passes, 4 full ones, for 5,500 intents). At 50,000 it was 2
# passes and 0.05 s. The cost: cyclic garbage waits longer to be collected, at most some 50,000 objects (a few
# MB).
GC_YOUNG_THRESHOLD = 50_000


def main(args: argparse.Namespace) -> int:
    if args.command == "schema":
        print(json.dumps(schema(), indent=2))
        return 0
    config = load_config(args.config)
    if args.command == "send":
        return asyncio.run(send(config, args.intent, args.timeout))
    if args.command == "run":
        # the config's [log] section, now that it is read (--log-format, when given, wins)
        logs.configure(args.log_level, args.log_format or config.log.format,
                       repeat_interval=config.log.repeat_interval)
        check_limits(config)
        check_inbound(config)  # its warnings are logged by Inbound at start
        tune_gc()
        return asyncio.run(run(config, with_sandbox=args.with_sandbox))
    raise SystemExit(f"unknown command {args.command}")


def tune_gc() -> None:
    """The collector's thresholds for a relay process (:data:`GC_YOUNG_THRESHOLD`; the older generations keep
    Python's defaults). ``relay run`` sets them before it starts, and so do the benchmarks that run the relay in
    their own process, for their plain loops as well."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def check_limits(config: Config) -> None:
    """Raise ConfigError when ``feishu.quota_share`` leaves a built-in app-wide window with no call per replica.

    ``relay run`` and ``relay check`` both call it, so a share too small for URL previews (5/s: under 0.2)
    fails at startup in one line instead of inside the limiter once the first such intent arrives.
    """
    f = config.feishu
    try:  # a group's shares vary (relay.shares): only the whole quota must be sizeable
        check_share(f.quota_share if f.share_mode == "static" else 1.0, f.time_scale, f.limit_jitter,
                    f.limit_utilization)
    except ValueError as err:
        raise ConfigError("feishu.quota_share", str(err)) from None


def uses_sandbox(config: Config) -> bool:
    """True when no app has real credentials (none configured, or only the sandbox placeholder)."""
    return all(app.app_id == SANDBOX_APP_ID or not app.app_secret for app in config.apps)


def with_sandbox_url(config: Config, base_url: str) -> Config:
    apps = config.apps or [AppConfig(name="default", app_id=SANDBOX_APP_ID, app_secret=Secret(SANDBOX_SECRET))]
    apps = [msgspec.structs.replace(app, base_url=None) for app in apps]
    feishu = msgspec.structs.replace(config.feishu, base_url=base_url)
    return msgspec.structs.replace(config, feishu=feishu, apps=apps)


def topics_to_create(config: Config) -> dict[str, dict[str, str]]:
    """Every topic the relay reads or writes, with the settings it relies on."""
    from relay.inbound import inbound_topics
    from relay.journal import JOURNAL_TOPIC_CONFIG
    from relay.previews import MEMORY_TOPIC_CONFIG
    from relay.tickets import TICKETS_TOPIC_CONFIG

    k = config.kafka
    large = {"max.message.bytes": str(MAX_REQUEST_SIZE)}  # a dead letter carries the whole intent plus headers
    topics: dict[str, dict[str, str]] = {name: {} for name in k.intents_topics}
    topics.update({k.results_topic: dict(large), k.dead_letter_topic: dict(large)})
    topics.update(inbound_topics(config))  # events may be as large as the body cap
    if config.inbound.callback_replies:
        from relay.replies import REPLIES_TOPIC_CONFIG

        topics[k.replies_topic] = {**REPLIES_TOPIC_CONFIG, **large}  # a reply may be a card near the cap
    topics[k.preview_memory_topic] = dict(MEMORY_TOPIC_CONFIG)
    if any(app.type == "store" for app in config.apps):
        topics[k.app_tickets_topic] = dict(TICKETS_TOPIC_CONFIG)
    if config.kafka.dedup_topic and config.inbound.enabled and config.http.enabled:
        from relay.seenlog import seen_topic_config

        topics[k.dedup_topic] = seen_topic_config(config)
    if config.feishu.share_mode == "group":
        from relay.coordination import COORDINATION_TOPIC_CONFIG

        topics[k.coordination_topic] = dict(COORDINATION_TOPIC_CONFIG)
    # a Finished entry carries a result: as large as the results topic allows
    topics[k.journal_topic] = {**JOURNAL_TOPIC_CONFIG, **large}
    return topics


async def run(config: Config, *, with_sandbox: bool = False) -> int:
    """``relay run``: serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(config, stop, with_sandbox=with_sandbox)


async def serve(config: Config, stop: asyncio.Event, *, with_sandbox: bool = False,
                metrics: Metrics | None = None, health: Health | None = None) -> int:
    """Run every enabled part until ``stop`` is set (or a part dies: the outbound consumer, the preview loop or
    its memory tail); 0 on a clean stop, 1 when a part died (``health.problem`` says which and why)."""
    metrics = metrics or Metrics()
    health = health or Health(metrics)
    async with contextlib.AsyncExitStack() as stack:
        if with_sandbox and uses_sandbox(config):
            from relay.sandbox import Sandbox, SandboxOptions

            sandbox = Sandbox(SandboxOptions(time_scale=config.feishu.time_scale))
            try:
                base_url = await sandbox.start("127.0.0.1", SANDBOX_PORT)
            except OSError as err:
                raise ListenError("sandbox", "127.0.0.1", SANDBOX_PORT, err) from None
            stack.push_async_callback(sandbox.stop)
            config = with_sandbox_url(config, base_url)
            log.info("no real app credentials: using the local Feishu sandbox at %s", base_url)
        if config.kafka.create_topics:
            await ensure_topics(config.kafka, topics_to_create(config))

        producer = make_producer(config.kafka)
        stack.push_async_callback(producer.stop)  # safe even if start() failed half-way
        await producer.start()
        tasks: list[asyncio.Task[Any]] = []  # run until stop; serve ends when one of them does
        watched: list[asyncio.Task[Any]] = []  # watch a part that runs on its own; cancelled at stop
        stack.push_async_callback(cancel, watched)  # also when a later start fails
        # /readyz: the broker answers (relay.readiness); the probe asks for one topic's metadata, not the cluster's
        broker = BrokerWatch(config.kafka.unreachable_after)
        health.checks.append(broker.problem)
        await producer.client.add_topic(config.kafka.results_topic)
        watched.append(asyncio.create_task(watch_broker(broker, producer.client.force_metadata_update,
                                                        probe_interval(config.kafka.unreachable_after)),
                                           name="broker watch"))

        inbound = None
        if config.inbound.enabled:
            from relay.inbound import Inbound, KafkaPublisher

            replies = await start_replies(config, metrics, stack, watched)
            inbound = Inbound(config, KafkaPublisher(producer), metrics, replies=replies)
            if config.kafka.dedup_topic and config.http.enabled:  # read before the server takes a request
                from relay.seenlog import KafkaSeen

                seen = KafkaSeen(config, producer, inbound.dedup)
                stack.push_async_callback(seen.stop)  # after inbound.close: its last publishes are marked too
                await seen.start()
                watched.append(seen.wait())  # dead, a redelivery another replica published would go out again
            stack.push_async_callback(inbound.close)  # after the server and the long connections stopped
        if config.http.enabled:
            web_app = web.Application(client_max_size=config.inbound.max_body_bytes + 1)
            health.install(web_app)
            if inbound is not None:
                inbound.install(web_app)
            runner = web.AppRunner(web_app, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            try:
                await web.TCPSite(runner, config.http.host, config.http.port).start()
            except OSError as err:
                raise ListenError("http", config.http.host, config.http.port, err) from None
            log.info("http on %s:%d", config.http.host, config.http.port)

        if config.outbound.enabled:
            tickets = None
            if any(app.type == "store" for app in config.apps):  # their app_tickets, as any replica received them
                tickets = KafkaTickets(config.kafka, producer)
                stack.push_async_callback(tickets.stop)
                watched.append(await tickets.start())
            client = FeishuClient(config, metrics=metrics, tickets=tickets)
            stack.push_async_callback(client.close)
            await client.start()
            health.checks.append(functools.partial(token_problem, client))
            watched.append(asyncio.create_task(retry_tokens(client, FAILED_TOKEN_HOLD), name="token retry"))
            outbound, previews, coordinator = await start_outbound(config, client, producer, metrics, stack)
            health.checks.append(outbound.problem)
            tasks.append(asyncio.create_task(outbound.run(stop), name="outbound"))
            # when serve ends another way (a later part failed to start, or serve itself was cancelled) it is told
            # to stop too: left running, it would consume and call Feishu with no one to stop it
            stack.push_async_callback(wind_down, tasks, stop, stop_seconds(config))
            # the preview loop and its memory tail: dead, they would leave every preview intent waiting forever
            watched.append(asyncio.create_task(previews.wait(), name="previews"))
            if coordinator is not None:  # dead, the share would fence itself to 0: every call would wait
                watched.append(asyncio.create_task(coordinator.wait(), name="coordination"))
        if inbound is None and any(a.inbound.mode == "websocket" for a in config.apps):
            log.warning("inbound.enabled = false: the apps with inbound.mode = \"websocket\" get no connection")
        if inbound is not None:  # apps in websocket mode: one long connection each, watched like the parts above
            for connection in await start_websockets(config, inbound, metrics, stack):
                health.checks.append(connection.problem)
                watched.append(asyncio.create_task(connection.run(), name=f"websocket apps[{connection.name}]"))
        health.ready = True
        log.info("relay running (apps: %s)", ", ".join(a.name for a in config.apps) or "none")
        stopper = asyncio.create_task(stop.wait())
        for task in (*tasks, *watched):
            task.add_done_callback(functools.partial(died, health))
        await asyncio.wait([stopper, *tasks, *watched], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in watched:  # they end with the parts they watch, stopped by the exit stack below
            task.cancel()
        await asyncio.gather(*watched, return_exceptions=True)
        stopper.cancel()
        failed = [t for t in (*tasks, *watched) if t.done() and not t.cancelled() and t.exception() is not None]
        log.info("relay stopped")
    return 1 if failed else 0


async def cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def wind_down(tasks: list[asyncio.Task[Any]], stop: asyncio.Event, timeout: float) -> None:
    """Set ``stop`` and give ``tasks`` up to ``timeout`` to end as they do on it (the outbound drains and commits),
    then cancel what is left. Nothing to do after a clean stop: they have ended."""
    stop.set()
    pending = [task for task in tasks if not task.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    await cancel(tasks)


async def start_replies(config: Config, metrics: Metrics, stack: contextlib.AsyncExitStack,
                        watched: list[asyncio.Task[Any]]) -> Replies | None:
    """The callback reply reader (``inbound.callback_replies``), at the topic's end before any callback is
    answered; its read loop is watched (dead, every click would get the fallback)."""
    if not config.inbound.callback_replies:
        return None
    replies = Replies(config, metrics)
    stack.push_async_callback(replies.stop)
    await replies.start()
    assert replies.run_task is not None
    watched.append(replies.run_task)
    return replies


def died(health: Health, task: asyncio.Task[Any]) -> None:
    """A part's task ended with an error: ``/readyz`` says so at once (and ``serve`` exits 1)."""
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    health.problem = health.problem or f"{task.get_name()} died: {error}"
    if isinstance(error, RelayError):  # says what was wrong in one line (a refused long connection)
        log.error("%s stopped: %s", task.get_name(), error)
    else:
        log.error("%s died: %s", task.get_name(), error, exc_info=error)


async def start_websockets(config: Config, inbound: Any, metrics: Metrics,
                           stack: contextlib.AsyncExitStack) -> list[Any]:
    """A :class:`relay.ws.LongConnection` per app in websocket mode (none: nothing started), on one session."""
    apps = [app for app in config.apps if app.inbound.mode == "websocket"]
    if not apps:
        return []
    import aiohttp

    from relay.ws import LongConnection, PushedEvents

    session = aiohttp.ClientSession()
    stack.push_async_callback(session.close)
    return [LongConnection(app, config, PushedEvents(app, config, inbound, metrics), session, metrics)
            for app in apps]


async def start_outbound(config: Config, client: FeishuClient, producer: Any, metrics: Metrics,
                         stack: contextlib.AsyncExitStack) -> tuple[Outbound, PreviewCoalescer, Coordinator | None]:
    feishu = config.feishu
    limiter = Limiter.from_config(feishu, clock=time.monotonic, sleep=asyncio.sleep)
    consumers: list[Any] = []  # the outbound consumer, made below: the coordinator's demand reads it
    coordinator: Coordinator | None = None
    if feishu.share_mode == "group":
        coordinator = Coordinator(config, producer, limiter, functools.partial(demand, consumers))
        stack.push_async_callback(coordinator.stop)  # after the consumer stopped: its "left" beat follows no call
        await coordinator.start()
        metrics.collect(lambda m: export_coordination(m, coordinator))
    out = config.outbound
    policy = RetryPolicy(max_attempts=out.max_attempts, max_seconds=out.max_retry_seconds, base=out.backoff_base,
                         cap=out.backoff_cap)
    # the group-membership lease: no Feishu call and no result once this replica may have lost its partitions
    membership = Membership(out.session_timeout_ms / 1000, out.rebalance_timeout_ms / 1000)
    # a partition's previous owner called its targets until just before this assignment (relay.limits)
    membership.on_assigned.append(functools.partial(limiter.hold_targets, target_hold(config)))
    executor = Executor(client, limiter, policy, rng=random.Random(), gate=membership, metrics=metrics)
    metrics.collect(lambda m: export_membership(m, membership))
    metrics.collect(lambda m: export_outbound(m, limiter, client))
    memory = KafkaPreviewMemory(config.kafka, producer)
    stack.push_async_callback(memory.stop)
    await memory.start()
    previews = PreviewCoalescer(executor, memory, config)
    stack.push_async_callback(previews.stop)
    await previews.start()  # reads the memory before any intent is read, then follows it live
    journal = KafkaJournal(config.kafka, producer)
    stack.push_async_callback(journal.stop)
    await journal.start()
    metrics.collect(lambda m: export_previews(m, previews))
    static = {} if config.kafka.group_instance_id is None else {"group_instance_id": config.kafka.group_instance_id}
    consumer = make_consumer(config.kafka, session_timeout_ms=out.session_timeout_ms,
                             heartbeat_interval_ms=heartbeat_interval_ms(out.session_timeout_ms),
                             rebalance_timeout_ms=out.rebalance_timeout_ms, max_poll_records=500, **static)
    consumers.append(consumer)
    # Outbound.run starts and stops it; this stops it when serve ends before run began (a no-op after run)
    stack.push_async_callback(consumer.stop)
    fetcher = Fetcher(out.fetch_allowed_networks, out.fetch_timeout)  # uploads by url (relay.fetch)
    stack.push_async_callback(fetcher.close)
    await fetcher.start()
    outbound = Outbound(config, consumer, producer, executor, metrics, known_apps=[a.name for a in config.apps],
                        previews=previews, membership=membership, journal=journal, fetcher=fetcher,
                        new_producer=lambda: make_producer(config.kafka))
    metrics.collect(lambda m: m.consumer_lag(outbound.lag()))
    consumers.append(outbound)
    return outbound, previews, coordinator


def stop_seconds(config: Config) -> float:
    """The longest the outbound takes to end once told to stop: the lease check and the drain (each up to
    ``drain_timeout``), then the consumer leaving its group."""
    return 2 * config.outbound.drain_timeout + CONSUMER_STOP_SECONDS + 5.0


def target_hold(config: Config) -> float:
    """One per-target window (Feishu's 1 s, scaled) plus the jitter margin: see Limiter.hold_targets."""
    return 1.0 / config.feishu.time_scale + config.feishu.limit_jitter


async def demand(consumers: list[Any]) -> tuple[int, int]:
    """(intent partitions owned, records on them not finished: not fetched yet, or in flight): what this
    replica's beats publish. ``consumers``: the outbound consumer, then the Outbound (once made)."""
    if not consumers:
        return 0, 0
    consumer = consumers[0]
    in_flight = consumers[1].in_flight if len(consumers) > 1 else 0
    assigned = consumer.assignment()
    lag = 0
    for tp in assigned:
        with contextlib.suppress(Exception):  # revoked meanwhile, position unknown yet: counts nothing
            high = consumer.highwater(tp)
            if high is not None:
                async with asyncio.timeout(0.05):
                    lag += max(0, high - await consumer.position(tp))
    return len(assigned), lag + in_flight


def export_coordination(metrics: Metrics, coordinator: Coordinator) -> None:
    book = coordinator.book
    metrics.set("relay_quota_share", book.share(), help="share of each app-wide quota this replica uses now")
    metrics.set("relay_quota_share_target", book.target(), help="this replica's part of the group's split")
    metrics.set("relay_coordination_members", len(book.live()), help="live replicas on the coordination topic")
    metrics.set_total("relay_coordination_remote_throttles_total", coordinator.applied_throttles,
                      help="throttles other replicas reported and this one applied")


def heartbeat_interval_ms(session_timeout_ms: int) -> int:
    """A quarter of the session (at most aiokafka's default 3 s): each answer renews the membership lease, so a
    late or lost one leaves room for the next before the lease lapses and calls wait (``relay.membership``)."""
    return max(1, min(3000, session_timeout_ms // 4))


def export_membership(metrics: Metrics, membership: Membership) -> None:
    metrics.set("relay_outbound_membership_valid", 1 if membership.standing() is Standing.VALID else 0,
                help="1 while the group coordinator has recently confirmed this replica (calls may go)")
    metrics.set_total("relay_outbound_membership_lost_total", membership.losses,
                      help="times this replica learned it was out of its group (its jobs were abandoned)")
    metrics.set_total("relay_outbound_membership_waits_total", membership.waits,
                      help="calls or result writes that waited for the coordinator to confirm the membership")


def export_previews(metrics: Metrics, previews: PreviewCoalescer) -> None:
    metrics.set_total("relay_previews_calls_total", previews.calls, help="url_preview batch_update calls planned")
    metrics.set_total("relay_previews_claims_total", previews.claims, help="preview claims written and judged")
    metrics.set_total("relay_previews_claim_seconds_total", previews.claim_seconds,
                      help="time preview claims took from writing to verdict (one Kafka round trip and a read)")
    metrics.set_total("relay_previews_claims_lost_total", previews.claims_lost,
                      help="preview attempts not sent on their claim (another replica's came first, or too slow)")


def export_outbound(metrics: Metrics, limiter: Limiter, client: FeishuClient) -> None:
    """The limiter's and the client's running totals, read at each ``/metrics`` scrape."""
    stats = limiter.stats()
    metrics.set_total("relay_feishu_throttled_total", stats.throttles,
                      help="answers 429/99991400/230020 (each slowed a bucket); should stay 0")
    metrics.set_total("relay_feishu_token_requests_total", client.token_requests, help="tenant token requests")
    metrics.set_total("relay_limiter_waits_total", stats.waits, help="calls that waited for a bucket")
    metrics.set_total("relay_limiter_waited_seconds_total", stats.waited_seconds, help="time calls waited")
    metrics.set_total("relay_limiter_guarded_total", stats.guarded,
                      help="sends held by the send-time guard (after an event-loop stall)")
    metrics.set("relay_limiter_target_buckets", stats.target_buckets, help="per-target buckets alive")
    metrics.set("relay_limiter_app_buckets", stats.app_buckets, help="app-wide buckets alive (feishu.max_api_buckets)")
    metrics.set_total("relay_limiter_voided_total", stats.voided,
                      help="calls granted, then held back by a throttle before they left, and queued again")
    metrics.set("relay_limiter_target_aliases", stats.aliases,
                help="target names known to be in a chat (feishu.target_memory)")


async def send(config: Config, text: str, timeout: float) -> int:
    """Produce one intent and print its result record (``relay send``)."""
    raw = (sys.stdin.read() if text == "-" else text).encode()
    intent = decode_intent(raw)  # fail here, with the reason, rather than as a rejected result
    from aiokafka import TopicPartition

    consumer = make_consumer(config.kafka, group_id=None)
    producer = make_producer(config.kafka)
    try:
        await consumer.start()
        await producer.start()
        results = config.kafka.results_topic
        await ensure_topics(config.kafka, {results: {}})
        # every partition of the results topic: the result is keyed by the id, so it may land on any of them
        # (the consumer's own metadata may not list the topic yet; the producer's call waits for it)
        partitions = [TopicPartition(results, p) for p in sorted(await producer.partitions_for(results))]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)
        await producer.send_and_wait(config.kafka.intents_topics[0], raw, key=ordering_key(intent).encode())
        print(f"sent {intent.id} to {config.kafka.intents_topics[0]}; waiting for its result", file=sys.stderr)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    if record.key == intent.id.encode() and record.value is not None:
                        print(record.value.decode())
                        return 0
        raise RelayError(f"no result for {intent.id} within {timeout:.0f}s (is `relay run` running?)")
    finally:
        await producer.stop()
        await consumer.stop()
