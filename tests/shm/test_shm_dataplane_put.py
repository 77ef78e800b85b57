"""ShmClient over the data plane (issue 14): one SHM_COMMIT frame per Put once
the session has slots in stock, the fallback to reserve + commit against a
server that does not offer it, a crashed client's slots given up, small Gets
inline, and the checks (stale lease, corrupt slot) on the lean path.

Frames are counted on the client (every shared-memory frame goes through
``Connection.call`` or ``Connection.call_flags``) and on the server (its
``kvstore_dataplane_requests`` counter)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kvstore.client.shm as shm_module
from kvstore import Client
from kvstore.client.dataplane import Connection
from kvstore.client.shm import ShmClient
from kvstore.dataplane.frames import FLAG_SHM_NEXT, FLAG_SHM_VOUCHED, Op
from kvstore.errors import InvalidArgument, InvalidKey, StaleLease

pytest.importorskip("prometheus_client", reason="prometheus-client is the kvstore[metrics] extra")

MiB = 1024**2


def block(i: int, size: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (size // 32 + 1))[:size]


@pytest.fixture
def server(server_factory, tmp_path: Path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-dpput"
    # Reservations outlive every bounded wait here (60 s): a slot that goes
    # away was given up, not expired.
    srv = server_factory("--l1-shm-path", path, "--server-shm-reserve-ms", "60000",
                         "--server-shm-lease-ms", "1000",
                         "--server-metrics-listen", "127.0.0.1:0", l1_capacity="64MiB")
    with srv:
        yield srv


def wait_for(what: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # polling a server gauge, bounded
    return True


@pytest.fixture
def frames_sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(opcode, header flags) of every frame the SDK sends through
    Connection.call / call_flags."""
    sent: list[tuple[int, int]] = []
    real_call, real_flags = Connection.call, Connection.call_flags

    def call(self: Connection, opcode: int, meta: bytes) -> bytes:
        sent.append((int(opcode), 0))
        return real_call(self, opcode, meta)

    def call_flags(self: Connection, opcode: int, meta: bytes,
                   flags: int = 0, checked_bytes: int = 0) -> tuple[int, bytes]:
        sent.append((int(opcode), flags))
        return real_flags(self, opcode, meta, flags, checked_bytes)

    monkeypatch.setattr(Connection, "call", call)
    monkeypatch.setattr(Connection, "call_flags", call_flags)
    return sent


def test_one_shm_commit_frame_per_put_after_the_first(server, frames_sent) -> None:  # type: ignore[no-untyped-def]
    blobs = {f"p{i}".encode(): block(i, MiB) for i in range(6)}
    # Every commit vouches for its checksums (the SDK computed them from the
    # bytes it wrote): the server may answer before its own check.
    commit = (Op.SHM_COMMIT, FLAG_SHM_NEXT | FLAG_SHM_VOUCHED)
    with ShmClient(server.unix_target, namespace="a", timeout=30) as c:
        assert c.data_plane_active()
        frames_sent.clear()
        items = iter(blobs.items())
        assert c.put([next(items)]).stored == 1
        # The first Put of a size reserves; its commit fills the stock for the
        # next Puts (8 of a size on a data plane session, 8 MiB at most).
        assert frames_sent == [(Op.SHM_RESERVE, 0), commit]
        assert c.stocked_slots() == 8
        frames_sent.clear()
        answered = server.exported("kvstore_dataplane_requests_total")
        for item in items:
            assert c.put([item]).stored == 1
        assert frames_sent == [commit] * 5
        assert server.exported("kvstore_dataplane_requests_total") - answered == 5
        bufs = [bytearray(MiB) for _ in blobs]
        assert c.get_into(list(blobs), bufs) == [MiB] * 6
        assert [bytes(b) for b in bufs] == list(blobs.values())
        # Five Puts took five stocked slots and asked for none (the stock still
        # covered the next Put): three left.
        assert c.stocked_slots() == 3
        assert server.exported("kvstore_shm_reservations") == 3  # the stocked slots
    # close abandoned it
    assert server.exported("kvstore_shm_reservations") == 0


