"""The URL-preview planner: which batch_update calls to make, and which intent each call finishes.

Pure: no I/O, time passed in, so every rule below is tested with an injected clock. :class:`PreviewPlanner`
keeps, per ``(app, token)``, the pending requests and the time of the last update; the async shell around it
is :class:`relay.previews.PreviewCoalescer`.

The rules (docs/intents.md "url_preview.update"; Feishu's, docs/feishu-rules.md §5.4):

Merging
    The pending requests for one token are merged into the token's next call: the union of their open_ids, or
    everyone (no ``open_ids``) if any of them asked for everyone or the union passes 100 open_ids.
Spacing
    A token's next call may start no earlier than ``last update + token_interval + margin`` (interval divided
    by ``feishu.time_scale``; the margin covers event-loop lag and network variance between our send and
    Feishu's clock). An update is every attempt this process sent, stamped at the instant it was sent
    (:meth:`PreviewPlanner.on_attempt`), retries included (Feishu may have acted on an attempt whose answer we
    never saw), and every update anyone else may have made (:meth:`PreviewPlanner.remember`: another replica's
    or a previous owner's claim, read from the shared memory, at the latest instant its writer may have sent);
    news of a later update holds back a token that was already ready. One token is never in two calls at once.
    Across replicas the rule is kept by claims (:mod:`relay.previews.claims`); this spacing only decides when a
    claim is worth making.
Packing and fairness
    Ready tokens are taken oldest-pending-request first; a call carries the oldest ready token plus up to 9 more
    ready tokens whose merged open_ids set is *the same* (never widened: a wider audience amplifies load, as the
    page warns). The coalescer asks for a call only when the executor's limiter is about to let it through (at
    most :data:`relay.previews.MAX_WAITING_CALLS` calls are waiting for the limiter), so under a saturated 5/s
    budget every decision uses the freshest merge and the oldest request goes first: every token's last request
    is delivered as soon as the budget allows.

Results (one per intent; "carried" = included in a call made after the intent was read):

* A call *carries* every request pending for its tokens when it is planned, plus requests read later but
  before an attempt whose open_ids are covered by the call's and whose ``expires_at`` the call cannot outlive
  (the call, made after they were read, delivers them too, per the definition of delivered in docs/intents.md).
* When a carrying call succeeds, for each of its tokens the *latest-read* carried request is that token's
  *carrier*; the other requests carried for that token are superseded by it.
* ``ok``: every token of the intent was delivered and the intent was its own carrier on each of them.
* ``superseded``: every token was delivered, and on at least one the carrier was a later intent;
  ``superseded_by`` is the latest-read such carrier (the carrier's own status is its own business: it may
  itself be superseded on another token, forming a chain).
* ``failed``: a call carrying any of its tokens failed (Feishu refused, retries exhausted); the intent fails
  at once with that call's outcome, and its requests still pending for other tokens are withdrawn.
* ``expired``: ``expires_at`` passed while at least one of its tokens had not been carried by any call yet (its
  pending requests are withdrawn), or the carrying call stopped because every intent it carried had expired.

``outcome``/``attempts`` of a result are those of the call that finished the intent.

Memory (what bounds how many intents may be read, see ``relay.outbound``): one entry per token with requests
waiting or a call in flight (:attr:`PreviewPlanner.pending_tokens`), holding their merged audience (at most 100
open_ids, else "everyone"), plus, per intent not finished yet, its state and one request per token it names; a
token idle past its spacing is forgotten by :meth:`PreviewPlanner.prune`. The per-token part is what a burst of
any size costs once it is in view; the per-intent part is bounded by the reader (the commit-metadata room).

Started (for drains): an intent is *started* once a call carrying it has claimed its tokens, or has been sent;
until then nothing of it can have reached Feishu, so :meth:`PreviewPlanner.withdraw` can hand it to the next
owner. Withdrawing an intent that a planned call carries before that call's first claim makes the call stale:
it is aborted unsent and its other requests are planned again. A call every intent of which has been withdrawn
makes no further attempt (a retry after its replica lost them would serve nobody, and could put older content
over what their new owner delivered).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from typing import Final, Literal

import msgspec

# docs/feishu-rules.md §5.4: preview_tokens 1 to 10, open_ids 0 to 100 per call.
MAX_TOKENS_PER_CALL: Final = 10
MAX_OPEN_IDS: Final = 100
# How long a token whose call raised (not an answer: e.g. the memory write failed) rests before it is retried.
ERROR_HOLD: Final = 1.0

PreviewStatus = Literal["ok", "superseded", "failed", "expired"]
# The merged audience of a token: a set of open_ids, or None for everyone in the chat.
Audience = frozenset[str] | None
TokenKey = tuple[str, str]  # (app, token)


def audience_of(open_ids: Iterable[str] | None) -> Audience:
    """An intent's audience: ``None`` (everyone) for absent or empty ``open_ids``, else the set."""
    ids = frozenset(open_ids or ())
    if not ids or len(ids) > MAX_OPEN_IDS:
        return None
    return ids


