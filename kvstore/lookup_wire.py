"""Hand-written wire codec for ``LookupRequest`` / ``LookupResponse``.

Lookup is the call an engine makes before every prefill, with a chain of up
to thousands of keys, so its fixed costs matter: building a generated
message of 1,000 keys costs ~90 µs, and a generated response holds its tiers
as a repeated enum that costs one Python int per key on both sides. Here:

* the request's keys are joined in one ``bytes.join`` when they all have the
  same length (block keys are 32 bytes): ``tag len key tag len key ...`` is
  ``sep + sep.join(keys)`` with ``sep = tag len``;
* the response's tiers are a packed repeated enum, and as every tier value is
  below 128 each one is a single byte: ``bytes(codes)`` is the field's payload.

The bytes are plain protobuf (tests compare them with the generated classes),
so peers in any language read and write them; unknown fields are skipped.
Used by the servicer and by the SDK; nothing here imports ``_pb2``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from kvstore.types import TierName
from kvstore.wire import WireError, encode_varint, read_varint

_REQ_NAMESPACE = b"\x0a"  # 1, length-delimited
_REQ_KEY = 0x12  # 2, length-delimited
_REQ_LEASE_MS = b"\x18"  # 3, varint
_REQ_SESSION_ID = b"\x22"  # 4, length-delimited

_RESP_FOUND = b"\x08"  # 1, varint
_RESP_TIERS_PACKED = b"\x12"  # 2, length-delimited (packed)
_RESP_TIERS_TAG_PACKED = 0x12
_RESP_TIERS_TAG_UNPACKED = 0x10  # 2, varint: a sender may also write them one by one
_RESP_FOUND_TAG = 0x08

# Index = the kvstore.v1.Tier value.
_TIER_BY_CODE: tuple[TierName | None, ...] = (None, TierName.L1, TierName.L2, TierName.L3)
_KNOWN_CODES = bytes(range(len(_TIER_BY_CODE)))


def _length_delimited(tag: bytes, value: bytes) -> bytes:
    return tag + encode_varint(len(value)) + value


def encode_lookup_request(namespace: str, keys: Sequence[bytes], lease_ms: int = 0,
                          session_id: str = "", lengths: set[int] | None = None) -> bytes:
    """A serialized ``LookupRequest`` (keys validated already: 1..64 bytes;
    ``lengths``, the set of their lengths, if the caller has it)."""
    parts = []
    if namespace:
        parts.append(_length_delimited(_REQ_NAMESPACE, namespace.encode()))
    if keys:
        first = len(keys[0])
        if len(lengths if lengths is not None else set(map(len, keys))) == 1:
            sep = bytes((_REQ_KEY, first))  # lengths < 128: one-byte varint
            parts.append(sep + sep.join(keys))
        else:
            parts.append(b"".join(bytes((_REQ_KEY, len(key))) + key for key in keys))
    if lease_ms:
        parts.append(_REQ_LEASE_MS + encode_varint(lease_ms))
    if session_id:
        parts.append(_length_delimited(_REQ_SESSION_ID, session_id.encode()))
    return b"".join(parts)


def encode_lookup_response(found: int, codes: bytes) -> bytes:
    """A serialized ``LookupResponse``: ``codes`` holds one ``kvstore.v1.Tier``
    value (0-3) per key."""
    out = _RESP_FOUND + encode_varint(found) if found else b""
    if codes:
        out += _RESP_TIERS_PACKED + encode_varint(len(codes)) + codes
    return out


def decode_lookup_response(raw: bytes) -> tuple[int, list[TierName | None]]:
    """``(found, tiers)`` from a serialized ``LookupResponse``. Tier values
    this SDK does not know read as None (not stored here)."""
    found = 0
    codes: list[int] = []
    pos, end = 0, len(raw)
    view = memoryview(raw)
    while pos < end:
        tag, pos = read_varint(view, pos)
        if tag == _RESP_TIERS_TAG_PACKED:
            length, pos = read_varint(view, pos)
            if pos + length > end:
                raise WireError("LookupResponse: truncated tiers")
            packed = raw[pos:pos + length]
            pos += length
            if not packed.translate(None, _KNOWN_CODES):
                # Every value a known tier (one byte each): the common case.
                if not codes and pos >= end and len(packed) > 1:
                    return found, list(
                        operator.itemgetter(*packed)(_TIER_BY_CODE))
                codes.extend(packed)
            elif max(packed) < 0x80:
                codes.extend(packed)  # one byte per value
            else:
                sub = memoryview(packed)
                p = 0
                while p < len(packed):
                    value, p = read_varint(sub, p)
                    codes.append(value)
        elif tag == _RESP_TIERS_TAG_UNPACKED:
            value, pos = read_varint(view, pos)
            codes.append(value)
        elif tag == _RESP_FOUND_TAG:
            found, pos = read_varint(view, pos)
        else:
            pos = _skip(view, pos, tag)
    table, n = _TIER_BY_CODE, len(_TIER_BY_CODE)
    if max(codes, default=0) < n:
        return found, list(map(table.__getitem__, codes))
    return found, [table[c] if c < n else None for c in codes]


def _skip(view: memoryview, pos: int, tag: int) -> int:
    wire_type = tag & 7
    if wire_type == 0:
        return read_varint(view, pos)[1]
    if wire_type == 1:
        pos += 8
    elif wire_type == 2:
        length, pos = read_varint(view, pos)
        pos += length
    elif wire_type == 5:
        pos += 4
    else:
        raise WireError(f"LookupResponse: unsupported wire type {wire_type}")
    if pos > len(view):
        raise WireError("LookupResponse: truncated field")
    return pos
