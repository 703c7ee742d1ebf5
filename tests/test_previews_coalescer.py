"""The URL-preview coalescer over a fake executor, and a restarted coalescer over the 5-second memory on the real
Kafka broker (the memory alone: test_previews_memory)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from relay.backoff import RetryPolicy
from relay.calls import Call
from relay.config import Config, FeishuConfig, KafkaConfig, parse_config
from relay.executor import Executor
from relay.feishu import FeishuClient
from relay.intents import UrlPreviewUpdate
from relay.limits import Limiter
from relay.outcomes import Outcome, Verdict
from relay.previews.claims import ClaimArbiter
from relay.previews.coalescer import PreviewCoalescer, PreviewResult, PreviewsStopped
from relay.previews.memory import Claim, KafkaPreviewMemory, Seen
from relay.sandbox import Sandbox, SandboxOptions
from tests.test_previews_planner import burst

INTERVAL = 5.0
MARGIN = 0.1
SPACING = INTERVAL + MARGIN
# --- the coalescer over a fake executor ------------------------------------------------------------------


class FakeAttempted(msgspec.Struct, frozen=True):
    outcome: Outcome | None
    attempts: int
    expired: bool = False
    exhausted: bool = False


OK = Outcome(verdict=Verdict.OK, http_status=200, code=0, msg="success")
INVALID = Outcome(verdict=Verdict.PERMANENT, http_status=400, code=230001, msg="param is invalid")
THROTTLED = Outcome(verdict=Verdict.RETRY, http_status=429, code=99991400, msg="request trigger frequency limit")


class FakeExecutor:
    """Sends nothing: spaces calls at ``rate``/s (as the limiter would), runs ``before_attempt``, waits ``hold(tokens)``
    (a token refresh or a pooled connection, as the client may), runs ``before_send``, records the send time per
    token, and answers OK, PERMANENT for calls holding a token in ``bad``, or RETRY once (then OK after
    ``min_retry_delay``) for calls holding a token in ``flaky``."""

    def __init__(self, rate: float, *, bad: frozenset[str] = frozenset(), flaky: frozenset[str] = frozenset(),
                 latency: float = 0.002, hold: Callable[[list[str]], float] | None = None) -> None:
        self.interval = 1.0 / rate
        self.bad = bad
        self.flaky = flaky
        self.latency = latency
        self.hold = hold
        self.next_slot = 0.0
        self.attempts: dict[str, list[float]] = defaultdict(list)
        self.calls: list[tuple[float, list[str], list[str] | None]] = []
        self.min_retry_delays: set[float] = set()
        self.in_flight = 0
        self.sending = asyncio.Event()  # set while a request is in flight

    async def _slot(self) -> None:
        now = time.monotonic()
        at = max(now, self.next_slot)
        self.next_slot = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)

    async def execute(self, app: str, call: Call, *, expires_at: float | None = None, min_retry_delay: float = 0.0,
                      before_attempt: Callable[[], Awaitable[None]] | None = None,
                      before_send: Callable[[], Awaitable[None]] | None = None) -> FakeAttempted:
        assert call.body is not None and call.api == "im.url_preview.batch_update"
        body = json.loads(call.body)
        tokens: list[str] = body["preview_tokens"]
        self.min_retry_delays.add(min_retry_delay)
        attempts = 0
        while True:
            await self._slot()
            if expires_at is not None and time.time() >= expires_at:
                return FakeAttempted(None, attempts, expired=True)
            assert before_attempt is not None
            await before_attempt()
            if self.hold is not None and (hold := self.hold(tokens)) > 0:
                await asyncio.sleep(hold)
            if before_send is not None:
                await before_send()
            attempts += 1
            now = time.monotonic()
            for token in tokens:
                self.attempts[token].append(now)
            self.calls.append((now, tokens, body.get("open_ids")))
            self.in_flight += 1
            self.sending.set()
            try:
                await asyncio.sleep(self.latency)
            finally:
                self.in_flight -= 1
                if not self.in_flight:
                    self.sending.clear()
            if set(tokens) & self.bad:
                return FakeAttempted(INVALID, attempts)
            if set(tokens) & self.flaky and attempts == 1:
                await asyncio.sleep(min_retry_delay)
                continue
            return FakeAttempted(OK, attempts)


class SharedLog:
    """One memory topic shared by replicas in this process (the broker's part): records in one order, stamped by
    one clock; ``replica()`` is one relay's view of it, reading the log ``tail_delay`` after each append."""

    def __init__(self) -> None:
        self.records: list[tuple[tuple[str, str], float, str | None]] = []  # (key, at, claim id)
        self.followers: list[SharedLogReplica] = []

    def replica(self, *, tail_delay: float = 0.001, ack_delay: float = 0.002) -> SharedLogReplica:
        return SharedLogReplica(self, tail_delay, ack_delay)

    def append(self, key: tuple[str, str], at: float, claim: str | None = None) -> None:
        self.records.append((key, at, claim))
        for follower in self.followers:
            follower.queue.put_nowait((time.monotonic() + follower.tail_delay, key, at, claim))


class SharedLogReplica:
    """A :class:`~relay.previews.memory.PreviewMemory` over a :class:`SharedLog` (the Kafka tail, in memory)."""

    _ids = itertools.count(1)

    def __init__(self, log: SharedLog, tail_delay: float, ack_delay: float) -> None:
        self.log = log
        self.tail_delay = tail_delay
        self.ack_delay = ack_delay
        self.queue: asyncio.Queue[tuple[float, tuple[str, str], float, str | None]] = asyncio.Queue()
        self.pending: dict[str, tuple[int, list[bool], asyncio.Future[bool]]] = {}
        self.writes = 0
        self.arbiter: ClaimArbiter | None = None
        self.tail: asyncio.Task[None] | None = None

    async def follow(self, arbiter: ClaimArbiter, seen: Seen) -> asyncio.Task[None]:
        self.arbiter = arbiter
        for key, at, claim in list(self.log.records):  # the start-up read
            self._apply(key, at, claim, seen)
        self.log.followers.append(self)
        self.tail = asyncio.create_task(self._tail(seen), name="fake-memory")
        return self.tail

    async def _tail(self, seen: Seen) -> None:
        try:
            while True:
                due, key, at, claim = await self.queue.get()
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                self._apply(key, at, claim, seen)
        finally:
            if self in self.log.followers:
                self.log.followers.remove(self)

    def _apply(self, key: tuple[str, str], at: float, claim: str | None, seen: Seen) -> None:
        assert self.arbiter is not None
        won = self.arbiter.read(key, at)
        seen(key[0], key[1], at)
        if claim in self.pending:
            want, verdicts, future = self.pending[claim]
            verdicts.append(won)
            if len(verdicts) == want and not future.done():
                future.set_result(all(verdicts))

    async def stop(self) -> None:
        if self.tail is not None:
            self.tail.cancel()
            await asyncio.gather(self.tail, return_exceptions=True)

    async def claim(self, app: str, tokens: Sequence[str], timeout: float) -> Claim:
        self.writes += 1
        claim = f"r{next(self._ids)}"
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.pending[claim] = (len(tokens), [], future)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.sleep(self.ack_delay / 2)
                for token in tokens:  # one record per token: another replica's records may land in between
                    self.log.append((app, token), time.time(), claim)
                    await asyncio.sleep(0)
                await asyncio.sleep(self.ack_delay / 2)
                return Claim(won=await future)
        except TimeoutError:
            return Claim(won=False, late=True)
        finally:
            del self.pending[claim]


def fake_memory(remembered: dict[tuple[str, str], float] | None = None) -> SharedLogReplica:
    """One replica's memory with ``remembered`` stamps (wall-clock times) already in its log."""
    log = SharedLog()
    for key, at in (remembered or {}).items():
        log.append(key, at)
    return log.replica()


SCALE = 50.0  # the 5 s rule becomes 0.1 s, 5 calls/s becomes 250/s
CLAIM_WINDOW = 0.03


def scaled_config() -> Config:
    return Config(feishu=FeishuConfig(time_scale=SCALE))


def intent(intent_id: str, tokens: list[str], open_ids: list[str] | None = None,
           expires_at: datetime | None = None) -> UrlPreviewUpdate:
    return UrlPreviewUpdate(id=intent_id, preview_tokens=tokens, open_ids=open_ids, expires_at=expires_at)


@contextlib.asynccontextmanager
async def running(executor: FakeExecutor, memory: SharedLogReplica | None = None,
                  config: Config | None = None) -> AsyncIterator[PreviewCoalescer]:
    """A started coalescer (the scaled config, a 20 ms margin, a 30 ms claim window), stopped on exit.

    A context manager, not a fixture: async fixtures run on the session loop, the tests on their own.
    """
    memory = memory or fake_memory()
    coalescer = PreviewCoalescer(executor, memory, config or scaled_config(), margin=0.02,
                                 claim_window=CLAIM_WINDOW)
    await coalescer.start()
    try:
        yield coalescer
    finally:
        await coalescer.stop()
        await memory.stop()


async def test_coalescer_burst_keeps_the_rule_and_calls_far_less_than_intents() -> None:
    executor = FakeExecutor(rate=5 * SCALE)
    memory = fake_memory()
    async with running(executor, memory) as coalescer:
        rng = random.Random(11)
        plan = burst(tokens=300, updates=8, seconds=0.5, rng=rng)
        submitted: dict[str, tuple[list[str], float]] = {}
        results: dict[str, PreviewResult] = {}

        async def one(at: float, intent_id: str, tokens: list[str], open_ids: list[str] | None) -> None:
            await asyncio.sleep(at)
            submitted[intent_id] = (tokens, time.monotonic())
            results[intent_id] = await coalescer.submit(intent(intent_id, tokens, open_ids), time.time())

        async with asyncio.timeout(30):
            await asyncio.gather(*(one(*a) for a in plan))

        interval = 5.0 / SCALE
        for token, times in executor.attempts.items():
            assert all(b - a >= interval for a, b in itertools.pairwise(times)), token
        assert len(results) == len(plan)
        last: dict[str, tuple[float, str]] = {}
        for intent_id, (tokens, at) in submitted.items():
            for token in tokens:
                last[token] = max(last.get(token, (at, intent_id)), (at, intent_id))
        for token, (at, intent_id) in last.items():
            assert executor.attempts[token][-1] >= at  # delivered by a call made after it was read
            assert results[intent_id].status in ("ok", "superseded")
            if all(last[t][1] == intent_id for t in submitted[intent_id][0]):
                assert results[intent_id].status == "ok"
        assert {r.status for r in results.values()} <= {"ok", "superseded"}
        assert all(r.outcome == OK and r.attempts == 1 for r in results.values())
        assert len(executor.calls) < len(plan) / 5
        assert all(1 <= len(tokens) <= 10 for _, tokens, _ in executor.calls)
        assert memory.writes == len(executor.calls) + coalescer.claims_lost  # a claim before every attempt
        assert coalescer.planner.pending_intents == 0


async def test_coalescer_failure_fails_the_carried_intents_with_the_feishu_outcome() -> None:
    executor = FakeExecutor(rate=5 * SCALE, bad=frozenset({"bad"}))
    async with running(executor) as coalescer:
        bad1 = asyncio.create_task(coalescer.submit(intent("b1", ["bad"], ["ou_1"]), time.time()))
        bad2 = asyncio.create_task(coalescer.submit(intent("b2", ["bad"], ["ou_2"]), time.time()))
        good = asyncio.create_task(coalescer.submit(intent("g", ["good"], ["ou_3"]), time.time()))
        results = await asyncio.gather(bad1, bad2, good)
        assert [r.status for r in results] == ["failed", "failed", "ok"]
        assert results[0].outcome == INVALID and results[0].reason == "230001 param is invalid"
        assert not results[0].exhausted


async def test_coalescer_retries_no_sooner_than_the_token_interval() -> None:
    executor = FakeExecutor(rate=5 * SCALE, flaky=frozenset({"t"}))
    async with running(executor) as coalescer:
        result = await coalescer.submit(intent("i", ["t"]), time.time())
        # two attempts, or more when a loaded machine let a claim age past the claim window before its send
        assert result.status == "ok" and result.attempts >= 2
        assert executor.min_retry_delays == {coalescer.spacing + CLAIM_WINDOW}
        sends = executor.attempts["t"]
        assert len(sends) >= 2 and all(b - a >= 5.0 / SCALE for a, b in itertools.pairwise(sends))


async def test_coalescer_expired_intent_is_not_sent() -> None:
    executor = FakeExecutor(rate=5 * SCALE)
    async with running(executor, fake_memory({("default", "t"): time.time()})) as coalescer:
        soon = datetime.now(UTC) + timedelta(seconds=0.03)  # before t's interval ends
        result = await coalescer.submit(intent("i", ["t"], expires_at=soon), time.time())
        assert result.status == "expired" and result.outcome is None and result.attempts == 0
        assert executor.calls == []


async def test_coalescer_honours_the_remembered_update_and_stops_cleanly() -> None:
    executor = FakeExecutor(rate=5.0)
    wall = time.time()
    memory = fake_memory({("default", "t"): wall - 1.0, ("default", "old"): wall - 60.0})
    coalescer = PreviewCoalescer(executor, memory, Config(), margin=0.1)  # real time: 5 s
    await coalescer.start()
    try:
        assert coalescer.planner.earliest_update("default", "old") == float("-inf")  # long past: not kept
        blocked = asyncio.create_task(coalescer.submit(intent("i1", ["t"]), time.time()))
        free = await coalescer.submit(intent("i2", ["u"]), time.time())
        assert free.status == "ok"
        assert not blocked.done()
        assert coalescer.planner.earliest_update("default", "t") >= time.monotonic() + 3.5
    finally:
        await coalescer.stop()
        await memory.stop()
    with pytest.raises(PreviewsStopped):
        await blocked
    assert [tokens for _, tokens, _ in executor.calls] == [["u"]]


async def test_cancelled_submit_withdraws_the_intent() -> None:
    executor = FakeExecutor(rate=5 * SCALE)
    async with running(executor, fake_memory({("default", "t"): time.time()})) as coalescer:
        task = asyncio.create_task(coalescer.submit(intent("i", ["t"]), time.time()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert coalescer.planner.pending_intents == 0
        await asyncio.sleep(0.15)
        assert executor.calls == []


# --- the coalescer over the memory on the real broker ----------------------------------------------------


def memory_config(bootstrap: str, topic: str) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=bootstrap, preview_memory_topic=topic, topic_partitions=3)


@pytest.mark.integration
async def test_restarted_coalescer_does_not_update_a_token_within_5_s_of_an_update_before_the_crash(
        kafka_bootstrap: str, topic_prefix: str) -> None:
    cfg = memory_config(kafka_bootstrap, f"{topic_prefix}.memory")
    config = Config(kafka=cfg)  # real time: 5 s per token
    before = KafkaPreviewMemory(cfg)
    await before.start()
    executor = FakeExecutor(rate=5.0)
    crashed = PreviewCoalescer(executor, before, config, margin=0.1)
    await crashed.start()
    try:
        assert (await crashed.submit(intent("i1", ["t"]), time.time())).status == "ok"
        updated = executor.attempts["t"][-1]
    finally:  # "crash": the in-process memory is gone, the topic is not
        await crashed.stop()
        await before.stop()

    after = KafkaPreviewMemory(cfg)
    await after.start()
    restarted = PreviewCoalescer(executor, after, config, margin=0.1)
    try:
        await restarted.start()
        assert restarted.planner.earliest_update("default", "t") >= updated + 5.0
        blocked = asyncio.create_task(restarted.submit(intent("i2", ["t"]), time.time()))
        other = await restarted.submit(intent("i3", ["u"]), time.time())
        assert other.status == "ok"
        await asyncio.sleep(0.2)
        assert not blocked.done() and executor.attempts["t"] == [updated]
    finally:
        await restarted.stop()
        await after.stop()
    with pytest.raises(PreviewsStopped):
        await blocked


# --- end to end through the real executor, limiter and client against the sandbox (real HTTP) -----------


async def test_burst_through_the_real_executor_makes_no_violation_at_the_sandbox() -> None:
    scale = 10.0  # 0.5 s per token, 50 calls/s
    box = Sandbox(SandboxOptions(apps={"cli_test": "secret"}, time_scale=scale, log_bodies=True))
    base_url = await box.start()
    config = parse_config({
        "feishu": {"base_url": base_url, "time_scale": scale},
        "apps": [{"name": "default", "app_id": "cli_test", "app_secret": "secret"}],
    }, env={})
    client = FeishuClient(config)
    await client.start()
    try:
        limiter = Limiter.from_config(config.feishu, clock=time.monotonic, sleep=asyncio.sleep)
        executor = Executor(client, limiter, RetryPolicy(max_attempts=5, max_seconds=30.0, base=0.05, cap=1.0))
        memory = fake_memory()
        coalescer = PreviewCoalescer(executor, memory, config)
        await coalescer.start()
        try:
            plan = burst(tokens=100, updates=6, seconds=1.0, rng=random.Random(3))

            async def one(at: float, intent_id: str, tokens: list[str], open_ids: list[str] | None) -> PreviewResult:
                await asyncio.sleep(at)
                return await coalescer.submit(intent(intent_id, tokens, open_ids), time.time())

            async with asyncio.timeout(40):
                results = await asyncio.gather(*(one(*a) for a in plan))
        finally:
            await coalescer.stop()
            await memory.stop()
    finally:
        await client.close()
        await box.stop()
    previews = box.calls_for("url_preview.update")
    assert box.violations() == [] and box.throttled_count() == 0
    assert {r.status for r in results} <= {"ok", "superseded"} and len(results) == len(plan)
    assert sum(r.status == "ok" for r in results) >= 100
    assert len(previews) < len(plan) / 3, (len(previews), len(plan))


async def test_an_intent_read_while_its_token_is_in_flight_is_sent_without_another_intent() -> None:
    # point 4: the call for i1 is at Feishu when i2 (not covered by its open_ids) arrives; once it ends, i2 must
    # go out after the spacing by itself, not when some later intent happens to wake the coalescer
    executor = FakeExecutor(rate=5 * SCALE, latency=0.05)
    async with running(executor) as coalescer:
        first = asyncio.create_task(coalescer.submit(intent("i1", ["t"], ["ou_1"]), time.time()))
        async with asyncio.timeout(10):
            await executor.sending.wait()
        second = asyncio.create_task(coalescer.submit(intent("i2", ["t"], ["ou_2"]), time.time()))
        assert (await first).status == "ok"
        async with asyncio.timeout(5.0):  # the spacing is 0.12 s; without a wake-up it waits forever
            assert (await second).status == "ok"
    assert [tokens for _, tokens, _ in executor.calls] == [["t"], ["t"]]


async def test_spacing_is_counted_from_the_instant_the_request_is_sent() -> None:
    # point 3: the first request waits 60 ms between its attempt starting and being written (a token refresh, a
    # pooled connection); the next update of the token must still be a whole interval after it really left
    holds = iter([0.06])
    executor = FakeExecutor(rate=5 * SCALE, hold=lambda tokens: next(holds, 0.0))
    async with running(executor) as coalescer:
        assert (await coalescer.submit(intent("i1", ["t"]), time.time())).status == "ok"
        assert (await coalescer.submit(intent("i2", ["t"]), time.time())).status == "ok"
    first, second = executor.attempts["t"]
    assert second - first >= 5.0 / SCALE, second - first


async def test_two_replicas_racing_on_a_token_never_update_it_within_the_interval() -> None:
    # point 2: [A, B] is keyed by A and read by one replica, [B] by another; both want B at once, every round
    log = SharedLog()
    one_ex, two_ex = FakeExecutor(rate=5 * SCALE), FakeExecutor(rate=5 * SCALE)
    async with running(one_ex, log.replica()) as one, running(two_ex, log.replica()) as two:
        for n in range(4):
            results = await asyncio.gather(one.submit(intent(f"ab{n}", ["A", "B"]), time.time()),
                                           two.submit(intent(f"b{n}", ["B"]), time.time()))
            assert {r.status for r in results} <= {"ok", "superseded"}
    sent = sorted(one_ex.attempts["B"] + two_ex.attempts["B"])
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert len(sent) >= 4 and min(gaps) >= 5.0 / SCALE, gaps


async def test_a_request_that_cannot_leave_within_the_claim_window_is_not_sent_and_claimed_again() -> None:
    holds = iter([CLAIM_WINDOW + 0.02])  # the first request waits past X between its claim and its send
    executor = FakeExecutor(rate=5 * SCALE, hold=lambda tokens: next(holds, 0.0))
    memory = fake_memory()
    async with running(executor, memory) as coalescer:
        result = await coalescer.submit(intent("i1", ["t"]), time.time())
        assert result.status == "ok" and result.attempts == 1
        assert coalescer.claims_lost == 1 and memory.writes == 2
    assert len(executor.attempts["t"]) == 1


async def test_drain_withdraws_an_unstarted_intent_and_keeps_a_claimed_one() -> None:
    gate, claimed_once = asyncio.Event(), asyncio.Event()
    executor = FakeExecutor(rate=5 * SCALE, hold=lambda tokens: 0.0)
    # "later" is blocked for 2 s (its last update "happens" then): long enough for c's claim on a loaded machine
    blocked_until = time.time() + 2.0
    memory = fake_memory({("default", "later"): blocked_until})
    async with running(executor, memory) as coalescer:
        original = executor.execute

        async def held(*args: object, **kw: object) -> FakeAttempted:
            before_attempt = kw["before_attempt"]

            async def claim_then_wait() -> None:
                await before_attempt()  # type: ignore[operator]
                claimed_once.set()
                await gate.wait()  # the claim is written; the request is not sent yet

            kw["before_attempt"] = claim_then_wait
            return await original(*args, **kw)  # type: ignore[arg-type]

        executor.execute = held  # type: ignore[method-assign]
        claimed = coalescer.enqueue(intent("c", ["now"]), time.time())
        waiting = coalescer.enqueue(intent("w", ["later"]), time.time())
        async with asyncio.timeout(10):
            await claimed_once.wait()  # c's call has claimed
        assert coalescer.withdraw_unstarted(waiting)  # no call for "later" yet: withdrawn, no result
        assert not coalescer.withdraw_unstarted(claimed)  # its call claimed: it may be at Feishu
        gate.set()
        assert (await coalescer.result(claimed)).status == "ok"
        await asyncio.sleep(blocked_until - time.time() + 0.3)  # past "later"'s spacing: still never sent
    assert "later" not in executor.attempts and not waiting.future.done()


async def test_wait_raises_and_waiting_intents_stop_when_the_memory_tail_dies() -> None:
    executor = FakeExecutor(rate=5 * SCALE)
    memory = fake_memory({("default", "t"): time.time()})
    async with running(executor, memory) as coalescer:
        waiting = asyncio.create_task(coalescer.submit(intent("i", ["t"]), time.time()))
        watch = asyncio.create_task(coalescer.wait())
        await asyncio.sleep(0.01)
        assert memory.tail is not None
        memory.queue.put_nowait((0.0, ("default", "t"), "not a time", None))  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="fake-memory"):
            await watch
        with pytest.raises(PreviewsStopped, match="died"):
            await waiting
        with pytest.raises(PreviewsStopped):
            coalescer.enqueue(intent("j", ["u"]), time.time())


async def test_wait_raises_when_the_planning_loop_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    executor = FakeExecutor(rate=5 * SCALE)
    async with running(executor) as coalescer:
        def broken(now: float) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(coalescer.planner, "next_call", broken)
        waiting = asyncio.create_task(coalescer.submit(intent("i", ["t"]), time.time()))
        with pytest.raises(RuntimeError, match="previews: RuntimeError: boom"):
            await coalescer.wait()
        with pytest.raises(PreviewsStopped):
            await waiting


async def test_two_replicas_that_each_won_half_of_a_call_do_not_race_again_forever() -> None:
    # one reads [A, B], the other [B, A]: their claims interleave (A from one, B from two, then the rest), so each
    # call loses a token and neither is sent; both tokens are ready again at the same instant for both replicas
    log = SharedLog()
    one_ex, two_ex = FakeExecutor(rate=5 * SCALE), FakeExecutor(rate=5 * SCALE)
    async with running(one_ex, log.replica()) as one, running(two_ex, log.replica()) as two:
        async with asyncio.timeout(10.0):  # a few spacings (0.15 s each) are enough unless they race forever
            results = await asyncio.gather(one.submit(intent("ab", ["A", "B"]), time.time()),
                                           two.submit(intent("ba", ["B", "A"]), time.time()))
        assert {r.status for r in results} == {"ok"}
        assert one.claims_lost + two.claims_lost >= 2  # they did collide
    for token in ("A", "B"):
        sent = sorted(one_ex.attempts[token] + two_ex.attempts[token])
        assert all(b - a >= 5.0 / SCALE for a, b in itertools.pairwise(sent)), (token, sent)


async def test_an_intent_withdrawn_while_its_call_waits_for_the_limiter_is_not_sent() -> None:
    # the call for "w" is planned and waiting for its slot when a drain withdraws "w": it must not go out
    executor = FakeExecutor(rate=4.0)  # 250 ms between calls
    async with running(executor) as coalescer:
        first = coalescer.enqueue(intent("a", ["t1"], ["ou_1"]), time.time())
        waiting = coalescer.enqueue(intent("w", ["t2"], ["ou_2"]), time.time())
        kept = coalescer.enqueue(intent("k", ["t3"], ["ou_2"]), time.time())  # rides w's call (same open_ids)
        assert (await coalescer.result(first)).status == "ok"
        assert coalescer.planner.calls_in_flight == 1  # w's call, in the limiter
        assert coalescer.withdraw_unstarted(waiting)
        assert (await coalescer.result(kept)).status == "ok"
    assert "t2" not in executor.attempts, executor.calls


async def test_after_a_late_claim_the_token_waits_out_that_claims_window_before_claiming_again() -> None:
    # the first claim is written but read back 1.5 s later (a lagging tail): it is late, not sent, and counts;
    # claiming again before its window has passed could only lose (and burn an API slot)
    class LaggingOnce(SharedLogReplica):
        lagged = False

        async def claim(self, app: str, tokens: Sequence[str], timeout: float) -> Claim:
            if not self.lagged:
                self.lagged, self.tail_delay = True, 1.5
                try:
                    return await super().claim(app, tokens, timeout)
                finally:
                    self.tail_delay = 0.001
            return await super().claim(app, tokens, timeout)

    log = SharedLog()
    memory = LaggingOnce(log, 0.001, 0.002)
    config = Config(feishu=FeishuConfig(time_scale=2.0))  # the rule is 2.5 s: longer than the lag
    executor = FakeExecutor(rate=10.0)
    async with running(executor, memory, config) as coalescer:
        result = await coalescer.submit(intent("i", ["t"]), time.time())
        assert result.status == "ok"
        assert memory.writes == 2 and coalescer.claims_lost == 1  # the late one only
