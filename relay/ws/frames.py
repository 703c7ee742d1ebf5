"""``pbbp2.Frame``, the long connection's protobuf message: a codec of its nine fields (pure, no I/O).

The frame (proto2; Feishu's SDKs ship the same ``pbbp2.proto``)::

    field  name              type      presence   meaning
    1      SeqID             uint64    required   frame sequence (0 in a ping)
    2      LogID             uint64    required   Feishu's log id (0 in a ping)
    3      service           int32     required   the ``service_id`` of the connection URL
    4      method            int32     required   0 control (ping/pong), 1 data (event/card)
    5      headers           Header*   repeated   ``Header{key string =1 required, value string =2 required}``
    6      payload_encoding  string    optional
    7      payload_type      string    optional
    8      payload           bytes     optional   the event JSON, a ClientConfig JSON, or our answer
    9      LogIDNew          string    optional

Why a hand codec and not the ``protobuf`` package with a generated module: the format is nine fields of three wire
types (varint, length-delimited, and the embedded ``Header``), about a hundred lines; a generated module is tied
to the protobuf runtime it was generated for (which is why Feishu's Python SDK vendors a whole copy of protobuf
inside itself), and the package would be a run-time dependency with a C extension for this one message. The
codec is checked byte for byte against the official SDK's generated ``Frame`` in the tests, both ways.

Rules a hand encoder must keep: fields 1-4 are proto2 *required*, so they are always written, even when 0 (a
parser that checks required fields refuses a frame without them; a ping is ``SeqID=0, LogID=0``). Each header
writes both its key and its value, even empty. The optional fields are written only when present (``None`` is
absent, ``b""`` is present and empty), so a frame echoed back keeps exactly the fields it came with.

Decoding is lenient where protobuf is (unknown fields skipped, a scalar repeated: the last wins, a missing
required field read as 0) and strict where a malformed frame could hurt: every length is checked against the
buffer, a varint is at most 10 bytes, strings must be UTF-8, and groups (wire types 3/4) and the reserved wire
types 6/7 are refused. Any such frame raises :class:`FrameError`.
"""

from __future__ import annotations

from typing import Final

import msgspec

CONTROL: Final = 0
DATA: Final = 1

_U64: Final = (1 << 64) - 1
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


class FrameError(ValueError):
    """The bytes are not a well-formed ``pbbp2.Frame``."""


class Frame(msgspec.Struct, frozen=True, kw_only=True):
    """One frame; ``headers`` in their wire order (a key may repeat: :meth:`header` takes the first)."""

    seq_id: int = 0
    log_id: int = 0
    service: int = 0
    method: int = CONTROL
    headers: tuple[tuple[str, str], ...] = ()
    payload_encoding: str | None = None
    payload_type: str | None = None
    payload: bytes | None = None
    log_id_new: str | None = None

    def header(self, key: str) -> str | None:
        """The first value of header ``key``, or None."""
        for name, value in self.headers:
            if name == key:
                return value
        return None


# --- encoding ------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= _U64  # an int32 below 0 is written as its 64-bit two's complement (10 bytes), as protobuf does
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _length_delimited(field: int, data: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(data)) + data


def encode(frame: Frame) -> bytes:
    """The frame's wire bytes (fields in number order, 1-4 always; see the module docstring)."""
    if not 0 <= frame.seq_id <= _U64 or not 0 <= frame.log_id <= _U64:
        raise FrameError("SeqID and LogID are uint64")
    if not -(1 << 31) <= frame.service < 1 << 31 or not -(1 << 31) <= frame.method < 1 << 31:
        raise FrameError("service and method are int32")
    parts = [_key(1, _VARINT), _varint(frame.seq_id), _key(2, _VARINT), _varint(frame.log_id),
             _key(3, _VARINT), _varint(frame.service), _key(4, _VARINT), _varint(frame.method)]
    for name, value in frame.headers:
        parts.append(_length_delimited(5, _length_delimited(1, name.encode()) + _length_delimited(2, value.encode())))
    if frame.payload_encoding is not None:
        parts.append(_length_delimited(6, frame.payload_encoding.encode()))
    if frame.payload_type is not None:
        parts.append(_length_delimited(7, frame.payload_type.encode()))
    if frame.payload is not None:
        parts.append(_length_delimited(8, frame.payload))
    if frame.log_id_new is not None:
        parts.append(_length_delimited(9, frame.log_id_new.encode()))
    return b"".join(parts)


# --- decoding ------------------------------------------------------------------------------------------------


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    if i >= len(data):
        raise FrameError("truncated varint")
    byte = data[i]
    if byte < 0x80:  # the common case: one byte
        return byte, i + 1
    value = shift = 0
    for j in range(i, min(i + 10, len(data))):
        byte = data[j]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _U64, j + 1
        shift += 7
    raise FrameError("truncated or over-long varint")


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field, wire type, value) of every field: an int for varints and fixed types, bytes for the rest."""
    out: list[tuple[int, int, int | bytes]] = []
    i, end = 0, len(data)
    while i < end:
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise FrameError("field number 0")
        value: int | bytes
        if wire == _VARINT:
            value, i = _read_varint(data, i)
        elif wire == _BYTES:
            length, i = _read_varint(data, i)
            if length > end - i:
                raise FrameError("length past the end of the frame")
            value, i = data[i:i + length], i + length
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            if size > end - i:
                raise FrameError("truncated fixed-width field")
            value, i = int.from_bytes(data[i:i + size], "little"), i + size
        else:
            raise FrameError(f"unsupported wire type {wire}")
        out.append((field, wire, value))
    return out


def _text(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise FrameError("a string field is not UTF-8") from None


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF  # protobuf truncates an int32 varint to its low 32 bits
    return value - (1 << 32) if value >= 1 << 31 else value


def _header(data: bytes) -> tuple[str, str]:
    key = value = ""
    for field, wire, raw in _fields(data):
        if wire == _BYTES and isinstance(raw, bytes):
            if field == 1:
                key = _text(raw)
            elif field == 2:
                value = _text(raw)
    return key, value


def decode(data: bytes) -> Frame:
    """Read a frame (see the module docstring for what is refused); raises :class:`FrameError`."""
    seq_id = log_id = service = method = 0
    headers: list[tuple[str, str]] = []
    strings: dict[int, str] = {}
    payload: bytes | None = None
    for field, wire, value in _fields(data):
        if field <= 4:
            if wire != _VARINT or not isinstance(value, int):
                raise FrameError(f"field {field} is not a varint")
            if field == 1:
                seq_id = value
            elif field == 2:
                log_id = value
            elif field == 3:
                service = _int32(value)
            else:
                method = _int32(value)
        elif field <= 9:
            if wire != _BYTES or not isinstance(value, bytes):
                raise FrameError(f"field {field} is not length-delimited")
            if field == 5:
                headers.append(_header(value))
            elif field == 8:
                payload = value
            else:
                strings[field] = _text(value)
        # any other field: unknown, skipped (a newer Feishu may add one)
    return Frame(seq_id=seq_id, log_id=log_id, service=service, method=method, headers=tuple(headers),
                 payload_encoding=strings.get(6), payload_type=strings.get(7), payload=payload,
                 log_id_new=strings.get(9))
