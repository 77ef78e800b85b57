"""The hand-written PutChunk/GetChunk codecs agree with the generated classes."""

from __future__ import annotations

import pytest

from kvstore.client import _convert as conv
from kvstore.types import AckLevel, SessionEnd, TierName, TurnEnd, TurnEndReason
from kvstore.wire.codec import read_varint
from kvstore.wire.pb import kvstore_pb2 as pb


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32 - 1, 2**63, 2**64 - 1])
def test_varint_roundtrip(value: int) -> None:
    raw = conv.encode_varint(value)
    assert read_varint(raw, 0) == (value, len(raw))
    # protobuf agrees
    assert pb.PutChunk.FromString(b"\x20" + raw).block_size == value


def test_encode_put_chunk_matches_protobuf() -> None:
    raw = conv.encode_put_chunk(namespace="ns-1", ack=2, key=b"\x00k", block_size=70000,
                                session_id="s1", data=memoryview(b"abc"))
    ref = pb.PutChunk(namespace="ns-1", ack=pb.ACK_LEVEL_LOCAL, key=b"\x00k", block_size=70000,
                      session_id="s1", data=b"abc")
    assert raw == ref.SerializeToString()
    assert conv.encode_put_chunk() == b""


def _parse_stream(messages: list[bytes]) -> list[pb.PutChunk]:
    return [pb.PutChunk.FromString(m) for m in messages]


def test_put_stream_layout() -> None:
    a = memoryview(bytes(range(256)) * 40)  # 10240 bytes
    b = memoryview(b"x" * 4096)
    c = memoryview(b"y")
    msgs = _parse_stream(list(conv.iter_put_messages(
        "ns", AckLevel.LOCAL, [(b"a", a), (b"b", b), (b"c", c)], "sess", 4096)))
    # a: 3 chunks (4096, 4096, 2048), b: 1 chunk, c: 1 chunk
    assert [len(m.data) for m in msgs] == [4096, 4096, 2048, 4096, 1]
    first = msgs[0]
    assert (first.namespace, first.ack, first.key, first.block_size, first.session_id) == (
        "ns", pb.ACK_LEVEL_LOCAL, b"a", 10240, "sess")
    for m in (msgs[1], msgs[2]):
        assert (m.namespace, m.ack, m.key, m.block_size, m.session_id) == ("", 0, b"", 0, "")
    for m, key, size in ((msgs[3], b"b", 4096), (msgs[4], b"c", 1)):
        assert (m.namespace, m.ack, m.key, m.block_size, m.session_id) == (
            "", 0, key, size, "sess")
    assert b"".join(m.data for m in msgs[:3]) == a.tobytes()


def test_put_stream_chunk_larger_than_block() -> None:
    msgs = _parse_stream(list(conv.iter_put_messages(
        "ns", AckLevel.MEMORY, [(b"k", memoryview(b"12345"))], "", 1 << 20)))
    assert len(msgs) == 1
    assert msgs[0].data == b"12345" and msgs[0].ack == pb.ACK_LEVEL_MEMORY
    assert msgs[0].session_id == ""


def test_decode_get_chunk_matches_protobuf() -> None:
    ref = pb.GetChunk(index=7, hit=True, block_size=1 << 33, offset=4096, data=b"payload",
                      tier=pb.TIER_L2)
    piece = conv.decode_get_chunk(ref.SerializeToString())
    assert piece.key_index == 7 and piece.hit and piece.block_size == 1 << 33
    assert piece.offset == 4096 and piece.tier == 2
    assert isinstance(piece.data, memoryview) and piece.data.tobytes() == b"payload"


def test_decode_get_chunk_defaults_and_unknown_fields() -> None:
    piece = conv.decode_get_chunk(b"")
    assert (piece.key_index, piece.hit, piece.block_size, piece.offset, piece.tier) == (
        0, False, 0, 0, 0)
    assert piece.data.tobytes() == b""
    base = pb.GetChunk(index=1, hit=True, data=b"zz").SerializeToString()
    # unknown fields of every wire type: varint (15), fixed64 (16), len (17), fixed32 (18)
    extra = (b"\x78\x05" + b"\x81\x01" + b"\x00" * 8 + b"\x8a\x01\x03abc"
             + b"\x95\x01" + b"\x00" * 4)
    piece = conv.decode_get_chunk(extra + base)
    assert piece.key_index == 1 and piece.hit and piece.data.tobytes() == b"zz"
    assert pb.GetChunk.FromString(extra + base).data == b"zz"  # what protobuf does too


@pytest.mark.parametrize("raw", [b"\x2a\x05ab", b"\x08", b"\x08\x80", b"\x0f"])
def test_decode_get_chunk_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ValueError):
        conv.decode_get_chunk(raw)


def test_small_messages() -> None:
    req = pb.GetRequest.FromString(conv.encode_get_request("ns", [b"a", b"b"], "s", 1 << 20))
    assert (req.namespace, list(req.keys), req.session_id, req.max_chunk_bytes) == (
        "ns", [b"a", b"b"], "s", 1 << 20)
    lk = conv.decode_lookup_response(
        pb.LookupResponse(found=1, tiers=[pb.TIER_L1, pb.TIER_UNSPECIFIED, pb.TIER_L3])
        .SerializeToString())
    assert lk.found == 1 and lk.tiers == [TierName.L1, None, TierName.L3]
    assert conv.decode_delete_response(pb.DeleteResponse(deleted=3).SerializeToString()) == 3
    st = conv.decode_stats_response(pb.StatsResponse(
        tiers=[pb.TierStats(tier=pb.TIER_L2, blocks=2, bytes=10, capacity=100, corrupt=1)],
        puts=5, gets=6, get_hits=4, session_events=1, policy="lru").SerializeToString())
    assert st.tiers[0].tier is TierName.L2 and st.tiers[0].corrupt == 1
    assert (st.puts, st.gets, st.get_hits, st.session_events, st.policy) == (5, 6, 4, 1, "lru")
    assert conv.decode_put_response(pb.PutResponse(stored=2, bytes=9).SerializeToString()) == (
        2, 9)


def test_session_event_encoding() -> None:
    raw = conv.encode_session_event("ns", "s1", TurnEnd(TurnEndReason.TOOL_CALL, 1500, "grep"))
    req = pb.SessionEventRequest.FromString(raw)
    assert req.WhichOneof("event") == "turn_end"
    assert (req.turn_end.reason, req.turn_end.expected_gap_ms, req.turn_end.tool_name) == (
        pb.TURN_END_REASON_TOOL_CALL, 1500, "grep")
    req = pb.SessionEventRequest.FromString(conv.encode_session_event("ns", "s1", SessionEnd()))
    assert req.WhichOneof("event") == "session_end"