def test_a_vouched_put_is_readable_at_once_and_a_wrong_checksum_never_served(
        server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The SDK's commits vouch for their checksums, so the server answers
    before it checks the bytes: another client reads each block the moment
    its Put returns. A Put whose checksum is wrong (an SDK bug, simulated)
    returns as stored but is never served: the key's earlier bytes are gone
    too (a miss), the server counts a corrupt L1 copy and stays up."""
    from kvstore.client import shm_dataplane
    from kvstore.types import TierName

    with ShmClient(server.unix_target, namespace="a", timeout=30) as writer, \
            Client(server.tcp, namespace="a", timeout=30, data_plane=False) as reader:
        for i in range(20):
            value = block(1000 + i, MiB if i % 2 else 64 * 1024)
            assert writer.put([(b"v%d" % i, value)]).stored == 1
            assert reader.get([b"v%d" % i]) == [value]

        def corrupt_l1() -> int:
            return next(t.corrupt for t in reader.stats().tiers if t.tier == TierName.L1)

        before = corrupt_l1()
        real = shm_dataplane.copy_and_checksum
        monkeypatch.setattr(shm_dataplane, "copy_and_checksum",
                            lambda *a: real(*a) ^ 1)  # the wrong CRC-32C for the bytes
        assert writer.put([(b"v1", block(5, MiB))]).stored == 1
        monkeypatch.setattr(shm_dataplane, "copy_and_checksum", real)
        assert reader.get([b"v1"]) == [None]  # neither the new bytes nor the old
        assert corrupt_l1() == before + 1
        assert writer.put([(b"v1", block(6, MiB))]).stored == 1
        assert reader.get([b"v1", b"v2"]) == [block(6, MiB), block(1002, 64 * 1024)]


def test_put_kv_packs_into_stocked_slots_in_one_frame(server, frames_sent) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    rng = np.random.default_rng(5)
    shape = (8, 16, 2, 64)  # pages, page tokens, heads, head dim
    k = [rng.standard_normal(shape).astype(np.float16) for _ in range(2)]
    v = [rng.standard_normal(shape).astype(np.float16) for _ in range(2)]
    commit = (Op.SHM_COMMIT, FLAG_SHM_NEXT | FLAG_SHM_VOUCHED)
    with ShmClient(server.unix_target, namespace="a", timeout=30) as c:
        frames_sent.clear()
        assert c.put_kv([b"kv0", b"kv1"], k, v, [[0, 1], [2, 3]]).stored == 2
        assert frames_sent == [(Op.SHM_RESERVE, 0), commit]
        frames_sent.clear()
        assert c.put_kv([b"kv2", b"kv3"], k, v, [[4, 5], [6, 7]]).stored == 2
        assert frames_sent == [commit]
        k2 = [np.zeros_like(x) for x in k]
        v2 = [np.zeros_like(x) for x in v]
        pages = [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert c.get_kv_into([b"kv0", b"kv1", b"kv2", b"kv3"], k2, v2, pages) == 4
        for a, b in zip(k + v, k2 + v2, strict=True):
            assert np.array_equal(a, b)


def test_a_server_that_does_not_offer_it_gets_reserve_and_commit(
        server, frames_sent, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # An older server never sets FLAG_SHM_NEXT on its answers.
    real = Connection.call_flags

    def older(self: Connection, opcode: int, meta: bytes, flags: int = 0,
              checked_bytes: int = 0) -> tuple[int, bytes]:
        got, answer = real(self, opcode, meta, flags, checked_bytes)
        return got & ~FLAG_SHM_NEXT, answer

    monkeypatch.setattr(Connection, "call_flags", older)
    frames_sent.clear()
    blobs = {f"o{i}".encode(): block(100 + i, 64 * 1024) for i in range(3)}
    with ShmClient(server.unix_target, namespace="a", timeout=30) as c:
        for item in blobs.items():
            assert c.put([item]).stored == 1
        # Version-1 frames only: no commit carries SHM_NEXT (they vouch for
        # their checksums, a bit an older server ignores).
        assert [op for op, flags in frames_sent if flags & FLAG_SHM_NEXT] == []
        assert {flags for op, flags in frames_sent if op == Op.SHM_COMMIT} == {FLAG_SHM_VOUCHED}
        assert [op for op, _ in frames_sent].count(Op.SHM_RESERVE) == 3
        assert [op for op, _ in frames_sent].count(Op.SHM_COMMIT) == 3
        assert c.stocked_slots() == 0
        assert server.exported("kvstore_shm_reservations") == 0
        assert c.get(list(blobs)) == list(blobs.values())


def test_a_client_that_dies_mid_put_leaves_no_slot_behind(server) -> None:  # type: ignore[no-untyped-def]
    # The client process dies (os._exit) while copying into a slot from its
    # stock: the session's close gives up every slot it held, long before
    # the reservations would expire, and nothing half-written is visible.
    script = textwrap.dedent(f"""
        import os
        import kvstore.client.shm_dataplane as lean
        from kvstore.client.shm import ShmClient
        c = ShmClient({server.unix_target!r}, namespace="a", timeout=30)
        for i in range(3):
            c.put({{b"whole-%d" % i: bytes([i]) * 65536}})
        assert c.stocked_slots() == 6  # 8 after the first Put, then 2 taken
        real = lean.copy_and_checksum
        def crash(dst, offset, data, seed=0, streaming=None):
            dst[offset:offset + 100] = b"x" * 100
            os._exit(3)
        lean.copy_and_checksum = crash
        c.put({{b"torn": b"t" * 65536}})
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert done.returncode == 3, done.stderr.decode()
    assert wait_for(lambda: server.exported("kvstore_shm_reservations") == 0)
    with Client(server.tcp, namespace="a", data_plane=False) as g:
        assert g.get([b"torn", b"whole-2"]) == [None, bytes([2]) * 65536]


def test_a_slow_copy_on_the_lean_path_raises_stale_lease(
        server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    data = block(7, MiB)
    with ShmClient(server.unix_target, namespace="a", timeout=30) as c:
        c.put({b"slow": data})
        real = shm_module.copy_and_checksum

        def slow(*args: Any, **kwargs: Any) -> int:
            # The copy outlasts its lease (1 s): the server has swept it.
            assert wait_for(lambda: server.exported("kvstore_shm_leases") == 0)
            return real(*args, **kwargs)

        monkeypatch.setattr(shm_module, "copy_and_checksum", slow)
        with pytest.raises(StaleLease):
            c.get_into([b"slow"], [bytearray(MiB)])
        monkeypatch.setattr(shm_module, "copy_and_checksum", real)
        buf = bytearray(MiB)
        assert c.get_into([b"slow"], [buf]) == [MiB] and bytes(buf) == data


def test_a_corrupt_slot_is_never_served(server) -> None:  # type: ignore[no-untyped-def]
    big, small = block(1, MiB), block(2, 4096)
    with ShmClient(server.unix_target, namespace="a", timeout=30) as c:
        c.put({b"big": big, b"small": small}, ack="local")  # an intact copy in L2
        with c.leased([b"big", b"small"]) as leases:
            for lease in leases:
                assert lease is not None
                lease.view[100:108] = b"corrupt!"  # a stray write into the arena
        # A big block comes through shared memory: the copy fails its check,
        # and the client reads it again by a plain Get, on which the server
        # checks its L1 copy, drops it and serves the L2 copy.
        buf = bytearray(MiB)
        assert c.get_into([b"big"], [buf]) == [MiB] and bytes(buf) == big
        assert c.get([b"big"]) == [big]
        # A small one comes inline: the server checks the L1 copy before
        # sending, drops it and serves the L2 copy.
        buf = bytearray(4096)
        assert c.get_into([b"small"], [buf]) == [4096] and bytes(buf) == small


def test_small_gets_come_inline_and_large_ones_through_shared_memory(
        server, frames_sent) -> None:  # type: ignore[no-untyped-def]
    with ShmClient(server.unix_target, namespace="a", timeout=30) as c:
        c.put({b"s": block(3, 4096), b"l": block(4, MiB)})
        frames_sent.clear()
        small, large = bytearray(4096), bytearray(MiB)
        # The first Get in a namespace leases (so a namespace that may not use
        # shared memory is refused as ever); then small blocks come inline.
        assert c.get_into([b"s"], [small]) == [4096]
        assert frames_sent == [(Op.SHM_ACQUIRE, 0)]
        frames_sent.clear()
        assert c.get_into([b"s"], [small]) == [4096]
        assert frames_sent == []  # a GET frame (Connection.get), no lease
        assert c.get_into([b"l"], [large]) == [MiB]
        assert frames_sent == [(Op.SHM_ACQUIRE, 0)]
        assert bytes(small) == block(3, 4096) and bytes(large) == block(4, MiB)
        c.inline_get_bytes = 0  # always shared memory
        assert c.get_into([b"s"], [small]) == [4096]
        assert frames_sent[-1] == (Op.SHM_ACQUIRE, 0)
        # get (bytes): the last Get's block size decides; the first one leases.
        c.inline_get_bytes = 64 * 1024
        frames_sent.clear()
        assert c.get([b"s"]) == [block(3, 4096)]
        assert frames_sent == [(Op.SHM_ACQUIRE, 0)]
        assert c.get([b"s"]) == [block(3, 4096)] and len(frames_sent) == 1  # inline
        assert c.get([b"l"]) == [block(4, MiB)] and len(frames_sent) == 1  # inline: hint small
        assert c.get([b"l"]) == [block(4, MiB)] and len(frames_sent) == 2  # leased again


def test_one_small_key_inline_answers_like_the_general_path(
        server, frames_sent) -> None:  # type: ignore[no-untyped-def]
    """get_into of one key into one small buffer (the engines' call) takes
    the inline one-key path: a miss, a buffer too small for its block and a
    bad key answer as for several keys, and the buffer kinds all work."""
    with ShmClient(server.unix_target, namespace="a", timeout=30) as c:
        c.put({b"one": block(5, 3000)})
        assert c.get_into([b"one"], [bytearray(4096)]) == [3000]  # the first one leases
        frames_sent.clear()
        for buf in (bytearray(4096), memoryview(bytearray(4096)), np.zeros(4096, np.uint8)):
            assert c.get_into([b"one"], [buf]) == [3000]
            assert bytes(memoryview(buf)[:3000]) == block(5, 3000)
        assert c.get_into([b"none"], [bytearray(10)]) == [None]
        assert frames_sent == []  # all inline
        with pytest.raises(InvalidArgument, match="buffer #0 is 100 bytes but key #0 holds a "
                                                  "block of 3000 bytes"):
            c.get_into([b"one"], [bytearray(100)])
        with pytest.raises(InvalidKey):
            c.get_into([b""], [bytearray(10)])
        with pytest.raises(InvalidArgument, match="buffer #0 is read-only"):
            c.get_into([b"one"], [bytes(4096)])
        assert c.get_into([b"one", b"none"], [bytearray(4096), bytearray(4096)]) == [3000, None]
