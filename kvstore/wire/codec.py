"""Hand-written protobuf wire codec for the two bulk messages.

``PutChunk`` and ``GetChunk`` carry block bytes. The generated protobuf
classes copy a payload two or three times per message (into the upb arena on
parse, again on every ``.data`` access, and on serialize), which costs more
than the network itself at GB/s. These functions produce and read the same
wire format (tests check them against the generated classes) with at most one
copy: encoding joins a small header with a memoryview of the payload, decoding
returns a memoryview into the received message. Unknown fields are skipped,
as protobuf requires, so newer peers stay compatible within v1.

Used by the servicer and by the SDK; nothing here imports generated code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple


class WireError(ValueError):
    """Bytes that are not a well-formed message of the expected type."""

# Field tags: (number << 3) | wire type.
_PUT_NAMESPACE = b"\x0a"  # 1, length-delimited
_PUT_ACK = b"\x10"  # 2, varint
_PUT_KEY = b"\x1a"  # 3, length-delimited
_PUT_BLOCK_SIZE = b"\x20"  # 4, varint
_PUT_SESSION_ID = b"\x2a"  # 5, length-delimited
_PUT_DATA = b"\x32"  # 6, length-delimited
_PUT_FORMAT = b"\x38"  # 7, varint

_GET_INDEX = b"\x08"  # 1, varint
_GET_HIT = b"\x10"  # 2, varint
_GET_BLOCK_SIZE = b"\x18"  # 3, varint
_GET_OFFSET = b"\x20"  # 4, varint
_GET_DATA = b"\x2a"  # 5, length-delimited
_GET_TIER = b"\x30"  # 6, varint

_EMPTY = memoryview(b"")


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varints encode non-negative integers here")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        try:
            b = buf[pos]
        except IndexError:
            raise ValueError("truncated varint") from None
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def iter_fields(raw: bytes, message: str) -> Iterator[tuple[int, int | memoryview]]:
    """The fields of one flat message in order, repeated ones included:
    (field number, value), varints as int and length-delimited fields as a
    memoryview into ``raw``; fixed-width fields are skipped. WireError when
    the bytes are not a well-formed message."""
    pos = 0
    end = len(raw)
    view = memoryview(raw)
    try:
        while pos < end:
            tag, pos = read_varint(raw, pos)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                value, pos = read_varint(raw, pos)
                yield number, value
            elif wire == 2:
                length, pos = read_varint(raw, pos)
                if pos + length > end:
                    raise ValueError("truncated length-delimited field")
                yield number, view[pos : pos + length]
                pos += length
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise ValueError(f"unsupported wire type {wire}")
    except ValueError as exc:
        raise WireError(f"undecodable {message}: {exc}") from None
    if pos != end:
        raise WireError(f"undecodable {message}: truncated")


def _fields(raw: bytes, message: str) -> dict[int, int | memoryview]:
    """Parse one flat message: field number -> last value (see iter_fields)."""
    return dict(iter_fields(raw, message))


# --------------------------------------------------------------------------- PutChunk


class PutChunkView(NamedTuple):
    namespace: str
    ack: int
    key: bytes
    block_size: int
    session_id: str
    data: memoryview
    format: int = 0


def _text(value: int | memoryview | None, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        raise WireError(f"field {field} has the wrong wire type")
    try:
        return bytes(value).decode()
    except UnicodeDecodeError:
        raise WireError(f"field {field} is not valid UTF-8") from None


def _blob(value: int | memoryview | None, field: str) -> memoryview:
    if value is None:
        return _EMPTY
    if isinstance(value, int):
        raise WireError(f"field {field} has the wrong wire type")
    return value


def _int(value: int | memoryview | None, field: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, int):
        raise WireError(f"field {field} has the wrong wire type")
    return value


class BadPutChunk(NamedTuple):
    """What the server's deserializer yields for undecodable bytes, so that the
    servicer answers INVALID_ARGUMENT instead of gRPC's generic INTERNAL."""

    error: str


def decode_put_chunk_or_error(raw: bytes) -> PutChunkView | BadPutChunk:
    try:
        return decode_put_chunk(raw)
    except WireError as exc:
        return BadPutChunk(str(exc))


def decode_put_chunk(raw: bytes) -> PutChunkView:
    f = _fields(raw, "PutChunk")
    return PutChunkView(
        _text(f.get(1), "namespace"),
        _int(f.get(2), "ack"),
        bytes(_blob(f.get(3), "key")),
        _int(f.get(4), "block_size"),
        _text(f.get(5), "session_id"),
        _blob(f.get(6), "data"),
        _int(f.get(7), "format"),
    )


def encode_put_chunk(*, namespace: str = "", ack: int = 0, key: bytes = b"",
                     block_size: int = 0, session_id: str = "",
                     data: bytes | memoryview = b"", format: int = 0) -> bytes:
    """One serialized ``PutChunk`` (fields in number order, defaults omitted)."""
    parts: list[bytes | memoryview] = []
    if namespace:
        ns = namespace.encode()
        parts += (_PUT_NAMESPACE, encode_varint(len(ns)), ns)
    if ack:
        parts += (_PUT_ACK, encode_varint(ack))
    if key:
        parts += (_PUT_KEY, encode_varint(len(key)), key)
    if block_size:
        parts += (_PUT_BLOCK_SIZE, encode_varint(block_size))
    if session_id:
        sid = session_id.encode()
        parts += (_PUT_SESSION_ID, encode_varint(len(sid)), sid)
    if len(data):
        parts += (_PUT_DATA, encode_varint(len(data)), data)
    if format:
        parts += (_PUT_FORMAT, encode_varint(format))
    return b"".join(parts)


def put_data_prefix(length: int) -> bytes:
    """The bytes that precede ``length`` bytes of data in a PutChunk."""
    return _PUT_DATA + encode_varint(length)


# --------------------------------------------------------------------------- GetChunk


class GetChunkView(NamedTuple):
    key_index: int
    hit: bool
    block_size: int
    offset: int
    data: memoryview
    tier: int


def encode_get_chunk(index: int, hit: bool, block_size: int = 0, offset: int = 0,
                     data: bytes | memoryview = b"", tier: int = 0) -> bytes:
    """One serialized ``GetChunk``; the payload is copied once, into it."""
    parts: list[bytes | memoryview] = []
    if index:
        parts += (_GET_INDEX, encode_varint(index))
    if hit:
        parts.append(_GET_HIT + b"\x01")
    if block_size:
        parts += (_GET_BLOCK_SIZE, encode_varint(block_size))
    if offset:
        parts += (_GET_OFFSET, encode_varint(offset))
    if len(data):
        parts += (_GET_DATA, encode_varint(len(data)), data)
    if tier:
        parts += (_GET_TIER, encode_varint(tier))
    return b"".join(parts)


def decode_get_chunk(raw: bytes) -> GetChunkView:
    """Parse a ``GetChunk`` without copying its data."""
    f = _fields(raw, "GetChunk")
    return GetChunkView(
        _int(f.get(1), "index"),
        _int(f.get(2), "hit") != 0,
        _int(f.get(3), "block_size"),
        _int(f.get(4), "offset"),
        _blob(f.get(5), "data"),
        _int(f.get(6), "tier"),
    )


def identity(message: bytes) -> bytes:
    return message
