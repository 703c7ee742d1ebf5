"""Readiness: the broker watch, the token check and the retries that notice a recovery."""

from __future__ import annotations

import asyncio

import pytest

from relay.metrics import Metrics
from relay.readiness import BrokerWatch, Health, probe_interval, retry_tokens, token_problem, watch_broker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_broker_watch_is_a_problem_only_after_the_allowed_silence() -> None:
    clock = Clock()
    watch = BrokerWatch(30.0, clock=clock)
    assert watch.problem() is None  # a fresh relay: the producer has just connected
    clock.now += 29.9
    assert watch.problem() is None
    clock.now += 0.2
    assert watch.problem() == "Kafka broker unreachable for 30s (kafka.unreachable_after = 30)"
    watch.answered()
    assert watch.problem() is None


def test_probe_interval_is_a_third_of_the_silence_within_bounds() -> None:
    assert probe_interval(30) == 5 and probe_interval(6) == 2 and probe_interval(0.3) == 0.5


async def test_watch_broker_records_answers_and_survives_errors() -> None:
    clock = Clock()
    watch = BrokerWatch(10.0, clock=clock)
    answers = iter([True, False, RuntimeError("no node"), False, True])
    sleeps: list[float] = []

    async def probe() -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += 4
        if len(sleeps) == 4:
            assert watch.problem() is not None  # 16 s since the first answer
        if len(sleeps) == 5:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await watch_broker(watch, probe, 2.0, sleep=sleep)
    assert watch.problem() is None  # the last probe answered
    assert sleeps == [2.0] * 5


class Tokens:
    def __init__(self) -> None:
        self.failing = {"b": "gateway 503", "a": "app_secret invalid"}
        self.asked: list[str] = []
        self.arises = asyncio.Event()  # a problem arises (while none is failing)

    def token_problems(self) -> dict[str, str]:
        return dict(self.failing)

    async def token_problem_arises(self) -> None:
        if not self.failing:
            await self.arises.wait()

    async def token(self, app: str) -> str:
        self.asked.append(app)
        if app == "a":
            raise RuntimeError("still failing")
        self.failing.pop(app)
        return "t"


async def test_token_problem_and_retry() -> None:
    tokens = Tokens()
    assert token_problem(tokens) == "apps[a]: tenant_access_token unavailable (app_secret invalid)"
    rounds = 0

    async def sleep(seconds: float) -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await retry_tokens(tokens, 1.0, sleep=sleep)
    assert sorted(tokens.asked) == ["a", "a", "b"]  # b recovered in the first round; a is asked each round
    assert tokens.failing == {"a": "app_secret invalid"}
    tokens.failing.clear()
    assert token_problem(tokens) is None


async def test_token_retry_sleeps_until_a_token_problem_arises() -> None:
    tokens = Tokens()
    tokens.failing.clear()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        raise asyncio.CancelledError

    retry = asyncio.create_task(retry_tokens(tokens, 1.0, sleep=sleep))
    await asyncio.sleep(0.05)
    assert sleeps == [] and tokens.asked == []  # no wake-up while every token is fine
    tokens.arises.set()
    with pytest.raises(asyncio.CancelledError):
        await retry
    assert sleeps == [1.0]


def test_health_reason() -> None:
    health = Health(Metrics())
    assert health.reason() == "starting"
    health.ready = True
    assert health.reason() is None
    problems: list[str | None] = [None]
    health.checks.append(lambda: problems[0])
    problems[0] = "broker down"
    assert health.reason() == "broker down"
    problems[0] = None
    assert health.reason() is None
    health.problem = "outbound died: boom"
    assert health.reason() == "outbound died: boom"
