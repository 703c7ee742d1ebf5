"""relay.ws.protocol: endpoint answers, handshake refusals, reconnect delays, liveness, reassembly, answers."""

from __future__ import annotations

import base64
import json
import random

import pytest

from relay.ws.frames import DATA, Frame, decode, encode
from relay.ws.protocol import (
    ClientConfig,
    Connect,
    DataHeaders,
    Liveness,
    Reassembly,
    Reconnect,
    Retry,
    Stop,
    answer,
    data_headers,
    ping,
    read_config,
    read_endpoint,
    read_handshake_refusal,
)

DEFAULT = ClientConfig()


def endpoint(code: int = 0, url: str | None = "wss://msg-frontier.feishu.cn/ws/v2?device_id=d1&service_id=33",
             config: dict[str, int] | None = None, msg: str = "") -> bytes:
    data: dict[str, object] = {}
    if url is not None:
        data["URL"] = url
    if config is not None:
        data["ClientConfig"] = config
    return json.dumps({"code": code, "msg": msg, "data": data}).encode()


def test_endpoint_ok_gives_url_service_and_config_in_seconds() -> None:
    config = {"ReconnectCount": -1, "ReconnectInterval": 120, "ReconnectNonce": 30, "PingInterval": 90}
    verdict = read_endpoint(200, endpoint(config=config), DEFAULT)
    assert isinstance(verdict, Connect)
    assert verdict.service_id == 33 and verdict.device_id == "d1"
    assert verdict.config == ClientConfig(reconnect_count=-1, reconnect_interval=120, reconnect_nonce=30,
                                          ping_interval=90)


def test_endpoint_without_config_keeps_the_current_one() -> None:
    current = ClientConfig(ping_interval=5)
    verdict = read_endpoint(200, endpoint(), current)
    assert isinstance(verdict, Connect) and verdict.config == current


@pytest.mark.parametrize(("status", "body", "kind"), [
    (200, endpoint(code=1), Retry),  # system busy
    (200, endpoint(code=1000040343), Retry),  # internal error
    (200, endpoint(code=1000040345), Retry),  # "system busy" seen in the wild; the SDKs stop on it
    (200, endpoint(code=10014, msg="app secret invalid"), Stop),
    (503, b"<html>gateway</html>", Retry),
    (429, b"", Retry),
    (404, b"", Stop),
    (200, b"not json", Retry),
    (200, endpoint(url=None), Retry),
    (200, endpoint(url="https://x/y?service_id=1"), Retry),
    (200, endpoint(url="wss://x/y?service_id=abc"), Retry),
])
def test_endpoint_failures_are_classified(status: int, body: bytes, kind: type) -> None:
    assert isinstance(read_endpoint(status, body, DEFAULT), kind)


def test_the_reason_never_carries_more_than_the_code_and_message() -> None:
    verdict = read_endpoint(200, endpoint(code=99, msg="x" * 1000), DEFAULT)
    assert isinstance(verdict, Stop) and len(verdict.reason) < 260


@pytest.mark.parametrize(("status", "headers", "kind"), [
    (400, {"Handshake-Status": "514", "Handshake-Autherrcode": "1000040350", "Handshake-Msg": "limit"}, Stop),
    (400, {"handshake-status": "403", "handshake-msg": "forbidden"}, Stop),  # header names in any case
    (403, {}, Stop),
    (400, {"Handshake-Status": "514", "Handshake-Autherrcode": "1000040351"}, Retry),  # another auth error
    (500, {"Handshake-Status": "500"}, Retry),
    (502, {}, Retry),
    (400, {"Handshake-Status": "x"}, Retry),
])
def test_handshake_refusals(status: int, headers: dict[str, str], kind: type) -> None:
    assert isinstance(read_handshake_refusal(status, headers), kind)


def test_pong_config_replaces_but_never_with_a_non_positive_interval() -> None:
    new = read_config(b'{"PingInterval": 0, "ReconnectInterval": 7, "ReconnectNonce": 2, "ReconnectCount": 3}')
    assert new is not None
    merged = ClientConfig(ping_interval=50).merged(new)
    assert merged.ping_interval == 50 and merged.reconnect_interval == 7 and merged.reconnect_nonce == 2
    assert read_config(None) is None and read_config(b"") is None and read_config(b"{oops") is None


def test_reconnect_first_jitter_then_interval_plus_jitter_and_starts_over_when_connected() -> None:
    config = ClientConfig(reconnect_interval=10, reconnect_nonce=4)
    reconnect = Reconnect(random.Random(1))
    delays = [reconnect.delay(config) for _ in range(50)]
    assert 0 <= delays[0] <= 4
    assert all(10 <= d <= 14 for d in delays[1:])
    assert len(set(delays)) == 50  # jittered, not lock-step
    reconnect.connected()
    assert reconnect.delay(config) <= 4 and reconnect.attempts == 1


def test_reconnect_is_for_ever_whatever_the_count() -> None:
    reconnect = Reconnect(random.Random(2))
    config = ClientConfig(reconnect_count=2, reconnect_interval=1, reconnect_nonce=0)
    assert [reconnect.delay(config) for _ in range(5)] == [0, 1, 1, 1, 1]


