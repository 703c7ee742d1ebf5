"""url_preview.update end to end: intents on the real broker, the whole relay, calls at the sandbox.

What "delivered by a later call" can be observed as, from outside the relay:

* *read time*: ``received_at`` of the intent's result, the relay's wall clock when it dispatched the record
  (before ``submit``); converted to this host's monotonic clock (the sandbox's clock) with one offset taken
  here. Relay and sandbox share the host, so the two clocks are the same clocks.
* *call time*: the sandbox's arrival time of the call (``CallRecord.at``, monotonic). A call is made before it
  arrives, so "arrived after the read" is necessary for "made after the read"; it could be fooled only by a call
  already on the wire at the read (a local HTTP hop, about a millisecond).
* *which call*: a result's ``log_id`` is the ``X-Tt-Logid`` of the call that finished it (the sandbox logs it),
  and a call's body (``preview_tokens``, ``open_ids``) says which tokens and audience it carried.

So for each token, its last-read intent must be followed by a successful call carrying the token to an audience
that covers the intent's; for each ``ok`` intent the same holds for all its tokens; each ``superseded`` intent
names a later-read intent that shares a token and such a call carried both; and each result's own ``log_id``
names a successful call with one of its tokens that arrived after its read.
"""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from relay.sandbox import CallRecord, Sandbox, SandboxOptions
from tests.relaykit import (
    APP_ID,
    APP_SECRET,
    Collector,
    RelayProcess,
    config_data,
    relay_in_process,
    to_config,
    to_toml,
)

pytestmark = pytest.mark.integration

API = "url_preview.update"
# a few audiences: merges stay small sets or become "everyone", so packing still has something to pack
AUDIENCES: tuple[tuple[str, ...] | None, ...] = (None, ("ou_a",), ("ou_b",), ("ou_a", "ou_b"), ("ou_c",))

Audience = frozenset[str] | None


# --- the burst ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    id: str
    at: float  # seconds after the burst's start
    tokens: tuple[str, ...]
    open_ids: tuple[str, ...] | None

    def intent(self) -> dict[str, Any]:
        value: dict[str, Any] = {"kind": API, "id": self.id, "preview_tokens": list(self.tokens)}
        if self.open_ids is not None:
            value["open_ids"] = list(self.open_ids)
        return value

    @property
    def audience(self) -> Audience:
        return frozenset(self.open_ids) if self.open_ids else None


def plan_burst(rng: random.Random, *, tokens: int, updates: int, seconds: float, multi: float = 0.1,
               prefix: str = "p") -> list[Planned]:
    """``tokens`` tokens each updated ``updates`` times at uniform random times in ``[0, seconds)``; a share
    ``multi`` of the intents carry a second random token; audiences from :data:`AUDIENCES`."""
    draft: list[tuple[float, tuple[str, ...], tuple[str, ...] | None]] = []
    for t in range(tokens):
        for _ in range(updates):
            toks = [f"tok-{t}"]
            if tokens > 1 and rng.random() < multi:
                other = rng.randrange(tokens - 1)
                toks.append(f"tok-{other if other < t else other + 1}")
            draft.append((rng.uniform(0, seconds), tuple(toks), rng.choice(AUDIENCES)))
    draft.sort(key=lambda d: d[0])
    return [Planned(f"{prefix}{i}", at, toks, ids) for i, (at, toks, ids) in enumerate(draft)]


