"""Classifying Feishu answers: every code class, every header form, unreadable bodies, network errors."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from relay.outcomes import CODES, Outcome, Verdict, classify, network_error, token_error


def body(code: int, msg: str = "", data: Any = None, **extra: Any) -> bytes:
    out: dict[str, Any] = {"code": code, "msg": msg, **extra}
    if data is not None:
        out["data"] = data
    return json.dumps(out, ensure_ascii=False).encode()


# (http status, headers, body, api, verdict, code, throttled, retry_after)
CASES: list[tuple[int, dict[str, str], bytes, str | None, Verdict, int | None, bool, float | None]] = [
    # success
    (200, {}, body(0, "success", {"message_id": "om_1"}), "im.message.create", Verdict.OK, 0, False, None),
    (200, {}, body(0, "success", {}), None, Verdict.OK, 0, False, None),
    (200, {}, b'{"code":0,"msg":"ok"}', "im.message.delete", Verdict.OK, 0, False, None),
    # per-user failures next to code 0
    (200, {}, body(0, "success", {"failed_user_reasons": [{"error_code": 0, "error_message": "The user is not in "
                                                          "the chat", "user_id": "ou_6"}]}),
     "im.chat_button.update", Verdict.PARTIAL, 0, False, None),
    (200, {}, body(0, "success", {"failed_user_reasons": []}), "im.chat_button.update", Verdict.OK, 0, False, None),
    (200, {}, body(0, "success", {"invalid_user_id_list": ["ou_x"]}), "im.message.urgent_app", Verdict.PARTIAL, 0,
     False, None),
    (200, {}, body(0, "success", {"message_id": "bm-1", "invalid_open_ids": ["ou_x"], "invalid_user_ids": []}),
     "message.batch_send", Verdict.PARTIAL, 0, False, None),
    (200, {}, body(0, "success", {"message_id": "bm-1", "invalid_open_ids": []}), "message.batch_send", Verdict.OK,
     0, False, None),
    # the field only counts for the API that has it
    (200, {}, body(0, "success", {"failed_user_reasons": [{"user_id": "ou_6"}]}), "im.message.create", Verdict.OK,
     0, False, None),
    # rate limits
    (429, {"x-ogw-ratelimit-limit": "50", "x-ogw-ratelimit-reset": "3"},
     body(99991400, "request trigger frequency limit"), "im.message.create", Verdict.RETRY, 99991400, True, 3.0),
    (400, {"X-Ogw-Ratelimit-Reset": "0.5"}, body(99991400, "request trigger frequency limit"), None, Verdict.RETRY,
     99991400, True, 0.5),
    (429, {}, body(99991400, "request trigger frequency limit"), None, Verdict.RETRY, 99991400, True, None),
    (429, {"x-ogw-ratelimit-reset": "soon"}, body(99991400), None, Verdict.RETRY, 99991400, True, None),
    (429, {"x-ogw-ratelimit-reset": "-2"}, body(99991400), None, Verdict.RETRY, 99991400, True, 0.0),
    (429, {"x-ogw-ratelimit-reset": "nan"}, body(99991400), None, Verdict.RETRY, 99991400, True, None),
    (429, {"x-ogw-ratelimit-reset": "2"}, b"Too Many Requests", None, Verdict.RETRY, None, True, 2.0),
    (429, {}, body(12345, "odd"), None, Verdict.RETRY, 12345, True, None),
    (400, {}, body(230020, "This operation triggers the frequency limit"), "im.message.create", Verdict.RETRY,
     230020, True, None),
    (400, {"x-ogw-ratelimit-reset": "1"}, body(230020), "im.message.create", Verdict.RETRY, 230020, True, 1.0),
    # transient
    (400, {}, body(230049, "message is being sent"), "im.message.reply", Verdict.RETRY, 230049, False, None),
    (500, {}, body(1500, "internal error"), None, Verdict.RETRY, 1500, False, None),
    (200, {}, body(1500, "internal error"), None, Verdict.RETRY, 1500, False, None),
    (502, {}, b"<html>Bad Gateway</html>", None, Verdict.RETRY, None, False, None),
    (503, {}, b"", None, Verdict.RETRY, None, False, None),
    (504, {"x-ogw-ratelimit-reset": "9"}, b"", None, Verdict.RETRY, None, False, None),
    (500, {}, body(99999, "server busy"), None, Verdict.RETRY, 99999, False, None),
    # tokens
    (400, {}, body(99991663, "Invalid access token for authorization"), None, Verdict.REFRESH, 99991663, False,
     None),
    (200, {}, body(99991663, "Invalid access token for authorization"), None, Verdict.REFRESH, 99991663, False,
     None),
    (400, {}, body(99991664, "app token invalid"), None, Verdict.REFRESH, 99991664, False, None),
    (400, {}, body(99991671, "token format"), None, Verdict.REFRESH, 99991671, False, None),
    # permanent, with Feishu's code
    (400, {}, body(230001, "param is invalid"), "im.chat_button.update", Verdict.PERMANENT, 230001, False, None),
    (400, {}, body(230027, "no permission, bot not in the chat"), "im.chat_button.update", Verdict.PERMANENT,
     230027, False, None),
    (400, {}, body(99991672, "Access denied"), None, Verdict.PERMANENT, 99991672, False, None),
    (400, {}, body(99991679, "unauthorized"), None, Verdict.PERMANENT, 99991679, False, None),
    (400, {}, body(99991401, "ip not allowed"), None, Verdict.PERMANENT, 99991401, False, None),
    (400, {}, body(230002, "Bot/User can NOT be out of the chat."), None, Verdict.PERMANENT, 230002, False, None),
    (400, {}, body(230031, "message too old"), "im.message.patch", Verdict.PERMANENT, 230031, False, None),
    (400, {}, body(230099, "Failed to create card content, ext=ErrCode: 200621"), None, Verdict.PERMANENT, 230099,
     False, None),
    (200, {}, body(10003, "invalid param"), "auth.tenant_access_token", Verdict.PERMANENT, 10003, False, None),
    (400, {"x-ogw-ratelimit-reset": "5"}, body(230001), None, Verdict.PERMANENT, 230001, False, None),
    # answers that are not Feishu's envelope
    (404, {}, b"404 page not found", None, Verdict.PERMANENT, None, False, None),
    (200, {}, b"<html>captive portal</html>", "im.message.create", Verdict.PERMANENT, None, False, None),
    (200, {}, b"", None, Verdict.PERMANENT, None, False, None),
    (200, {}, b"{}", None, Verdict.PERMANENT, None, False, None),
    (200, {}, b"[0]", None, Verdict.PERMANENT, None, False, None),
    (200, {}, b'{"code":"0"}', None, Verdict.PERMANENT, None, False, None),
    (200, {}, b"\xff\xfe", None, Verdict.PERMANENT, None, False, None),
    (200, {}, b'{"code":0,"msg":"\xff"}', None, Verdict.PERMANENT, None, False, None),
    # code 0 is only success on a 2xx
    (400, {}, body(0, ""), None, Verdict.PERMANENT, 0, False, None),
]


@pytest.mark.parametrize(
    ("status", "headers", "raw", "api", "verdict", "code", "throttled", "retry_after"), CASES,
    ids=[f"{c[0]}-{c[4].name}-{c[5]}-{i}" for i, c in enumerate(CASES)],
)
def test_classify(status: int, headers: dict[str, str], raw: bytes, api: str | None, verdict: Verdict,
                  code: int | None, throttled: bool, retry_after: float | None) -> None:
    outcome = classify(status, headers, raw, api=api)
    assert outcome.verdict is verdict
    assert outcome.code == code
    assert outcome.http_status == status
    assert outcome.throttled is throttled
    assert outcome.retry_after == retry_after
    assert outcome.msg  # always something to show
    assert "\n" not in outcome.msg


def test_feishu_fields_are_kept() -> None:
    outcome = classify(200, {"X-Tt-Logid": "20240501abc"}, body(0, "success", {"message_id": "om_1"}, extra=1),
                       api="im.message.create")
    assert outcome == Outcome(verdict=Verdict.OK, http_status=200, code=0, msg="success",
                              data={"message_id": "om_1"}, log_id="20240501abc")


@pytest.mark.parametrize("name", ["X-Tt-Logid", "x-tt-logid", "X-TT-LOGID"])
def test_log_id_header_in_any_case(name: str) -> None:
    assert classify(400, {name: "L-1"}, body(230001, "bad")).log_id == "L-1"
    assert classify(502, {name: "L-2"}, b"").log_id == "L-2"


def test_no_log_id() -> None:
    assert classify(200, {}, body(0)).log_id is None


def test_permanent_keeps_feishus_msg() -> None:
    outcome = classify(400, {}, body(230027, "no permission, bot not in the chat"))
    assert outcome.msg == "no permission, bot not in the chat"


def test_empty_msg_is_explained() -> None:
    assert classify(400, {}, body(230001)).msg == "code 230001 with HTTP 400"
    assert classify(429, {}, body(99991400)).msg == CODES[99991400].source
    assert classify(200, {}, body(0)).msg == "ok"


def test_msg_is_bounded_and_one_line() -> None:
    outcome = classify(400, {}, body(230001, "line one\nline two " + "x" * 2000))
    assert len(outcome.msg) <= 500 and "\n" not in outcome.msg


def test_unreadable_answer_says_what_it_was() -> None:
    assert classify(502, {}, b"<html>").msg == "HTTP 502 from Feishu"
    assert "404" in classify(404, {}, b"nope").msg
    assert "429" in classify(429, {}, b"").msg


def test_code_table_cites_its_sources() -> None:
    for code, rule in CODES.items():
        assert rule.source, code
    assert CODES[230020].throttled and CODES[99991400].throttled
    assert not CODES[230049].throttled


def test_network_error() -> None:
    outcome = network_error(ConnectionResetError(104, "Connection reset by peer"))
    assert outcome.verdict is Verdict.RETRY
    assert outcome.http_status is None and outcome.code is None
    assert outcome.msg == "ConnectionResetError: [Errno 104] Connection reset by peer"
    assert not outcome.throttled and outcome.retry_after is None


def test_network_error_without_text() -> None:
    assert network_error(TimeoutError()).msg == "TimeoutError"


def test_network_error_is_one_bounded_line() -> None:
    outcome = network_error(OSError("a\nb " + "y" * 5000))
    assert "\n" not in outcome.msg and len(outcome.msg) <= 500


# ---- performed or not ---------------------------------------------------------------------------------------


async def _connector_error() -> BaseException:
    """What aiohttp really raises when nothing listens (a connect error: nothing was written)."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post("http://127.0.0.1:9/open-apis/x", data=b"{}"):
                pass
        except aiohttp.ClientError as err:
            return err
    raise AssertionError("port 9 answered")


