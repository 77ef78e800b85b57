"""Session hints over the wire: prefetch, pin/unpin with a quota, the session
policy in a live server."""

from __future__ import annotations

import os
import time

import pytest

from kvstore import Client
from kvstore.errors import CapacityExhausted, InvalidArgument
from kvstore.types import SessionEnd, TierName, TurnEnd, TurnEndReason

MiB = 1024**2


def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)  # bounded poll


def test_prefetch_by_session_brings_blocks_back_into_l1(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory(l1_capacity="8MiB") as server, Client(server.tcp, namespace="p") as c:
        chain = [f"s{i}".encode() for i in range(4)]
        c.put({k: os.urandom(MiB) for k in chain}, ack="local")
        assert c.lookup(chain, session_id="agent-1").found == 4
        for i in range(12):  # push the session's blocks out of L1
            c.put({f"x{i}".encode(): os.urandom(MiB)}, ack="local")
        assert c.lookup(chain).tiers == [TierName.L2] * 4
        before = {t.tier: t for t in c.stats().tiers}
        result = c.prefetch("agent-1")
        assert result.blocks == 4 and result.bytes == 4 * MiB
        wait_for(lambda: c.lookup(chain).tiers == [TierName.L1] * 4)
        # a prefetch is not a read: no hit or miss counted on any tier (L2
        # counted its 4 as hits: the hit ratios overstated L2)
        after = {t.tier: t for t in c.stats().tiers}
        for tier in (TierName.L1, TierName.L2):
            assert (after[tier].hits, after[tier].misses) == \
                (before[tier].hits, before[tier].misses), tier
        hits_before = c.stats().get_hits
        assert c.prefetch(keys=[b"x0", b"missing"]).blocks == 1
        assert c.stats().get_hits == hits_before  # a prefetch is not a hit


def test_pin_keeps_blocks_in_l1_within_the_quota(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--server-pin-quota", "0.5", l1_capacity="8MiB") as server, \
            Client(server.tcp, namespace="pin") as c:
        c.put({b"sys-prompt": os.urandom(MiB), b"tools": os.urandom(MiB)}, ack="local")
        assert c.pin([b"sys-prompt", b"tools"], ttl_ms=60_000).blocks == 2
        for i in range(16):
            c.put({f"f{i}".encode(): os.urandom(MiB)}, ack="local")
        assert c.lookup([b"sys-prompt", b"tools"]).tiers == [TierName.L1] * 2
        c.put({b"more": os.urandom(3 * MiB)}, ack="local")
        with pytest.raises(CapacityExhausted, match="pin quota"):
            c.pin([b"more"])  # 2 + 3 MiB > half of 8 MiB
        assert c.unpin([b"tools"]).blocks == 1
        assert c.pin([b"more"]).blocks == 1
        with pytest.raises(InvalidArgument):
            c.pin([b""])
        # A key named twice is one pin: counted once against the quota and in
        # the answer (it counted twice: 2 x 3 MiB was refused, 1 + 3 allowed).
        assert c.unpin([b"sys-prompt"]).blocks == 1
        pinned = c.pin([b"more", b"more"])
        assert (pinned.blocks, pinned.bytes) == (1, 3 * MiB)


def test_session_policy_serves_and_takes_hints(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--policy-name", "session", l1_capacity="16MiB") as server, \
            Client(server.tcp, namespace="sp") as c:
        assert c.stats().policy == "session"
        for turn in range(6):
            keys = [f"ctx{i}".encode() for i in range(turn + 2)]
            found = c.lookup(keys, session_id="a").found
            c.put({k: os.urandom(512 * 1024) for k in keys[found:]}, session_id="a")
            assert c.get(keys[:found], session_id="a") == c.get(keys[:found])
            c.session_event("a", TurnEnd(TurnEndReason.TOOL_CALL, 1200, "bash"))
        c.session_event("a", SessionEnd())
        assert c.lookup([b"ctx0", b"ctx1"]).found == 2


def test_client_clock_drives_policy_time(server_factory) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from kvstore.wire.pb import kvstore_pb2 as pb

    with server_factory("--policy-clock", "client", l1_capacity="8MiB") as server, \
            grpc.insecure_channel(server.tcp) as ch:
        lookup = ch.unary_unary("/kvstore.v1.KVStore/Lookup",
                                request_serializer=pb.LookupRequest.SerializeToString,
                                response_deserializer=pb.LookupResponse.FromString)
        req = pb.LookupRequest(namespace="clk", keys=[b"k"], session_id="s")
        lookup(req, metadata=[("kvstore-clock", "1234.5")])
        with pytest.raises(grpc.RpcError) as info:
            lookup(req, metadata=[("kvstore-clock", "soon")])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_pin_quota_counts_the_l1_pages_a_block_takes(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A 16-byte block takes a 4 KiB page of L1: the quota counts pages, so tiny
    blocks cannot pin all of L1 and lock every other namespace out of it."""
    with server_factory("--server-pin-quota", "0.25", l1_capacity="4MiB") as server, \
            Client(server.tcp, namespace="tiny") as c:
        keys = [f"t{i}".encode() for i in range(300)]
        c.put({k: b"x" * 16 for k in keys})
        assert c.pin(keys[:256], ttl_ms=600_000).blocks == 256  # 256 pages: 1 MiB, the quota
        with pytest.raises(CapacityExhausted, match="pin quota"):
            c.pin(keys[256:257])
        with Client(server.tcp, namespace="other") as other:
            other.put({b"big": os.urandom(2 * MiB)})  # three quarters of L1 are not pinned
            assert other.lookup([b"big"]).tiers == [TierName.L1]


def test_pins_of_deleted_blocks_are_dropped(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Pins of blocks deleted since do not count against the quota, nor pile up."""
    with server_factory("--server-pin-quota", "0.25", l1_capacity="4MiB") as server, \
            Client(server.tcp, namespace="churn") as c:
        for round_ in range(5):
            keys = [f"r{round_}-{i}".encode() for i in range(200)]
            c.put({k: b"y" * 100 for k in keys})
            assert c.pin(keys, ttl_ms=600_000).blocks == 200  # 200 pages < 256
            c.delete(keys)


def test_another_tenants_session_of_the_same_name_is_not_ours(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Session ids are each tenant's own names: a SessionEnd with discard from
    one namespace must not drop the blocks another namespace put under a
    session of the same name (before, they shared one stream in the policy)."""
    with server_factory("--policy-name", "session", l1_capacity="8MiB") as server, \
            Client(server.tcp, namespace="tenant-a") as a, \
            Client(server.tcp, namespace="tenant-b") as b:
        theirs = {f"b{i}".encode(): os.urandom(MiB) for i in range(2)}
        assert b.lookup(list(theirs), session_id="main").found == 0
        b.put(theirs, session_id="main")
        mine = {f"a{i}".encode(): os.urandom(MiB) for i in range(3)}
        assert a.lookup(list(mine), session_id="main").found == 0  # A's latest request
        a.put(mine, session_id="main")
        b.session_end("main", discard=True)  # tenant B's session "main" is over
        for i in range(12):  # push everything out of L1
            b.put({f"x{i}".encode(): os.urandom(MiB)})
        assert a.get(list(mine)) == list(mine.values())  # kept (in L2), byte for byte
        assert b.get(list(theirs)) == [None, None]  # B's own: discarded, as asked
