"""One pure function classifies every Feishu answer; callers branch on the ``Verdict``, never on ``code``.

    classify(http_status, headers, body, api=...) -> Outcome
    network_error(exc)                            -> Outcome   (no answer at all: RETRY)

Verdicts (SPEC.md "Retries"):

    OK         code 0 on a 2xx
    PARTIAL    code 0, but Feishu reports per-user failures in ``data`` (chat_button ``failed_user_reasons``, ...)
    RETRY      try again later: after ``retry_after`` seconds when Feishu says so, else with backoff;
               ``throttled`` means a limit was hit and that bucket must slow down
    REFRESH    the access token is invalid or expired: evict it, fetch a new one, retry once
    PERMANENT  Feishu refused; retrying the same request cannot succeed

The codes below come from feishu-facts.md (its sources in brackets); every code not listed is PERMANENT with
Feishu's own code and msg, which is what the SPEC asks for ("other codes fail at once").

A 2xx whose body is not Feishu's ``{code, msg, data}`` is PERMANENT, not RETRY: Feishu always answers with that
envelope, so an unreadable 2xx comes from something else on the path (a proxy, a wrong ``base_url``), which
retrying will not fix. Worse, a 2xx may mean the call *was* performed, and repeating reactions, urgent buzzes,
ephemeral cards or batch sends (no uuid) would duplicate them. A 5xx, readable or not, is RETRY.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, Final

import msgspec

__all__ = ["Attempted", "Outcome", "Verdict", "classify", "network_error"]


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


class Attempted(msgspec.Struct, frozen=True):
    """How a call ended: the last outcome, the attempts made, and whether ``expires_at`` stopped it."""

    outcome: Outcome | None
    attempts: int
    expired: bool = False
    exhausted: bool = False


class _Rule(msgspec.Struct, frozen=True):
    verdict: Verdict
    throttled: bool
    source: str


# code -> what to do. Sources: feishu-facts.md §1.3, §2.1, §2.4, §4 and the pages they cite.
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
    1500: _Rule(Verdict.RETRY, False, "generic-error-code: internal error"),
    # Token codes (oapi-sdk-go core/constants.go; its doRequest retries exactly these once).
    99991663: _Rule(Verdict.REFRESH, False, "tenant_access_token invalid or expired"),
    99991664: _Rule(Verdict.REFRESH, False, "app_access_token invalid"),
    99991671: _Rule(Verdict.REFRESH, False, "access token invalid (format)"),
    # Listed so the table says it on purpose: config problems a refresh cannot fix (facts §1.3).
    99991672: _Rule(Verdict.PERMANENT, False, "app lacks a required scope"),
    99991679: _Rule(Verdict.PERMANENT, False, "user has not granted the scope"),
    99991401: _Rule(Verdict.PERMANENT, False, "caller IP not in the app's whitelist"),
    99991661: _Rule(Verdict.PERMANENT, False, "missing access token"),
}

# Per-user failures Feishu reports next to code 0, by API (see relay.calls for the names).
PARTIAL_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    # seeds/chat_button_update.md: data.failed_user_reasons[{error_code, error_message, user_id}].
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
        if http_status == 429:
            verdict, throttled, msg = Verdict.RETRY, True, "HTTP 429 (rate limited)"
        elif http_status >= 500:
            verdict, throttled, msg = Verdict.RETRY, False, f"HTTP {http_status} from Feishu"
        else:
            verdict, throttled, msg = Verdict.PERMANENT, False, f"HTTP {http_status} with a body that is not Feishu's"
        return Outcome(verdict=verdict, http_status=http_status, code=None, msg=msg, log_id=log_id,
                       retry_after=reset if throttled else None, throttled=throttled)

    code, msg, data = envelope.code, _short(envelope.msg), envelope.data
    rule = CODES.get(code) if code is not None else None
    if code == 0 and 200 <= http_status < 300:
        verdict = Verdict.PARTIAL if _partial(api, data) else Verdict.OK
        throttled = False
    elif rule is not None:
        verdict, throttled = rule.verdict, rule.throttled
    elif http_status == 429:  # a limit whatever the code says (frequency-control)
        verdict, throttled = Verdict.RETRY, True
    elif http_status >= 500:  # server side; a code we do not know does not make it permanent
        verdict, throttled = Verdict.RETRY, False
    else:
        verdict, throttled = Verdict.PERMANENT, False
    if not msg:  # Feishu left msg empty: say something a person can act on
        msg = "ok" if verdict in (Verdict.OK, Verdict.PARTIAL) else (
            rule.source if rule is not None else f"code {code} with HTTP {http_status}")
    return Outcome(verdict=verdict, http_status=http_status, code=code, msg=msg, data=data, log_id=log_id,
                   retry_after=reset if throttled else None, throttled=throttled)


def network_error(exc: BaseException) -> Outcome:
    """No answer from Feishu (connect error, timeout, dropped connection): RETRY, with the class and text.

    The text of aiohttp/asyncio errors names the host and path at most; requests carry the token only in a
    header, which no exception text includes.
    """
    text = _short(str(exc))
    msg = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return Outcome(verdict=Verdict.RETRY, http_status=None, code=None, msg=_short(msg))
