"""The executor's branching, with a fake sender, a real limiter and an injected clock (no sleeping)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence

import msgspec
import pytest

from relay.backoff import RetryPolicy
from relay.buckets import Window
from relay.calls import Call
from relay.executor import Executor
from relay.limits import Limiter
from relay.outcomes import Outcome, Verdict

CALL = Call(method="POST", path="/open-apis/im/v1/messages", query={}, body=b"{}", api="im.message.create",
            api_windows=(Window(50, 1), Window(1000, 60)), target="chat:oc_1",
            target_windows=(Window(5, 1),), uuid_protected=True)


def outcome(verdict: Verdict, code: int | None = 0, *, throttled: bool = False,
            retry_after: float | None = None) -> Outcome:
    return Outcome(verdict=verdict, http_status=200, code=code, msg="m", data=None, log_id=None,
                   retry_after=retry_after, throttled=throttled)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(seconds, 0.0)


class Script:
    """A sender answering from a script, recording when each attempt was made."""

    def __init__(self, answers: Sequence[Outcome], clock: Clock) -> None:
        self.answers = list(answers)
        self.clock = clock
        self.times: list[float] = []

    async def send(self, app: str, call: Call, admit: Callable[[], Awaitable[None]] | None = None) -> Outcome:
        if admit is not None:
            await admit()
        self.times.append(self.clock.now)
        return self.answers.pop(0)


def executor(script: Script, clock: Clock, *, attempts: int = 5, seconds: float = 60.0) -> tuple[Executor, Limiter]:
    limiter = Limiter(jitter=0.0, utilization=0.975, clock=clock, sleep=clock.sleep)
    policy = RetryPolicy(max_attempts=attempts, max_seconds=seconds, base=0.5, cap=8.0)
    return Executor(script, limiter, policy, clock=clock, wall=clock, sleep=clock.sleep,
                    rng=random.Random(1)), limiter


@pytest.mark.parametrize("verdict", [Verdict.OK, Verdict.PARTIAL, Verdict.PERMANENT])
async def test_final_answers_end_after_one_attempt(verdict: Verdict) -> None:
    clock = Clock()
    script = Script([outcome(verdict, 230001 if verdict is Verdict.PERMANENT else 0)], clock)
    done = await executor(script, clock)[0].execute("default", CALL)
    assert done.attempts == 1 and done.outcome is not None and done.outcome.verdict is verdict
    assert not done.exhausted and not done.expired


async def test_refresh_retries_once_at_once_then_gives_up() -> None:
    clock = Clock()
    untargeted = msgspec.structs.replace(CALL, target=None, target_windows=())  # no 5/s spacing in the way
    script = Script([outcome(Verdict.REFRESH, 99991663), outcome(Verdict.OK)], clock)
    done = await executor(script, clock)[0].execute("default", untargeted)
    assert (done.attempts, clock.slept) == (2, [])
    script = Script([outcome(Verdict.REFRESH, 99991663)] * 2, clock)
    done = await executor(script, clock)[0].execute("default", CALL)
    assert done.attempts == 2 and done.outcome is not None and done.outcome.code == 99991663


async def test_retries_back_off_until_attempts_run_out() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 1500)] * 3, clock)
    done = await executor(script, clock, attempts=3)[0].execute("default", CALL)
    assert done.attempts == 3 and done.exhausted
    gaps = [b - a for a, b in zip(script.times, script.times[1:], strict=False)]
    assert all(gap >= 0 for gap in gaps) and len(gaps) == 2


async def test_retries_stop_when_total_time_would_pass() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 1500, retry_after=30.0)] * 10, clock)
    done = await executor(script, clock, attempts=10, seconds=50.0)[0].execute("default", CALL)
    assert done.exhausted and done.attempts == 2  # a third attempt would land past 50 s


async def test_rate_limit_waits_the_reset_and_penalizes_the_app_bucket() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 99991400, throttled=True, retry_after=3.0), outcome(Verdict.OK)], clock)
    ex, limiter = executor(script, clock)
    done = await ex.execute("default", CALL)
    assert done.attempts == 2
    assert script.times[1] - script.times[0] >= 3.0
    assert limiter.stats().throttles == 1


async def test_per_target_limit_penalizes_only_the_target_bucket() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 230020, throttled=True), outcome(Verdict.OK)], clock)
    ex, limiter = executor(script, clock)
    await ex.execute("default", CALL)
    target = limiter.bucket(("target", "default", "chat:oc_1"))  # shared by every API reaching the chat
    app = limiter.bucket(("app", "default", CALL.api))
    assert target is not None and app is not None
    assert target.rate < app.rate  # the target slowed; the app bucket kept its rate


async def test_expiry_is_checked_before_every_attempt() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 1500)] * 5, clock)
    ex, _ = executor(script, clock)
    done = await ex.execute("default", CALL, expires_at=clock.now - 1)
    assert done.expired and done.attempts == 0 and not script.times
    done = await ex.execute("default", CALL, expires_at=clock.now + 0.01)
    assert done.expired and done.attempts == 1  # the retry would have started after expires_at


async def test_min_retry_delay_and_before_attempt_hook() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.RETRY, 1500), outcome(Verdict.OK)], clock)
    hooked: list[float] = []

    async def hook() -> None:
        hooked.append(clock.now)

    done = await executor(script, clock)[0].execute("default", CALL, min_retry_delay=5.0, before_attempt=hook)
    assert done.attempts == 2 and hooked == script.times
    assert script.times[1] - script.times[0] >= 5.0


async def test_admissible_rejects_what_this_replicas_share_cannot_send() -> None:
    clock = Clock()
    limiter = Limiter(jitter=0.15, utilization=0.975, share=0.25, clock=clock, sleep=clock.sleep)
    ex = Executor(Script([], clock), limiter, RetryPolicy(max_attempts=1, max_seconds=1, base=0.5, cap=1.0),
                  clock=clock, wall=clock, sleep=clock.sleep)
    assert ex.admissible(CALL) is None  # 50/s * 0.25, and the chat's 5/s is never shared
    tiny = msgspec.structs.replace(CALL, api="api:GET /open-apis/x", api_windows=(Window(3, 1),), target=None,
                                   target_windows=())
    reason = ex.admissible(tiny)
    assert reason is not None and reason.startswith("api:GET /open-apis/x: quota_share 0.25 of 3 calls per 1 s")
    with pytest.raises(ValueError):  # what execute would do with it: the engine must ask first
        await ex.execute("default", tiny)


async def test_the_gate_waits_then_checks_last_right_before_the_request_and_can_stop_it() -> None:
    clock = Clock()
    script = Script([outcome(Verdict.OK)], clock)
    order: list[str] = []

    class Stopped(Exception):
        pass

    class Gate:
        open = True
        not_now = 0  # this many checks answer "not at this instant"

        async def wait(self) -> None:
            order.append("wait")
            if not self.open:
                raise Stopped

        def check(self) -> bool:
            order.append("check")
            if not self.open:
                raise Stopped
            if self.not_now:
                self.not_now -= 1
                return False
            return True

    async def before_send() -> None:
        order.append("before_send")

    gate = Gate()
    limiter = Limiter(jitter=0.0, utilization=0.975, clock=clock, sleep=clock.sleep)
    policy = RetryPolicy(max_attempts=3, max_seconds=60.0, base=0.5, cap=8.0)
    ex = Executor(script, limiter, policy, clock=clock, wall=clock, sleep=clock.sleep, rng=random.Random(1),
                  gate=gate)
    done = await ex.execute("default", CALL, before_send=before_send)
    assert done.attempts == 1 and order == ["wait", "before_send", "check"] and len(script.times) == 1
    # "not now" at the instant of writing: wait again (the send-time guard and the hook again), then send, once
    order.clear()
    gate.not_now = 1
    script.answers.append(outcome(Verdict.OK))
    done = await ex.execute("default", CALL, before_send=before_send)
    assert done.attempts == 1 and order == ["wait", "before_send", "check", "wait", "before_send", "check"]
    assert len(script.times) == 2
    gate.open = False
    with pytest.raises(Stopped):
        await ex.execute("default", CALL, before_send=before_send)
    assert len(script.times) == 2, "a closed gate let a request out"
