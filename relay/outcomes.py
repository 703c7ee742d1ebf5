"""One pure function classifies every Feishu answer; callers branch on the ``Verdict``, never on ``code``.

    classify(http_status, headers, body, api=...) -> Outcome
    network_error(exc)                            -> Outcome   (no answer at all: RETRY)
    token_error(outcome)                          -> Outcome   (no tenant token: the API was not called)

Verdicts (docs/guarantees.md "Bounded retries", docs/feishu-rules.md §4):

    OK         code 0 on a 2xx
    PARTIAL    code 0, but Feishu reports per-user failures in ``data`` (chat_button ``failed_user_reasons``, ...)
    RETRY      try again later: after ``retry_after`` seconds when Feishu says so, else with backoff;
               ``throttled`` means a limit was hit and that bucket must slow down
    REFRESH    the access token is invalid or expired: evict it, fetch a new one, retry once
    PERMANENT  Feishu refused; retrying the same request cannot succeed

The codes below come from docs/feishu-rules.md §4 (its sources in brackets); every code not listed is PERMANENT
with Feishu's own code and msg, which is what docs/guarantees.md promises ("every other refusal fails at once").

A 2xx whose body is not Feishu's ``{code, msg, data}`` is PERMANENT, not RETRY: Feishu always answers with that
envelope, so an unreadable 2xx comes from something else on the path (a proxy, a wrong ``base_url``), which
retrying will not fix. Worse, a 2xx may mean the call *was* performed, and repeating reactions, urgent buzzes,
ephemeral cards or batch sends (no uuid) would duplicate them. A 5xx, readable or not, is RETRY.

**Was it performed?** A RETRY outcome also says whether Feishu may have performed the operation
(``maybe_performed``): the executor retries such an outcome only for a call that is safe to repeat
(``Call.repeatable``); any other call ends ``failed`` with ``relay.error`` = ``outcome-unknown``. The rule is
conservative: *not performed* only where the failure proves the request never reached the API.

    not performed (retried for every call)            maybe performed (retried only if repeatable)
    ------------------------------------------------  ------------------------------------------------
    connect errors: ClientConnectorError (DNS, TCP,   ServerDisconnectedError: the connection closed
      TLS, certificate, proxy connection),              with no answer after the request was handed to
      ConnectionTimeoutError, ServerFingerprint-        it (aiohttp raises it from the response read; an
      Mismatch, ClientHttpProxyError (the proxy         idle keep-alive closed by the server at that
      refused the CONNECT tunnel), InvalidURL:          instant looks the same, and RFC 9112 §9.3.1 forbids
      all raised by aiohttp's connector before a        repeating a non-idempotent request on it)
      byte of the request is written                  ClientOSError / ClientPayloadError / any other
    429 (any body), 99991400, 230020: a limit           error after the connection was ours (reset,
      refused the call at the gateway                   broken pipe, truncated answer)
    99991663/99991664/99991671: the token was         SocketTimeoutError (sock_read), TimeoutError (the
      refused before the API ran                        total ``request_timeout``): the request was written
    230049: another request with this uuid is         HTTP 5xx with a body that is not Feishu's
      in flight; this one was not performed             (500/502/503/504 from a gateway): a gateway that
    the tenant token could not be had                   timed out or lost its upstream after forwarding
      (``token_unavailable``): no API request           cannot say whether the upstream acted
                                                      Feishu code 1500 "internal error", or an unknown
                                                        code on a 5xx: the failure may have come after
                                                        the operation was committed

Exception classes are precise here because of how aiohttp 3.14 sends (``ClientSession._request``): the only step
before the request is written is ``connector.connect``, whose failures have their own classes above; headers and
body are then handed to the transport without a failure point of their own, so aiohttp's trace signal
``on_request_headers_sent`` would add no information (and costs a coroutine per signal per request). The one
ambiguity, the total timeout firing *during* connect (a plain TimeoutError), is removed by the client: its
``connect`` timeout is shorter than the total, so a connect that is too slow raises ConnectionTimeoutError first.
(aiohttp itself re-sends PUT/DELETE once on a fresh connection after a stale keep-alive; those are repeatable.)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
import msgspec

__all__ = ["Attempted", "Outcome", "Verdict", "classify", "network_error", "token_error"]


class Verdict(enum.Enum):
    """What the caller does next with this call."""

    OK = "ok"
    PARTIAL = "partial"
    RETRY = "retry"
    REFRESH = "refresh"
    PERMANENT = "permanent"


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """A classified answer. ``code``/``msg``/``data`` are Feishu's when it answered, else ``code`` is None."""

    verdict: Verdict
    http_status: int | None
    code: int | None
    msg: str
    data: Any = None
    log_id: str | None = None
    retry_after: float | None = None  # seconds, from ``x-ogw-ratelimit-reset``
    throttled: bool = False  # a rate limit was hit: the bucket must slow down, not just wait
    maybe_performed: bool = False  # RETRY only: Feishu may have performed the operation (module doc)
    token_unavailable: bool = False  # no tenant token: the API was not called (not an attempt)


