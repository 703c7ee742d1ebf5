"""Result records and dead letters: statuses from a performed call, forwarded headers, dead-letter headers."""

from __future__ import annotations

import msgspec

from relay.outcomes import Attempted, Outcome, Verdict
from relay.results import (
    dead_letter_headers,
    dead_letter_reason,
    encode_result,
    forwarded_headers,
    from_attempt,
    make_result,
)


def outcome(verdict: Verdict, code: int | None = 0, msg: str = "success") -> Outcome:
    return Outcome(verdict=verdict, http_status=200 if code == 0 else 400, code=code, msg=msg,
                   data={"message_id": "om_1"}, log_id="L1", retry_after=None, throttled=False)


def test_statuses_from_attempts() -> None:
    assert from_attempt(Attempted(outcome(Verdict.OK), 1))[:2] == ("ok", None)
    assert from_attempt(Attempted(outcome(Verdict.PARTIAL), 1))[:2] == ("partial", None)
    status, error, fields = from_attempt(Attempted(outcome(Verdict.PERMANENT, 230001, "param is invalid"), 1))
    assert (status, error, fields["code"], fields["attempts"]) == ("failed", "feishu", 230001, 1)
    assert dead_letter_reason("feishu", fields) == "Feishu code 230001 (HTTP 400): param is invalid"
    status, error, fields = from_attempt(Attempted(outcome(Verdict.RETRY, 1500, "internal"), 8, exhausted=True))
    assert (status, error) == ("failed", "retries-exhausted")
    assert "8 attempt" in fields["msg"] and "1500" in fields["msg"]
    status, error, fields = from_attempt(Attempted(None, 0, expired=True))
    assert (status, error) == ("expired", None) and "before any attempt" in fields["msg"]


def test_a_maybe_performed_call_not_retried_fails_as_outcome_unknown() -> None:
    lost = Outcome(verdict=Verdict.RETRY, http_status=None, code=None, msg="ServerDisconnectedError: gone",
                   maybe_performed=True)
    status, error, fields = from_attempt(Attempted(lost, 1, unknown=True))
    assert (status, error) == ("failed", "outcome-unknown")
    assert fields["msg"].startswith("outcome unknown:") and "ServerDisconnectedError" in fields["msg"]
    assert dead_letter_reason(error, fields) == fields["msg"]


def test_result_record_has_every_contract_field() -> None:
    result = make_result(id="n-1", kind="message.send", app="default", status="ok", received_at=1.5e9,
                         finished_at=1.5e9 + 0.25, code=0, msg="success", data={"message_id": "om_1"},
                         http_status=200, attempts=1, log_id="L1")
    value = msgspec.json.decode(encode_result(result))
    assert set(value) == {"id", "kind", "app", "status", "superseded_by", "code", "msg", "data", "http_status",
                          "attempts", "log_id", "received_at", "finished_at", "tenant_key"}
    assert value["received_at"].startswith("2017-07-14T02:40:00") and value["received_at"].endswith("Z")


def test_headers() -> None:
    original = [("traceparent", b"00-1-2-01"), ("tenant", b"t1"), ("other", b"x")]
    assert forwarded_headers(original, ["tenant"]) == [("traceparent", b"00-1-2-01"), ("tenant", b"t1")]
    dead = dict(dead_letter_headers(original, error="decode", reason="not JSON\nat all", topic="in",
                                    partition=3, offset=42))
    assert dead["relay.error"] == b"decode" and dead["relay.reason"] == b"not JSON at all"
    assert (dead["relay.source.topic"], dead["relay.source.partition"], dead["relay.source.offset"]) == \
        (b"in", b"3", b"42")
    assert dead["traceparent"] == b"00-1-2-01" and dead["other"] == b"x"