async def produce_timed(bootstrap: str, topic: str, plan: Sequence[Planned],
                        produced: dict[str, float]) -> None:
    """Write each intent at its planned time (keyed by its first token, as the relay's ordering key is);
    ``produced[id]`` = monotonic time just before the send."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        futures = []
        for item in plan:
            delay = start + item.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the producer, not waiting on a condition
            produced[item.id] = time.monotonic()
            futures.append(await producer.send(topic, msgspec.json.encode(item.intent()),
                                               key=item.tokens[0].encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


# --- checking what happened --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeenCall:
    at: float
    tokens: frozenset[str]
    audience: Audience
    log_id: str
    ok: bool


def seen_calls(calls: Sequence[CallRecord]) -> list[SeenCall]:
    out = []
    for c in calls:
        if c.api != API:
            continue
        body = c.body or {}
        ids = body.get("open_ids") or None
        out.append(SeenCall(c.at, frozenset(body.get("preview_tokens") or ()), frozenset(ids) if ids else None,
                            c.log_id, c.code == 0))
    return sorted(out, key=lambda s: s.at)


def covers(call: Audience, want: Audience) -> bool:
    return call is None or (want is not None and want <= call)


@dataclass
class Analysis:
    intents: int = 0
    results: int = 0
    duplicates: int = 0  # results beyond the first per intent id
    statuses: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    ok_calls: int = 0
    violations: int = 0
    throttled: int = 0
    tokens_per_call: float = 0.0
    delays: list[float] = field(default_factory=list)  # per token: last intent produced -> delivering call
    problems: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.delays:
            return float("nan")
        ordered = sorted(self.delays)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def analyse(plan: Sequence[Planned], produced: dict[str, float], results: dict[str, list[dict[str, Any]]],
            sandbox: Sandbox, wall_minus_mono: float) -> Analysis:
    """Every check of the module docstring; ``problems`` lists each one broken (at most a few per kind)."""
    a = Analysis(intents=len(plan))
    calls = seen_calls(sandbox.calls)
    ok_calls = [c for c in calls if c.ok]
    by_log = {c.log_id: c for c in calls}
    by_token: dict[str, list[SeenCall]] = {}
    for c in ok_calls:
        for t in c.tokens:
            by_token.setdefault(t, []).append(c)
    a.calls, a.ok_calls = len(calls), len(ok_calls)
    a.violations = len(sandbox.violations())
    a.throttled = sandbox.throttled_count()
    a.tokens_per_call = statistics.fmean(len(c.tokens) for c in calls) if calls else 0.0
    planned = {p.id: p for p in plan}
    kinds: Counter[str] = Counter()

    def problem(kind: str, text: str) -> None:
        kinds[kind] += 1
        if kinds[kind] <= 5:
            a.problems.append(text)

    def read(result: dict[str, Any]) -> float:
        return datetime.fromisoformat(result["received_at"]).timestamp() - wall_minus_mono

    def delivering(token: str, after: float, *audiences: Audience) -> SeenCall | None:
        for c in by_token.get(token, ()):
            if c.at > after and all(covers(c.audience, aud) for aud in audiences):
                return c
        return None

    for p in plan:
        got = results.get(p.id, [])
        if not got:
            problem("missing", f"{p.id}: no result")
        a.results += len(got)
        a.duplicates += max(0, len(got) - 1)
        for r in got:
            a.statuses[r["status"]] += 1
            t_read = read(r)
            finisher = by_log.get(r.get("log_id") or "")
            if finisher is None or not finisher.ok or finisher.at <= t_read or not finisher.tokens & set(p.tokens):
                problem("log_id", f"{p.id}: log_id {r.get('log_id')} is not a successful call with its token "
                                  f"after its read ({r['status']}, {finisher})")
            if r["status"] == "ok":
                for t in p.tokens:
                    if delivering(t, t_read, p.audience) is None:
                        problem("ok", f"{p.id}: ok but no call carried {t} to it after its read")
            elif r["status"] == "superseded":
                by = r.get("superseded_by")
                later = [s for s in results.get(by or "", []) if read(s) >= t_read]
                shared = set(p.tokens) & set(planned[by].tokens) if by in planned else set()
                if not later or not shared or not any(
                        delivering(t, read(s), p.audience, planned[by].audience) for s in later for t in shared):
                    problem("superseded", f"{p.id}: superseded_by {by}, but no later-read intent sharing a token "
                                          f"was carried by a call covering both")
            else:
                problem("status", f"{p.id}: {r['status']} {r.get('msg')}")
    # per token: the last-read intent (every read of it, when it was redone) is delivered by a later call
    last: dict[str, tuple[float, Planned]] = {}
    for p in plan:
        for r in results.get(p.id, []):
            t_read = read(r)
            for t in p.tokens:
                if t not in last or t_read > last[t][0]:
                    last[t] = (t_read, p)
    for t, (t_read, p) in sorted(last.items()):
        call = delivering(t, t_read, p.audience)
        if call is None:
            problem("last", f"{t}: its last intent {p.id} (read {t_read:.3f}) was not delivered by a later call")
        else:
            a.delays.append(call.at - produced[p.id])
    return a


def summary(a: Analysis) -> str:
    return (f"{a.intents} intents, {a.results} results ({a.duplicates} duplicates) {dict(a.statuses)}; "
            f"{a.calls} calls ({a.ok_calls} ok, {a.tokens_per_call:.1f} tokens/call), {a.violations} violations, "
            f"{a.throttled} throttled; delay last intent -> delivering call p50 {a.percentile(0.5):.2f}s "
            f"p99 {a.percentile(0.99):.2f}s max {max(a.delays, default=float('nan')):.2f}s")


def wall_minus_mono() -> float:
    return time.time() - time.monotonic()


@pytest.fixture
async def sandbox_factory() -> AsyncIterator[Any]:
    boxes: list[Sandbox] = []

    async def make(scale: float) -> Sandbox:
        box = Sandbox(SandboxOptions(apps={APP_ID: APP_SECRET}, time_scale=scale, log_bodies=True))
        await box.start()
        boxes.append(box)
        return box

    yield make
    for box in boxes:
        await box.stop()


# --- (a) the burst, relay in-process -----------------------------------------------------------------------


async def test_burst_keeps_the_5s_rule_delivers_every_last_request_and_calls_far_below_intents(
        kafka_bootstrap: str, topic_prefix: str, sandbox_factory: Any) -> None:
    scale = 10.0  # 0.5 s per token, 50 calls/s: the same on both sides
    sandbox: Sandbox = await sandbox_factory(scale)
    config = to_config(config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=scale))
    plan = plan_burst(random.Random(4), tokens=200, updates=10, seconds=3.0)
    produced: dict[str, float] = {}
    offset = wall_minus_mono()
    async with relay_in_process(config), Collector(kafka_bootstrap, config.kafka.results_topic) as results:
        await produce_timed(kafka_bootstrap, config.kafka.intents_topics[0], plan, produced)
        await results.wait_for(len(plan), 60, what="url_preview results")
        by_id = results.by_id()
    a = analyse(plan, produced, by_id, sandbox, offset)
    print(summary(a))
    assert a.violations == 0 and a.throttled == 0, sandbox.violations()[:3]
    assert a.problems == [], a.problems
    assert a.duplicates == 0 and set(a.statuses) <= {"ok", "superseded"}
    assert len(a.delays) == 200  # every token's last request delivered
    assert a.calls < a.intents / 10, summary(a)


# --- (b) SIGKILL mid-burst, relay as a subprocess, restarted -----------------------------------------------


async def wait_until(condition: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_sigkill_mid_burst_then_restart_keeps_the_5s_rule_and_loses_nothing(
        kafka_bootstrap: str, topic_prefix: str, sandbox_factory: Any, tmp_path: Path) -> None:
    # A restart takes longer than 5 s (the dead member holds its partitions for session_timeout_ms = 6 s), so
    # Feishu's time runs slower here: the token rule is 12.5 s long, and the restarted relay starts calling
    # while tokens updated just before the kill are still inside it: only the memory can keep it.
    scale = 0.4
    interval = 5.0 / scale
    sandbox: Sandbox = await sandbox_factory(scale)
    data = config_data(kafka_bootstrap, topic_prefix, sandbox.url, time_scale=scale)
    config = to_config(data)
    config_path = tmp_path / "relay.toml"
    config_path.write_text(to_toml(data))
    plan = plan_burst(random.Random(5), tokens=60, updates=8, seconds=6.0, multi=0.0)
    produced: dict[str, float] = {}
    offset = wall_minus_mono()
    first = RelayProcess(config_path, tmp_path / "relay-1.log")
    second = RelayProcess(config_path, tmp_path / "relay-2.log")
    try:
        await first.start()
        producing = asyncio.create_task(
            produce_timed(kafka_bootstrap, config.kafka.intents_topics[0], plan, produced))
        try:
            # mid-burst: the relay has made calls and the producer is still writing
            await wait_until(lambda: len(sandbox.calls_for(API)) >= 5 or producing.done(), 60,
                             "the first relay's preview calls")
            assert not producing.done(), "the burst ended before the kill"
            await first.kill()
            killed_at = time.monotonic()
            calls_before = len(sandbox.calls_for(API))
            await second.start()
            await producing
        finally:
            if not producing.done():
                producing.cancel()
        async with Collector(kafka_bootstrap, config.kafka.results_topic) as results:
            await results.wait_for(len(plan), 75, what="url_preview results after the restart")
            by_id = results.by_id()
        second.send(signal.SIGTERM)
        assert await second.wait(60) == 0, second.log_tail()
    finally:
        await first.kill()
        await second.kill()
    calls = seen_calls(sandbox.calls)
    before = calls[:calls_before]
    after = [c for c in calls[calls_before:]]
    assert before and after and before[-1].at < killed_at <= after[0].at
    a = analyse(plan, produced, by_id, sandbox, offset)
    # the memory mattered: the restarted relay was calling while pre-kill updates were inside the token rule
    last_before: dict[str, float] = {}
    for c in before:
        for t in c.tokens:
            last_before[t] = c.at
    gaps = [next(c.at for c in after if t in c.tokens) - at for t, at in last_before.items()
            if any(t in c.tokens for c in after)]
    print(summary(a), f"| kill after {calls_before} calls; first call after restart "
                      f"{after[0].at - before[-1].at:.2f}s after the last one before; {len(gaps)} tokens called on "
                      f"both sides, min gap {min(gaps):.2f}s (rule {interval:g}s)")
    assert a.violations == 0 and a.throttled == 0, sandbox.violations()[:3]
    assert a.problems == [], a.problems
    assert set(a.statuses) <= {"ok", "superseded"}
    assert after[0].at - before[-1].at < interval, "the restart took longer than the rule: nothing was proved"
    assert gaps and min(gaps) >= interval
