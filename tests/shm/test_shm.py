"""The same-host shared-memory protocol, end to end against a real server."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import Client
from kvstore.client.shm import ShmClient
from kvstore.errors import (
    ConnectionFailed,
    CorruptBlock,
    InvalidArgument,
    StaleLease,
    TierNotConfigured,
)
from kvstore.types import TierName
from kvstore.wire.pb import kvstore_pb2 as pb

MiB = 1024**2


@pytest.fixture
def shm_server(server_factory, tmp_path: Path) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}"
    server = server_factory("--l1-shm-path", path, "--server-shm-lease-ms", "1000",
                            "--server-shm-reserve-ms", "1000", l1_capacity="64MiB")
    with server:
        yield server
    assert not Path(path).exists() or not server.alive()


def block(i: int, size: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def test_round_trip_and_misses(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="s") as c:
        blobs = {f"k{i}".encode(): os.urandom(1000 + i * 77777) for i in range(10)}
        assert c.put(blobs).stored == 10
        assert c.get([b"k3", b"none", b"k9"]) == [blobs[b"k3"], None, blobs[b"k9"]]
        bufs = [bytearray(1 * MiB) for _ in range(2)]
        assert c.get_into([b"k1", b"k2"], bufs) == [len(blobs[b"k1"]), len(blobs[b"k2"])]
        assert bytes(bufs[0][: len(blobs[b"k1"])]) == blobs[b"k1"]
    # Blocks put through shared memory are ordinary blocks over gRPC too.
    with Client(shm_server.tcp, namespace="s") as c:
        assert c.get([b"k4"]) == [blobs[b"k4"]]


def test_concurrent_writers_and_readers_see_nothing_torn_or_stale(shm_server) -> None:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []
    stop = threading.Event()
    keys = [f"c{i}".encode() for i in range(8)]
    versions = {k: 0 for k in keys}
    payloads = {(k, v): block(hash((k, v)), 512 * 1024) for k in keys for v in range(6)}

    def writer(n: int) -> None:
        try:
            with ShmClient(shm_server.unix_target, namespace="cc") as c:
                for v in range(6):
                    for k in keys[n::2]:
                        c.put({k: payloads[(k, v)]})
                        versions[k] = v
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            with ShmClient(shm_server.unix_target, namespace="cc") as c:
                while not stop.is_set():
                    for k, got in zip(keys, c.get(keys), strict=True):
                        # Whatever is read is exactly one version ever written.
                        if got is not None:
                            assert any(got == payloads[(k, v)] for v in range(6)), k
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(120)
    stop.set()
    for t in readers:
        t.join(120)
    assert not errors, errors
    with ShmClient(shm_server.unix_target, namespace="cc") as c:
        assert c.get(keys) == [payloads[(k, 5)] for k in keys]


def test_killed_client_leases_expire_and_server_keeps_serving(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="kill") as c:
        c.put({f"h{i}".encode(): os.urandom(8 * MiB) for i in range(7)})  # 56 of 64 MiB
    script = textwrap.dedent(f"""
        import os, sys
        from kvstore.client.shm import ShmClient
        c = ShmClient({shm_server.unix_target!r}, namespace="kill")
        leases = c.acquire([f"h{{i}}".encode() for i in range(7)], lease_ms=1000)
        assert all(leases)
        print("leased", flush=True)
        os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert "leased" in proc.stdout and proc.returncode == -9, proc.stderr
    with ShmClient(shm_server.unix_target, namespace="kill") as c:
        # L1 has room for this block only once the dead client's leases on the
        # other 56 MiB expire (1 s): the Put waits for that, then succeeds.
        started = time.monotonic()
        c.put({b"big": os.urandom(16 * MiB)})
        assert time.monotonic() - started < 30
        stats = c.stats()
        assert stats.tiers[0].evictions >= 1
        assert c.get([b"h6"])[0] is not None


