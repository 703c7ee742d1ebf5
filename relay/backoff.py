"""When to retry a Feishu call that failed retriably, and when to give up (docs/guarantees.md "Bounded retries").

Pure arithmetic over an injected ``random.Random`` and explicit times, so tests never sleep. The delay is "full
jitter" exponential backoff (uniform in ``[0, min(cap, base * 2**(attempt-1))]``): replicas and keys that failed
together spread out instead of retrying in lock step. When Feishu says how long to wait (``x-ogw-ratelimit-reset``
on 429 / 99991400) we wait at least that, plus a little jitter for the same reason. Retries still take limiter
tokens like first attempts; backoff only decides the earliest moment to ask for one.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Annotated

import msgspec
from msgspec import Meta

if TYPE_CHECKING:
    from relay.config import OutboundConfig


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Retry up to ``max_attempts`` attempts in all, within ``max_seconds`` of the first attempt.

    ``base`` is the first backoff ceiling, doubling per attempt up to ``cap`` (seconds).
    """

    max_attempts: Annotated[int, Meta(ge=1)]
    max_seconds: Annotated[float, Meta(gt=0)]
    base: Annotated[float, Meta(gt=0)]
    cap: Annotated[float, Meta(gt=0)]

    def __post_init__(self) -> None:
        # Meta constraints are checked on decode only; a policy built in code is checked here too.
        if self.max_attempts < 1 or self.max_seconds <= 0 or self.base <= 0 or self.cap <= 0:
            raise ValueError(f"RetryPolicy: every bound must be positive, got {self!r}")

    @classmethod
    def from_config(cls, outbound: OutboundConfig) -> RetryPolicy:
        """The ``[outbound]`` section's max_attempts, max_retry_seconds, backoff_base and backoff_cap."""
        return cls(max_attempts=outbound.max_attempts, max_seconds=outbound.max_retry_seconds,
                   base=outbound.backoff_base, cap=outbound.backoff_cap)

    def ceiling(self, attempt: int) -> float:
        """The largest backoff after failed attempt number ``attempt`` (1 for the first)."""
        if attempt < 1:
            raise ValueError(f"RetryPolicy: attempts count from 1, got {attempt}")
        # the exponent is clamped so a huge attempt number cannot overflow the float
        return min(self.cap, self.base * 2.0 ** min(attempt - 1, 1000))

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 for the first) before trying again.

        Without ``retry_after``: uniform in ``[0, ceiling(attempt)]``. With it (Feishu's reset, in seconds): that
        long plus uniform ``[0, min(base, cap)]``, never less; the cap does not shorten a wait Feishu asked for.
        """
        ceiling = self.ceiling(attempt)
        if retry_after is None:
            return rng.uniform(0.0, ceiling)
        return max(0.0, retry_after) + rng.uniform(0.0, min(self.base, self.cap))

    def allows(self, attempt: int, first_attempt_at: float, now: float, next_delay: float) -> bool:
        """Whether to try again after failed attempt number ``attempt``, ``next_delay`` seconds from ``now``.

        No when ``attempt`` attempts are all that were allowed, or when the next attempt would start more than
        ``max_seconds`` after ``first_attempt_at`` (then the intent fails now rather than after a useless wait).
        """
        if attempt >= self.max_attempts:
            return False
        return now + next_delay - first_attempt_at <= self.max_seconds
