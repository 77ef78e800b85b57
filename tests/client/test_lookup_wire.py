"""The hand-written Lookup codec writes and reads the same bytes as the
generated protobuf classes (so peers in any language interoperate)."""

from __future__ import annotations

import pytest

from kvstore.types import TierName
from kvstore.wire import lookup as lookup_wire
from kvstore.wire.codec import WireError
from kvstore.wire.pb import kvstore_pb2 as pb


@pytest.mark.parametrize("keys", [
    [b"k" * 32] * 3,  # equal lengths: the one-join path
    [i.to_bytes(32, "big") for i in range(1000)],
    [b"a", b"bb" * 10, b"c" * 64],  # mixed lengths
    [b"\x00" * 32, b"\xff" * 31],
    [],
])
@pytest.mark.parametrize("lease_ms,session", [(0, ""), (1500, "agent-7"), (2**32 - 1, "s")])
def test_request_parses_as_the_generated_message(keys: list[bytes], lease_ms: int,
                                                 session: str) -> None:
    raw = lookup_wire.encode_lookup_request("team-a", keys, lease_ms, session)
    msg = pb.LookupRequest.FromString(raw)
    assert (msg.namespace, list(msg.keys), msg.lease_ms, msg.session_id) == \
        ("team-a", keys, lease_ms, session)
    assert raw == pb.LookupRequest(namespace="team-a", keys=keys, lease_ms=lease_ms,
                                   session_id=session).SerializeToString()


@pytest.mark.parametrize("codes", [b"", b"\x01\x02\x03\x00", bytes([1]) * 1000, b"\x00\x00"])
def test_response_matches_the_generated_message(codes: bytes) -> None:
    found = codes.find(0) if 0 in codes else len(codes)
    raw = lookup_wire.encode_lookup_response(found, codes)
    assert raw == pb.LookupResponse(found=found, tiers=list(codes)).SerializeToString()
    assert lookup_wire.decode_lookup_response(raw) == (
        found, [None if c == 0 else TierName(c) for c in codes])


def test_response_reader_takes_unpacked_tiers_unknown_values_and_unknown_fields() -> None:
    # Tiers written one by one (legal for a packed field), a tier value from
    # a newer server (7, read as not stored) and an unknown field 9.
    raw = b"\x08\x02" + b"\x10\x01" + b"\x10\x03" + b"\x12\x02\x07\x02" + b"\x4a\x03abc"
    assert lookup_wire.decode_lookup_response(raw) == (
        2, [TierName.L1, TierName.L3, None, TierName.L2])
    big = pb.LookupResponse(found=0, tiers=[1, 300]).SerializeToString()  # 2-byte varint
    assert lookup_wire.decode_lookup_response(big) == (0, [TierName.L1, None])


@pytest.mark.parametrize("raw", [b"\x12\x05\x01", b"\x08", b"\x4a\x09ab"])
def test_truncated_responses_are_errors(raw: bytes) -> None:
    with pytest.raises((WireError, ValueError)):
        lookup_wire.decode_lookup_response(raw)
