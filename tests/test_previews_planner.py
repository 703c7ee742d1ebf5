"""The URL-preview planner (pure, injected time): merging, spacing, packing, fairness and per-intent results."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Sequence

import pytest

from relay.previews.planner import MAX_OPEN_IDS, Finished, PlannedCall, PreviewPlanner, audience_of, merge_audience

INTERVAL = 5.0
MARGIN = 0.1
SPACING = INTERVAL + MARGIN


def planner(**kw: float) -> PreviewPlanner:
    return PreviewPlanner(token_interval=INTERVAL, margin=MARGIN, **kw)  # type: ignore[arg-type]


def ids(n: int, prefix: str = "ou_") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def by_ref(finished: Sequence[Finished]) -> dict[int, Finished]:
    return {f.ref: f for f in finished}


def send(p: PreviewPlanner, call: PlannedCall, at: float, *, delivered: bool = True,
         expired: bool = False) -> dict[int, Finished]:
    """One attempt at ``at`` and its answer right away."""
    p.on_attempt(call.id, at)
    return by_ref(p.complete(call.id, at, delivered=delivered, expired=expired,
                             reason=None if delivered else "230001 param is invalid"))


# --- merge rule -------------------------------------------------------------------------------------------


def test_audience_empty_or_absent_is_everyone() -> None:
    assert audience_of(None) is None
    assert audience_of([]) is None
    assert audience_of(["ou_1", "ou_1"]) == frozenset({"ou_1"})


def test_merge_union_everyone_and_over_100() -> None:
    a, b = frozenset(ids(60, "a")), frozenset(ids(40, "b"))
    assert merge_audience(a, b) == a | b  # exactly 100: still a list
    assert merge_audience(a, b | {"c"}) is None  # 101: everyone
    assert merge_audience(a, None) is None
    assert merge_audience(None, a) is None
    assert len(a | b) == MAX_OPEN_IDS


def test_pending_requests_for_one_token_merge_into_one_call() -> None:
    p = planner()
    p.add("i1", "default", ["t"], ["ou_1"], None, 0.0)
    p.add("i2", "default", ["t"], ["ou_2", "ou_1"], None, 0.1)
    call = p.next_call(0.2)
    assert call is not None and call.tokens == ("t",) and call.open_ids == ("ou_1", "ou_2")
    assert p.next_call(0.2) is None


def test_tokens_with_the_same_merged_audience_share_one_call() -> None:
    p = planner()
    p.add("i1", "default", ["t"], ["ou_1"], None, 0.0)
    p.add("i2", "default", ["t"], None, None, 0.0)
    p.add("i3", "default", ["u"], ids(60, "a"), None, 0.0)
    p.add("i4", "default", ["u"], ids(41, "b"), None, 0.0)
    call = p.next_call(0.0)
    assert call is not None and call.tokens == ("t", "u") and call.open_ids is None
    assert p.next_call(0.0) is None


# --- packing --------------------------------------------------------------------------------------------


def test_packs_up_to_10_tokens_with_the_same_open_ids() -> None:
    p = planner()
    for i in range(25):
        p.add(f"e{i}", "default", [f"t{i}"], None, None, float(i))
    for i in range(3):
        p.add(f"x{i}", "default", [f"x{i}"], ["ou_x"], None, 100.0 + i)
    p.add("y", "default", ["y"], ["ou_y"], None, 200.0)
    calls = []
    while (call := p.next_call(300.0)) is not None:
        calls.append(call)
    sizes = [(len(c.tokens), c.open_ids) for c in calls]
    assert sizes == [(10, None), (10, None), (5, None), (3, ("ou_x",)), (1, ("ou_y",))]
    assert calls[0].tokens == tuple(f"t{i}" for i in range(10))  # oldest first
    assert [t for c in calls for t in c.tokens].count("t3") == 1


def test_never_packs_two_apps_in_one_call() -> None:
    p = planner()
    p.add("a", "app1", ["t"], None, None, 0.0)
    p.add("b", "app2", ["u"], None, None, 0.0)
    first, second = p.next_call(0.0), p.next_call(0.0)
    assert first is not None and second is not None
    assert {(first.app, first.tokens), (second.app, second.tokens)} == {("app1", ("t",)), ("app2", ("u",))}


def test_max_tokens_is_bounded_by_the_seed() -> None:
    with pytest.raises(ValueError):
        PreviewPlanner(token_interval=5.0, max_tokens=11)


# --- the 5 s rule ---------------------------------------------------------------------------------------


def test_a_token_is_not_updated_again_within_the_interval() -> None:
    p = planner()
    p.add("i1", "default", ["t"], None, None, 0.0)
    call = p.next_call(0.0)
    assert call is not None
    send(p, call, 1.0)
    p.add("i2", "default", ["t"], None, None, 1.5)
    assert p.next_call(1.5) is None
    assert p.next_wakeup() == pytest.approx(1.0 + SPACING)
    assert p.next_call(1.0 + SPACING - 0.001) is None
    again = p.next_call(1.0 + SPACING)
    assert again is not None and again.tokens == ("t",)


def test_no_second_call_while_one_is_in_flight_and_every_attempt_counts() -> None:
    p = planner()
    p.add("i1", "default", ["t"], None, None, 0.0)
    call = p.next_call(0.0)
    assert call is not None
    p.on_attempt(call.id, 0.0)
    p.add("i2", "default", ["t"], ["ou_1"], None, 1.0)  # not covered? everyone covers it: folded at a retry
    assert p.next_call(100.0) is None  # in flight (retrying), however long
    p.on_attempt(call.id, 100.0)  # the retry is an update too
    done = p.complete(call.id, 100.5, delivered=True)
    assert {f.status for f in done} == {"ok", "superseded"}
    assert p.earliest_update("default", "t") == pytest.approx(100.0 + SPACING)


def test_remembered_update_blocks_the_token() -> None:
    p = planner()
    p.remember("default", "t", 10.0)
    p.remember("default", "t", 8.0)  # the later of two stays
    p.add("i1", "default", ["t"], None, None, 11.0)
    assert p.next_call(11.0) is None
    assert p.next_wakeup() == pytest.approx(10.0 + SPACING)
    assert p.next_call(10.0 + SPACING) is not None


# --- results ----------------------------------------------------------------------------------------------


def test_latest_request_is_ok_and_earlier_ones_are_superseded_by_it() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t"], ["ou_1"], None, 0.0)
    r2 = p.add("i2", "default", ["t"], ["ou_2"], None, 0.1)
    call = p.next_call(0.2)
    assert call is not None
    done = send(p, call, 0.2)
    assert done[r1].status == "superseded" and done[r1].superseded_by == "i2"
    assert done[r2].status == "ok" and done[r2].superseded_by is None
    assert p.pending_intents == 0


def test_request_read_after_the_call_was_planned_needs_a_later_call_unless_covered() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t"], ["ou_1", "ou_2"], None, 0.0)
    call = p.next_call(0.0)
    assert call is not None
    r2 = p.add("i2", "default", ["t"], ["ou_2"], None, 0.05)  # covered by the call's open_ids: folded
    r3 = p.add("i3", "default", ["t"], ["ou_3"], None, 0.05)  # not covered: waits for the next call
    done = send(p, call, 0.1)
    assert done[r1].status == "superseded" and done[r1].superseded_by == "i2"
    assert done[r2].status == "ok"
    assert r3 not in done
    assert p.next_call(0.1 + SPACING - 0.01) is None
    later = p.next_call(0.1 + SPACING)
    assert later is not None and later.open_ids == ("ou_3",)
    assert send(p, later, 0.1 + SPACING)[r3].status == "ok"


def test_multi_token_intent_finishes_when_all_tokens_are_delivered_and_chains() -> None:
    p = planner()
    ra = p.add("A", "default", ["t"], ["ou_a"], None, 0.0)
    rb = p.add("B", "default", ["t", "u"], ["ou_b"], None, 0.1)
    rc = p.add("C", "default", ["u"], ["ou_c"], None, 0.2)
    first = p.next_call(0.3)  # t: A+B merged
    second = p.next_call(0.3)  # u: B+C merged (a different open_ids set: a separate call)
    assert first is not None and second is not None
    assert (first.tokens, first.open_ids) == (("t",), ("ou_a", "ou_b"))
    assert (second.tokens, second.open_ids) == (("u",), ("ou_b", "ou_c"))
    done = send(p, first, 0.3)
    assert set(done) == {ra}  # B still owes u
    assert done[ra].superseded_by == "B"
    done = send(p, second, 0.4)
    assert done[rb].status == "superseded" and done[rb].superseded_by == "C"  # A -> B -> C
    assert done[rc].status == "ok"


def test_intent_that_is_latest_on_every_token_is_ok() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t"], None, None, 0.0)
    r2 = p.add("i2", "default", ["t", "u"], None, None, 0.1)
    call = p.next_call(0.2)
    assert call is not None and call.tokens == ("t", "u")
    done = send(p, call, 0.2)
    assert done[r2].status == "ok" and done[r1].superseded_by == "i2"


def test_failed_call_fails_everything_it_carried_and_withdraws_their_other_tokens() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t"], ["ou_1"], None, 0.0)
    r2 = p.add("i2", "default", ["t", "u"], ["ou_1"], None, 0.1)
    r3 = p.add("i3", "default", ["u"], ["ou_9"], None, 0.2)
    first = p.next_call(0.3)
    assert first is not None and first.tokens == ("t",)  # t (oldest), u's merged set differs
    done = send(p, first, 0.3, delivered=False)
    assert {done[r1].status, done[r2].status} == {"failed"}
    assert done[r1].reason == "230001 param is invalid"
    # i2's request on u is withdrawn: u's next call carries only i3's open_ids
    second = p.next_call(0.3)
    assert second is not None and second.tokens == ("u",) and second.open_ids == ("ou_9",)
    assert send(p, second, 0.3)[r3].status == "ok"
    assert p.pending_intents == 0


def test_intent_fails_when_one_of_its_calls_fails_even_if_another_succeeded() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t", "u"], ["ou_1"], None, 0.0)
    r2 = p.add("i2", "default", ["u"], ["ou_2"], None, 0.0)
    c1, c2 = p.next_call(0.0), p.next_call(0.0)
    assert c1 is not None and c2 is not None
    assert (c1.tokens, c2.tokens) == (("t",), ("u",))
    p.on_attempt(c2.id, 0.0)
    assert send(p, c1, 0.0) == {}  # t delivered; i1 still owes u
    done = by_ref(p.complete(c2.id, 0.1, delivered=False, reason="99991400 rate limited"))
    assert done[r1].status == "failed" and done[r2].status == "failed"
    assert p.pending_intents == 0


def test_expired_before_any_call() -> None:
    p = planner()
    p.add("i0", "default", ["t"], None, None, 0.0)
    call = p.next_call(0.0)
    assert call is not None
    send(p, call, 0.0)
    r1 = p.add("i1", "default", ["t"], None, 2.0, 1.0)
    assert p.next_wakeup() == 2.0
    assert p.expire(1.9) == []
    done = by_ref(p.expire(2.0))
    assert done[r1].status == "expired"
    assert p.next_call(SPACING) is None  # nothing left to send


def test_carried_intent_does_not_expire_while_its_call_is_in_flight() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t"], None, 2.0, 0.0)
    call = p.next_call(0.0)
    assert call is not None and call.expires_at == 2.0
    p.on_attempt(call.id, 0.0)
    assert p.expire(3.0) == []
    assert by_ref(p.complete(call.id, 3.0, delivered=True))[r1].status == "ok"


def test_call_expires_at_is_the_latest_of_its_intents_or_none() -> None:
    p = planner()
    p.add("i1", "default", ["t"], None, 2.0, 0.0)
    p.add("i2", "default", ["t"], None, 3.0, 0.0)
    p.add("i3", "default", ["u"], ["ou"], 3.0, 0.0)
    p.add("i4", "default", ["u"], ["ou"], None, 0.0)
    first, second = p.next_call(0.0), p.next_call(0.0)
    assert first is not None and second is not None
    assert {first.expires_at, second.expires_at} == {3.0, None}
    assert p.complete(first.id if first.expires_at else second.id, 3.5, delivered=False, expired=True)


def test_abort_puts_requests_back_first_in_line() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t"], ["ou_1"], 10.0, 0.0)
    call = p.next_call(0.0)
    assert call is not None
    p.add("i2", "default", ["t"], ["ou_2"], None, 0.5)
    p.abort(call.id, 1.0, hold=1.0)
    assert p.next_call(1.5) is None
    again = p.next_call(2.0)  # never attempted: only the hold applies
    assert again is not None and again.open_ids == ("ou_1", "ou_2")
    p.abort(again.id, 2.0, hold=1.0)
    assert by_ref(p.expire(10.0))[r1].status == "expired"  # its expiry still applies after an abort


def test_withdraw_and_prune_forget() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t"], None, None, 0.0)
    p.withdraw(r1)
    assert p.next_call(0.0) is None and p.pending_intents == 0
    assert p.prune(0.0) == 1


# --- whole-burst properties with an injected clock ---------------------------------------------------------


class Simulation:
    """A discrete-time run: intents arrive, the planner plans at most ``rate`` calls per second, each call is
    attempted when planned and answered ``latency`` later. Records everything the properties need."""

    def __init__(self, p: PreviewPlanner, rate: float, latency: float = 0.05) -> None:
        self.p = p
        self.rate = rate
        self.latency = latency
        self.attempts: dict[str, list[float]] = defaultdict(list)  # token -> attempt times
        self.calls: list[tuple[float, PlannedCall]] = []
        self.read: dict[int, tuple[str, tuple[str, ...], float]] = {}  # ref -> (id, tokens, read at)
        self.results: dict[int, Finished] = {}
        self.finished_at: dict[int, float] = {}

    def run(self, arrivals: list[tuple[float, str, list[str], list[str] | None]], until: float) -> None:
        arrivals = sorted(arrivals, key=lambda a: a[0])
        answers: list[tuple[float, int]] = []
        next_slot = 0.0
        step = 0.01
        now = 0.0
        i = 0
        while now <= until:
            while i < len(arrivals) and arrivals[i][0] <= now:
                _, intent_id, tokens, open_ids = arrivals[i]
                ref = self.p.add(intent_id, "default", tokens, open_ids, None, now)
                self.read[ref] = (intent_id, tuple(tokens), now)
                i += 1
            for at, call_id in [a for a in answers if a[0] <= now]:
                answers.remove((at, call_id))
                self._record(self.p.complete(call_id, now, delivered=True), now)
            self._record(self.p.expire(now), now)
            while next_slot <= now:
                call = self.p.next_call(now)
                if call is None:
                    break
                self.p.on_attempt(call.id, now)
                for token in call.tokens:
                    self.attempts[token].append(now)
                self.calls.append((now, call))
                answers.append((now + self.latency, call.id))
                next_slot = now + 1.0 / self.rate - 1e-9  # evenly spaced: never more than rate in 1 s
            now = round(now + step, 6)

    def _record(self, finished: list[Finished], now: float) -> None:
        for f in finished:
            assert f.ref not in self.results, "two results for one intent"
            self.results[f.ref] = f
            self.finished_at[f.ref] = now


def burst(tokens: int, updates: int, seconds: float, rng: random.Random, *, everyone: float = 0.3,
          own_audience: bool = False, multi: float = 0.1) -> list[tuple[float, str, list[str], list[str] | None]]:
    """Random intents: ``everyone`` of them without open_ids, the rest with one of 5 shared open_ids (or of 3
    per token with ``own_audience``, so no two tokens ever share a call); ``multi`` of them name a 2nd token."""
    out: list[tuple[float, str, list[str], list[str] | None]] = []
    n = 0
    for t in range(tokens):
        for _ in range(updates):
            user = f"ou_{t}_{rng.randrange(3)}" if own_audience else f"ou_{rng.randrange(5)}"
            open_ids = None if rng.random() < everyone else [user]
            extra = [f"tok{rng.randrange(tokens)}"] if rng.random() < multi else []
            toks = list(dict.fromkeys([f"tok{t}", *extra]))
            out.append((round(rng.uniform(0, seconds), 2), f"i{n}", toks, open_ids))
            n += 1
    return out


def check_burst(sim: Simulation, spacing: float) -> None:
    # the 5 s rule, on every attempt of every token
    for token, times in sim.attempts.items():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(g >= spacing - 1e-9 for g in gaps), (token, gaps)
    # one result per intent
    assert set(sim.results) == set(sim.read)
    # every token's last request was delivered by a call attempted after it was read, and is `ok`
    last: dict[str, tuple[float, int]] = {}
    for ref, (_, tokens, at) in sim.read.items():
        for token in tokens:
            if token not in last or (at, ref) > last[token]:
                last[token] = (at, ref)
    for token, (at, ref) in last.items():
        assert sim.attempts[token] and sim.attempts[token][-1] >= at
        latest_everywhere = all(last[t][1] == ref for t in sim.read[ref][1])
        assert sim.results[ref].status == ("ok" if latest_everywhere else "superseded"), (token, sim.results[ref])
    # superseded_by names an intent that was read after the superseded one
    when = {intent_id: at for intent_id, _, at in sim.read.values()}
    for ref, result in sim.results.items():
        assert result.status in ("ok", "superseded")
        if result.status == "superseded":
            assert result.superseded_by is not None and when[result.superseded_by] >= sim.read[ref][2]


def test_burst_under_budget_keeps_the_rule_and_delivers_every_last_request() -> None:
    rng = random.Random(4)
    p = planner()
    sim = Simulation(p, rate=5.0)
    sim.run(burst(tokens=30, updates=8, seconds=4.0, rng=rng), until=40.0)
    check_burst(sim, SPACING)
    assert len(sim.calls) < len(sim.read) / 3
    assert all(1 <= len(c.tokens) <= 10 for _, c in sim.calls)
    assert all(c.open_ids is None or len(c.open_ids) <= 100 for _, c in sim.calls)


def test_burst_with_the_budget_saturated_is_fair_and_still_delivers_everything() -> None:
    # 200 tokens that can never share a call, 5 calls/s: a round of all tokens takes 40 s, so the API budget
    # is the bottleneck; oldest-pending-first must still get every token's last request out within two rounds
    rng = random.Random(7)
    p = planner()
    sim = Simulation(p, rate=5.0)
    sim.run(burst(tokens=200, updates=5, seconds=3.0, rng=rng, everyone=0.0, own_audience=True, multi=0.0),
            until=200.0)
    check_burst(sim, SPACING)
    starts = [at for at, _ in sim.calls]
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip(starts, starts[5:], strict=False))  # never 6 in 1 s
    assert 200 <= len(sim.calls) <= 400
    waits = [sim.finished_at[ref] - at for ref, (_, _, at) in sim.read.items()]
    assert max(waits) <= 200 / 5.0 + SPACING, max(waits)  # one round of the budget, not more


def test_saturated_budget_serves_oldest_pending_first() -> None:
    p = planner()
    # 12 tokens, each its own audience (one token per call); 5 calls/s: served strictly in read order
    for i in range(12):
        p.add(f"i{i}", "default", [f"t{i}"], [f"ou_{i}"], None, i * 0.001)
    order: list[str] = []
    now = 1.0
    while (call := p.next_call(now)) is not None:
        order.extend(call.tokens)
        p.on_attempt(call.id, now)
        p.complete(call.id, now, delivered=True)
        now += 0.2
    assert order == [f"t{i}" for i in range(12)]
    # a token updated just now waits behind older requests of other tokens even once it is ready again
    p.add("late-old", "default", ["t0"], ["ou_0"], None, now)
    p.add("z1", "default", ["z1"], ["ou_z"], None, now + 0.001)
    first = p.next_call(now + SPACING)
    assert first is not None and first.tokens == ("t0",)



def test_a_call_that_may_expire_does_not_fold_in_a_request_that_outlives_it() -> None:
    p = planner()
    p.add("i1", "default", ["t"], None, 2.0, 0.0)
    call = p.next_call(0.0)
    assert call is not None and call.expires_at == 2.0
    r2 = p.add("i2", "default", ["t"], None, None, 0.5)  # no expiry: the call might give up on it
    r3 = p.add("i3", "default", ["t"], None, 1.5, 0.5)  # expires before the call does: folded
    done = send(p, call, 1.0)
    assert done[r3].status == "ok" and r2 not in done


def test_an_update_seen_later_holds_back_a_token_that_was_already_ready() -> None:
    # another replica's (or the previous owner's) update of t arrives through the memory after t became ready
    p = planner()
    p.add("i1", "default", ["t"], None, None, 0.0)
    p.remember("default", "t", 1.0)
    assert p.next_call(1.0) is None
    assert p.next_wakeup() == pytest.approx(1.0 + SPACING)
    assert p.next_call(1.0 + SPACING) is not None


def test_an_update_seen_later_holds_back_a_cooling_token_longer() -> None:
    p = planner()
    p.remember("default", "t", 0.0)
    p.add("i1", "default", ["t"], None, None, 0.1)
    p.remember("default", "t", 2.0)
    assert p.next_call(SPACING) is None
    assert p.next_wakeup() == pytest.approx(2.0 + SPACING)
    assert p.next_call(2.0 + SPACING) is not None


# --- started: may an intent already be at Feishu (a drain waits for it) -------------------------------------


def test_an_intent_is_started_once_a_call_carrying_it_claims_and_stays_so_once_sent() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t"], None, None, 0.0)
    call = p.next_call(0.0)
    assert call is not None
    assert not p.started(r1)  # planned: nothing written anywhere yet
    p.on_claim(call.id)
    assert p.started(r1)
    p.on_attempt(call.id, 0.1)
    p.abort(call.id, 0.2)  # e.g. the executor raised after the request left: it may have been performed
    assert p.started(r1)


def test_a_claim_that_is_not_sent_unstarts_its_intents() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t", "u"], None, None, 0.0)
    call = p.next_call(0.0)
    assert call is not None and call.tokens == ("t", "u")
    p.on_claim(call.id)
    p.abort(call.id, 0.1, hold=0.0)  # the claim lost: nothing was sent
    assert not p.started(r1)
    p.withdraw(r1)
    assert p.pending_intents == 0 and p.next_call(100.0) is None


def test_a_request_folded_in_at_the_send_is_started_with_it() -> None:
    p = planner()
    p.add("i1", "default", ["t"], None, None, 0.0)
    call = p.next_call(0.0)
    assert call is not None
    p.on_claim(call.id)
    r2 = p.add("i2", "default", ["t"], ["ou_1"], None, 0.05)  # covered by "everyone": rides this attempt
    assert not p.started(r2)
    p.on_attempt(call.id, 0.1)
    assert p.started(r2)


def test_a_multi_token_intent_with_one_token_delivered_stays_started() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t", "u"], ["ou_1"], None, 0.0)
    p.add("i2", "default", ["u"], ["ou_2"], None, 0.0)
    first = p.next_call(0.0)
    assert first is not None and first.tokens == ("t",)
    p.on_claim(first.id)
    send(p, first, 0.0)
    assert p.started(r1)  # t was delivered: redoing it elsewhere would update t twice for i1


def test_a_lost_claim_waits_a_jitter_past_the_spacing_of_the_winner() -> None:
    p = planner()
    p.add("i1", "default", ["t"], None, None, 0.0)
    call = p.next_call(0.0)
    assert call is not None
    p.on_claim(call.id)
    p.remember("default", "t", 0.5)  # the winner's claim (and ours), read by the tail before the verdict
    p.abort(call.id, 0.01, hold=0.0, jitter=0.3)
    assert p.next_call(0.5 + SPACING) is None
    again = p.next_call(0.5 + SPACING + 0.3)
    assert again is not None and again.tokens == ("t",)


def test_a_call_carrying_an_intent_withdrawn_before_its_claim_is_not_claimed_and_replanned_without_it() -> None:
    p = planner()
    r1 = p.add("i1", "default", ["t"], ["ou_1"], None, 0.0)
    r2 = p.add("i2", "default", ["t"], ["ou_2"], None, 0.0)
    call = p.next_call(0.0)
    assert call is not None and call.open_ids == ("ou_1", "ou_2")
    p.withdraw(r1)  # a drain gave i1 to the next owner while its call waited for the limiter
    assert not p.on_claim(call.id) and not p.started(r2)
    p.abort(call.id, 0.1, hold=0.0)
    again = p.next_call(0.1)
    assert again is not None and again.open_ids == ("ou_2",)
    assert p.on_claim(again.id)
    p.withdraw(r2)  # claimed: it may be at Feishu, but its next attempt serves nobody (the next owner redoes i2
    assert not p.on_claim(again.id)  # with the latest state; a late retry would put older content over it)


def test_pending_tokens_counts_tokens_waiting_or_in_flight_however_many_intents_they_fold() -> None:
    """What a read preview intent costs (outbound bounds reading by it): its tokens, once each."""
    p = planner()
    for i in range(50):
        p.add(f"a{i}", "default", ["t1", "t2"] if i % 2 else ["t1"], None, None, 0.0)
    p.add("e", "default", ["t3"], None, 1.0, 0.0)
    assert p.pending_tokens == 3 and p.pending_intents == 51
    call = p.next_call(0.0)
    assert call is not None and set(call.tokens) == {"t1", "t2", "t3"}
    assert p.pending_tokens == 3  # in flight still counts
    p.on_attempt(call.id, 0.1)
    p.abort(call.id, 0.2)
    assert p.pending_tokens == 3  # back to pending
    assert [f.status for f in p.expire(1.0)] == ["expired"] and p.pending_tokens == 2
    again = p.next_call(6.0)
    assert again is not None and p.pending_tokens == 2
    send(p, again, 6.0)
    assert p.pending_tokens == 0 and p.pending_intents == 0
    p.add("w", "default", ["t4"], None, None, 7.0)
    assert p.pending_tokens == 1
    p.withdraw(next(iter(p._intents)))
    assert p.pending_tokens == 0
    failing = [p.add(f"f{i}", "default", ["t5"], None, None, 20.0) for i in range(3)]
    call = p.next_call(20.0)
    assert call is not None and len(failing) == 3
    send(p, call, 20.0, delivered=False)
    assert p.pending_tokens == 0 and p.pending_intents == 0


def test_a_claimed_call_whose_intents_were_all_withdrawn_is_not_attempted_again() -> None:
    """A call between attempts (waiting to retry) when its replica abandons every intent it carries (another
    replica owns them now) must not be sent again once this replica is a member again: it would serve nobody."""
    p = planner()
    a = p.add("a", "default", ["t1"], None, None, 0.0)
    b = p.add("b", "default", ["t2"], None, None, 0.0)
    call = p.next_call(0.0)
    assert call is not None and p.on_claim(call.id)
    p.on_attempt(call.id, 0.1)  # sent; its answer lost: the executor retries
    p.withdraw(a)
    assert p.on_claim(call.id)  # b still wants it
    p.withdraw(b)
    assert not p.on_claim(call.id)
    p.abort(call.id, 1.0, hold=0.0)
    assert p.pending_intents == 0 and p.pending_tokens == 0 and p.next_call(20.0) is None
