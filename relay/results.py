"""What the relay writes for each intent: one result record, and a dead letter for every rejected/failed one.

Result record (results topic), written whenever the intent's ``id`` can be read: key = ``id``, value = the
:class:`Result` JSON (every field always present: consumers see ``null`` rather than absence), headers = the
intent record's ``traceparent`` and any header named in ``kafka.forward_headers``, unchanged.

Dead letter (dead-letter topic): the original value bytes and key unchanged; headers ``relay.error``
(``decode`` | ``invalid`` | ``feishu`` | ``retries-exhausted`` | ``outcome-unknown``, ``fetch`` for an upload whose
``url`` could not be downloaded, and ``internal`` for a relay bug reported as the intent's failure rather than
freezing its partition), ``relay.reason`` (one line),
``relay.source.topic``, ``relay.source.partition``, ``relay.source.offset``, then the original headers.
Expired intents are reported, not dead-lettered.

``outcome-unknown``: the call is not safe to repeat (``Call.repeatable``) and Feishu may have performed it, so the
relay did not send it again: the answer was lost after the request was written (a dropped connection, a read
timeout), a gateway answered 5xx, Feishu answered 1500; or a previous owner of the partition made the call and
stopped (killed, cut off in a drain) before writing its result (``relay.journal``). Check at Feishu before
repeating it by hand; the ``msg`` says which.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec

from relay.intents import AwareTime, Intent
from relay.outcomes import Attempted, Verdict

Status = Literal["ok", "partial", "superseded", "expired", "failed", "rejected"]
# ``relay.error`` of a dead letter (docs/results.md lists what each means; new values are added, never renamed)
DeadLetterError = Literal["decode", "invalid", "feishu", "retries-exhausted", "internal", "fetch"]


class Result(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One per intent on the results topic, key = ``id``; every field always present.

    ``code``/``msg`` are Feishu's when Feishu answered; otherwise ``code`` is null and ``msg`` is the relay's
    reason (rejected, expired, failed without an answer). Times must be timezone-aware (encoded as RFC 3339).
    """

    id: str | None
    kind: str | None
    app: str | None
    status: Status
    superseded_by: str | None = None
    code: int | None = None
    msg: str | None = None
    data: Any = None
    http_status: int | None = None
    attempts: int = 0
    log_id: str | None = None
    received_at: AwareTime
    finished_at: AwareTime

    def __post_init__(self) -> None:
        for name in ("received_at", "finished_at"):
            if getattr(self, name).tzinfo is None:
                raise ValueError(f"{name}: must be timezone-aware (RFC 3339 needs an offset)")


_result_encoder: Final = msgspec.json.Encoder()


def encode_result(result: Result) -> bytes:
    """The JSON value of a result record."""
    return _result_encoder.encode(result)


def schema() -> dict[str, Any]:
    """JSON Schema (2020-12) whose root validates one intent record value; ``$defs.Result`` is the result record.

    The root is ``{"$ref": "#/$defs/Intent"}`` (the union tagged on ``kind``), so a producer can validate a
    record with the document as it is; a result validates against ``{"$ref": "<this>#/$defs/Result"}``.
    """
    (intent, _), components = msgspec.json.schema_components((Intent, Result), ref_template="#/$defs/{name}")
    return {  # ``Result`` (a struct) is already among the components; the union ``Intent`` is not
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "feishu-relay intent (the result record is $defs.Result)",
        "$ref": "#/$defs/Intent",
        "$defs": {**components, "Intent": intent},
    }


Headers = list[tuple[str, bytes]]

# ``relay.error`` of a call that may have been performed and was not repeated (module doc)
OUTCOME_UNKNOWN: Final = "outcome-unknown"

ALWAYS_FORWARDED: Final = "traceparent"


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def forwarded_headers(headers: Sequence[tuple[str, bytes]], names: Iterable[str]) -> Headers:
    wanted = {ALWAYS_FORWARDED, *names}
    return [(k, v) for k, v in headers if k in wanted]


def dead_letter_headers(headers: Sequence[tuple[str, bytes]], *, error: str, reason: str, topic: str,
                        partition: int, offset: int) -> Headers:
    return [
        ("relay.error", error.encode()),
        ("relay.reason", one_line(reason).encode()),
        ("relay.source.topic", topic.encode()),
        ("relay.source.partition", str(partition).encode()),
        ("relay.source.offset", str(offset).encode()),
        *headers,
    ]


def one_line(text: str, limit: int = 500) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def dead_letter_reason(error: str, fields: dict[str, Any]) -> str:
    """``relay.reason``: the relay's own reason, or Feishu's code, HTTP status and msg for a refusal."""
    if error == "feishu" and fields.get("code") is not None:
        return feishu_reason(fields["code"], fields.get("http_status"), fields.get("msg") or "")
    return str(fields.get("msg") or error)


def feishu_reason(code: int | None, http_status: int | None, msg: str) -> str:
    """``Feishu code 230001 (HTTP 400): param is invalid`` (``no answer`` when Feishu did not answer)."""
    said = "no answer" if code is None else f"code {code}"
    status = f" (HTTP {http_status})" if http_status is not None else ""
    return f"Feishu {said}{status}: {msg}"


def from_attempt(attempted: Attempted) -> tuple[str, str | None, dict[str, Any]]:
    """(status, dead-letter error or None, result fields) for a performed call."""
    outcome = attempted.outcome
    fields: dict[str, Any] = {"attempts": attempted.attempts}
    if outcome is not None:
        fields.update(code=outcome.code, msg=outcome.msg, data=outcome.data, http_status=outcome.http_status,
                      log_id=outcome.log_id)
    if attempted.expired:
        note = f" after {attempted.attempts} attempt(s)" if attempted.attempts else " before any attempt"
        fields["msg"] = f"expires_at passed{note}"
        return "expired", None, fields
    assert outcome is not None
    if outcome.verdict is Verdict.OK:
        return "ok", None, fields
    if outcome.verdict is Verdict.PARTIAL:
        return "partial", None, fields
    if attempted.unknown:
        last = feishu_reason(outcome.code, outcome.http_status, outcome.msg)
        fields["msg"] = (f"outcome unknown: attempt {attempted.attempts} may have been performed and this call is "
                         f"not safe to repeat, so it was not retried; last: {last}")
        return "failed", OUTCOME_UNKNOWN, fields
    if attempted.exhausted:
        last = feishu_reason(outcome.code, outcome.http_status, outcome.msg)
        fields["msg"] = f"retries exhausted after {attempted.attempts} attempt(s); last: {last}"
        return "failed", "retries-exhausted", fields
    return "failed", "feishu", fields


def make_result(*, id: str, kind: str | None, app: str | None, status: str, received_at: float,
                finished_at: float, **fields: Any) -> Result:
    return Result(id=id, kind=kind, app=app, status=status,  # type: ignore[arg-type]  # checked by callers
                  received_at=utc(received_at), finished_at=utc(finished_at), **fields)
