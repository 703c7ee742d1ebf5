"""Which claims on a URL-preview token win: one rule every replica computes the same way from the memory topic.

Pure: no I/O; the broker's timestamps are passed in, in log order. :class:`ClaimArbiter` is fed every record of the
memory topic (:mod:`relay.previews.memory`) as the tail reads it, and says of each whether it wins.

A *claim* is one record per token of a call, written before each attempt (key ``app + token``, so every claim
on one token lands on one partition, in one total order, whichever replica wrote it), stamped ``T`` by the
broker's clock (``message.timestamp.type=LogAppendTime``: one clock for every replica). Its writer sends the
attempt only if every token's claim wins and only within ``claim_window`` (X) of starting to write it.

The rule: a claim at ``T`` on a token **wins iff no earlier claim on that token in log order has
T_prev + spacing + X > T**, where spacing = the token interval plus the margin. *Every* earlier claim counts,
won or lost, sent or not.

Why that keeps Feishu's per-token rule across replicas and owners: a sent claim's request left after its record
was acknowledged (so after ``T``) and at most X after its writer started writing (so before ``T + X``). Two sent
claims on one token both won, so the later one is at ``T2 >= T1 + spacing + X`` and the requests are at least
``T2 - (T1 + X) >= spacing`` apart: the interval, plus the margin for the network. Every replica reads the same
records in the same order and applies the same rule, so of two claims racing within milliseconds exactly one
(the first appended) wins, and the loser puts its requests back and tries again after the winner's window.

Why every earlier claim counts, not only the ones that won: the rule then needs only the latest ``T`` per
token (one float, the value compaction keeps), never the chain of earlier verdicts, so a replica that starts
on a compacted topic judges every new claim exactly as one that has read every record since the beginning.
It costs nothing in practice: planners wait ``spacing + X`` after any claim they have seen before claiming, so
only claims racing one another (written before either writer saw the other) ever lose.

A broker clock that steps backwards makes the next claims lose (``T`` below the latest), never wrongly win.
"""

from __future__ import annotations

from typing import Final

TokenKey = tuple[str, str]  # (app, token)

# how long after a token's window closed its entry is kept anyway (broker time vs this host's wall clock)
PRUNE_SLACK: Final = 60.0


class ClaimArbiter:
    """Feed every claim record in log order (per token); :meth:`read` says whether it wins (module doc)."""

    __slots__ = ("_latest", "window")

    def __init__(self, *, spacing: float, claim_window: float) -> None:
        if spacing <= 0 or claim_window < 0:
            raise ValueError("spacing must be > 0 and claim_window >= 0")
        self.window = spacing + claim_window
        self._latest: dict[TokenKey, float] = {}

    def read(self, key: TokenKey, at: float) -> bool:
        """The next claim on ``key`` in log order, stamped ``at`` (broker seconds): True iff it wins."""
        latest = self._latest.get(key)
        if latest is None:
            self._latest[key] = at
            return True
        if at > latest:
            self._latest[key] = at
        return at >= latest + self.window

    def latest(self, key: TokenKey) -> float | None:
        """The latest claim time read for ``key`` (broker seconds), if any is remembered."""
        return self._latest.get(key)

    def prune(self, now: float) -> int:
        """Forget tokens whose latest claim cannot matter to a claim made at or after ``now`` (minus
        :data:`PRUNE_SLACK` for clock differences); returns how many."""
        horizon = now - self.window - PRUNE_SLACK
        old = [key for key, at in self._latest.items() if at < horizon]
        for key in old:
            del self._latest[key]
        return len(old)

    def __len__(self) -> int:
        return len(self._latest)
