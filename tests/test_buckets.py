"""The pure bucket arithmetic: sizing for Feishu's windows, token-bucket reservations and penalties, the send log."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from relay.buckets import BucketShape, SendLog, TokenBucket, Window, size_bucket, stricter

IM = (Window(50, 1.0), Window(1000, 60.0))
PER_TARGET = (Window(5, 1.0),)
URL_PREVIEW = (Window(5, 1.0),)
JITTER = 0.15
UTILIZATION = 0.975


def _shape(windows: Sequence[Window], **kw: float) -> BucketShape:
    return size_bucket(windows, jitter=JITTER, utilization=UTILIZATION, **kw)


def _holds(shape: BucketShape, windows: Sequence[Window], *, share: float = 1.0, time_scale: float = 1.0) -> bool:
    return all(shape.burst + shape.rate * (w.seconds / time_scale + JITTER) <= math.floor(w.limit * share) + 1e-9
               for w in windows)


def test_im_shape() -> None:
    shape = _shape(IM)
    assert shape.burst == 22
    assert shape.rate == pytest.approx(16.25)
    assert 22 + 16.25 * 1.15 <= 50 and 22 + 16.25 * 60.15 <= 1000
    assert _holds(shape, IM)


def test_small_limit_falls_back_to_burst_one() -> None:
    shape = _shape(PER_TARGET)
    assert shape.burst == 1 and shape.rate == pytest.approx(4 / 1.15)
    assert _holds(shape, PER_TARGET)
    # a limit of 1: spaced (T + jitter) / utilization apart, never two in one window
    one = _shape((Window(1, 1.0),))
    assert one.burst == 1 and one.rate == pytest.approx(UTILIZATION / 1.15)


def test_share_and_time_scale_scale_the_windows() -> None:
    half = _shape(IM, share=0.5)
    assert half.burst == 11 and half.rate == pytest.approx(8.125)
    assert _holds(half, IM, share=0.5)
    assert _shape((Window(5, 1.0),), share=1 / 3).burst == 1  # floor(5/3) = 1 call per second, then r from 0
    fast = _shape(IM, time_scale=10)
    assert _holds(fast, IM, time_scale=10)
    assert fast.burst == 1 and fast.rate == pytest.approx(999 / 6.15)
    with pytest.raises(ValueError, match="leaves no call"):
        _shape(PER_TARGET, share=0.1)
    with pytest.raises(ValueError, match="at least one window"):
        _shape(())


# --- token bucket arithmetic ---------------------------------------------------------------------------------


def test_reservations_queue_fifo_in_debt() -> None:
    bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(4)] == [0.0, 0.0, pytest.approx(0.1), pytest.approx(0.2)]
    assert bucket.tokens(0.0) == pytest.approx(-2)
    assert bucket.delay(0.0) == pytest.approx(0.3)
    assert bucket.reserve(0.25) == pytest.approx(0.05)  # behind the debt, not a fresh slot
    assert bucket.tokens(10.0) == 2  # refills to burst, no further
    assert bucket.is_full(10.0)


def test_take_only_when_free_and_stale_times_do_not_refill_twice() -> None:
    bucket = TokenBucket(rate=2.0, burst=1, now=0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.4)
    assert bucket.take(0.5)
    assert bucket.tokens(0.1) == pytest.approx(0.0)  # an earlier time is the bucket's own time
    assert bucket.delay(0.5) == pytest.approx(0.5)


def test_penalize_pauses_then_slows_then_recovers() -> None:
    rate = 10.0
    bucket = TokenBucket(rate=rate, burst=5, now=0.0)
    bucket.penalize(0.0, 2.0, slow_factor=0.5, recovery=30.0)
    assert not bucket.is_full(100.0 - 99)  # paused
    assert bucket.reserve(0.0) == pytest.approx(2.0)  # nothing before the reset Feishu gave
    assert bucket.reserve(0.0) == pytest.approx(2.0 + 1 / (rate * 0.5), rel=0.01)  # slowed to half
    # over the 30 s ramp the average rate is 0.75 of nominal; then nominal again
    bucket = TokenBucket(rate=rate, burst=1, now=0.0)
    bucket.penalize(0.0, 2.0, slow_factor=0.5, recovery=30.0)
    instants = [bucket.reserve(0.0) for _ in range(int(0.75 * rate * 30) + 1)]
    assert instants[0] == pytest.approx(2.0)
    assert instants[-1] == pytest.approx(32.0, abs=0.11)
    assert instants[-1] - instants[-2] == pytest.approx(1 / rate, rel=0.02)
    after = [bucket.reserve(0.0) for _ in range(3)]
    assert after[1] - after[0] == pytest.approx(1 / rate)
    assert bucket.is_full(40.0)


def test_penalize_twice_slows_further_and_pause_never_shortens() -> None:
    bucket = TokenBucket(rate=8.0, burst=1, now=0.0)
    bucket.penalize(0.0, 5.0)
    bucket.penalize(1.0, 1.0)  # a shorter reset does not cut the first pause
    assert bucket.delay(1.0) == pytest.approx(4.0)
    bucket.reserve(1.0)
    assert bucket.delay(5.0) == pytest.approx(1 / (8.0 * 0.25), rel=0.05)  # a quarter, recovering already


def test_penalize_voids_every_reservation_and_restarts_with_one_call() -> None:
    """Reservations handed out before a throttle are void, whatever their instant (epoch moves on); their debt is
    forgiven because their holders queue again; after the pause one token, then the slowed rate."""
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    handed = [bucket.reserve(0.0) for _ in range(30)]  # 5 now, then 25 queued up to 2.5 s ahead
    assert handed[-1] == pytest.approx(2.5)
    assert bucket.epoch == 0
    bucket.penalize(0.5, 3.0)
    assert bucket.epoch == 1
    again = [bucket.reserve(0.6) for _ in range(3)]  # the holders, queueing anew behind the pause
    assert again[0] == pytest.approx(3.5 - 0.6 + 1 / 5.0, rel=0.01)  # nothing before the reset, no debt left
    assert again[1] - again[0] == pytest.approx(1 / 5.0, rel=0.05)  # half the rate, not a burst


def test_a_second_answer_of_the_same_burst_extends_the_pause_only() -> None:
    bucket = TokenBucket(rate=8.0, burst=1, now=0.0)
    bucket.penalize(0.0, 5.0)
    bucket.reserve(0.0)
    bucket.penalize(0.1, 2.0, slow_factor=1.0)  # inside the pause: nothing changes, no reservation voided
    assert bucket.epoch == 1
    bucket.penalize(0.2, 6.0, slow_factor=1.0)  # longer: the pause grows, the rate is not cut again
    assert bucket.epoch == 2
    first, second = bucket.reserve(0.2), bucket.reserve(0.2)
    assert 0.2 + first == pytest.approx(6.2 + 1 / 4.0, abs=0.01)  # the void holder queues behind the longer pause
    assert second - first == pytest.approx(1 / 4.0, rel=0.02)  # 4/s: half of 8, not a quarter


def test_absorb_counts_the_other_buckets_use() -> None:
    chat = TokenBucket(rate=4.0, burst=1, now=0.0)
    alias = TokenBucket(rate=4.0, burst=1, now=0.0)
    assert chat.take(0.0) and alias.take(0.0)  # one call each under two names of one chat
    chat.absorb(alias, 0.0)
    assert chat.tokens(0.0) == pytest.approx(-1.0)  # two calls' worth used: the next is due after two refills
    assert chat.delay(0.0) == pytest.approx(0.5)
    paused = TokenBucket(rate=4.0, burst=1, now=0.0)
    paused.penalize(0.0, 3.0)
    fresh = TokenBucket(rate=4.0, burst=1, now=0.0)
    fresh.absorb(paused, 0.0)  # a throttle on one name holds the other too
    assert fresh.epoch == 1 and fresh.delay(0.0) >= 3.0


def sent(log: SendLog, at: float) -> None:
    """A call sent at ``at`` and answered at once."""
    log.record()
    log.release(at)


def test_send_logs_merge() -> None:
    one, other = SendLog([(2, 1.0)]), SendLog([(2, 1.0)])
    sent(one, 0.0)
    sent(other, 0.5)
    assert one.delay(0.6) == 0.0
    one.merge(other)
    assert one.delay(0.6) == pytest.approx(0.4)  # both sends count: the next waits for the first to leave


def test_set_shape_changes_rate_and_clamps_tokens() -> None:
    bucket = TokenBucket(rate=10.0, burst=10, now=0.0)
    bucket.set_shape(5.0, 3, now=0.0)
    assert bucket.tokens(0.0) == 3
    for _ in range(3):
        bucket.reserve(0.0)
    assert bucket.reserve(0.0) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        bucket.set_shape(0.0, 1)


# --- simulations ---------------------------------------------------------------------------------------------


def test_stricter_keeps_every_window() -> None:
    assert stricter(PER_TARGET, (Window(40, 1.0),)) == PER_TARGET
    assert stricter((Window(40, 1.0),), IM, PER_TARGET) == (Window(5, 1.0), Window(1000, 60.0))
    assert stricter((Window(1000, 60.0), Window(50, 1.0))) == IM  # sorted by length


def test_send_log_holds_the_next_send_until_the_window_has_room() -> None:
    log = SendLog([(5, 1.15)])
    for t in (0.0, 0.1, 0.2, 0.3, 0.4):
        assert log.delay(t) == 0.0
        sent(log, t)
    assert log.delay(0.5) == pytest.approx(0.65)  # the first send leaves the 1.15 s window at 1.15
    assert log.delay(1.15) == pytest.approx(0.0, abs=1e-9)
    assert not log.idle(1.0) and log.idle(1.6)


def test_send_log_checks_every_window() -> None:
    log = SendLog([(3, 1.0), (4, 10.0)])
    for t in (0.0, 0.1, 0.2):
        sent(log, t)
    assert log.delay(0.3) == pytest.approx(0.7)  # the 1 s window is full
    sent(log, 1.5)
    assert log.delay(2.0) == pytest.approx(8.0)  # 4 in the 10 s window: the first leaves at 10.0


def test_a_call_in_flight_counts_until_its_answer_then_for_a_window() -> None:
    """Feishu counts a call when it arrives, anywhere between its send and its answer: one sent at 0.0 and
    answered at 0.8 may have arrived at 0.8, so it keeps its place until 1.8, not 1.0."""
    log = SendLog([(2, 1.0)])
    log.record()  # sent at 0.0, in flight
    sent(log, 0.1)
    assert log.open == 1 and log.delay(0.5) == pytest.approx(0.6)  # the answered one leaves at 1.1; the other
    log.record()                                                  # counts as long as it is in flight
    assert log.delay(1.5) == math.inf  # two in flight: only an answer can make room
    log.release(0.7)
    log.release(0.8)
    assert log.open == 0 and log.delay(0.9) == pytest.approx(0.8)  # answered at 0.7 and 0.8: the first leaves
    assert log.delay(1.75) == pytest.approx(0.0, abs=1e-9)          # at 1.7
    assert not log.idle(1.7) and log.idle(1.8)


def test_a_merged_log_takes_the_other_logs_calls_in_flight() -> None:
    one, other = SendLog([(2, 1.0)]), SendLog([(2, 1.0)])
    other.record()
    one.merge(other)
    assert one.open == 1 and not one.idle(5.0)
    other.release(0.5)  # answered through the name it was sent under
    assert one.open == 0 and one.delay(1.0) == 0.0 and one.idle(1.6)