class Attempted(msgspec.Struct, frozen=True):
    """How a call ended: the last outcome, the API requests made (``attempts``), and why it stopped.

    ``expired``: ``expires_at`` passed; ``exhausted``: the retry policy's attempts or time ran out; ``unknown``:
    the last attempt may have been performed and the call is not safe to repeat, so it was not retried.
    """

    outcome: Outcome | None
    attempts: int
    expired: bool = False
    exhausted: bool = False
    unknown: bool = False


class _Rule(msgspec.Struct, frozen=True):
    verdict: Verdict
    throttled: bool
    source: str
    maybe_performed: bool = False  # RETRY only: the failure may have come after the operation (module doc)


# code -> what to do. Sources: docs/feishu-rules.md §1, §2.1, §2.4, §4 and the pages they name.
CODES: Final[dict[int, _Rule]] = {
    # Frequency control (server-docs/api-call-guide/frequency-control): HTTP 429 (older APIs 400) with 99991400;
    # wait ``x-ogw-ratelimit-reset`` seconds, then retry.
    99991400: _Rule(Verdict.RETRY, True, "frequency-control: request trigger frequency limit"),
    # IM per-target limit (im-v1/message/create, reply: 5 QPS per user / per group, shared by all bots in a group):
    # "This operation triggers the frequency limit"; back off.
    230020: _Rule(Verdict.RETRY, True, "im-v1 error table: frequency limit triggered"),
    # im-v1/message/reply error table: "message is being sent, please try again later".
    230049: _Rule(Verdict.RETRY, False, "im-v1 error table: message is being sent, try later"),
    # api-call-guide/generic-error-code: 1500 internal error.
    # Performed or not is not said: a non-repeatable call is not retried on it (module doc).
    1500: _Rule(Verdict.RETRY, False, "generic-error-code: internal error", maybe_performed=True),
    # Token codes (oapi-sdk-go core/constants.go; its doRequest retries exactly these once).
    99991663: _Rule(Verdict.REFRESH, False, "tenant_access_token invalid or expired"),
    99991664: _Rule(Verdict.REFRESH, False, "app_access_token invalid"),
    99991671: _Rule(Verdict.REFRESH, False, "access token invalid (format)"),
    # Listed so the table says it on purpose: config problems a refresh cannot fix (docs/feishu-rules.md §1).
    99991672: _Rule(Verdict.PERMANENT, False, "app lacks a required scope"),
    99991679: _Rule(Verdict.PERMANENT, False, "user has not granted the scope"),
    99991401: _Rule(Verdict.PERMANENT, False, "caller IP not in the app's whitelist"),
    99991661: _Rule(Verdict.PERMANENT, False, "missing access token"),
    # CardKit (docs/feishu-rules.md §5.7). A sequence not greater than the card's last: the same record's retry carries
    # the same number, so retrying cannot help (the relay's sequences increase: relay.calls.card_sequence).
    300317: _Rule(Verdict.PERMANENT, False, "cardkit: sequence number compare failed"),
    # Streaming mode closed (10 min after it was opened, or idle): element content updates fail until a
    # card.settings opens it again; settings and full updates still work. Final for this intent.
    300309: _Rule(Verdict.PERMANENT, False, "cardkit: streaming mode is closed"),
    200850: _Rule(Verdict.PERMANENT, False, "cardkit: streaming mode closed (idle)"),
    # An element added a moment ago is not visible yet: a short retry finds it (3P-observed, docs/feishu-rules.md §5.7).
    300313: _Rule(Verdict.RETRY, False, "cardkit: element not found (not visible yet)"),
    # Uploads (docs/feishu-rules.md §5.8): listed so the table says it on purpose; the same bytes again cannot help.
    234001: _Rule(Verdict.PERMANENT, False, "upload: invalid param"),
    234006: _Rule(Verdict.PERMANENT, False, "upload: size exceeded (image 10 MB, file 30 MB)"),
    234010: _Rule(Verdict.PERMANENT, False, "upload: file is empty"),
}

# Per-user failures Feishu reports next to code 0, by API (see relay.calls for the names).
PARTIAL_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    # docs/feishu-rules.md §5.5: data.failed_user_reasons[{error_code, error_message, user_id}].
    "im.chat_button.update": ("failed_user_reasons",),
    # im-v1 buzz-messages urgent_*: data.invalid_user_id_list.
    "im.message.urgent_app": ("invalid_user_id_list",),
    "im.message.urgent_sms": ("invalid_user_id_list",),
    "im.message.urgent_phone": ("invalid_user_id_list",),
    # message/v4/batch_send: data.invalid_department_ids / invalid_open_ids / invalid_user_ids / invalid_union_ids.
    "message.batch_send": ("invalid_department_ids", "invalid_open_ids", "invalid_user_ids", "invalid_union_ids"),
}

_RESET_HEADER: Final = "x-ogw-ratelimit-reset"
_LOG_ID_HEADER: Final = "x-tt-logid"
_MAX_MSG: Final = 500