def test_forged_lease_ids_and_wrong_offsets_are_rejected(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="forge") as c:
        c.put({b"real": b"r" * 4096})
        leases = c.acquire([b"real"])
        assert leases[0] is not None
        with grpc.insecure_channel(shm_server.unix_target) as ch:
            release = ch.unary_unary("/kvstore.v1.KVStore/ShmRelease",
                                     request_serializer=pb.ShmReleaseRequest.SerializeToString,
                                     response_deserializer=pb.ShmReleaseResponse.FromString)
            with pytest.raises(grpc.RpcError) as info:
                release(pb.ShmReleaseRequest(lease_ids=[leases[0].lease_id ^ 0x5A5A5A]))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "never issued" in info.value.details()
        assert c.release(leases) == []

        slots = c.reserve([(b"w", 4096)])
        slots[0].view[:] = b"w" * 4096
        forged = type(slots[0])(b"w", slots[0].slot_id, slots[0].offset + 4096, 4096,
                                slots[0].view)
        with pytest.raises(InvalidArgument, match="do not match slot"):
            c.commit([forged])
        # The reservation named wrongly is gone: it cannot be committed later either.
        with pytest.raises(InvalidArgument,
                           match=r"is not reserved: unknown, expired .* or given up"):
            c.commit([slots[0]], [0])
        out_of_range = type(slots[0])(b"x", 12345, 2**40, 4096, memoryview(bytearray(4096)))
        with pytest.raises(InvalidArgument, match="unknown"):
            c.commit([out_of_range], [0])
        assert c.get([b"w"]) == [None]


def test_bad_checksum_is_never_visible(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="crc") as c:
        slots = c.reserve([(b"bad", 8192), (b"good", 8192)])
        slots[0].view[:] = b"a" * 8192
        slots[1].view[:] = b"b" * 8192
        with pytest.raises(CorruptBlock, match="CRC-32C"):
            c.commit(slots, [0xDEADBEEF, 0])
        assert c.get([b"bad", b"good"]) == [None, None]


def test_expired_lease_is_reported_stale(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="stale") as c:
        c.put({b"s": b"s" * 4096})
        with pytest.raises(StaleLease), c.leased([b"s"], lease_ms=50):
            deadline = time.monotonic() + 30
            with Client(shm_server.tcp, namespace="stale") as probe:
                # Wait (bounded) until the server has swept the expired lease:
                # the block can then be deleted and its slot reused.
                while probe.delete([b"s"]) == 0 and time.monotonic() < deadline:
                    pass
            time.sleep(0.1)  # let the 50 ms lease run out for sure


def test_shm_off_is_failed_precondition(shared_server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TierNotConfigured, match="shm_path"):
        ShmClient(shared_server.unix_target, namespace="x")


# -- one round trip per Get: releases piggybacked on the next ShmAcquire ----------------


def _raw_rpc(ch: grpc.Channel, name: str, req: type, resp: type):  # type: ignore[no-untyped-def]
    return ch.unary_unary(f"/kvstore.v1.KVStore/{name}", request_serializer=req.SerializeToString,
                          response_deserializer=resp.FromString)