async def test_a_connect_error_was_not_performed() -> None:
    err = await _connector_error()
    assert isinstance(err, aiohttp.ClientConnectorError)
    outcome = network_error(err)
    assert outcome.verdict is Verdict.RETRY and not outcome.maybe_performed


@pytest.mark.parametrize("exc", [
    aiohttp.ConnectionTimeoutError("Connection timeout to host http://x"),
    aiohttp.InvalidURL("x"),
])
def test_failures_before_the_request_is_written_were_not_performed(exc: BaseException) -> None:
    assert not network_error(exc).maybe_performed


@pytest.mark.parametrize("exc", [
    aiohttp.ServerDisconnectedError(),  # the answer lost after the request was handed to the connection
    aiohttp.ClientOSError(104, "Connection reset by peer"),
    aiohttp.ClientPayloadError("Response payload is not completed"),
    aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
    TimeoutError(),  # the total request_timeout
    ConnectionResetError(104, "reset"),
])
def test_failures_after_the_request_was_written_may_have_been_performed(exc: BaseException) -> None:
    outcome = network_error(exc)
    assert outcome.verdict is Verdict.RETRY and outcome.maybe_performed


@pytest.mark.parametrize(("status", "raw", "maybe"), [
    (500, b"500 gateway error", True),  # a gateway's own answer: it may have forwarded the request
    (502, b"<html>bad gateway</html>", True),
    (503, b"", True),
    (504, b"upstream timed out", True),
    (500, body(1500, "internal error"), True),  # Feishu's internal error: maybe after the operation
    (503, body(123456, "unknown"), True),
    (429, b"too many", False),  # a limit refused it
    (429, body(99991400, "request trigger frequency limit"), False),
    (400, body(230020, "This operation triggers the frequency limit"), False),
    (400, body(230049, "The message is being sent"), False),
])
def test_answers_that_may_have_been_performed(status: int, raw: bytes, maybe: bool) -> None:
    outcome = classify(status, {}, raw)
    assert outcome.verdict is Verdict.RETRY and outcome.maybe_performed is maybe


def test_token_answers_and_final_answers_are_not_maybe_performed() -> None:
    assert not classify(400, {}, body(99991663)).maybe_performed  # REFRESH: refused before the API ran
    assert not classify(200, {}, body(0)).maybe_performed
    held = token_error(network_error(aiohttp.ServerDisconnectedError()))
    assert held.token_unavailable and not held.maybe_performed and held.msg.startswith("tenant_access_token:")