class _Envelope(msgspec.Struct):
    """Feishu's answer, read leniently: unknown fields ignored, every field optional."""

    code: int | None = None
    msg: str = ""
    data: Any = None


_envelope_decoder: Final = msgspec.json.Decoder(_Envelope)


def _read(body: bytes) -> _Envelope | None:
    try:
        envelope = _envelope_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):  # ValidationError is a DecodeError
        return None
    return envelope if envelope.code is not None else None


def _headers(headers: Mapping[str, str]) -> tuple[str | None, float | None]:
    """``X-Tt-Logid`` and ``x-ogw-ratelimit-reset`` (seconds), whatever the case of the names."""
    log_id: str | None = None
    reset: float | None = None
    for name, value in headers.items():
        lowered = name.lower()
        if lowered == _LOG_ID_HEADER:
            log_id = value.strip() or None
        elif lowered == _RESET_HEADER:
            try:
                seconds = float(value)
            except ValueError:
                continue
            if math.isfinite(seconds):
                reset = max(seconds, 0.0)
    return log_id, reset


def _partial(api: str | None, data: Any) -> bool:
    if api is None or not isinstance(data, dict):
        return False
    return any(data.get(name) for name in PARTIAL_FIELDS.get(api, ()))


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MSG else text[: _MAX_MSG - 1] + "…"


def classify(http_status: int, headers: Mapping[str, str], body: bytes, *, api: str | None = None) -> Outcome:
    """Classify one Feishu answer. ``api`` (a ``Call.api`` name) selects the per-user failure fields for PARTIAL."""
    log_id, reset = _headers(headers)
    envelope = _read(body)

    if envelope is None:
        maybe = False
        if http_status == 429:
            verdict, throttled, msg = Verdict.RETRY, True, "HTTP 429 (rate limited)"
        elif http_status >= 500:  # a gateway's own answer: it may have forwarded the request (module doc)
            verdict, throttled, msg, maybe = Verdict.RETRY, False, f"HTTP {http_status} from Feishu", True
        else:
            verdict, throttled, msg = Verdict.PERMANENT, False, f"HTTP {http_status} with a body that is not Feishu's"
        return Outcome(verdict=verdict, http_status=http_status, code=None, msg=msg, log_id=log_id,
                       retry_after=reset if throttled else None, throttled=throttled, maybe_performed=maybe)

    code, msg, data = envelope.code, _short(envelope.msg), envelope.data
    rule = CODES.get(code) if code is not None else None
    maybe = False
    if code == 0 and 200 <= http_status < 300:
        verdict = Verdict.PARTIAL if _partial(api, data) else Verdict.OK
        throttled = False
    elif rule is not None:
        verdict, throttled, maybe = rule.verdict, rule.throttled, rule.maybe_performed
    elif http_status == 429:  # a limit whatever the code says (frequency-control)
        verdict, throttled = Verdict.RETRY, True
    elif http_status >= 500:  # server side; a code we do not know does not make it permanent, nor "not done"
        verdict, throttled, maybe = Verdict.RETRY, False, True
    else:
        verdict, throttled = Verdict.PERMANENT, False
    if not msg:  # Feishu left msg empty: say something a person can act on
        msg = "ok" if verdict in (Verdict.OK, Verdict.PARTIAL) else (
            rule.source if rule is not None else f"code {code} with HTTP {http_status}")
    return Outcome(verdict=verdict, http_status=http_status, code=code, msg=msg, data=data, log_id=log_id,
                   retry_after=reset if throttled else None, throttled=throttled, maybe_performed=maybe)


# aiohttp raises these before a byte of the request is written (connector.connect; module doc).
NOT_WRITTEN: Final[tuple[type[BaseException], ...]] = (
    aiohttp.ClientConnectorError,  # DNS, TCP connect, TLS handshake, certificate, proxy connection
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerFingerprintMismatch,
    aiohttp.ClientHttpProxyError,
    aiohttp.InvalidURL,
)


def network_error(exc: BaseException) -> Outcome:
    """No answer from Feishu (connect error, timeout, dropped connection): RETRY, with the class and text.

    ``maybe_performed`` unless ``exc`` is one of :data:`NOT_WRITTEN` (module doc). The text of aiohttp/asyncio
    errors names the host and path at most; requests carry the token only in a header, which no exception text
    includes.
    """
    text = _short(str(exc))
    msg = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return Outcome(verdict=Verdict.RETRY, http_status=None, code=None, msg=_short(msg),
                   maybe_performed=not isinstance(exc, NOT_WRITTEN))


def token_error(outcome: Outcome) -> Outcome:
    """A token-endpoint outcome as the answer to an API call that was therefore never sent.

    Named as such in ``msg``; never a reason to slow the API's bucket (the limit hit was the token endpoint's);
    never performed; and not an attempt of the call (``token_unavailable``): the executor bounds such waits by
    the retry policy's time only, so a short token outage does not use up an intent's attempts.
    """
    return msgspec.structs.replace(outcome, msg=f"tenant_access_token: {outcome.msg}", throttled=False,
                                   maybe_performed=False, token_unavailable=True)
