"""Retry delays and the give-up rule: seeded randomness, explicit times."""

from __future__ import annotations

import random

import msgspec
import pytest

from relay.backoff import RetryPolicy
from relay.config import OutboundConfig

POLICY = RetryPolicy(max_attempts=8, max_seconds=300.0, base=0.5, cap=30.0)


def test_ceiling_doubles_up_to_the_cap() -> None:
    assert [POLICY.ceiling(n) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert POLICY.ceiling(10_000) == 30.0  # no overflow
    with pytest.raises(ValueError, match="count from 1"):
        POLICY.ceiling(0)


def test_full_jitter_stays_within_bounds_and_spreads() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        delays = [POLICY.delay(attempt, rng) for _ in range(2000)]
        ceiling = POLICY.ceiling(attempt)
        assert min(delays) >= 0.0 and max(delays) <= ceiling
        # full jitter: spread over the whole range, not bunched at the ceiling
        assert sum(delays) / len(delays) == pytest.approx(ceiling / 2, rel=0.1)
        assert min(delays) < 0.05 * ceiling and max(delays) > 0.95 * ceiling


def test_same_seed_same_delays() -> None:
    assert [POLICY.delay(3, random.Random(42)) for _ in range(3)] == [POLICY.delay(3, random.Random(42))] * 3


def test_retry_after_is_a_floor_with_a_little_jitter() -> None:
    rng = random.Random(2)
    for retry_after in (0.0, 0.2, 3.0, 45.0):  # 45 > cap: Feishu's word beats our cap
        delays = [POLICY.delay(1, rng, retry_after) for _ in range(500)]
        assert min(delays) >= retry_after
        assert max(delays) <= retry_after + POLICY.base
        assert len(set(delays)) == len(delays)  # replicas told the same reset do not retry in step
    assert POLICY.delay(1, rng, -1.0) <= POLICY.base  # a nonsense negative reset is treated as none


def test_allows_stops_on_attempts() -> None:
    assert POLICY.allows(1, 0.0, 0.0, 0.5)
    assert POLICY.allows(7, 0.0, 10.0, 1.0)
    assert not POLICY.allows(8, 0.0, 10.0, 1.0)  # the 8th attempt was the last
    one = RetryPolicy(max_attempts=1, max_seconds=300.0, base=0.5, cap=30.0)
    assert not one.allows(1, 0.0, 0.0, 0.0)


def test_allows_stops_when_the_next_try_lands_past_max_seconds() -> None:
    assert POLICY.allows(3, 100.0, 390.0, 10.0)  # lands at exactly 300 s after the first
    assert not POLICY.allows(3, 100.0, 390.0, 10.5)
    assert not POLICY.allows(2, 0.0, 10.0, 600.0)  # a reset longer than the budget: fail now, not later


def test_a_whole_retry_sequence_respects_both_bounds() -> None:
    rng = random.Random(3)
    for _ in range(200):
        now, attempt = 0.0, 1
        while True:
            delay = POLICY.delay(attempt, rng)
            if not POLICY.allows(attempt, 0.0, now, delay):
                break
            now += delay
            attempt += 1
        assert attempt <= POLICY.max_attempts
        assert now <= POLICY.max_seconds


def test_from_config_and_validation() -> None:
    policy = RetryPolicy.from_config(OutboundConfig(max_attempts=3, max_retry_seconds=60.0, backoff_base=1.0,
                                                    backoff_cap=8.0))
    assert policy == RetryPolicy(max_attempts=3, max_seconds=60.0, base=1.0, cap=8.0)
    with pytest.raises(ValueError, match="positive"):
        RetryPolicy(max_attempts=0, max_seconds=1.0, base=1.0, cap=1.0)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"max_attempts": 3, "max_seconds": -1, "base": 1, "cap": 1}, RetryPolicy)
    with pytest.raises(AttributeError):
        policy.base = 2.0  # type: ignore[misc]
