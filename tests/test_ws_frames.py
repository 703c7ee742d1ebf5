"""relay.ws.frames against the official SDK's generated ``pbbp2.Frame`` (lark-oapi's vendored protobuf), both ways."""

from __future__ import annotations

import random

import feishu_requests  # noqa: F401  (closes the event loop lark_oapi.ws creates at import)
import pytest
from lark_oapi.ws.pb.pbbp2_pb2 import Frame as SdkFrame

from relay.ws.frames import CONTROL, DATA, Frame, FrameError, decode, encode


def sdk(frame: Frame) -> SdkFrame:
    out = SdkFrame()
    out.SeqID, out.LogID, out.service, out.method = frame.seq_id, frame.log_id, frame.service, frame.method
    for key, value in frame.headers:
        header = out.headers.add()
        header.key, header.value = key, value
    if frame.payload_encoding is not None:
        out.payload_encoding = frame.payload_encoding
    if frame.payload_type is not None:
        out.payload_type = frame.payload_type
    if frame.payload is not None:
        out.payload = frame.payload
    if frame.log_id_new is not None:
        out.LogIDNew = frame.log_id_new
    return out


EXAMPLES = [
    Frame(),  # every required field 0: still written
    Frame(service=7, method=CONTROL, headers=(("type", "ping"),)),
    Frame(seq_id=1, log_id=(1 << 64) - 1, service=-5, method=DATA,
          headers=(("type", "event"), ("message_id", "m1"), ("sum", "1"), ("seq", "0"), ("trace_id", "t"),
                   ("empty", ""), ("type", "dup")),
          payload=b'{"schema":"2.0","x":"\xe4\xbd\xa0"}', log_id_new="n-1"),
    Frame(seq_id=300, log_id=2, service=1 << 30, method=1, payload_encoding="", payload_type="json",
          payload=b""),
    Frame(seq_id=2, payload=bytes(range(256)) * 700),  # a payload over 128 KiB: a 3-byte length
]


@pytest.mark.parametrize("frame", EXAMPLES)
def test_bytes_equal_the_sdk_serialisation_and_read_back_both_ways(frame: Frame) -> None:
    ours = encode(frame)
    theirs = sdk(frame)
    assert ours == theirs.SerializeToString()
    assert decode(ours) == frame
    parsed = SdkFrame()
    parsed.ParseFromString(ours)  # the SDK's parser checks the required fields
    assert parsed == theirs


def test_required_fields_are_written_even_when_zero() -> None:
    ping = encode(Frame(headers=(("type", "ping"),)))
    assert ping.startswith(b"\x08\x00\x10\x00\x18\x00\x20\x00")
    assert SdkFrame.FromString(ping).IsInitialized()


def test_optional_presence_survives_an_echo() -> None:
    with_empty = Frame(payload=b"", payload_type="")
    assert decode(encode(with_empty)) == with_empty
    assert decode(encode(Frame())).payload is None


def test_unknown_fields_are_skipped_and_a_repeated_scalar_takes_the_last() -> None:
    data = encode(Frame(seq_id=1, service=3))
    data += b"\x58\x05"  # field 11, varint
    data += b"\x62\x02hi"  # field 12, bytes
    data += b"\x6d\x01\x02\x03\x04"  # field 13, fixed32
    data += b"\x71" + bytes(8)  # field 14, fixed64
    data += b"\x08\x09"  # SeqID again
    assert decode(data) == Frame(seq_id=9, service=3)


def test_random_frames_round_trip_with_the_sdk() -> None:
    rng = random.Random(7)
    for _ in range(300):
        frame = Frame(seq_id=rng.getrandbits(64), log_id=rng.getrandbits(rng.choice((7, 14, 64))),
                      service=rng.randint(-(1 << 31), (1 << 31) - 1), method=rng.choice((0, 1)),
                      headers=tuple((f"k{rng.randint(0, 9)}", "v" * rng.randint(0, 200))
                                    for _ in range(rng.randint(0, 6))),
                      payload=rng.randbytes(rng.randint(0, 3000)) if rng.random() < 0.8 else None,
                      log_id_new=str(rng.random()) if rng.random() < 0.5 else None)
        assert encode(frame) == sdk(frame).SerializeToString()
        assert decode(sdk(frame).SerializeToString()) == frame


@pytest.mark.parametrize("data", [
    b"\x08",  # truncated varint
    b"\x08" + b"\xff" * 10 + b"\x01",  # over-long varint
    b"\x42\x05abc",  # a length past the end
    b"\x0a\x01x",  # SeqID length-delimited
    b"\x40\x01",  # payload as a varint
    b"\x0b",  # a group (wire type 3)
    b"\x0f",  # reserved wire type 7
    b"\x00\x00",  # field number 0
    b"\x2a\x04\x0a\x02\xff\xfe",  # a header key that is not UTF-8
    b"\x2a\x03\x0a\x05a",  # a header whose key runs past the header
])
def test_malformed_frames_are_refused(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode(data)


def test_a_header_missing_its_value_reads_as_empty() -> None:
    assert decode(b"\x2a\x03\x0a\x01k").headers == (("k", ""),)


def test_out_of_range_values_are_not_encoded() -> None:
    with pytest.raises(FrameError):
        encode(Frame(seq_id=-1))
    with pytest.raises(FrameError):
        encode(Frame(service=1 << 31))


def test_header_takes_the_first() -> None:
    assert EXAMPLES[2].header("type") == "event"
    assert EXAMPLES[2].header("nope") is None
