"""SHM_ACQUIRE of L1 hits (and SHM_RELEASE; at the end, SHM_COMMITs that
need no waiting and SESSION_EVENTs) answered from the readable callback: the
broker's ``acquire_now`` grants the same leases with the same bookkeeping as
``acquire``, or declines having changed nothing; on a real
in-process data plane (store, broker, sockets) such answers keep request
order among those the connection's task gives, their leases go when the
connection drops, an expired lease is still reported expired, and a lease on
a damaged L1 copy names the checksum the bytes fail (so the client's copy
check refuses it). A spy on ``Session.answer_now`` tells which requests the
callback answered."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dataplane.raw import (
    PING,
    PUT,
    SESSION_EVENT,
    SHM_ACQUIRE,
    SHM_COMMIT,
    SHM_RELEASE,
    SHM_RESERVE,
    Frame,
    Raw,
    block_of,
    header,
    keys,
    put_meta,
    request,
    s,
    u8,
    u32,
    u64,
    u64s,
)
from dataplane.raw import get as raw_get
from dataplane.raw import put as raw_put
from kvstore.checksum import checksum
from kvstore.config import load
from kvstore.dataplane import frames as f
from kvstore.dataplane.ops import Answered, Session
from kvstore.dataplane.server import DataPlaneServer
from kvstore.dataplane.tickets import Binding
from kvstore.errors import InvalidKey, PermissionDenied
from kvstore.store import CommitSpec, SharedMemoryBroker, TieredStore
from kvstore.types import AckLevel, TierName

KiB, MiB = 1024, 1024**2


def _config(tmp_path: Path, l1: str, shm: str, unix: str = "") -> Any:
    return load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": l1,
                     "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "",
                     "KVSTORE_SERVER_UNIX_SOCKET": "/tmp/kvstore-test-acqnow-unused.sock",
                     "KVSTORE_L1_SHM_PATH": shm, "KVSTORE_SERVER_DATA_PLANE_UNIX": unix,
                     "KVSTORE_L2_ENABLED": "true"})


def _shm_path() -> str:
    return f"/dev/shm/kvstore-test-acqnow-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# -- the broker -----------------------------------------------------------------------------


def _with_broker(tmp_path: Path, body: Callable[[TieredStore, SharedMemoryBroker],
                                                 Awaitable[None]]) -> None:
    shm = _shm_path()
    config = _config(tmp_path, "1MiB", shm)

    async def go() -> None:
        store = TieredStore(config)
        await store.start()
        broker = SharedMemoryBroker(store, 60_000, 60_000, 60_000, clock=lambda: 1000.0)
        try:
            await body(store, broker)
        finally:
            await broker.close()
            await store.close()
    try:
        asyncio.run(go())
    finally:
        if os.path.exists(shm):
            os.unlink(shm)


def _in_l1(store: TieredStore, keys_: list[bytes]) -> list[bytes]:
    blocks = store.index.blocks
    return [k for k in keys_ if (e := blocks.get(("ns", k))) is not None and e.l1_offset >= 0]


def test_acquire_now_grants_and_counts_as_acquire(tmp_path: Path) -> None:
    names = [f"k{i}".encode() for i in range(12)]
    reads = [[b"k3"], [b"k0", b"k7"], [b"k3", b"k5"], [b"k0"], [b"k9", b"k9"]]
    outcomes = []
    for way in ("acquire", "now"):
        async def body(store: TieredStore, broker: SharedMemoryBroker, way: str = way) -> None:
            for key in names:  # 12 x 64 KiB in the 1 MiB L1 (+ L2 copies)
                await store.put_bytes("ns", key, key * (64 * KiB // len(key)), AckLevel.LOCAL)
            held: list[int] = []
            grants = []
            for ks in reads:  # each acquire ends the leases of the one before
                if way == "acquire":
                    leases, released, expired = await broker.acquire(
                        "ns", ks, "s1", 0, held, "me")
                else:
                    got = broker.acquire_now("ns", ks, "s1", 0, held, "me")
                    assert got is not None
                    leases, released, expired = got
                held = [lease.lease_id for lease in leases if lease is not None]
                assert released == (len(grants[-1]) if grants else 0) and expired == []
                grants.append([(lease.offset, lease.size, lease.checksum, lease.generation,
                                lease.tier, lease.expires) for lease in leases
                               if lease is not None])
            pins = [store.index.blocks[("ns", k)].readers for k in names]
            broker.release(held, "ns", "me")
            stats = store.stats()
            # The policy was told the same: it evicts the same blocks.
            for i in range(12, 20):
                await store.put_bytes("ns", f"k{i}".encode(), b"x" * 64 * KiB, AckLevel.LOCAL)
            outcomes.append((grants, pins, stats, _in_l1(store, names), broker.leases))
        (tmp_path / way).mkdir()
        _with_broker(tmp_path / way, body)
    assert outcomes[0] == outcomes[1]
    grants, pins, stats, _, leases = outcomes[1]
    assert stats.gets == stats.get_hits == 8
    assert pins[9] == 2 and sum(pins) == 2  # the last acquire's leases still pinned
    assert all(g[4] == TierName.L1 for gs in grants for g in gs) and leases == 0


def test_acquire_now_declines_or_refuses_having_changed_nothing(tmp_path: Path) -> None:
    async def body(store: TieredStore, broker: SharedMemoryBroker) -> None:
        for i in range(20):  # more than L1 holds: the first ones only in L2
            await store.put_bytes("ns", f"k{i}".encode(), b"v" * 64 * KiB, AckLevel.LOCAL)
        in_l1 = _in_l1(store, [f"k{i}".encode() for i in range(20)])
        cold = next(f"k{i}".encode() for i in range(20) if f"k{i}".encode() not in in_l1)
        hot = in_l1[-1]
        (kept,), _, _ = await broker.acquire("ns", [hot], None, 0, (), "me")
        assert kept is not None
        before = (store.stats(), broker.leases, store.index.blocks[("ns", hot)].readers)
        # A block to promote from L2, a miss: declined.
        assert broker.acquire_now("ns", [hot, cold], None, 0, [kept.lease_id], "me") is None
        assert broker.acquire_now("ns", [b"missing"], None, 0, (), "me") is None
        # Someone else's lease, a bad key: refused.
        with pytest.raises(PermissionDenied):
            broker.acquire_now("ns", [hot], None, 0, [kept.lease_id], "you")
        with pytest.raises(InvalidKey):
            broker.acquire_now("ns", [b""], None, 0, (), "me")
        assert (store.stats(), broker.leases, store.index.blocks[("ns", hot)].readers) == before
        # The lease named in a declined call is still there to end.
        assert broker.release([kept.lease_id], "ns", "me") == (1, [])
        # A release id not held (a lost answer's, a closed session's) is
        # skipped: the acquire goes on.
        got = broker.acquire_now("ns", [hot], None, 0, [12345, kept.lease_id], "me")
        assert got is not None and got[0][0] is not None
        assert broker.release([got[0][0].lease_id], "ns", "me") == (1, [])
    _with_broker(tmp_path, body)


def test_a_commit_now_overwrite_is_never_left_waiting_for_an_old_l2_write(
        tmp_path: Path) -> None:
    """A commit on the spot of several blocks, one an overwrite of a dirty
    L1-only block: the write-back started by the blocks before it must not
    send that old copy to L2 first, or the commit (answered without waiting)
    leaves the old copy's L2 delete unawaited, and a kill before it lands
    serves the old bytes after the restart."""
    async def body(store: TieredStore, broker: SharedMemoryBroker) -> None:
        def spec(slot: Any) -> CommitSpec:
            data = os.urandom(slot.size)
            view = store.l1.slice(slot.offset, slot.size)
            view[:] = data
            view.release()
            return CommitSpec(slot.slot_id, slot.offset, slot.size, checksum(data))

        for i in range(12):  # 768 KiB of dirty blocks in the 1 MiB L1
            slot = broker.reserve_now("ns", [(b"k%d" % i, 64 * KiB)], None)[0]
            assert broker.commit_now("ns", AckLevel.MEMORY, [spec(slot)], []) is not None
        assert not store.placement.replace_waits(("ns", b"k0"))
        new, old = broker.reserve_now("ns", [(b"x", 64 * KiB), (b"k0", 64 * KiB)], None)
        assert broker.commit_now("ns", AckLevel.MEMORY, [spec(new), spec(old)], []) == \
            (2, 128 * KiB)
        assert ("ns", b"k0") not in store.placement.replacing
    _with_broker(tmp_path, body)


# -- a real data plane, in process ------------------------------------------------------------


@dataclass
class World:
    store: TieredStore
    broker: SharedMemoryBroker
    server: DataPlaneServer
    now: list[float]
    answered: list[tuple[int, int, bool]]  # (opcode, request id, answered by the callback)

    async def connect(self) -> Raw:
        ticket = self.server.issue_ticket(Binding("", None, "owner-t"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        sock.connect(self.server.unix_path)
        raw = Raw(sock)
        await _send(raw, request(0x01, 1, s(ticket)))
        assert (await _frames(raw, 1))[0].op == 0x81
        return raw

    def fast(self, opcode: int, rid: int) -> bool | None:
        """Whether the callback answered that request (None: never offered)."""
        return next((ok for op, r, ok in self.answered if (op, r) == (opcode, rid)), None)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, bool]]]:
    answered: list[tuple[int, int, bool]] = []
    real = Session.answer_now

    def answer_now(self: Session, opcode: int, flags: int, rid: int,
                   meta: memoryview) -> Answered:
        done = real(self, opcode, flags, rid, meta)
        answered.append((opcode, rid, bool(done)))
        return done
    monkeypatch.setattr(Session, "answer_now", answer_now)
    yield answered


def _with_server(tmp_path: Path, answered: list[tuple[int, int, bool]],
                 body: Callable[[World], Awaitable[None]]) -> None:
    shm = _shm_path()
    unix = f"/tmp/kvstore-test-acqnow-{uuid.uuid4().hex[:8]}.dp"
    config = _config(tmp_path, "4MiB", shm, unix)

    async def go() -> None:
        store = TieredStore(config)
        await store.start()
        now = [1000.0]
        broker = SharedMemoryBroker(store, 60_000, 1000, 60_000, clock=lambda: now[0])
        server = DataPlaneServer(config, store, broker)
        await server.start()
        try:
            await body(World(store, broker, server, now, answered))
        finally:
            await server.close()
            await broker.close()
            await store.close()
    try:
        asyncio.run(go())
    finally:
        for path in (shm, unix):
            if os.path.exists(path):
                os.unlink(path)


def _acquire(rid: int, ks: list[bytes], release: list[int] | None = None,
             lease_ms: int = 0) -> bytes:
    return request(SHM_ACQUIRE, rid, s("ns") + s("") + u32(lease_ms) + keys(ks)
                   + u64s(release or []))


async def _send(raw: Raw, data: bytes) -> None:
    """Sent off the loop (the server's loop must run meanwhile)."""
    await asyncio.to_thread(raw.send, data)


async def _frames(raw: Raw, count: int) -> list[Frame]:
    return await asyncio.to_thread(lambda: [raw.frame() for _ in range(count)])


async def _bounded(check: Callable[[], bool]) -> bool:
    for _ in range(1000):  # up to ~10 s
        if check():
            return True
        await asyncio.sleep(0.01)  # polling the server's state, bounded
    return check()


def _bytes(world: World, lease: f.ShmLease) -> bytes:
    return bytes(world.store.l1.slice(lease.offset, lease.size))


def test_a_pipelined_mix_is_answered_in_order(tmp_path: Path, spy: Any) -> None:
    async def body(w: World) -> None:
        raw = await w.connect()
        values = {f"b{i}".encode(): os.urandom(MiB) for i in range(6)}  # > the 4 MiB L1
        for i, (key, value) in enumerate(values.items()):
            # ack=2 (local): in L2 too, so the first ones may leave L1.
            await _send(raw, request(PUT, 100 + i, put_meta("ns", [(key, MiB, 0, None)], 2), value))
            assert (await _frames(raw, 1))[0].op == PUT | 0x80
        in_l1 = _in_l1(w.store, list(values))
        cold = next(k for k in values if k not in in_l1)
        hot = in_l1[-1]
        fresh = os.urandom(5000)
        await _send(raw, b"".join([
            _acquire(2, [hot]),               # an L1 hit: the callback's
            _acquire(3, [cold]),              # promoted from L2: the task's
            request(PUT, 4, put_meta("ns", [(b"fresh", len(fresh), 0, None)]), fresh),
            request(0x04, 5, s("ns") + s("") + keys([b"fresh"])),
            _acquire(6, [hot, b"fresh"]),
            request(PING, 7),
        ]))
        got = await _frames(raw, 6)
        assert [(fr.op, fr.rid) for fr in got] == [
            (SHM_ACQUIRE | 0x80, 2), (SHM_ACQUIRE | 0x80, 3), (PUT | 0x80, 4),
            (0x84, 5), (SHM_ACQUIRE | 0x80, 6), (PING | 0x80, 7)]
        first, promoted, both = (f.ShmAcquireResult.decode(got[i].meta) for i in (0, 1, 4))
        assert [lease.tier for lease in first.leases + promoted.leases + both.leases
                if lease is not None] == [TierName.L1, TierName.L2, TierName.L1, TierName.L1]
        assert _bytes(w, first.leases[0]) == values[hot]  # type: ignore[arg-type]
        assert _bytes(w, promoted.leases[0]) == values[cold]  # type: ignore[arg-type]
        assert [_bytes(w, x) for x in both.leases] == [values[hot], fresh]  # type: ignore[arg-type]
        assert got[3].payload == fresh
        assert w.fast(SHM_ACQUIRE, 2) is True and w.fast(SHM_ACQUIRE, 3) is False
        # Once the task has caught up, the callback answers again.
        await _send(raw, _acquire(8, [b"fresh", cold]))
        again = f.ShmAcquireResult.decode((await _frames(raw, 1))[0].meta)
        assert [_bytes(w, x) for x in again.leases] == [fresh, values[cold]]  # type: ignore[arg-type]
        assert w.fast(SHM_ACQUIRE, 8) is True
        assert w.broker.leases == 6
        raw.close()
        # The connection's leases, both ways granted, go with it.
        assert await _bounded(lambda: w.broker.leases == 0 and w.store.index.busy_pins == 0)
    _with_server(tmp_path, spy, body)


def test_leases_granted_by_the_callback_go_when_the_connection_drops(
        tmp_path: Path, spy: Any) -> None:
    async def body(w: World) -> None:
        raw = await w.connect()
        await asyncio.to_thread(raw_put, raw, 2, "ns", {b"k": b"k" * 64 * KiB})
        await _send(raw, _acquire(3, [b"k", b"k"], lease_ms=60_000))
        (answer,) = await _frames(raw, 1)
        assert w.fast(SHM_ACQUIRE, 3) is True
        assert len(f.ShmAcquireResult.decode(answer.meta).leases) == 2
        entry = w.store.index.blocks[("ns", b"k")]
        assert w.broker.leases == 2 and entry.readers == 2
        raw.close()
        assert await _bounded(lambda: w.broker.leases == 0 and entry.readers == 0)
        # The block is intact and may be evicted again.
        other = await w.connect()
        frames = await asyncio.to_thread(raw_get, other, 4, "ns", [b"k"])
        assert frames[0].payload == b"k" * 64 * KiB
    _with_server(tmp_path, spy, body)


def test_an_expired_lease_is_still_reported_expired(tmp_path: Path, spy: Any) -> None:
    async def body(w: World) -> None:
        raw = await w.connect()
        await asyncio.to_thread(raw_put, raw, 2, "ns", {b"k": b"k" * 4 * KiB})
        await _send(raw, _acquire(3, [b"k"], lease_ms=1000))
        (answer,) = await _frames(raw, 1)
        first = f.ShmAcquireResult.decode(answer.meta).leases[0]
        assert first is not None and w.fast(SHM_ACQUIRE, 3) is True
        w.now[0] += 5.0  # past the lease's time (the copy was too slow)
        # SHM_RELEASE says it expired (the client raises StaleLease), from
        # the callback too.
        await _send(raw, request(SHM_RELEASE, 4, s("ns") + u64s([first.lease_id])))
        (released,) = await _frames(raw, 1)
        assert f.ShmReleaseResult.decode(released.meta) == f.ShmReleaseResult(0, [first.lease_id])
        assert w.fast(SHM_RELEASE, 4) is True
        # So does an acquire that names an expired lease to end.
        await _send(raw, _acquire(5, [b"k"], lease_ms=1000))
        second = f.ShmAcquireResult.decode((await _frames(raw, 1))[0].meta).leases[0]
        assert second is not None
        w.now[0] += 5.0
        await _send(raw, _acquire(6, [b"k"], [second.lease_id]))
        result = f.ShmAcquireResult.decode((await _frames(raw, 1))[0].meta)
        assert result.released == 0 and result.expired == [second.lease_id]
        assert w.fast(SHM_ACQUIRE, 6) is True
        # An id never issued: SHM_RELEASE refuses it (by the task, as ever),
        # the connection lives; an acquire skips it.
        await _send(raw, request(SHM_RELEASE, 7, s("ns") + u64s([12345]))
                    + _acquire(8, [b"k"], [12345]) + request(PING, 9))
        got = await _frames(raw, 3)
        assert got[0].error()[1] == "InvalidArgument" and w.fast(SHM_RELEASE, 7) is False
        skipped = f.ShmAcquireResult.decode(got[1].meta)
        assert skipped.released == 0 and skipped.expired == [] and skipped.leases[0] is not None
        assert got[2].op == PING | 0x80
        assert w.broker.leases == 2  # rid 6's and rid 8's
    _with_server(tmp_path, spy, body)


def test_a_lease_on_a_damaged_copy_names_the_checksum_it_fails(tmp_path: Path,
                                                                spy: Any) -> None:
    async def body(w: World) -> None:
        raw = await w.connect()
        good = os.urandom(MiB)
        await asyncio.to_thread(raw_put, raw, 2, "ns", {b"k": good})
        entry = w.store.index.blocks[("ns", b"k")]
        w.store.l1.slice(entry.l1_offset + 100, 8)[:] = b"corrupt!"  # a stray write
        await _send(raw, _acquire(3, [b"k"]))
        lease = f.ShmAcquireResult.decode((await _frames(raw, 1))[0].meta).leases[0]
        assert lease is not None and w.fast(SHM_ACQUIRE, 3) is True
        # The lease carries the block's own checksum: the client's copy of
        # the damaged bytes fails it (ShmClient raises CorruptBlock).
        assert lease.crc32c == checksum(good) != checksum(_bytes(w, lease))
    _with_server(tmp_path, spy, body)


# -- SHM_COMMIT answered on the spot ----------------------------------------------------------


def _reserve(rid: int, sizes: list[int], key: bytes = b"") -> bytes:
    return request(SHM_RESERVE, rid, f.ShmReserveRequest("ns", [(key, n) for n in sizes]).encode())


def _commit(rid: int, slots: list[tuple[int, int, int]], data: list[bytes], ack: int = 0,
            keys_: list[bytes] | None = None, reserve_next: list[int] | None = None,
            crcs: list[int] | None = None, fmt: int = 0, vouched: bool = False) -> bytes:
    """An SHM_COMMIT of ``data`` written into ``slots`` (id, offset, size):
    extended (FLAG_SHM_NEXT) when ``keys_`` are given; ``fmt`` 1: KV_V1 blocks;
    ``vouched``: header flag SHM_VOUCHED."""
    sums = crcs if crcs is not None else [checksum(d) for d in data]
    blocks = [(slot, offset, size, crc, fmt)
              for (slot, offset, size), crc in zip(slots, sums, strict=True)]
    meta = f.encode_shm_commit("ns", ack, blocks, [], keys_, "", reserve_next or [])
    flags = (f.FLAG_SHM_NEXT if keys_ is not None else 0) | \
        (f.FLAG_SHM_VOUCHED if vouched else 0)
    return header(SHM_COMMIT, rid, len(meta), 0, flags) + meta


def _write(world: World, slots: list[tuple[int, int, int]], data: list[bytes]) -> None:
    for (_, offset, size), value in zip(slots, data, strict=True):
        view = world.store.l1.slice(offset, size)
        view[:] = value
        view.release()


async def _slots(world: World, raw: Raw, rid: int, sizes: list[int],
                 key: bytes = b"") -> list[tuple[int, int, int]]:
    await _send(raw, _reserve(rid, sizes, key))
    answer = (await _frames(raw, 1))[0]
    assert answer.op == SHM_RESERVE | 0x80, answer
    return [(slot, offset, size) for slot, offset, size, _ in
            f.ShmReserveResult.decode(answer.meta).slots]


async def _get_one(raw: Raw, rid: int, key: bytes) -> bytes | None:
    await _send(raw, request(0x04, rid, s("ns") + s("") + keys([key])))
    return block_of((await _frames(raw, 1))[0])


def _kv_block(payload: int) -> bytes:
    """A valid block-format (KV_V1) block of ``payload`` bytes of K and V."""
    import numpy as np

    from kvstore._impl import pack

    layers = payload // (64 * KiB)
    rng = np.random.default_rng(7)
    pages = [[rng.integers(0, 2**15, (2, 16, 8, 64), dtype=np.int16).view(np.float16)
              for _ in range(layers)] for _ in range(2)]
    return bytes(pack(pages[0], pages[1], [0, 1]))


def test_commits_are_answered_on_the_spot(tmp_path: Path, spy: Any) -> None:
    """A shared-memory Put's commit that needs no waiting is answered from
    the readable callback: stored, its next slots granted, readable at once;
    a commit whose bytes fail their checksum is answered DATA_LOSS from there
    too, stores nothing and leaves the key's earlier bytes served."""
    async def body(w: World) -> None:
        raw = await w.connect()
        first = await _slots(w, raw, 2, [64 * KiB])
        assert w.fast(SHM_RESERVE, 2) is True
        # More than L1 holds: refused by the task, as before.
        await _send(raw, _reserve(20, [2 * MiB, 2 * MiB, MiB]))
        code, _, message = (await _frames(raw, 1))[0].error()
        assert code == 8 and "capacity" in message and w.fast(SHM_RESERVE, 20) is False
        old = os.urandom(64 * KiB)
        _write(w, first, [old])
        await _send(raw, _commit(3, first, [old], keys_=[b"a"], reserve_next=[64 * KiB] * 2))
        answer = (await _frames(raw, 1))[0]
        assert (answer.op, answer.flags & f.FLAG_SHM_NEXT) == (SHM_COMMIT | 0x80, f.FLAG_SHM_NEXT)
        done = f.ShmCommitResult.decode(answer.meta)
        assert (done.stored, done.nbytes, len(done.next_slots)) == (1, 64 * KiB, 2)
        assert w.fast(SHM_COMMIT, 3) is True
        assert await _get_one(raw, 4, b"a") == old
        # The granted slots are the session's: one takes a damaged block
        # under the same key, the other a good one.
        stock = [(slot, offset, size) for slot, offset, size, _ in done.next_slots]
        new = os.urandom(64 * KiB)
        _write(w, stock, [new, new])
        errors = w.server.stats.errors
        await _send(raw, _commit(5, stock[:1], [new], keys_=[b"a"], crcs=[checksum(new) ^ 1]))
        code, name, message = (await _frames(raw, 1))[0].error()
        assert (code, name) == (15, "CorruptBlock") and "CRC-32C" in message
        assert w.fast(SHM_COMMIT, 5) is True and w.server.stats.errors == errors + 1
        assert await _get_one(raw, 6, b"a") == old  # nothing of it was stored
        # Its slot went with it; the other one commits; then the plain form.
        await _send(raw, _commit(7, stock[:1], [new], keys_=[b"b"]))
        code, _, message = (await _frames(raw, 1))[0].error()
        assert code == 3 and "a failed commit gives up every slot it names" in message
        await _send(raw, _commit(8, stock[1:], [new], keys_=[b"b"]))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        keyed = await _slots(w, raw, 9, [1000], key=b"d")
        _write(w, keyed, [b"d" * 1000])
        await _send(raw, _commit(10, keyed, [b"d" * 1000]))
        assert f.Counted.decode((await _frames(raw, 1))[0].meta).stored == 1
        assert [w.fast(SHM_COMMIT, rid) for rid in (7, 8, 10)] == [True, True, True]
        assert [await _get_one(raw, 11, b"b"), await _get_one(raw, 12, b"d")] == \
            [new, b"d" * 1000]
        # Block-format blocks up to 1 MiB are checked there too: a good one
        # is stored, a bad one refused naming its field.
        kv = _kv_block(512 * KiB)
        slot = await _slots(w, raw, 13, [len(kv)])
        _write(w, slot, [kv])
        await _send(raw, _commit(14, slot, [kv], keys_=[b"kv"], fmt=1))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        bad = b"XXXX" + kv[4:]
        slot = await _slots(w, raw, 15, [len(bad)])
        _write(w, slot, [bad])
        await _send(raw, _commit(16, slot, [bad], keys_=[b"kv2"], fmt=1))
        code, name, message = (await _frames(raw, 1))[0].error()
        assert (code, name) == (3, "InvalidBlock") and message.startswith("block #0: "), message
        assert [w.fast(SHM_COMMIT, rid) for rid in (14, 16)] == [True, True]
        assert [await _get_one(raw, 17, b"kv"), await _get_one(raw, 18, b"kv2")] == [kv, None]
        raw.close()
        assert await _bounded(lambda: w.broker.reservations == 0)
    _with_server(tmp_path, spy, body)


def test_vouched_commits_are_answered_before_their_check(
        tmp_path: Path, spy: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A commit that vouches for its checksums (SHM_VOUCHED, what the SDK
    sends) is answered before the server checks its bytes, and stored before
    anything else runs: readable at once. One whose bytes then fail the check
    was answered "stored" but is never served: a miss, not the key's earlier
    bytes, its slot back in L1, counted as a corrupt L1 copy. Without the
    flag the check comes first and answers DATA_LOSS (the test above)."""
    events: list[str] = []
    real_reply, real_verify = Session.reply_now, SharedMemoryBroker._verify_now

    def reply(self: Session, answer: bytes) -> None:
        events.append("answer")
        real_reply(self, answer)

    def verify(self: SharedMemoryBroker, taken: Any) -> None:
        events.append("check")
        real_verify(self, taken)

    monkeypatch.setattr(Session, "reply_now", reply)
    monkeypatch.setattr(SharedMemoryBroker, "_verify_now", verify)

    async def body(w: World) -> None:
        raw = await w.connect()
        stock = await _slots(w, raw, 2, [64 * KiB])
        old = os.urandom(64 * KiB)
        _write(w, stock, [old])
        events.clear()
        await _send(raw, _commit(3, stock, [old], keys_=[b"a"], reserve_next=[64 * KiB] * 4))
        done = f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta)
        assert (done.stored, events) == (1, ["check", "answer"])  # not vouched: checked first
        stock = [(slot, offset, size) for slot, offset, size, _ in done.next_slots]
        new = os.urandom(64 * KiB)
        _write(w, stock[:1], [new])
        events.clear()
        await _send(raw, _commit(4, stock[:1], [new], keys_=[b"b"], vouched=True))
        done = f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta)
        assert (done.stored, done.nbytes, events) == (1, 64 * KiB, ["answer", "check"])
        assert w.fast(SHM_COMMIT, 4) is True
        assert await _get_one(raw, 5, b"b") == new
        # Checked first all the same: a commit that restocks (the restock
        # may evict, which must not come between the checks and the store),
        # and any commit on a store with an L3 tier (a failed one could not
        # remove a key's older bytes there on the spot).
        extra = await _slots(w, raw, 20, [64 * KiB, 64 * KiB])
        _write(w, extra, [new, new])
        events.clear()
        await _send(raw, _commit(21, extra[:1], [new], keys_=[b"e"], vouched=True,
                                 reserve_next=[64 * KiB]))
        done = f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta)
        assert (done.stored, len(done.next_slots), events) == (1, 1, ["check", "answer"])
        events.clear()
        monkeypatch.setattr(w.store, "l3", object())  # only its presence is looked at
        await _send(raw, _commit(22, extra[1:], [new], keys_=[b"f"], vouched=True))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        assert events == ["check", "answer"]
        monkeypatch.setattr(w.store, "l3", None)
        # Bytes that fail the check: answered as stored, never served, and
        # the key's earlier block is gone too (a miss, not the old bytes).
        corrupt = w.store.placement.stats.counters[TierName.L1].corrupt
        used = w.store.l1.used_bytes
        _write(w, stock[1:3], [new, new])
        await _send(raw, _commit(6, stock[1:2], [new], keys_=[b"a"], crcs=[checksum(new) ^ 1],
                                 vouched=True))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        await _send(raw, _commit(7, stock[2:3], [new], keys_=[b"c"], crcs=[0], vouched=True))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        assert [await _get_one(raw, 8, b"a"), await _get_one(raw, 9, b"c")] == [None, None]
        assert w.store.placement.stats.counters[TierName.L1].corrupt == corrupt + 2
        assert w.store.l1.used_bytes == used - 3 * 64 * KiB  # the two slots, "a"'s block
        # A block-format block failing its format check: the same.
        kv = _kv_block(512 * KiB)
        slot = await _slots(w, raw, 10, [len(kv)])
        _write(w, slot, [b"XXXX" + kv[4:]])
        await _send(raw, _commit(11, slot, [b"XXXX" + kv[4:]], keys_=[b"kv"], fmt=1,
                                 vouched=True))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        assert await _get_one(raw, 12, b"kv") is None
        assert [w.fast(SHM_COMMIT, rid) for rid in (6, 7, 11)] == [True, True, True]
        # Logged once per 10 s however often a client vouches falsely.
        assert [r.getMessage() for r in caplog.records
                if "answered shared-memory commit failed" in r.getMessage()] == [
            "an answered shared-memory commit failed its check: 1 block(s), first key "
            "ns/61: not stored, and no earlier bytes of their keys served (1 block(s) failed "
            f"their CRC-32C check (first: block #0, slot {stock[1][0]}: client said "
            f"{checksum(new) ^ 1:#010x}, slot holds {checksum(new):#010x}); nothing of this "
            "commit was stored)"]
        # Up to 4 MiB a commit is stored on the spot (beyond, the executor's
        # hop and the task cost more than the check): a 2 MiB block too.
        big = os.urandom(2 * MiB)
        slot = await _slots(w, raw, 23, [len(big)])
        _write(w, slot, [big])
        events.clear()
        await _send(raw, _commit(24, slot, [big], keys_=[b"big"], vouched=True))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        assert (w.fast(SHM_COMMIT, 24), events) == (True, ["answer", "check"])
        assert await _get_one(raw, 25, b"big") == big
        assert w.fast(0x04, 25) is True  # a GET of it too: checked and sent from there
        # A vouched commit the callback cannot store on the spot (acknowledged
        # beyond memory) is the task's: checked first, DATA_LOSS as before.
        slot = await _slots(w, raw, 13, [64 * KiB])
        _write(w, slot, [new])
        await _send(raw, _commit(14, slot, [new], ack=2, keys_=[b"d"], crcs=[0], vouched=True))
        code, name, _ = (await _frames(raw, 1))[0].error()
        assert (code, name, w.fast(SHM_COMMIT, 14)) == (15, "CorruptBlock", False)
        raw.close()
        assert await _bounded(lambda: w.broker.reservations == 0)
    _with_server(tmp_path, spy, body)


def test_larger_vouched_commits_are_stored_then_checked(
        tmp_path: Path, spy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A vouched commit too large to check on the loop is the task's: its
    blocks are stored at once (readable as soon as it is answered) and
    checked after the answer, off the loop. One that fails is dropped then
    (its key's earlier block went when it was stored), counted, its L1
    extent freed. Unvouched, it is checked first: DATA_LOSS, nothing stored."""
    import kvstore.store.shm as shm_module

    monkeypatch.setattr(shm_module, "VERIFY_INLINE_BYTES", 256 * KiB)  # this L1: 4 MiB
    events: list[str] = []
    real_reply, real_check = Session.reply, SharedMemoryBroker.check_answered

    async def reply(self: Session, *args: Any) -> None:
        events.append("answer")
        await real_reply(self, *args)

    async def check(self: SharedMemoryBroker, left: Any) -> None:
        events.append("check")
        await real_check(self, left)

    monkeypatch.setattr(Session, "reply", reply)
    monkeypatch.setattr(SharedMemoryBroker, "check_answered", check)

    async def body(w: World) -> None:
        raw = await w.connect()
        values = [os.urandom(MiB) for _ in range(4)]
        slots = await _slots(w, raw, 2, [MiB] * 3)
        _write(w, slots, values[:3])
        events.clear()
        await _send(raw, _commit(3, slots[:1], values[:1], keys_=[b"g"], vouched=True))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        assert w.fast(SHM_COMMIT, 3) is False
        assert await _bounded(lambda: events == ["answer", "check"])
        assert await _get_one(raw, 4, b"g") == values[0]
        counters = w.store.placement.stats.counters[TierName.L1]
        corrupt, used = counters.corrupt, w.store.l1.used_bytes
        # Answered as stored, then found bad: gone, and so is the key's
        # earlier block (a miss, never the bytes it was told were replaced).
        await _send(raw, _commit(5, slots[1:2], values[1:2], keys_=[b"g"], crcs=[0],
                                 vouched=True))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        assert await _bounded(lambda: counters.corrupt == corrupt + 1)
        assert await _get_one(raw, 6, b"g") is None
        assert await _bounded(lambda: w.store.l1.used_bytes == used - 2 * MiB)
        # Unvouched: checked before the answer, nothing stored.
        await _send(raw, _commit(7, slots[2:3], values[2:3], keys_=[b"h"], crcs=[0]))
        code, name, _ = (await _frames(raw, 1))[0].error()
        assert (code, name) == (15, "CorruptBlock")
        assert await _get_one(raw, 8, b"h") is None
        # Block-format blocks are checked first, vouched or not: reads check
        # a block's checksum, not its format.
        bad_kv = b"XXXX" + _kv_block(512 * KiB)[4:]
        slot = await _slots(w, raw, 9, [len(bad_kv)])
        _write(w, slot, [bad_kv])
        await _send(raw, _commit(10, slot, [bad_kv], keys_=[b"kv"], fmt=1, vouched=True))
        code, name, _ = (await _frames(raw, 1))[0].error()
        assert (code, name) == (3, "InvalidBlock")
        assert await _get_one(raw, 11, b"kv") is None
        raw.close()
        assert await _bounded(lambda: w.broker.reservations == 0)
        assert await _bounded(lambda: w.store.index.busy_pins == 0)
    _with_server(tmp_path, spy, body)


def test_commits_that_would_wait_are_the_tasks(tmp_path: Path, spy: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Acknowledged beyond memory, larger than the callback checks, or an
    overwrite of a block with an L2 copy (answered once that copy's delete
    is done): the callback leaves the commit to the connection's task, which
    stores it as before."""
    import kvstore.store.shm as shm_module

    monkeypatch.setattr(shm_module, "VERIFY_INLINE_BYTES", MiB)  # this L1 holds 4 MiB
    async def body(w: World) -> None:
        raw = await w.connect()
        local = await _slots(w, raw, 2, [64 * KiB])
        value = os.urandom(64 * KiB)
        _write(w, local, [value])
        await _send(raw, _commit(3, local, [value], ack=2, keys_=[b"local"]))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        assert w.store.index.blocks[("ns", b"local")].l2  # written before the answer
        large = await _slots(w, raw, 4, [768 * KiB, 768 * KiB])
        values = [os.urandom(768 * KiB) for _ in large]
        _write(w, large, values)
        await _send(raw, _commit(5, large, values, keys_=[b"x", b"y"]))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 2
        again = await _slots(w, raw, 6, [64 * KiB])
        newer = os.urandom(64 * KiB)
        _write(w, again, [newer])
        await _send(raw, _commit(7, again, [newer], keys_=[b"local"]))
        assert f.ShmCommitResult.decode((await _frames(raw, 1))[0].meta).stored == 1
        assert [w.fast(SHM_COMMIT, rid) for rid in (3, 5, 7)] == [False, False, False]
        assert [await _get_one(raw, 8, b"local"), await _get_one(raw, 9, b"y")] == \
            [newer, values[1]]
        raw.close()
    _with_server(tmp_path, spy, body)


def test_commit_now_stores_as_commit_does(tmp_path: Path) -> None:
    """The broker's ``commit_now`` and ``restock_now`` leave the store as
    ``commit`` and ``restock`` do (index, statistics, the policy's victims);
    ``restock_now`` evicts what can leave at once when L1 is full;
    ``reserve_now`` declines where ``reserve`` would wait."""
    outcomes = []
    for way in ("commit", "now"):
        async def body(store: TieredStore, broker: SharedMemoryBroker, way: str = way) -> None:
            for i in range(4):  # 4 x 128 KiB of the 1 MiB L1, with L2 copies (evictable)
                await store.put_bytes("ns", f"old{i}".encode(), b"o" * 128 * KiB, AckLevel.LOCAL)
            granted = []
            for i in range(6):
                (slot,), _ = await broker.reserve("ns", [(b"", 128 * KiB)], None, "me")
                data = bytes([i]) * 128 * KiB
                view = store.l1.slice(slot.offset, slot.size)
                view[:] = data
                view.release()
                spec = CommitSpec(slot.slot_id, slot.offset, slot.size, checksum(data),
                                  key=f"new{i}".encode())
                if way == "commit":
                    done = await broker.commit("ns", AckLevel.MEMORY, [spec], [], "me")
                    more, _ = await broker.restock("ns", [128 * KiB] * 2, "me")
                else:
                    got = broker.commit_now("ns", AckLevel.MEMORY, [spec], [], "me")
                    assert got is not None
                    done = got
                    more = broker.restock_now("ns", [128 * KiB] * 2, "me")
                assert done == (1, 128 * KiB)
                granted.append(len(more))
                for s_ in more:  # give them back at once
                    await broker.commit("ns", AckLevel.MEMORY, [], [s_.slot_id], "me")
            outcomes.append((granted, store.stats(), _in_l1(store, [
                f"{p}{i}".encode() for p in ("old", "new") for i in range(6)])))
            # A restock grants at most an eighth of L1 (RESTOCK_MAX_L1_SHARE).
            assert len(broker.restock_now("ns", [128 * KiB] * 16, "me")) == 1
            # Extents while L1 has clean blocks to evict, then -1 where reserve
            # waits: the others' L2 writes are queued, not done.
            taken = []
            while (offset := store.placement.reserve_now(128 * KiB)) >= 0:
                taken.append(offset)
                assert len(taken) < 8
            assert store.index.busy_pins > 0
            # The broker's reserve_now then reserves nothing (all or none).
            held = broker.reservations
            assert broker.reserve_now("ns", [(b"", 4 * KiB), (b"", 128 * KiB)], None,
                                      "me") is None
            assert broker.reservations == held
            taken.append(await store.placement.reserve(128 * KiB))  # after a write
            for offset in taken:
                store.placement.release(offset, 128 * KiB)
        (tmp_path / way).mkdir()
        _with_broker(tmp_path / way, body)
    assert outcomes[0] == outcomes[1]
    granted, stats, in_l1 = outcomes[1]
    assert granted == [1] * 6 and stats.puts == 10  # an eighth of L1 a restock
    assert len(in_l1) < 8  # L1 holds 8: commits and restocks evicted


def test_session_events_are_answered_on_the_spot(tmp_path: Path, spy: Any) -> None:
    """A turn end or session end (what an engine sends every request) is
    told to the policy and answered from the readable callback; a malformed
    one is left to the task, which refuses it as before."""
    async def body(w: World) -> None:
        raw = await w.connect()
        before = w.store.stats().session_events
        await _send(raw, b"".join([
            request(SESSION_EVENT, 2, s("ns") + s("s1") + u8(1) + u8(1) + u64(5000) + s("bash")
                    + u8(0)),
            request(SESSION_EVENT, 3, s("ns") + s("s1") + u8(2) + u8(0) + u64(0) + s("")
                    + u8(1)),
            request(SESSION_EVENT, 4, s("ns") + s("s1") + u8(9) + u8(0) + u64(0) + s("")
                    + u8(0)),
        ]))
        got = await _frames(raw, 3)
        assert [(fr.op, fr.rid) for fr in got[:2]] == [(SESSION_EVENT | 0x80, 2),
                                                       (SESSION_EVENT | 0x80, 3)]
        code, _, message = got[2].error()
        assert code == 3 and "unknown session event kind 9" in message
        assert [w.fast(SESSION_EVENT, rid) for rid in (2, 3, 4)] == [True, True, False]
        assert w.store.stats().session_events == before + 2
        raw.close()
    _with_server(tmp_path, spy, body)
