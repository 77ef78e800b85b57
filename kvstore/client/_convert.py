"""Wire conversion for the SDK's calls over generated messages (kvstore.wire.pb).

Small messages (Lookup, Delete, Stats, SessionEvent) go through the generated
protobuf classes. The two bulk messages are encoded and decoded by hand,
because the generated classes copy payloads two or three times:

* ``PutChunk``: ``bytes(view)`` then ``SerializeToString`` (the upb encoder
  also allocates a fresh arena per message) costs ~1.5 ms per MiB here, while
  ``b"".join((header, view))`` is one copy (~30 µs per MiB).
* ``GetChunk``: ``FromString`` copies ``data`` into the arena, and every
  access to ``.data`` copies it again. :func:`decode_get_chunk` returns a
  ``memoryview`` into the received message instead, so a block is copied once,
  into its result (or the caller's buffer).

Both are plain protobuf wire format (tests check them against the generated
classes); unknown fields in a ``GetChunk`` are skipped, as protobuf requires.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvstore.types import (
    TIER_BY_CODE,
    AckLevel,
    ListedBlock,
    LookupResult,
    Pin,
    Prefetch,
    SessionEnd,
    SessionEventResult,
    SessionHint,
    StoreStats,
    TierName,
    TierStats,
    TurnEnd,
)
from kvstore.wire import lookup as lookup_wire

# Re-exported: the bulk-message codec is shared with the servicer.
from kvstore.wire.codec import GetChunkView, encode_put_chunk, encode_varint
from kvstore.wire.codec import decode_get_chunk as decode_get_chunk
from kvstore.wire.codec import identity as identity
from kvstore.wire.pb import kvstore_pb2 as pb

SERVICE = "/kvstore.v1.KVStore/"
PUT = SERVICE + "Put"
GET = SERVICE + "Get"
LOOKUP = SERVICE + "Lookup"
DELETE = SERVICE + "Delete"
STATS = SERVICE + "Stats"
SESSION_EVENT = SERVICE + "SessionEvent"
LIST_BLOCKS = SERVICE + "ListBlocks"
FLUSH = SERVICE + "Flush"

_TAG_DATA = b"\x32"  # PutChunk.data: field 6, length-delimited

def iter_put_messages(
    namespace: str,
    ack: AckLevel,
    blocks: Sequence[tuple[bytes, memoryview]],
    session_id: str,
    chunk_bytes: int,
    block_format: int = 0,
) -> Iterator[bytes]:
    """The serialized ``PutChunk`` stream for ``blocks`` (validated already).

    The first message carries namespace and ack; the first chunk of each block
    its key, size and session; each block's bytes follow in slices of at most
    ``chunk_bytes``, copied once (into the message).
    """
    first = True
    for key, view in blocks:
        size = len(view)
        head = encode_put_chunk(
            namespace=namespace if first else "",
            ack=int(ack) if first else 0,
            key=key,
            block_size=size,
            session_id=session_id,
            format=block_format,
        )
        first = False
        end = min(chunk_bytes, size)
        yield b"".join((head, _TAG_DATA, encode_varint(end), view[:end]))
        pos = end
        while pos < size:
            end = min(pos + chunk_bytes, size)
            yield b"".join((_TAG_DATA, encode_varint(end - pos), view[pos:end]))
            pos = end


def decode_put_response(raw: bytes) -> tuple[int, int]:
    resp = pb.PutResponse.FromString(raw)
    return resp.stored, resp.bytes


# --------------------------------------------------------------------------- Get


#: One decoded ``GetChunk``; ``data`` is a view into the received message.
GetPiece = GetChunkView


def encode_get_request(
    namespace: str, keys: Sequence[bytes], session_id: str, max_chunk_bytes: int
) -> bytes:
    return pb.GetRequest(
        namespace=namespace, keys=keys, session_id=session_id, max_chunk_bytes=max_chunk_bytes
    ).SerializeToString()


# --------------------------------------------------------------------------- small RPCs




def tier_name(value: int) -> TierName | None:
    return TIER_BY_CODE[value] if 0 <= value < len(TIER_BY_CODE) else None


def encode_lookup_request(
    namespace: str, keys: Sequence[bytes], lease_ms: int, session_id: str,
    lengths: set[int] | None = None,
) -> bytes:
    return lookup_wire.encode_lookup_request(namespace, keys, lease_ms, session_id, lengths)


def decode_lookup_response(raw: bytes) -> LookupResult:
    found, tiers = lookup_wire.decode_lookup_response(raw)
    return LookupResult(found=found, tiers=tiers)


def encode_delete_request(namespace: str, keys: Sequence[bytes]) -> bytes:
    return pb.DeleteRequest(namespace=namespace, keys=keys).SerializeToString()


def decode_delete_response(raw: bytes) -> int:
    return int(pb.DeleteResponse.FromString(raw).deleted)


def encode_stats_request(namespace: str = "") -> bytes:
    return pb.StatsRequest(namespace=namespace).SerializeToString()


def decode_stats_response(raw: bytes) -> StoreStats:
    resp = pb.StatsResponse.FromString(raw)
    tiers = []
    for t in resp.tiers:
        name = tier_name(int(t.tier))
        if name is None:  # a tier this SDK does not know: skip rather than fail
            continue
        tiers.append(
            TierStats(
                tier=name,
                blocks=t.blocks,
                bytes=t.bytes,
                capacity=t.capacity,
                hits=t.hits,
                misses=t.misses,
                evictions=t.evictions,
                demotions=t.demotions,
                promotions=t.promotions,
                corrupt=t.corrupt,
                available=not t.unavailable,
                used=t.used,
            )
        )
    return StoreStats(
        tiers=tiers,
        puts=resp.puts,
        gets=resp.gets,
        get_hits=resp.get_hits,
        session_events=resp.session_events,
        policy=resp.policy,
        namespace=resp.namespace,
    )


def encode_list_blocks_request(namespace: str, prefix: bytes, limit: int) -> bytes:
    return pb.ListBlocksRequest(namespace=namespace, prefix=prefix,
                                limit=limit).SerializeToString()


class ListBlocksPage:
    """One ListBlocksResponse: its blocks and whether the listing was cut."""

    __slots__ = ("blocks", "truncated")

    def __init__(self, blocks: list[ListedBlock], truncated: bool) -> None:
        self.blocks = blocks
        self.truncated = truncated


def decode_list_blocks_response(raw: bytes) -> ListBlocksPage:
    resp = pb.ListBlocksResponse.FromString(raw)
    blocks = []
    for b in resp.blocks:
        tiers = tuple(t for t in (tier_name(int(code)) for code in b.tiers) if t is not None)
        blocks.append(ListedBlock(b.key, b.size, tiers, b.age_ms / 1000.0))
    return ListBlocksPage(blocks, resp.truncated)


def encode_flush_request(namespace: str) -> bytes:
    return pb.FlushRequest(namespace=namespace).SerializeToString()


def decode_flush_response(raw: bytes) -> int:
    return int(pb.FlushResponse.FromString(raw).flushed)


def encode_session_event(namespace: str, session_id: str, event: SessionHint) -> bytes:
    req = pb.SessionEventRequest(namespace=namespace, session_id=session_id)
    if isinstance(event, TurnEnd):
        req.turn_end.reason = int(event.reason)  # type: ignore[assignment]
        req.turn_end.expected_gap_ms = event.expected_gap_ms
        req.turn_end.tool_name = event.tool_name
    elif isinstance(event, SessionEnd):
        req.session_end.SetInParent()
        req.session_end.discard = event.discard
    elif isinstance(event, Prefetch):
        req.prefetch.SetInParent()
        req.prefetch.keys.extend(event.keys)
    elif isinstance(event, Pin):
        req.pin.keys.extend(event.keys)
        req.pin.ttl_ms = event.ttl_ms
    else:
        req.unpin.keys.extend(event.keys)
    return req.SerializeToString()


def decode_session_event_response(raw: bytes) -> SessionEventResult:
    resp = pb.SessionEventResponse.FromString(raw)
    return SessionEventResult(resp.blocks, resp.bytes)


@dataclass(frozen=True, slots=True)
class DataPlaneOffer:
    """What OpenDataPlane answered (docs/dataplane.md)."""

    ticket: bytes
    tcp_address: str
    unix_path: str
    tls: bool
    max_meta_bytes: int
    max_payload_bytes: int


def encode_open_data_plane(shm_owner: str) -> bytes:
    return pb.OpenDataPlaneRequest(shm_owner=shm_owner).SerializeToString()


def decode_open_data_plane(raw: bytes) -> DataPlaneOffer:
    m = pb.OpenDataPlaneResponse.FromString(raw)
    return DataPlaneOffer(m.ticket, m.tcp_address, m.unix_path, m.tls, m.max_meta_bytes,
                          m.max_payload_bytes)