def test_get_leaves_its_release_to_the_next_acquire_which_frees_the_slots(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Leases of 30 s: a slot still leased could not be reused within this test.
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-pig"
    server = server_factory("--l1-shm-path", path, "--server-shm-lease-ms", "30000",
                            l1_capacity="64MiB")
    with server, ShmClient(server.unix_target, namespace="pig") as c:
        assert c.release_on_acquire
        # 7 MiB: within the share of L1 (1/8) that may wait for the next
        # acquire (more is released at once: a get of most of L1 left no room
        # for the client's own next Put).
        blobs = {f"p{i}".encode(): block(i, MiB) for i in range(7)}
        c.put(blobs)
        bufs = [bytearray(MiB) for _ in blobs]
        assert c.get_into(list(blobs), bufs) == [MiB] * 7
        assert [bytes(b) for b in bufs] == list(blobs.values())
        # No ShmRelease was sent: the 7 leases wait for the next ShmAcquire ...
        assert len(c._deferred) == 7
        # ... which ends them (a miss, so it leases nothing new).
        assert c.get([b"none"]) == [None]
        assert c._deferred == []
        # Over the share: released at once, none left waiting.
        big = {f"q{i}".encode(): block(i, 4 * MiB) for i in range(3)}
        c.put(big)
        assert c.get(list(big)) == list(big.values())
        assert c._deferred == []
        # close() sends the releases still waiting.
        present = [k for k, got in zip(blobs, c.get(list(blobs)), strict=True) if got]
        assert c._deferred and present
        c.close()
        with ShmClient(server.unix_target, namespace="pig", timeout=10) as w:
            started = time.monotonic()
            assert w.put({b"big2": os.urandom(16 * MiB)}).stored == 1
            assert time.monotonic() - started < 5


def test_release_on_acquire_protocol(shm_server) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(shm_server.unix_target, namespace="rel") as c, \
            grpc.insecure_channel(shm_server.unix_target) as ch:
        c.put({b"a": b"a" * 4096, b"b": b"b" * 4096})
        attach = _raw_rpc(ch, "ShmAttach", pb.ShmAttachRequest, pb.ShmAttachResponse)
        acquire = _raw_rpc(ch, "ShmAcquire", pb.ShmAcquireRequest, pb.ShmAcquireResponse)
        release = _raw_rpc(ch, "ShmRelease", pb.ShmReleaseRequest, pb.ShmReleaseResponse)
        assert attach(pb.ShmAttachRequest()).release_on_acquire
        first = acquire(pb.ShmAcquireRequest(namespace="rel", keys=[b"a"]))
        assert first.leases[0].hit and first.lease_ms == 1000 and first.released == 0
        held = first.leases[0].lease_id

        # Ids not held ride along skipped: an acquire's ``release`` hands on
        # leases whose copies the client already judged good, and one that
        # is gone (released by an acquire whose answer was lost, or with its
        # data-plane session) must not fail the client's next Get.
        forged = acquire(pb.ShmAcquireRequest(namespace="rel", keys=[b"b"],
                                              release=[held ^ 0x5A5A5A]))
        assert forged.released == 0 and list(forged.expired) == [] and forged.leases[0].hit
        assert release(pb.ShmReleaseRequest(
            lease_ids=[forged.leases[0].lease_id], namespace="rel")).released == 1

        # The real one, piggybacked (named twice: released once), then the
        # new lease is taken.
        second = acquire(pb.ShmAcquireRequest(namespace="rel", keys=[b"b"],
                                              release=[held, held]))
        assert second.released == 1 and list(second.expired) == []
        assert second.leases[0].hit and second.leases[0].lease_id != held
        # Already released: skipped by an acquire, refused by ShmRelease (the
        # call whose answer tells a reader whether its copy is good).
        again = acquire(pb.ShmAcquireRequest(namespace="rel", keys=[b"a"], release=[held]))
        assert again.released == 0 and again.leases[0].hit
        assert release(pb.ShmReleaseRequest(
            lease_ids=[again.leases[0].lease_id], namespace="rel")).released == 1
        with pytest.raises(grpc.RpcError) as info:
            release(pb.ShmReleaseRequest(lease_ids=[held]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # An expired lease is reported as expired, not refused.
        late = second.leases[0].lease_id
        time.sleep(1.2)  # the leases last 1 s on this server
        third = acquire(pb.ShmAcquireRequest(namespace="rel", keys=[b"a"], release=[late]))
        assert third.released == 0 and list(third.expired) == [late]
        assert release(pb.ShmReleaseRequest(
            lease_ids=[third.leases[0].lease_id], namespace="rel")).released == 1


def test_slow_copy_is_released_at_once_and_checked(shm_server) -> None:  # type: ignore[no-untyped-def]
    """A copy that outlasts its lease never leaves its release for later: the
    Get releases at once and raises StaleLease when the lease had expired."""
    with ShmClient(shm_server.unix_target, namespace="slow") as c:
        c.put({b"s": b"s" * 4096})
        with pytest.raises(StaleLease), c._reading([b"s"], None, None) as leases:
            assert leases[0] is not None
            time.sleep(1.2)  # the lease lasts 1 s
        assert c._deferred == []
        # Within its time, the release is left for the next acquire; close sends it.
        assert c.get([b"s"]) == [b"s" * 4096]
        assert len(c._deferred) == 1


@pytest.mark.parametrize("read", ["get", "get_into"])
def test_a_reader_paused_past_its_lease_while_its_slot_is_reused_gets_stale_lease(
        server_factory, tmp_path: Path, read: str) -> None:  # type: ignore[no-untyped-def]
    """An engine paused after its ShmAcquire (SIGSTOP, a frozen cgroup, a long
    GC) for longer than the lease, while its block is replaced and the slot
    goes to another block: its copy fails the lease's CRC-32C. That is a
    stale lease (read again), not damaged data: StaleLease, which the engine
    link answers as a miss; it was CorruptBlock (DATA_LOSS), on which the
    link dropped its client."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-paused"
    server = server_factory("--l1-shm-path", path, "--server-shm-lease-ms", "300",
                            "--l2-enabled", "false", "--server-metrics-listen", "127.0.0.1:0",
                            l1_capacity="8MiB")
    old, new = b"o" * MiB, b"n" * MiB
    with server, ShmClient(server.unix_target, namespace="p") as c, \
            Client(server.tcp, namespace="p") as other:
        c.put({b"a": old})
        acquire = c._acquire

        def paused_acquire(*args, **kwargs):  # type: ignore[no-untyped-def]
            got = acquire(*args, **kwargs)
            # Paused here (the lease granted, nothing copied yet): the lease
            # runs out, "a" is deleted and every slot of L1 rewritten.
            deadline = time.monotonic() + 30
            while server.metric("kvstore_shm_leases") != 0:
                assert time.monotonic() < deadline, "the lease never expired"
            assert other.delete([b"a"]) == 1
            for i in range(12):
                other.put({f"f{i}".encode(): new})
            return got

        c._acquire = paused_acquire  # type: ignore[method-assign]
        with pytest.raises(StaleLease):
            if read == "get":
                c.get([b"a"])
            else:
                c.get_into([b"a"], [bytearray(MiB)])
        c._acquire = acquire  # type: ignore[method-assign]
        assert c.get([b"a"]) == [None]


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
def test_a_damaged_l1_copy_read_through_shared_memory_is_dropped_not_raised_each_time(
        server_factory, tmp_path: Path, data_plane: bool) -> None:  # type: ignore[no-untyped-def]
    """A writer paused past its reservation and the quarantine writes into
    the slot of a block stored there since (its lease checks fail under valid
    leases). The reader reads it again by a plain Get, on which the server
    checks the copy and drops it: a miss here (no other copy), the same on
    the next read. It was CorruptBlock on every read, the bad copy kept (the
    server never learnt of it), and the engine link dropped its client each
    time."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-damaged"
    server = server_factory("--l1-shm-path", path, "--l2-enabled", "false",
                            l1_capacity="16MiB")
    np = pytest.importorskip("numpy")
    pages = [np.arange(4 * 2 * 16, dtype=np.float16).reshape(4, 2, 1, 16)] * 2
    with server, ShmClient(server.unix_target, namespace="d", data_plane=data_plane) as c:
        c.put({b"a": b"a" * MiB, b"b": b"b" * MiB})
        assert c.put_kv([b"kv"], pages, pages, [[1, 2]]).stored == 1
        with c.leased([b"a", b"kv"]) as leases:
            for lease in leases:
                assert lease is not None
                lease.view[100:108] = b"late!!!!"  # the paused writer's bytes
        assert c.get([b"a", b"b"]) == [None, b"b" * MiB]
        assert c.get_into([b"a", b"b"], [bytearray(MiB), bytearray(MiB)]) == [None, MiB]
        out = [np.zeros((4, 2, 1, 16), np.float16) for _ in range(2)]
        assert c.get_kv_into([b"kv"], out, out, [[0, 1]]) == 0
        assert c.get_kv_into([b"kv"], out, out, [[0, 1]]) == 0
        assert [t.corrupt for t in c.stats().tiers if t.tier == TierName.L1] == [2]


def test_two_rpc_path_still_works(shm_server) -> None:  # type: ignore[no-untyped-def]
    """release_on_acquire=False (and a server without the field) use ShmRelease."""
    with ShmClient(shm_server.unix_target, namespace="old", release_on_acquire=False) as c:
        c.put({b"o": b"o" * 4096})
        bufs = [bytearray(4096)]
        for _ in range(3):
            assert c.get_into([b"o"], bufs) == [4096]
            assert c._deferred == []
        assert bytes(bufs[0]) == b"o" * 4096


def test_refused_acquire_still_ends_the_leases_it_carried(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An acquire the server refuses (here: a namespace it does not serve)
    must not strand releases: an acquire carries only its own namespace's
    (leases are bound to the namespace that took them), so those of another
    stay waiting and ``close`` sends them."""
    from kvstore.errors import UnknownNamespace

    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-ref"
    server = server_factory("--l1-shm-path", path, "--server-namespaces", "ok",
                            l1_capacity="64MiB")
    with server, ShmClient(server.unix_target, namespace="ok") as c, \
            grpc.insecure_channel(server.unix_target) as ch:
        c.put({b"k": b"k" * 4096})
        assert c.get([b"k"]) == [b"k" * 4096]
        [(held, _, ns, _)] = c._deferred
        assert ns == "ok"
        with pytest.raises(UnknownNamespace):
            c.get([b"k"], namespace="other")
        assert [d[0] for d in c._deferred] == [held]
        c.close()
        release = _raw_rpc(ch, "ShmRelease", pb.ShmReleaseRequest, pb.ShmReleaseResponse)
        with pytest.raises(grpc.RpcError) as info:
            release(pb.ShmReleaseRequest(lease_ids=[held], namespace="ok"))
        assert "already released" in info.value.details()


def test_gets_of_large_blocks_copy_with_streaming_stores(
        shm_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """One block of 256 KiB or more is copied out of shared memory with
    streaming stores (a 1 MiB Get per call is ~1/3 faster so); smaller copies
    keep ordinary stores; ``stream_get_bytes = None`` brings back the batch
    rule. The bytes read are the same either way."""
    import kvstore.client.shm as shm_module

    seen: list[tuple[int, object]] = []
    real = shm_module.copy_and_checksum

    def recording(dst, offset, src, seed=0, streaming=None):  # type: ignore[no-untyped-def]
        seen.append((len(memoryview(src)), streaming))
        return real(dst, offset, src, seed, streaming)

    monkeypatch.setattr(shm_module, "copy_and_checksum", recording)
    with ShmClient(shm_server.unix_target, namespace="nt") as c:
        blobs = {b"big": block(1, MiB), b"mid": block(2, 128 * 1024)}
        c.put(blobs)
        got = bytearray(MiB)
        seen.clear()
        assert c.get_into([b"big"], [got]) == [MiB]
        assert bytes(got) == blobs[b"big"]
        assert seen == [(MiB, True)]
        seen.clear()
        assert c.get_into([b"mid"], [got]) == [128 * 1024]
        assert bytes(got[:128 * 1024]) == blobs[b"mid"]
        assert seen == [(128 * 1024, None)]
        c.stream_get_bytes = None
        seen.clear()
        assert c.get_into([b"big"], [got]) == [MiB]
        assert seen == [(MiB, None)]


def test_puts_of_large_blocks_copy_with_streaming_stores(
        shm_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A Put copying 256 KiB or more into shared memory uses streaming stores
    (1 MiB per call ~10 % faster on the second development machine); a
    smaller one keeps ordinary stores, and ``stream_put_bytes = None`` brings
    back the 8 MiB batch rule. What is stored is the same either way."""
    import kvstore.client.shm as shm_module
    import kvstore.client.shm_dataplane as shm_dp_module

    seen: list[tuple[int, object]] = []

    def recorder(real):  # type: ignore[no-untyped-def]
        def recording(dst, offset, src, seed=0, streaming=None):  # type: ignore[no-untyped-def]
            seen.append((len(memoryview(src)), streaming))
            return real(dst, offset, src, seed, streaming)
        return recording

    for module in (shm_module, shm_dp_module):  # (either path may carry the Put)
        monkeypatch.setattr(module, "copy_and_checksum", recorder(module.copy_and_checksum))
    with ShmClient(shm_server.unix_target, namespace="ntp") as c:
        blobs = {b"big": block(3, MiB), b"mid": block(4, 128 * 1024), b"again": block(5, MiB)}
        c.put({b"big": blobs[b"big"]})
        assert seen == [(MiB, True)]
        seen.clear()
        c.put({b"mid": blobs[b"mid"]})
        assert seen == [(128 * 1024, None)]
        c.stream_put_bytes = None
        seen.clear()
        c.put({b"again": blobs[b"again"]})
        assert seen == [(MiB, None)]
        assert c.get(list(blobs)) == list(blobs.values())


def test_a_get_of_more_than_l1_holds_reads_without_leases(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Blocks that together exceed L1 cannot all be leased at once (the server refuses
    such an acquire at once): ShmClient reads them the way that holds no lease."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-over"
    server = server_factory("--l1-shm-path", path, l1_capacity="4MiB")
    with server, ShmClient(server.unix_target, namespace="over", timeout=20) as c:
        blobs = {f"o{i}".encode(): block(i, MiB) for i in range(6)}  # 6 MiB > 4 MiB of L1
        items = list(blobs.items())
        c.put(dict(items[:3]), ack="local")
        c.put(dict(items[3:]), ack="local")
        started = time.monotonic()
        assert c.get(list(blobs)) == list(blobs.values())
        bufs = [bytearray(MiB) for _ in blobs]
        assert c.get_into(list(blobs), bufs) == [MiB] * 6
        assert [bytes(b) for b in bufs] == list(blobs.values())
        assert time.monotonic() - started < 15


def test_a_get_of_more_blocks_than_l1_holds_does_not_wait_for_each_one(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One get of 20 x 4 MiB blocks (more than the 64 MiB of L1): once a block
    finds no L1 room, the later ones are read the way that holds no lease at
    once. Each waited a second for room this call's own leases held, and the
    whole get ran out a 5 s timeout (a plain Client took 0.2 s)."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-many"
    server = server_factory("--l1-shm-path", path, l1_capacity="64MiB")
    with server, ShmClient(server.unix_target, namespace="many", timeout=5) as c:
        blobs = {f"m{i}".encode(): block(i, 4 * MiB) for i in range(20)}
        for key, data in blobs.items():
            c.put({key: data}, ack="local")
        started = time.monotonic()
        assert c.get(list(blobs)) == list(blobs.values())
        assert time.monotonic() - started < 4


def test_a_client_shared_by_many_threads_holds_a_bounded_slot_stock(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each data-plane connection kept up to 8 MiB of reserved L1 in stock, and a
    ShmClient shared by n threads has n connections: 64 threads held 512 MiB of
    L1, and every client's Puts failed. All its stocks now share 16 MiB."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-stock"
    server = server_factory("--l1-shm-path", path, l1_capacity="256MiB")
    with server, ShmClient(server.unix_target, namespace="stock", timeout=20) as c:
        barrier = threading.Barrier(16)
        errors: list[BaseException] = []

        def put_some(i: int) -> None:
            barrier.wait(10)
            try:
                for n in range(12):
                    c.put({f"t{i}-{n}".encode(): block(i, MiB)})
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=put_some, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert c.stocked_slots() <= 16  # 1 MiB slots: 16 MiB in all
        assert c.get([b"t3-11"]) == [block(3, MiB)]


def test_after_a_graceful_restart_a_client_never_reads_the_old_arena(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A server stopped gracefully removes its arena file and the next one makes a new
    file: offsets it hands out point into that, not into the old mapping. The client
    says so (ConnectionFailed), never serving the old file's bytes; a new one works."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-restart"
    server = server_factory("--l1-shm-path", path, l1_capacity="16MiB").start()
    c = ShmClient(server.unix_target, namespace="rs", timeout=10)
    try:
        c.put({b"k": b"a" * 300_000})
        assert c.get([b"k"]) == [b"a" * 300_000]
        assert server.terminate() == 0
        server.start()
        with Client(server.tcp, namespace="rs") as plain:
            plain.put({b"k": b"z" * 300_000})
        for call in (lambda: c.get([b"k"]), lambda: c.acquire([b"k"]),
                     lambda: c.put({b"j": b"j" * 300_000})):
            with pytest.raises(ConnectionFailed, match="create a new ShmClient"):
                call()
        with ShmClient(server.unix_target, namespace="rs", timeout=10) as fresh:
            assert fresh.get([b"k"]) == [b"z" * 300_000]
    finally:
        c.close()
        server.kill()


def test_a_get_of_most_of_l1_leaves_room_for_the_next_put(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A Get's leases may wait for the client's next ShmAcquire to be
    released (one round trip saved), but not when they pin more than a share
    of L1: a Get of 14 MiB of a 16 MiB L1 kept them all, and the client's
    own next Put found no room (30 s, then "every block that could leave is
    leased")."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-deferred"
    server = server_factory("--l1-shm-path", path, "--l2-enabled", "false",
                            l1_capacity="16MiB")
    keys = [b"g%d" % i for i in range(14)]
    with server, ShmClient(server.unix_target, namespace="dl", timeout=10) as c:
        for i, k in enumerate(keys):
            c.put({k: block(i, MiB)})
        assert c.get(keys) == [block(i, MiB) for i in range(len(keys))]
        assert c.put({b"next": block(99, MiB)}).stored == 1
        assert c.get([b"next"]) == [block(99, MiB)]


def test_close_while_other_threads_call_fails_them_as_kvstore_errors(shm_server) -> None:  # type: ignore[no-untyped-def]
    """close() from one thread while others get and put: each call finishes,
    fails with a KVStoreError (ConnectionFailed: closed in flight), or, begun
    after the close, raises ValueError("the client is closed") -- never the
    bare ValueError of a released memoryview (3-4 per run before)."""
    from kvstore import KVStoreError

    c = ShmClient(shm_server.unix_target, namespace="cl", timeout=10)
    c.put({b"k": b"x" * 100_000})
    stop = threading.Event()
    running = threading.Barrier(7)
    unexpected: list[BaseException] = []
    done = [0]
    under_way = threading.Event()  # calls have been made on every thread

    def work(t: int) -> None:
        running.wait(10)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if i % 2:
                    c.get([b"k"])
                else:
                    c.put({b"k%d" % t: b"y" * 100_000})
                done[0] += 1
                if done[0] >= 200:
                    under_way.set()
            except KVStoreError:
                pass
            except ValueError as exc:
                if str(exc) != "the client is closed":
                    unexpected.append(exc)
            except BaseException as exc:
                unexpected.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    running.wait(10)
    assert under_way.wait(30), "the calls made no progress"
    c.close()
    stop.set()
    for t in threads:
        t.join(30)
    assert not unexpected, [repr(e) for e in unexpected[:5]]


def test_after_a_kill_the_old_servers_stocked_slots_are_not_written(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A server killed -9 leaves its arena file, and the next one maps it. A
    ShmClient over gRPC keeps a stock of slots reserved ahead for its next
    Puts: after the restart those were the old server's, and the new one gives
    their memory to other blocks. The client's next Put copied into one, over
    another client's stored block, before its commit was refused (an outside
    review). It now sees the arena's marker name a new server, drops the
    stock, and reserves: the Put succeeds and the other blocks stay whole."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-killstock"
    server = server_factory("--l1-shm-path", path, l1_capacity="8MiB").start()
    size = 64 * 1024

    def value(tag: bytes, i: int) -> bytes:
        return bytes([i % 256]) * (size - 16) + tag.ljust(16, b".")

    a = ShmClient(server.unix_target, namespace="ks", timeout=10, data_plane=False)
    try:
        for i in range(4):
            a.put({b"a%d" % i: value(b"a", i)})
        assert a.stocked_slots() >= 1
        assert server.proc is not None
        server.proc.kill()  # (not server.kill(): that removes the arena file too)
        server.proc.wait()
        server.start()
        keys = [b"b%d" % i for i in range(60)]
        with Client(server.tcp, namespace="ks", timeout=10) as b:
            for i, k in enumerate(keys):
                b.put({k: value(b"b", i)})
            a.put({b"a-new": value(b"A", 9)})
            assert b.get(keys) == [value(b"b", i) for i in range(len(keys))]
            assert b.get([b"a-new"]) == [value(b"A", 9)]
    finally:
        a.close()
        server.kill()


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
def test_a_block_held_only_in_l2_is_read_while_l1_is_full_of_leases(
        server_factory, tmp_path: Path, data_plane: bool) -> None:  # type: ignore[no-untyped-def]
    """When every L1 page is leased by another reader, a block held only in L2
    cannot be brought into L1 for a lease: ShmAcquire says it was found
    (hit false, its tier set) and ShmClient's reads (get, get_into,
    get_kv_into, acquire, leased) read it the way that holds no lease instead
    of reporting a miss (they reported one: the engine recomputed a block the
    store had)."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-leasedfull{data_plane:d}"
    server = server_factory("--l1-shm-path", path, l1_capacity="4MiB")
    with server, Client(server.tcp, namespace="lf", timeout=20) as writer, \
            ShmClient(server.unix_target, namespace="lf", timeout=20) as holder, \
            ShmClient(server.unix_target, namespace="lf", timeout=20,
                      data_plane=data_plane) as reader:
        cold = block(99, 256 * 1024)
        writer.put({b"cold": cold}, ack="local")
        np = pytest.importorskip("numpy")
        pages = [np.arange(4 * 2 * 16, dtype=np.float16).reshape(4, 2, 1, 16)] * 2
        assert writer.put_kv([b"coldkv"], pages, pages, [[1, 2]], ack="local").stored == 1
        hot = {f"h{i}".encode(): block(i, MiB) for i in range(4)}
        for key, value in hot.items():  # pushes "cold" out of L1 (it stays in L2)
            writer.put({key: value}, ack="local")
        leases = holder.acquire(list(hot))  # L1 is now all leased
        try:
            assert all(lease is not None for lease in leases)
            assert reader.get([b"cold", b"absent"]) == [cold, None]
            buf = bytearray(len(cold))
            assert reader.get_into([b"cold"], [buf]) == [len(cold)]
            assert bytes(buf) == cold
            out = [np.zeros((4, 2, 1, 16), np.float16) for _ in range(2)]
            assert reader.get_kv_into([b"coldkv", b"absent"], out, out, [[0, 1], [2, 3]]) == 1
            assert (out[0][:2] == pages[0][1:3]).all()
            found = reader.acquire([b"cold", b"absent"])
            assert found[1] is None
            assert found[0] is not None and found[0].lease_id == 0  # a copy, no lease
            assert bytes(found[0].view) == cold and found[0].size == len(cold)
            assert reader.release(found) == []
            with reader.leased([b"cold"]) as copies:
                assert copies[0] is not None and bytes(copies[0].view) == cold
        finally:
            holder.release(leases)
        assert reader.get([b"cold"]) == [cold]


def test_a_put_and_get_of_more_keys_than_one_frame_carries(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """16,384 blocks with 64-byte keys: their reserve frame is over the data
    plane's 1 MiB of metadata, so the SDK takes gRPC for them (the frame went
    out anyway: the server closed the connection, and the Put failed with
    "whether it took effect is unknown"). Within the 65,536-key bound."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}"
    with server_factory("--l1-shm-path", path, l1_capacity="128MiB") as server, \
            ShmClient(server.unix_target, namespace="many") as c:
        keys = [b"%064d" % i for i in range(16_384)]
        assert c.put({k: k[-2:] for k in keys}).stored == len(keys)
        got = c.get(keys)
        assert got == [k[-2:] for k in keys]
        assert c.put({b"after": b"x" * 5000}).stored == 1  # the session is still good


def test_a_client_never_maps_another_servers_arena_at_the_same_path(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A ShmClient that reached a server on another host (through a forward or a
    tunnel) opens the path that server names on its own host, where another
    kvstore may keep its arena. Made here by linking server B's arena file at
    the path server A names: attaching to A must refuse that file, before a
    single write into B's blocks, and refuse a stale file or none just as
    clearly."""
    a_path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-a"
    b_path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-b"
    a = server_factory("--l1-shm-path", a_path, l1_capacity="16MiB").start()
    b = server_factory("--l1-shm-path", b_path, l1_capacity="16MiB").start()
    moved = a_path + ".moved"
    try:
        with ShmClient(b.unix_target, namespace="b", timeout=10) as on_b:
            on_b.put({b"k": block(1, 300_000)})
        os.rename(a_path, moved)
        os.link(b_path, a_path)  # "another server's file at the same path"
        for data_plane in (True, False):
            with pytest.raises(ConnectionFailed, match="not the shared-memory arena of the server"):
                ShmClient(a.unix_target, namespace="a", timeout=10, data_plane=data_plane)
        os.unlink(a_path)
        Path(a_path).write_bytes(bytes(16 * MiB + 4096))  # a stale file
        with pytest.raises(ConnectionFailed, match="not the shared-memory arena of the server"):
            ShmClient(a.unix_target, namespace="a", timeout=10)
        os.unlink(a_path)
        with pytest.raises(ConnectionFailed, match="ShmClient works only on the server's own host"):
            ShmClient(a.unix_target, namespace="a", timeout=10)
        os.rename(moved, a_path)
        with ShmClient(a.unix_target, namespace="a", timeout=10) as on_a:
            on_a.put({b"k": block(2, 300_000)})
            assert on_a.get([b"k"]) == [block(2, 300_000)]
            # Every attached client may write the file: one that wipes the
            # marker must not lock every later client out.
            fd = os.open(a_path, os.O_WRONLY)
            try:
                os.pwrite(fd, bytes(4096), 16 * MiB)
            finally:
                os.close(fd)
            with ShmClient(a.unix_target, namespace="a", timeout=10) as later:
                assert later.get([b"k"]) == [block(2, 300_000)]
        with ShmClient(b.unix_target, namespace="b", timeout=10) as on_b:
            assert on_b.get([b"k"]) == [block(1, 300_000)]
    finally:
        if os.path.exists(moved):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(a_path)
            os.rename(moved, a_path)
        a.kill()
        b.kill()


def test_a_read_with_no_l1_room_for_a_lease_counts_one_get(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Found by a review: with L1 held by another client's leases, one
    ShmClient.get of a block in L2 counted two Gets, two hits and two L2
    hits (the acquire's read, answered Unleased, then the client's Get)."""
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-room"
    server = server_factory("--l1-shm-path", path, "--server-shm-lease-ms", "30000",
                            l1_capacity="2MiB")
    size = 512 * 1024
    blocks = {b"k%d" % i: block(i, size) for i in range(8)}
    with server, Client(server.tcp, namespace="room") as kv, \
            ShmClient(server.unix_target, namespace="room") as holder, \
            ShmClient(server.unix_target, namespace="room") as reader:
        kv.put(blocks, ack="local")  # the last four in L1 (2 MiB), all in L2
        in_l1 = [k for k, t in zip(blocks, kv.lookup(list(blocks)).tiers, strict=True)
                 if t == TierName.L1]
        leases = holder.acquire(in_l1, lease_ms=30_000)
        assert all(lease is not None for lease in leases)
        before = kv.stats()
        assert reader.get([b"k0"]) == [blocks[b"k0"]]
        after = kv.stats()
        holder.release(leases)
    assert (after.gets - before.gets, after.get_hits - before.get_hits) == (1, 1)
    l2 = [(a.hits - b.hits, a.misses - b.misses)
          for a, b in zip(after.tiers, before.tiers, strict=True) if a.tier == TierName.L2]
    assert l2 == [(1, 0)]