def merge_audience(a: Audience, b: Audience) -> Audience:
    """The merge rule of docs/intents.md (url_preview.update).

    Everyone if either is everyone or the union passes 100 open_ids, else the union."""
    if a is None or b is None:
        return None
    union = a | b
    return None if len(union) > MAX_OPEN_IDS else union



class PlannedCall(msgspec.Struct, frozen=True):
    """One batch_update call: its tokens and open_ids (``None`` = everyone) for one app.

    ``expires_at`` (planner time) is the latest ``expires_at`` of the intents it carries, ``None`` if any has
    none: past it, no carried intent wants the call any more.
    """

    id: int
    app: str
    tokens: tuple[str, ...]
    open_ids: tuple[str, ...] | None
    expires_at: float | None


class Finished(msgspec.Struct, frozen=True):
    """An intent's result as the planner knows it (the shell adds the call's outcome and attempts)."""

    ref: int
    status: PreviewStatus
    superseded_by: str | None = None
    reason: str | None = None


class _Request:
    __slots__ = ("audience", "id", "ref")

    def __init__(self, ref: int, intent_id: str, audience: Audience) -> None:
        self.ref = ref
        self.id = intent_id
        self.audience = audience


class _IntentState:
    __slots__ = ("app", "claimed", "expires_at", "id", "owed", "ref", "sent", "superseders")

    def __init__(self, ref: int, intent_id: str, app: str, tokens: Iterable[str], expires_at: float | None) -> None:
        self.ref = ref
        self.id = intent_id
        self.app = app
        self.owed: set[str] = set(tokens)
        self.expires_at = expires_at
        self.superseders: list[tuple[int, str]] = []  # (ref, id) of later intents that carried one of its tokens
        self.claimed: set[int] = set()  # calls carrying it whose current attempt has claimed and not been sent yet
        self.sent = False  # an attempt carrying it was sent (it may have been performed)


class _TokenState:
    __slots__ = ("_merged", "app", "cooling_until", "hold_until", "in_flight", "last_update", "pending", "token")

    def __init__(self, app: str, token: str) -> None:
        self.app = app
        self.token = token
        self.last_update: float | None = None
        self.hold_until = float("-inf")
        # by intent ref, in read order; whoever removes an entry calls ``changed()``
        self.pending: dict[int, _Request] = {}
        self.in_flight: int | None = None  # the call carrying this token
        self.cooling_until: float | None = None  # the time it sits in the cooling heap under, if it does
        self._merged: Audience | Literal[False] = frozenset()  # False: recompute

    def add(self, request: _Request) -> None:
        self.pending[request.ref] = request
        if self._merged is not False:
            self._merged = merge_audience(self._merged, request.audience)

    def changed(self) -> None:
        self._merged = False

    def audience(self) -> Audience:
        """The merged audience of the pending requests (cached: asked for every ready token per call)."""
        if self._merged is False:
            merged: Audience = frozenset()
            for request in self.pending.values():
                merged = merge_audience(merged, request.audience)
                if merged is None:
                    break
            self._merged = merged
        return self._merged

    def oldest(self) -> int:
        return next(iter(self.pending))


