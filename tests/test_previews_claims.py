"""The claim rule (pure): which claim on a preview token wins, the same for every replica reading the log."""

from __future__ import annotations

import itertools
import random

import pytest

from relay.previews.claims import PRUNE_SLACK, ClaimArbiter

SPACING = 5.25  # binary fractions: the boundary cases below are exact
X = 0.5
WINDOW = SPACING + X
B = ("default", "B")


def arbiter() -> ClaimArbiter:
    return ClaimArbiter(spacing=SPACING, claim_window=X)


def test_the_first_claim_wins_and_a_racing_one_loses() -> None:
    a = arbiter()
    assert a.read(B, 100.0)
    assert not a.read(B, 100.004)  # another replica, 4 ms later in the log
    assert a.read(("default", "A"), 100.004)  # other tokens are independent
    assert a.read(("other", "B"), 100.004)  # and other apps


def test_a_claim_wins_only_spacing_plus_x_after_the_latest_earlier_claim() -> None:
    a = arbiter()
    assert a.read(B, 100.0)
    assert not a.read(B, 100.0 + WINDOW - 0.001)
    # the loser counts too: the next claim must clear the loser's window, not only the winner's
    assert not a.read(B, 100.0 + WINDOW)
    assert a.read(B, 100.0 + 2 * WINDOW)  # a window after the latest loser


def test_a_clock_stepping_back_makes_claims_lose_never_win() -> None:
    a = arbiter()
    assert a.read(B, 100.0)
    assert not a.read(B, 90.0)  # earlier in time, later in the log
    assert a.latest(B) == 100.0
    assert not a.read(B, 100.0 + WINDOW - 1.0)
    assert a.read(B, 100.0 + 2 * WINDOW)


def test_two_sent_claims_are_at_least_the_spacing_apart_at_feishu() -> None:
    # claims in log order, racing (ms apart), early (before the window ended) or late; a winner's request
    # leaves between its stamp T and T + X
    rng = random.Random(8)
    a = arbiter()
    t = 0.0
    sends: list[float] = []
    for _ in range(2000):
        t += rng.choice((0.0, 0.001, 0.02, 1.0, 5.0, WINDOW, 7.0, 20.0))
        if a.read(B, t):
            sends.append(t + rng.uniform(0.0, X))
    assert len(sends) > 50
    assert min(b - s for s, b in itertools.pairwise(sends)) >= SPACING


def test_a_replica_starting_on_the_compacted_log_judges_new_claims_as_one_that_read_everything() -> None:
    rng = random.Random(2)
    history = sorted(rng.uniform(0.0, 100.0) for _ in range(300))
    everything, compacted = arbiter(), arbiter()
    for at in history:
        everything.read(B, at)
    compacted.read(B, history[-1])  # compaction keeps the latest record of the key
    for at in sorted(rng.uniform(100.0, 130.0) for _ in range(40)):
        assert everything.read(B, at) == compacted.read(B, at), at


def test_prune_forgets_only_tokens_no_future_claim_can_collide_with() -> None:
    a = arbiter()
    a.read(B, 100.0)
    a.read(("default", "C"), 200.0)
    assert a.prune(100.0 + WINDOW + PRUNE_SLACK) == 0
    assert a.prune(100.0 + WINDOW + PRUNE_SLACK + 0.1) == 1
    assert a.latest(B) is None and len(a) == 1


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        ClaimArbiter(spacing=0.0, claim_window=X)
    with pytest.raises(ValueError):
        ClaimArbiter(spacing=SPACING, claim_window=-1.0)
