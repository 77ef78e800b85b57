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
Used by the servicer and by the SDK; nothing here imports generated code.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from kvstore.types import TIER_BY_CODE, TierName
from kvstore.wire.codec import encode_varint, iter_fields, read_varint

_REQ_NAMESPACE = b"\x0a"  # 1, length-delimited
_REQ_KEY = 0x12  # 2, length-delimited
_REQ_LEASE_MS = b"\x18"  # 3, varint
_REQ_SESSION_ID = b"\x22"  # 4, length-delimited

_RESP_FOUND = 1  # varint
_RESP_TIERS = 2  # packed repeated enum (a sender may also write them one by one)

# Index = the kvstore.v1.Tier value.
_KNOWN_CODES = bytes(range(len(TIER_BY_CODE)))


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
    out = b"\x08" + encode_varint(found) if found else b""  # field 1, varint
    if codes:
        out += b"\x12" + encode_varint(len(codes)) + codes  # field 2, length-delimited
    return out


def decode_lookup_response(raw: bytes) -> tuple[int, list[TierName | None]]:
    """``(found, tiers)`` from a serialized ``LookupResponse``. Tier values
    this SDK does not know read as None (not stored here)."""
    found = 0
    codes: list[int] = []
    known = True  # every value is a tier this SDK knows
    for number, value in iter_fields(raw, "LookupResponse"):
        if number == _RESP_FOUND and isinstance(value, int):
            found = value
        elif number == _RESP_TIERS and isinstance(value, int):
            codes.append(value)  # written one by one (legal for a packed field)
            known = known and value < len(TIER_BY_CODE)
        elif number == _RESP_TIERS:
            packed = bytes(value)
            if not packed.translate(None, _KNOWN_CODES):
                codes.extend(packed)  # the common case: one known tier per byte
            elif max(packed) < 0x80:
                codes.extend(packed)
                known = False
            else:
                sub = memoryview(packed)
                p = 0
                while p < len(packed):
                    code, p = read_varint(sub, p)
                    codes.append(code)
                known = False
    table, n = TIER_BY_CODE, len(TIER_BY_CODE)
    if known and len(codes) > 1:
        return found, list(operator.itemgetter(*codes)(table))
    return found, [table[c] if c < n else None for c in codes]