class _CallState:
    __slots__ = ("audience", "carried", "claimed", "keys", "planned", "stale")

    def __init__(self, planned: PlannedCall, keys: list[TokenKey], audience: Audience) -> None:
        self.planned = planned
        self.keys = keys
        self.audience = audience
        self.carried: dict[TokenKey, list[_Request]] = {key: [] for key in keys}  # in read order
        self.claimed = False  # an attempt has claimed: it may be at Feishu
        self.stale = False  # an intent it carries was withdrawn before any attempt claimed

    def refs(self) -> set[int]:
        return {request.ref for requests in self.carried.values() for request in requests}


def _covers(call: Audience, request: Audience) -> bool:
    return call is None or (request is not None and request <= call)


def _outlives(call_expires: float | None, intent_expires: float | None) -> bool:
    """The call will not stop for expiry before the intent's own ``expires_at``."""
    return call_expires is None or (intent_expires is not None and intent_expires <= call_expires)


class PreviewPlanner:
    """Decides every URL-preview call and every url_preview intent's result; pure: time is passed in.

    Usage: :meth:`add` each intent as it is read; :meth:`remember` every update of a token made elsewhere (another
    replica, a previous owner, this process before a restart); :meth:`next_call` while the caller can send;
    :meth:`on_claim` when an attempt of a call claims its tokens and :meth:`on_attempt` at the instant that attempt
    is sent; :meth:`complete` (or :meth:`abort`) when the call ends; :meth:`expire` whenever time passes; sleep until
    :meth:`next_wakeup`. Intents are identified by the ``ref`` returned from :meth:`add` (two records may share an
    intent ``id``); :meth:`started` says whether one may already be at Feishu. The rules are in the module docstring.
    """

    def __init__(self, *, token_interval: float, margin: float = 0.0,
                 max_tokens: int = MAX_TOKENS_PER_CALL) -> None:
        if not 1 <= max_tokens <= MAX_TOKENS_PER_CALL:
            raise ValueError(f"max_tokens must be 1..{MAX_TOKENS_PER_CALL}")
        self.spacing = token_interval + margin
        self.max_tokens = max_tokens
        self._refs = itertools.count(1)
        self._call_ids = itertools.count(1)
        self._intents: dict[int, _IntentState] = {}
        self._tokens: dict[TokenKey, _TokenState] = {}
        self._calls: dict[int, _CallState] = {}
        self._ready: dict[TokenKey, _TokenState] = {}  # pending, not in flight, spacing passed
        self._busy: set[TokenKey] = set()  # tokens with pending requests or a call in flight (see _mark)
        self._cooling: list[tuple[float, TokenKey]] = []  # heap, validated lazily
        self._expiry: list[tuple[float, int]] = []  # heap of (expires_at, ref), validated lazily

    # -- inputs ------------------------------------------------------------------------------------------

    def remember(self, app: str, token: str, at: float) -> None:
        """``token`` was (or may have been) updated at ``at``, by anyone; keeps the later of two.

        A token already ready when the news arrives waits again: it is ready only ``spacing`` after ``at``.
        """
        state = self._token(app, token)
        if state.last_update is not None and at <= state.last_update:
            return
        state.last_update = at
        key = (app, token)
        if self._ready.pop(key, None) is not None or state.cooling_until is not None:
            self._cool(state)

    def add(self, intent_id: str, app: str, tokens: Sequence[str], open_ids: Sequence[str] | None,
            expires_at: float | None, now: float) -> int:
        """Record an intent read at ``now``; returns its ref. Duplicate tokens count once."""
        ref = next(self._refs)
        unique = list(dict.fromkeys(tokens))
        if not unique:
            raise ValueError("an url_preview intent needs at least one token")
        intent = _IntentState(ref, intent_id, app, unique, expires_at)
        self._intents[ref] = intent
        audience = audience_of(open_ids)
        for token in unique:
            state = self._token(app, token)
            state.add(_Request(ref, intent_id, audience))
            self._busy.add((app, token))
            self._schedule(state, now)
        if expires_at is not None:
            heapq.heappush(self._expiry, (expires_at, ref))
        return ref

    def next_call(self, now: float) -> PlannedCall | None:
        """The next call to make now, or None when no token is ready. Marks its tokens in flight."""
        self._advance(now)
        if not self._ready:
            return None
        first = min(self._ready.values(), key=_TokenState.oldest)
        audience = first.audience()
        app = first.app
        same = sorted((s for s in self._ready.values()
                       if s is not first and s.app == app and s.audience() == audience), key=_TokenState.oldest)
        chosen = [first, *same[: self.max_tokens - 1]]
        call_id = next(self._call_ids)
        keys = [(s.app, s.token) for s in chosen]
        expiries: list[float | None] = []
        state = _CallState(PlannedCall(call_id, app, (), None, None), keys, audience)
        for key, token in zip(keys, chosen, strict=True):
            del self._ready[key]
            token.in_flight = call_id
            for ref, request in token.pending.items():
                expiries.append(self._intents[ref].expires_at)
                state.carried[key].append(request)
            token.pending.clear()
            token.changed()
        expires_at = None if not expiries or None in expiries else max(e for e in expiries if e is not None)
        open_ids = None if audience is None else tuple(sorted(audience))
        state.planned = PlannedCall(call_id, app, tuple(s.token for s in chosen), open_ids, expires_at)
        self._calls[call_id] = state
        return state.planned

    def on_claim(self, call_id: int) -> bool:
        """An attempt of ``call_id`` is about to claim its tokens: from now on it may be sent, so the intents it
        carries are :meth:`started` until it ends (or is aborted unsent).

        False, and nothing changes, when an intent it carries was withdrawn before its first claim (a drain gave
        the intent to the next owner), or every intent it carries has been withdrawn since (an abandon while the
        call was waiting to retry: another replica owns them now): the caller must :meth:`abort` it unsent, so
        its other requests are planned again without the withdrawn ones.
        """
        call = self._calls[call_id]
        if call.stale or not any(ref in self._intents for ref in call.refs()):
            return False  # (every intent it carried withdrawn: a retry after a lost membership would serve nobody)
        call.claimed = True
        for ref in call.refs():
            intent = self._intents.get(ref)
            if intent is not None:
                intent.claimed.add(call_id)
        return True

    def on_attempt(self, call_id: int, now: float) -> None:
        """An attempt of ``call_id`` is being sent at ``now``: stamp its tokens and fold in covered requests.

        Requests read since the call was planned whose open_ids the call covers are carried by it too: the
        attempt is a call made after they were read, so a success delivers them. Every intent it carries is
        :meth:`started` from now on.
        """
        call = self._calls[call_id]
        for key in call.keys:
            token = self._tokens[key]
            token.last_update = now if token.last_update is None else max(token.last_update, now)
            for ref, request in list(token.pending.items()):
                intent = self._intents.get(ref)
                if intent is None or (intent.expires_at is not None and intent.expires_at <= now):
                    continue
                if not _outlives(call.planned.expires_at, intent.expires_at):
                    continue  # the call may give up (expire) while this intent still wants its update
                if _covers(call.audience, request.audience):
                    del token.pending[ref]
                    token.changed()
                    call.carried[key].append(request)
        for ref in call.refs():
            intent = self._intents.get(ref)
            if intent is not None:
                intent.sent = True
                intent.claimed.discard(call_id)

    def complete(self, call_id: int, now: float, *, delivered: bool, expired: bool = False,
                 reason: str | None = None) -> list[Finished]:
        """The call ended: ``delivered`` (Feishu accepted it), else it failed (or ``expired``, see module doc).

        Returns the intents this finishes.
        """
        call = self._calls.pop(call_id)
        self._unclaim(call)
        finished: list[Finished] = []
        for key in call.keys:
            token = self._tokens[key]
            token.in_flight = None
            carried = call.carried[key]
            if delivered and carried:
                carrier = max(carried, key=lambda r: r.ref)  # the latest-read request for this token
                for request in carried:
                    intent = self._intents.get(request.ref)
                    if intent is None:
                        continue  # already finished (failed or expired through another token)
                    intent.owed.discard(key[1])
                    if request is not carrier:
                        intent.superseders.append((carrier.ref, carrier.id))
                    if not intent.owed:
                        finished.append(self._finish_delivered(intent))
            elif not delivered:
                status: PreviewStatus = "expired" if expired else "failed"
                for request in carried:
                    intent = self._intents.get(request.ref)
                    if intent is not None:
                        finished.append(self._finish(intent, status, reason=reason))
            self._mark(token)
            self._schedule(token, now)
        return finished

    def abort(self, call_id: int, now: float, hold: float = ERROR_HOLD, *, jitter: float = 0.0) -> None:
        """The call neither succeeded nor failed (it raised, or its claim lost): its requests go back to pending,
        first in line; intents it carried are no longer :meth:`started` by it unless one of its attempts was sent.

        Its tokens rest ``hold`` seconds (besides the spacing rule) so a persistent error cannot spin, and
        ``jitter`` seconds past the spacing: two replicas whose claims lost to each other's (each won a token
        of the other's call) would otherwise both be ready again at the same instant, and race again.
        """
        call = self._calls.pop(call_id)
        self._unclaim(call)
        for key in call.keys:
            token = self._tokens[key]
            token.in_flight = None
            token.hold_until = now + hold
            if jitter > 0 and token.last_update is not None:
                token.hold_until = max(token.hold_until, token.last_update + self.spacing + jitter)
            back = {r.ref: r for r in call.carried[key] if r.ref in self._intents}
            for ref in back:
                expires_at = self._intents[ref].expires_at
                if expires_at is not None:  # its expiry entry may have been popped while it was in flight
                    heapq.heappush(self._expiry, (expires_at, ref))
            back.update(token.pending)
            token.pending = dict(sorted(back.items()))
            token.changed()
            self._mark(token)
            self._schedule(token, now)

    def expire(self, now: float) -> list[Finished]:
        """Finish every intent whose ``expires_at`` is at or before ``now`` and that still has a pending token."""
        self._advance(now)
        finished: list[Finished] = []
        while self._expiry and self._expiry[0][0] <= now:
            _, ref = heapq.heappop(self._expiry)
            intent = self._intents.get(ref)
            if intent is None:
                continue
            if any(ref in self._tokens[(intent.app, t)].pending for t in intent.owed):
                finished.append(self._finish(intent, "expired", reason="expires_at passed before the update"))
        return finished

    def started(self, ref: int) -> bool:
        """Whether a call carrying intent ``ref`` has claimed or been sent, so the intent may be (or have been)
        performed at Feishu; False for an intent no longer pending (finished or withdrawn)."""
        intent = self._intents.get(ref)
        return intent is not None and (intent.sent or bool(intent.claimed))

    def withdraw(self, ref: int) -> None:
        """Forget an intent nobody waits for any more (its caller was cancelled, a drain gave it away); no result.

        A call carrying it that has not claimed yet becomes stale (see :meth:`on_claim`): it must not be sent.
        """
        intent = self._intents.get(ref)
        if intent is None:
            return
        for call in self._calls.values():
            if not call.claimed and ref in call.refs():
                call.stale = True
        self._finish(intent, "expired")

    def next_wakeup(self, *, spacing: bool = True) -> float | None:
        """When time alone next changes something: an intent expires, or (``spacing``) a token becomes ready.

        Pass ``spacing=False`` while no call could be made anyway (the caller's sending slots are full).
        """
        times = [self._expiry[0][0]] if self._expiry else []
        if spacing and self._cooling:
            times.append(self._cooling[0][0])
        return min(times) if times else None

    def prune(self, now: float) -> int:
        """Forget tokens with nothing pending or in flight whose spacing has passed; returns how many."""
        idle = [key for key, s in self._tokens.items()
                if not s.pending and s.in_flight is None and s.cooling_until is None
                and (s.last_update is None or s.last_update + self.spacing <= now) and s.hold_until <= now]
        for key in idle:
            del self._tokens[key]
            self._ready.pop(key, None)
        return len(idle)

    # -- views (tests, metrics) --------------------------------------------------------------------------

    @property
    def pending_intents(self) -> int:
        return len(self._intents)

    @property
    def calls_in_flight(self) -> int:
        return len(self._calls)

    @property
    def pending_tokens(self) -> int:
        """Tokens with requests waiting or a call in flight: what the intents read cost (module doc)."""
        return len(self._busy)

    def last_update(self, app: str, token: str) -> float | None:
        state = self._tokens.get((app, token))
        return None if state is None else state.last_update

    def earliest_update(self, app: str, token: str) -> float:
        """The earliest time ``token`` may be in a call again (``-inf`` if never updated)."""
        state = self._tokens.get((app, token))
        return float("-inf") if state is None else self._ready_time(state)

    # -- internals ---------------------------------------------------------------------------------------

    def _token(self, app: str, token: str) -> _TokenState:
        key = (app, token)
        state = self._tokens.get(key)
        if state is None:
            state = self._tokens[key] = _TokenState(app, token)
        return state

    def _ready_time(self, state: _TokenState) -> float:
        spaced = float("-inf") if state.last_update is None else state.last_update + self.spacing
        return max(spaced, state.hold_until)

    def _unclaim(self, call: _CallState) -> None:
        for ref in call.refs():
            intent = self._intents.get(ref)
            if intent is not None:
                intent.claimed.discard(call.planned.id)

    def _mark(self, state: _TokenState) -> None:
        """Keep ``_busy`` true for ``state`` (after its pending requests or its call changed)."""
        key = (state.app, state.token)
        if state.pending or state.in_flight is not None:
            self._busy.add(key)
        else:
            self._busy.discard(key)

    def _cool(self, state: _TokenState) -> None:
        """Put a token with pending requests (and no call) in the cooling heap at its ready time, due or not."""
        if not state.pending or state.in_flight is not None:
            state.cooling_until = None
            return
        at = self._ready_time(state)
        if state.cooling_until != at:
            state.cooling_until = at
            heapq.heappush(self._cooling, (at, (state.app, state.token)))

    def _schedule(self, state: _TokenState, now: float) -> None:
        """Put a token with pending requests (and no call) in the ready set or the cooling heap."""
        key = (state.app, state.token)
        if not state.pending or state.in_flight is not None or key in self._ready:
            return
        at = self._ready_time(state)
        if at <= now:
            self._ready[key] = state
        elif state.cooling_until != at:
            state.cooling_until = at
            heapq.heappush(self._cooling, (at, key))

    def _advance(self, now: float) -> None:
        while self._cooling and self._cooling[0][0] <= now:
            at, key = heapq.heappop(self._cooling)
            state = self._tokens.get(key)
            if state is None or state.cooling_until != at:
                continue  # stale entry
            state.cooling_until = None
            self._schedule(state, now)

    def _finish_delivered(self, intent: _IntentState) -> Finished:
        if not intent.superseders:
            return self._finish(intent, "ok")
        _, by = max(intent.superseders)
        return self._finish(intent, "superseded", superseded_by=by)

    def _finish(self, intent: _IntentState, status: PreviewStatus, *, superseded_by: str | None = None,
                reason: str | None = None) -> Finished:
        del self._intents[intent.ref]
        for token in intent.owed:
            state = self._tokens.get((intent.app, token))
            if state is not None and state.pending.pop(intent.ref, None) is not None:
                state.changed()
                if not state.pending:
                    self._ready.pop((intent.app, token), None)
                    self._mark(state)
        return Finished(intent.ref, status, superseded_by, reason)

