"""Shared memory under careless and hostile clients (issue 12, items 3-6 and
the tenancy section), end to end against a real server."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import Client
from kvstore.client.shm import ShmClient
from kvstore.errors import (
    CapacityExhausted,
    InvalidArgument,
    PermissionDenied,
    ReservationExpired,
)
from kvstore.types import TierName
from kvstore.wire.pb import kvstore_pb2 as pb

MiB = 1024**2


def _shm_path(tmp_path: Path, tag: str) -> str:
    return f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-{tag}"


@pytest.fixture
def shm_server(server_factory, tmp_path: Path) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    server = server_factory("--l1-shm-path", _shm_path(tmp_path, "h"),
                            "--server-shm-lease-ms", "3000", "--server-shm-reserve-ms", "3000",
                            l1_capacity="64MiB")
    with server:
        yield server


def _wait_until(deadline: float) -> None:
    """Wait for a point in time (what is being waited for *is* the clock:
    a reservation's expiry)."""
    while time.monotonic() < deadline:
        time.sleep(0.02)


# -- item 3: a slot named twice in one ShmCommit ----------------------------------------


def test_slot_named_twice_in_one_commit_is_invalid_and_leaks_nothing(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="dup", timeout=10) as c:
        for named_twice in ("blocks", "blocks and abandon"):
            for _ in range(2):  # 4 x 16 MiB: all of L1, had any leaked
                [slot] = c.reserve([(b"d", 16 * MiB)])
                slot.view[:] = b"d" * (16 * MiB)
                again = type(slot)(slot.key, slot.slot_id, slot.offset, slot.size,
                                   c._arena[slot.offset : slot.offset + slot.size])
                with pytest.raises(InvalidArgument, match="named twice"):
                    if named_twice == "blocks":
                        c.commit([slot, again])
                    else:
                        c.commit([slot], abandon=[again])
        assert c.get([b"d"]) == [None]
        # Nothing leaked: all of L1 can be reserved at once, without waiting.
        started = time.monotonic()
        slots = c.reserve([(f"f{i}".encode(), 16 * MiB) for i in range(4)])
        assert time.monotonic() - started < 5
        c.commit([], abandon=slots)


# -- item 4: one ShmReserve larger than L1, and one that waits for room -----------------


def test_reserve_larger_than_l1_fails_at_once(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="big", timeout=60) as c:
        started = time.monotonic()
        with pytest.raises(CapacityExhausted, match="more than its capacity"):
            c.reserve([(f"b{i}".encode(), 24 * MiB) for i in range(4)])
        assert time.monotonic() - started < 5
        # Nothing was kept: L1 is whole again.
        slots = c.reserve([(b"x", 60 * MiB)])
        c.commit([], abandon=slots)


def test_slots_of_one_reserve_never_overlap_while_it_waits_for_room(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="wait", timeout=60) as holder, \
            ShmClient(shm_server.unix_target, namespace="wait", timeout=60) as c:
        holder.put({b"h0": b"0" * (20 * MiB), b"h1": b"1" * (20 * MiB)})
        # 40 MiB leased for 6.5 s: the second and third slots below wait for
        # them, longer than a reservation lives (3 s on this server).
        leases = holder.acquire([b"h0", b"h1"], lease_ms=6500)
        assert all(leases)
        slots = c.reserve([(f"w{i}".encode(), 20 * MiB) for i in range(3)])
        extents = sorted((s.offset, s.offset + s.size) for s in slots)
        for (_, end), (start, _) in itertools.pairwise(extents):
            assert end <= start, extents
        # And they are all still the client's: the whole batch commits.
        for i, s in enumerate(slots):
            s.view[:] = bytes([i]) * s.size
        assert c.commit(slots).stored == 3
        holder.release(leases)
        assert c.get([b"w0", b"w1", b"w2"]) == [bytes([i]) * (20 * MiB) for i in range(3)]


# -- item 5: a late writer ----------------------------------------------------------------


def test_late_writer_never_corrupts_what_get_serves(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="slow", timeout=60) as late:
        [slot] = late.reserve([(b"late", 16 * MiB)])
        # The writer stalls past its reservation (and the server's sweep).
        _wait_until(slot.deadline + 0.5)
        # The client refuses to write or commit a slot it no longer holds.
        with pytest.raises(ReservationExpired, match="reserve again"):
            slot.check_writable()
        with pytest.raises(ReservationExpired):
            late.commit([slot])
        # Another tenant fills L1 meanwhile.
        blobs = {f"v{i}".encode(): bytes([0x40 + i]) * (16 * MiB) for i in range(4)}
        with Client(shm_server.unix_target, namespace="victim", timeout=60) as victim:
            assert victim.put(blobs, ack="local").stored == 4
            # The slow writer, ignoring all that, writes into its old extent.
            late._arena[slot.offset : slot.offset + slot.size] = b"\xee" * slot.size
            got = victim.get(list(blobs))
        for key, data in zip(blobs, got, strict=True):
            assert data is None or data == blobs[key], key
        assert sum(data is not None for data in got) == 4


# -- item 6: leases and reservations belong to who took them ------------------------------


def test_another_client_cannot_release_or_abandon_what_is_not_its_own(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="owner", timeout=10) as a, \
            ShmClient(shm_server.unix_target, namespace="thief", timeout=10) as other_ns, \
            ShmClient(shm_server.unix_target, namespace="owner", timeout=10) as same_ns:
        a.put({b"k": b"k" * 8192})
        leases = a.acquire([b"k"], lease_ms=10_000)
        lease_id = leases[0].lease_id  # type: ignore[union-attr]
        [slot] = a.reserve([(b"r", 8192)])
        for thief, ns in ((other_ns, "thief"), (same_ns, "owner"), (other_ns, "owner")):
            with pytest.raises(PermissionDenied, match="another client"):
                thief._release_ids([lease_id], ns)
            with pytest.raises(PermissionDenied, match="another client"):
                thief._call(thief._commit, pb.ShmCommitRequest(
                    namespace=ns, owner=thief._owner, abandon=[slot.slot_id]))
            with pytest.raises(PermissionDenied, match="another client"):
                thief._call(thief._commit, pb.ShmCommitRequest(namespace=ns, owner=thief._owner,
                            blocks=[pb.ShmCommitBlock(slot_id=slot.slot_id, offset=0, size=1)]))
        # A raw call with neither namespace nor owner is refused the same way.
        with grpc.insecure_channel(shm_server.unix_target) as ch:
            release = ch.unary_unary("/kvstore.v1.KVStore/ShmRelease",
                                     request_serializer=pb.ShmReleaseRequest.SerializeToString,
                                     response_deserializer=pb.ShmReleaseResponse.FromString)
            with pytest.raises(grpc.RpcError) as info:
                release(pb.ShmReleaseRequest(lease_ids=[lease_id]))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The owner's lease and reservation are untouched.
        assert bytes(leases[0].view) == b"k" * 8192  # type: ignore[union-attr]
        assert a.release(leases) == []
        slot.view[:] = b"r" * 8192
        assert a.commit([slot]).stored == 1
        assert a.get([b"r"]) == [b"r" * 8192]


# -- tenancy: which namespaces may use shared memory ---------------------------------------


def test_shm_namespaces_limits_who_may_map_the_arena(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--l1-shm-path", _shm_path(tmp_path, "ns"),
                            "--server-shm-namespaces", "trusted,also", l1_capacity="64MiB")
    with server:
        with pytest.raises(PermissionDenied, match="shm_namespaces"):
            ShmClient(server.unix_target, namespace="tenant")
        with ShmClient(server.unix_target, namespace="trusted") as c:
            assert c.put({b"t": b"t" * 4096}).stored == 1
            assert c.get([b"t"]) == [b"t" * 4096]
            assert c.put({b"a": b"a" * 4096}, namespace="also").stored == 1
            for call in (lambda: c.put({b"x": b"x" * 4096}, namespace="tenant"),
                         lambda: c.get([b"x"], namespace="tenant")):
                with pytest.raises(PermissionDenied, match="may not use shared memory"):
                    call()
        # The namespace keeps the ordinary gRPC path.
        with Client(server.unix_target, namespace="tenant") as plain:
            assert plain.put({b"x": b"x" * 4096}).stored == 1
            assert plain.get([b"x"]) == [b"x" * 4096]


def test_a_reservation_of_all_of_l1_does_not_stall_another_clients_l2_reads(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One client's reservation of the whole of L1 leaves no room to promote into: a
    read of a block in L2 waits about a second for room, then is served from L2
    without promotion (it waited 30 s, server.shm_reserve_ms)."""
    server = server_factory("--l1-shm-path", _shm_path(tmp_path, "fair"),
                            l1_capacity="8MiB")
    with server, Client(server.tcp, namespace="reader", data_plane=False) as reader, \
            ShmClient(server.unix_target, namespace="hog", timeout=60) as hog:
        data = os.urandom(MiB)
        reader.put({b"cold": data}, ack="local")
        for i in range(8):  # push it out of L1: it is in L2 only
            reader.put({f"f{i}".encode(): os.urandom(MiB)}, ack="local")
        assert reader.lookup([b"cold"]).tiers == [TierName.L2]
        slots = hog.reserve([(b"all", 8 * MiB)])  # every page of L1
        started = time.monotonic()
        assert reader.get([b"cold"]) == [data]
        assert time.monotonic() - started < 10
        hog.commit([], abandon=slots)


def test_a_shm_reserve_or_commit_of_more_blocks_than_a_request_may_name_is_refused(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every request names at most 65,536 keys (docs/protocol.md): ShmReserve
    granted 70,000 slots (and 185,000 made an answer no stock client can
    receive, its slots reserved until they expired); a ShmCommit's duplicate
    check was quadratic in the ids it named."""
    from kvstore.wire.pb import kvstore_pb2 as pb
    from kvstore.wire.pb import kvstore_pb2_grpc as pb_grpc
    server = server_factory("--l1-shm-path", _shm_path(tmp_path, "many"), l1_capacity="64MiB")
    with server, grpc.insecure_channel(server.tcp) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        owner = stub.ShmAttach(pb.ShmAttachRequest(), timeout=30).owner
        too_many = 65_537
        with pytest.raises(grpc.RpcError) as refused:
            stub.ShmReserve(pb.ShmReserveRequest(
                namespace="many", owner=owner,
                blocks=[pb.ShmBlockSpec(size=1)] * too_many), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "names 65537 blocks; at most 65536" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            stub.ShmCommit(pb.ShmCommitRequest(
                namespace="many", owner=owner,
                blocks=[pb.ShmCommitBlock(slot_id=i + 1, size=1) for i in range(too_many)]),
                timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "names 65537 blocks; at most 65536" in refused.value.details()
        ok = stub.ShmReserve(pb.ShmReserveRequest(namespace="many", owner=owner,
                                                  blocks=[pb.ShmBlockSpec(size=1)] * 8),
                             timeout=30)
        assert len(ok.slots) == 8


def test_a_shm_put_of_more_blocks_than_a_request_may_name_is_split(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Client.put stores 65,537 blocks; ShmClient.put sent them in one
    ShmReserve, which the server now refuses past 65,536 blocks. (The split
    comes before the path is chosen: the gRPC one, quicker here, stands for
    both.)"""
    data_plane = False
    server = server_factory("--l1-shm-path", _shm_path(tmp_path, "split"),
                            "--l1-page-bytes", "1024", l1_capacity="128MiB")
    n = 65_537
    with server, ShmClient(server.unix_target, namespace="many", data_plane=data_plane) as c:
        blocks = {b"k%06d" % i: b"%016d" % i for i in range(n)}
        result = c.put(blocks)
        assert (result.stored, result.bytes) == (n, 16 * n)
        assert c.get([b"k000000", b"k065536"]) == [b"%016d" % 0, b"%016d" % 65536]


def test_the_attach_answer_gives_the_lease_acquires_are_granted(  # type: ignore[no-untyped-def]
        server_factory, tmp_path: Path) -> None:
    """Found by a protocol review: under a server.max_lease_ms below
    server.shm_lease_ms, ShmAttach said leases last 30 s while every acquire
    was granted 5 s, so a client trusting the answer read past its leases."""
    from kvstore.wire.pb import kvstore_pb2_grpc as pb_grpc
    server = server_factory("--l1-shm-path", _shm_path(tmp_path, "lease"),
                            "--server-max-lease-ms", "5000", l1_capacity="16MiB")
    with server, Client(server.tcp, namespace="l") as c, \
            grpc.insecure_channel(server.tcp) as channel:
        c.put({b"k": b"k" * 4096})
        stub = pb_grpc.KVStoreStub(channel)
        attach = stub.ShmAttach(pb.ShmAttachRequest(), timeout=30)
        got = stub.ShmAcquire(pb.ShmAcquireRequest(namespace="l", keys=[b"k"],
                                                   owner=attach.owner), timeout=30)
        assert attach.default_lease_ms == got.lease_ms == 5000
