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

A record too large for its topic is written cut rather than never (``cut_result``, ``cut_dead_letter``), with a
``relay.truncated`` header holding the original value's size in bytes: a result loses ``data`` (then its
forwarded headers and most of ``msg``); a dead letter keeps its ``relay.*`` headers, then as many original
headers as fit, then a prefix of the key and of the value.
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
DeadLetterError = Literal["decode", "invalid", "feishu", "retries-exhausted", "outcome-unknown", "internal",
                          "fetch"]


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
    tenant_key: str | None = None  # the intent's, for a store app (null for a custom app's)

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


TRUNCATED: Final = "relay.truncated"
_RECORD_OVERHEAD: Final = 32  # a record's framing in a v2 batch: length, attributes, deltas, varints (generous)
_KEY_KEPT: Final = 1024  # a cut dead letter keeps at most this much of its key


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> int:
    """About the bytes a record takes in a batch (a little more, never less, than Kafka counts)."""
    return (_RECORD_OVERHEAD + (len(key) if key else 0) + (len(value) if value else 0)
            + sum(_header_size(h) for h in headers))


def _header_size(header: tuple[str, bytes | None]) -> int:
    return 4 + len(header[0].encode("utf-8", "replace")) + (len(header[1]) if header[1] else 0)


def cut_dead_letter(key: bytes | None, value: bytes, relay_headers: Headers,
                    original_headers: Sequence[tuple[str, bytes | None]],
                    budget: int) -> tuple[bytes | None, bytes, Headers]:
    """The dead letter within ``budget`` bytes where it can be: the ``relay.*`` headers and ``relay.truncated``
    (the original value size) whole, the key (at most 1 KiB of it), the original headers in order while they
    fit, then as much of the value as is left."""
    headers: Headers = [*relay_headers, (TRUNCATED, str(len(value)).encode())]
    room = budget - record_size(None, None, headers)
    kept_key = key[: max(0, min(_KEY_KEPT, room))] if key else key
    room -= len(kept_key) if kept_key else 0
    for header in original_headers:
        size = _header_size(header)
        if size > room:
            break
        headers.append(header)  # type: ignore[arg-type]  # a None value is a valid Kafka header
        room -= size
    return kept_key, value[: max(0, room)], headers


def cut_result(value: bytes, headers: Headers, budget: int) -> tuple[bytes, Headers]:
    """The result record ``value`` within ``budget`` bytes where it can be, marked ``relay.truncated`` (its
    original size): without ``data``; if that is still too large, also without its forwarded headers and with
    ``msg`` cut short. (Bytes in, bytes out: a result re-emitted from the journal is cut the same way.)"""
    mark = (TRUNCATED, str(len(value)).encode())
    fields = _any_decoder.decode(value)
    fields["data"] = None
    cut = _any_encoder.encode(fields)
    if record_size(None, cut, [*headers, mark]) + len(str(fields.get("id") or "")) <= budget:
        return cut, [*headers, mark]
    if isinstance(fields.get("msg"), str):
        fields["msg"] = one_line(fields["msg"], 200)
    return _any_encoder.encode(fields), [mark]


_any_decoder: Final = msgspec.json.Decoder()
_any_encoder: Final = msgspec.json.Encoder()


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