def test_liveness_counts_from_the_last_frame_received() -> None:
    config = ClientConfig(ping_interval=120)
    live = Liveness(now=1000.0, grace=30.0)
    assert live.remaining(1100.0, config) == 50.0
    live.received(1100.0)
    assert live.remaining(1249.0, config) == 1.0
    assert live.remaining(1250.0, config) <= 0


def test_ping_frame_is_what_the_sdk_sends() -> None:
    assert ping(33) == Frame(seq_id=0, log_id=0, service=33, method=0, headers=(("type", "ping"),))


def event_frame(**headers: str) -> Frame:
    base = {"type": "event", "message_id": "m1", "sum": "1", "seq": "0", "trace_id": "t1",
            "instance_id": "inst-9", **headers}
    return Frame(seq_id=5, log_id=77, service=33, method=DATA, headers=tuple(base.items()), payload=b'{"a":1}',
                 log_id_new="ln")


def test_answer_echoes_the_frame_and_adds_biz_rt_and_the_payload() -> None:
    frame = event_frame()
    got = decode(encode(answer(frame, 200, b'{"toast":{}}', 12.6)))
    assert (got.seq_id, got.log_id, got.service, got.method, got.log_id_new) == (5, 77, 33, DATA, "ln")
    assert got.headers == (*frame.headers, ("biz_rt", "13"))
    body = json.loads(got.payload or b"")
    assert body == {"code": 200, "data": base64.b64encode(b'{"toast":{}}').decode()}


def test_answer_without_data_omits_it_and_biz_rt_is_never_negative() -> None:
    got = answer(event_frame(), 500, None, -3)
    assert json.loads(got.payload or b"") == {"code": 500}
    assert got.header("biz_rt") == "0"


def test_data_headers_default_to_one_whole_frame_and_refuse_non_numbers() -> None:
    frame = Frame(method=DATA, headers=(("type", "card"),))
    assert data_headers(frame) == DataHeaders(type="card", message_id="", sum=1, seq=0, trace_id="")
    assert data_headers(event_frame(sum="x")) is None


def frag(message_id: str, total: int, seq: int) -> DataHeaders:
    return DataHeaders(type="event", message_id=message_id, sum=total, seq=seq, trace_id="")


def test_reassembly_joins_in_seq_order_whatever_the_arrival_order() -> None:
    r = Reassembly(ttl=5, max_bytes=1000, max_event_bytes=100)
    assert r.add(frag("m", 3, 2), b"C", 0) is None
    assert r.add(frag("m", 3, 0), b"A", 0) is None
    assert r.size == 2
    assert r.add(frag("m", 3, 1), b"B", 0) == b"ABC"
    assert len(r) == 0 and r.size == 0


def test_a_whole_frame_passes_straight_through() -> None:
    r = Reassembly(ttl=5, max_bytes=10, max_event_bytes=10)
    assert r.add(frag("m", 1, 0), b"whole", 0) == b"whole"
    assert len(r) == 0


def test_incomplete_events_expire_after_the_ttl() -> None:
    r = Reassembly(ttl=5, max_bytes=1000, max_event_bytes=100)
    r.add(frag("m", 2, 0), b"A", 0.0)
    assert r.add(frag("m", 2, 1), b"B", 5.0) is None  # too late: the first half is gone, this starts anew
    assert r.dropped == 1 and len(r) == 1
    assert r.add(frag("m", 2, 0), b"A", 6.0) == b"AB"


def test_memory_is_bounded_the_oldest_going_first() -> None:
    r = Reassembly(ttl=60, max_bytes=10, max_event_bytes=8)
    for i in range(5):
        r.add(frag(f"m{i}", 2, 0), b"xxxx", float(i))
    assert r.size <= 10 and r.dropped == 3
    assert r.add(frag("m4", 2, 1), b"y", 9) == b"xxxxy"  # the newest survived


def test_one_event_larger_than_allowed_is_dropped() -> None:
    r = Reassembly(ttl=60, max_bytes=1000, max_event_bytes=8)
    r.add(frag("m", 3, 0), b"xxxx", 0)
    assert r.add(frag("m", 3, 1), b"xxxxx", 0) is None
    assert len(r) == 0 and r.size == 0 and r.dropped == 1


@pytest.mark.parametrize("bad", [frag("m", 2, 2), frag("m", 2, -1), frag("m", Reassembly.MAX_FRAGMENTS + 1, 0)])
def test_malformed_fragments_are_refused(bad: DataHeaders) -> None:
    r = Reassembly(ttl=60, max_bytes=1000, max_event_bytes=100)
    assert r.add(bad, b"x", 0) is None
    assert len(r) == 0


def test_a_sum_that_changes_starts_the_event_over() -> None:
    r = Reassembly(ttl=60, max_bytes=1000, max_event_bytes=100)
    r.add(frag("m", 2, 0), b"A", 0)
    assert r.add(frag("m", 3, 1), b"B", 0) is None
    assert r.dropped == 1 and r.size == 1
    assert r.add(frag("m", 3, 0), b"A", 0) is None
    assert r.add(frag("m", 3, 2), b"C", 0) == b"ABC"


def test_a_repeated_fragment_replaces_the_first_copy() -> None:
    r = Reassembly(ttl=60, max_bytes=1000, max_event_bytes=100)
    r.add(frag("m", 2, 0), b"old", 0)
    r.add(frag("m", 2, 0), b"A", 0)
    assert r.size == 1
    assert r.add(frag("m", 2, 1), b"B", 0) == b"AB"
