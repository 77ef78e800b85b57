"""LMDB failures leave the L2 tier as StorageError, and reach clients as
UNAVAILABLE (never INTERNAL); a full map is not a failure (it grows).

Faults are injected from here (a test subclass, monkeypatching), never by
hooks in the production class.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import lmdb
import pytest

from kvstore.checksum import checksum
from kvstore.client.aio import AsyncClient
from kvstore.config import Config, load
from kvstore.errors import StorageError
from kvstore.server.app import Server
from kvstore.tiers import lmdb_tier
from kvstore.tiers.base import BlockMeta
from kvstore.tiers.lmdb_tier import LMDBTier
from kvstore.types import AckLevel, BlockId


def meta_for(data: bytes) -> BlockMeta:
    return BlockMeta(len(data), checksum(data), time.time())


def store_config(tmp_path: Path, l1_capacity: str = "16MiB") -> Config:
    """A store under ``tmp_path/data`` with L2 (and no L3)."""
    return load(env={
        "KVSTORE_DATA_DIR": str(tmp_path / "data"), "KVSTORE_L1_CAPACITY": l1_capacity,
        "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0",
    })


def has_deletes(batch: list[Any]) -> bool:
    """Whether an L2 write batch deletes a block."""
    return any(op.data is None and op.kind == lmdb_tier._BLOCK for op in batch)


def failing_deletes(working: Any) -> Any:
    """An LMDBTier._apply_locked whose batches that delete a block fail, as
    commits on a disk full to its last pages do; the others as ``working``."""
    def apply(batch: list[Any]) -> list[bool]:
        if has_deletes(batch):
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")
        return working(batch)  # type: ignore[no-any-return]
    return apply


async def store_with_l2(tmp_path: Path) -> tuple[Any, LMDBTier, Any]:
    """A started store of :func:`store_config`: (store, its L2, its write-back)."""
    from kvstore.store import TieredStore

    store = TieredStore(store_config(tmp_path))
    await store.start()
    assert store.l2 is not None and store.writeback is not None
    return store, store.l2, store.writeback


class BrokenLMDBTier(LMDBTier):
    """An L2 whose storage can be taken away under it."""

    def lose_storage(self) -> None:
        # Every later LMDB call fails with a real lmdb.Error (closed environment).
        self._env.close()


@pytest.fixture
def broken_tier(tmp_path: Path) -> Iterator[BrokenLMDBTier]:
    tier = BrokenLMDBTier(tmp_path / "l2", capacity=1 << 30, initial_map_size=4 << 20)
    yield tier
    # The environment is gone: closing reports that, as a StorageError too.
    with pytest.raises(StorageError):
        tier.close_sync()


def write(tier: LMDBTier, block: BlockId, data: bytes) -> BaseException | None:
    """Submit one write and wait (bounded) for its outcome."""
    outcome: list[BaseException | None] = []
    settled = threading.Event()

    def done(error: BaseException | None, existed: bool) -> None:
        outcome.append(error)
        settled.set()

    tier.submit(block, data, meta_for(data), done)
    assert settled.wait(10), "the write was never settled"
    return outcome[0]


def test_read_failure_is_a_storage_error(broken_tier: BrokenLMDBTier) -> None:
    assert write(broken_tier, ("ns", b"k"), b"payload") is None
    broken_tier.lose_storage()
    with pytest.raises(StorageError, match="L2 read failed"):
        broken_tier.read_into_sync(("ns", b"k"), None)


def test_write_failure_is_a_storage_error_and_the_writer_survives(
        broken_tier: BrokenLMDBTier) -> None:
    broken_tier.lose_storage()
    first = write(broken_tier, ("ns", b"a"), b"one")
    second = write(broken_tier, ("ns", b"b"), b"two")  # the writer thread still runs
    assert isinstance(first, StorageError) and "L2 write failed" in str(first)
    assert isinstance(second, StorageError)


def test_scan_failure_is_a_storage_error(broken_tier: BrokenLMDBTier) -> None:
    broken_tier.lose_storage()

    async def go() -> None:
        with pytest.raises(StorageError, match="L2 scan failed"):
            async for _ in broken_tier.scan():
                pass

    asyncio.run(go())


def test_a_full_map_grows_and_no_write_fails(tmp_path: Path) -> None:
    tier = LMDBTier(tmp_path / "l2", capacity=1 << 30, initial_map_size=1 << 20)
    try:
        start = tier.map_size
        blobs = {i.to_bytes(2, "big"): os.urandom(100_000) for i in range(40)}  # 4x the map
        for k, v in blobs.items():
            assert write(tier, ("ns", k), v) is None
        assert tier.map_grows >= 2 and tier.map_size >= 4 * start
        found = [tier.read_into_sync(("ns", k), None) for k in blobs]
        assert [bytes(f[1]) if f else None for f in found] == list(blobs.values())
    finally:
        tier.close_sync()


def test_opening_an_unusable_directory_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_bytes(b"x")
    with pytest.raises(StorageError, match="L2 open failed"):
        LMDBTier(tmp_path / "not-a-dir", capacity=1 << 20)


def test_a_failing_l2_write_reaches_the_client_as_unavailable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = store_config(tmp_path)

    def disk_fails(batch: Any) -> list[bool]:
        raise lmdb.DiskError("mdb_txn_commit: Input/output error")

    async def go() -> None:
        server = Server(config)
        await server.start()
        try:
            assert server.store.l2 is not None
            async with AsyncClient(str(server.addresses["tcp"]), namespace="ns",
                                   timeout=30) as client:
                before, after = os.urandom(1000), os.urandom(1000)
                await client.put({b"before": before}, ack="local")
                monkeypatch.setattr(server.store.l2, "_apply", disk_fails)
                with pytest.raises(StorageError) as raised:
                    await client.put({b"during": os.urandom(1000)}, ack="local")
                assert raised.value.grpc_code == grpc.StatusCode.UNAVAILABLE.name  # type: ignore[attr-defined]
                assert "Input/output error" in str(raised.value)
                monkeypatch.undo()
                # The server kept serving, and L2 takes writes again.
                await client.put({b"after": after}, ack="local")
                assert await client.get([b"before", b"after"]) == [before, after]
        finally:
            await server.stop(0)

    asyncio.run(go())


def test_a_failing_l2_read_is_a_miss_that_keeps_the_copy(tmp_path: Path) -> None:
    """An L2 read that fails (an I/O error, or the environment closing at shutdown)
    is a miss, not a corrupt copy: the block stays in L2 and is served once reads work."""
    config = load(env={
        "KVSTORE_DATA_DIR": str(tmp_path / "data"), "KVSTORE_L1_CAPACITY": "1MiB",
        "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0",
    })

    async def go() -> None:
        from kvstore.store import TieredStore

        store = TieredStore(config)
        await store.start()
        try:
            data = os.urandom(256 * 1024)
            await store.put_bytes("ns", b"kept", data, ack=AckLevel.LOCAL)
            for i in range(8):  # push it out of L1 (into L2 only)
                await store.put_bytes("ns", f"f{i}".encode(), os.urandom(256 * 1024),
                                      ack=AckLevel.LOCAL)
            entry = store.index.entry(("ns", b"kept"))
            assert entry is not None and entry.l1_offset < 0 and entry.l2
            reads = store.reads
            working = reads.read_verify_l2

            def failing(*args: Any) -> Any:
                raise StorageError("L2 read failed: mdb_get: Input/output error")

            reads.read_verify_l2 = failing
            assert await store.get_bytes("ns", b"kept") is None  # a miss ...
            reads.read_verify_l2 = working
            assert await store.get_bytes("ns", b"kept") == data  # ... the copy kept
            assert reads._c2.corrupt == 0
        finally:
            await store.close()

    asyncio.run(go())


class FullDiskLMDBTier(LMDBTier):
    """An L2 whose disk takes no more than one poisoned write: a transaction
    holding that write fails, as a commit on a full disk does."""

    def _apply_locked(self, batch: list[Any]) -> list[bool]:
        if any(op.key.endswith(b"poison") for op in batch):
            raise lmdb.DiskError("mdb_txn_commit: Input/output error")
        return super()._apply_locked(batch)


def test_a_failed_batch_keeps_the_writes_that_fit(tmp_path: Path) -> None:
    """One write the disk cannot take must not fail the whole batch it was
    committed in (at shutdown, every block only in memory goes in a few big
    batches): the others are committed, the failure reported on its own."""
    tier = FullDiskLMDBTier(tmp_path / "l2", capacity=1 << 30, initial_map_size=4 << 20)
    outcomes: dict[bytes, BaseException | None] = {}
    all_done = threading.Event()
    keys = [f"k{i}".encode() for i in range(7)] + [b"poison"] + [b"k8", b"k9"]

    def done_for(key: bytes) -> Any:
        def done(error: BaseException | None, existed: bool) -> None:
            outcomes[key] = error
            if len(outcomes) == len(keys):
                all_done.set()
        return done

    # Hold the writer (it takes the first write, then waits for the lock) so
    # that the rest queue up and are committed as one batch.
    with tier._write_lock:
        for key in keys:
            data = key * 100
            tier.submit(("ns", key), data, meta_for(data), done_for(key))
    assert all_done.wait(30)
    assert isinstance(outcomes[b"poison"], StorageError)
    assert "bytes free on its disk" in str(outcomes[b"poison"])
    assert [k for k in keys if outcomes[k] is not None] == [b"poison"]
    assert all(tier.read_into_sync(("ns", k), None) is not None for k in keys if k != b"poison")
    tier.close_sync()


def test_l2_deletes_that_fail_fail_the_call_and_are_done_again_by_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outside review filled L2's disk: the L2 deletes of a Delete failed
    and it was answered anyway, as was an overwrite at memory whose old
    copy's delete failed; a restart served the deleted blocks, and the old
    bytes of the overwritten keys. Blocks evicted meanwhile (their deletes
    failed too) were unknown to the index, so a later Delete or overwrite
    of their keys did not delete them either. Now the call fails, the index
    remembers what L2 still holds, and the next Delete, Flush or Put of the
    key deletes it."""
    config = store_config(tmp_path)

    async def go() -> None:
        from kvstore.store import TieredStore

        store = TieredStore(config)
        await store.start()
        l2 = store.l2
        assert l2 is not None
        working = l2._apply_locked

        deletes_fail = failing_deletes(working)

        def in_l2(key: bytes) -> bool:
            return l2.read_into_sync(("ns", key), None) is not None

        try:
            for key in (b"d0", b"d1", b"o0", b"f0", b"f1"):
                await store.put_bytes("ns", key, b"old" * 100, ack=AckLevel.LOCAL)
            monkeypatch.setattr(l2, "_apply_locked", deletes_fail)
            with pytest.raises(StorageError, match="could not remove 2 of the blocks"):
                await store.delete("ns", [b"d0", b"d1"])
            assert await store.get_bytes("ns", b"d0") is None  # (no longer served)
            assert in_l2(b"d0") and ("ns", b"d0") in store.index.l2_deletes.left
            with pytest.raises(StorageError, match="removal from L2 failed"):
                await store.put_bytes("ns", b"o0", b"new" * 100, ack=AckLevel.MEMORY)
            with pytest.raises(StorageError, match="could not remove"):
                await store.flush("ns")
            # The disk has room again: the same calls succeed, and L2 holds
            # none of the old bytes.
            monkeypatch.undo()
            assert await store.delete("ns", [b"d0", b"d1"]) == 0  # (not served: not counted)
            assert not in_l2(b"d0") and not in_l2(b"d1")
            await store.put_bytes("ns", b"o0", b"new" * 100, ack=AckLevel.MEMORY)
            got = l2.read_into_sync(("ns", b"o0"), None)
            assert got is None or bytes(got[1]) == b"new" * 100
            await store.flush("ns")
            assert not any(in_l2(k) for k in (b"d0", b"d1", b"o0", b"f0", b"f1"))
            assert not store.index.l2_deletes.left
        finally:
            monkeypatch.undo()
            await store.close()

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["delete", "overwrite", "evicted-delete", "evicted-slow"])
def test_a_call_waits_for_an_l2_delete_of_its_key_already_on_its_way(
        tmp_path: Path, kind: str) -> None:
    """A fix review: a delete queued by L2's own trim (the block dropped from
    L2, or evicted while the disk was full) was still on its way when a
    Delete or an ack=memory overwrite of the key came; the call did not wait
    for it, was answered OK, and when that delete failed (or had not
    committed yet, "evicted-slow": a slow disk) a kill served the old bytes.
    Now the call queues a delete of its own and waits for it: answered, L2
    no longer holds the old bytes; else StorageError."""
    fails = kind != "evicted-slow"

    async def go() -> None:
        store, l2, writeback = await store_with_l2(tmp_path)
        working = l2._apply_locked
        old = b"old" * 1000

        def disk(batch: list[Any]) -> list[bool]:
            if has_deletes(batch):
                if fails:
                    raise lmdb.DiskError("mdb_txn_commit: No space left on device")
                time.sleep(0.5)  # (the slow commit under test)
            return working(batch)

        try:
            await store.put_bytes("ns", b"k", old, ack=AckLevel.LOCAL)
            l2._apply_locked = disk  # type: ignore[method-assign]
            if kind.startswith("evicted"):
                writeback.disk_capacity = 0  # the disk-full trim: k leaves the index
                writeback.trim()
                writeback.disk_capacity = None
            else:
                writeback.capacity = 0  # k's L2 copy dropped, k stays in L1
                writeback.trim()
                writeback.capacity = 1 << 30
            try:
                if kind == "overwrite":
                    await store.put_bytes("ns", b"k", b"new" * 1000, ack=AckLevel.MEMORY)
                else:
                    await store.delete("ns", [b"k"])
            except StorageError as exc:
                assert fails, exc
                assert "L2" in str(exc)
            else:
                assert not fails, "answered, though its key's L2 bytes could not be removed"
                got = l2.read_into_sync(("ns", b"k"), None)
                assert got is None or bytes(got[1]) != old, "a kill now would serve them"
        finally:
            l2._apply_locked = working  # type: ignore[method-assign]
            await store.close()

    asyncio.run(go())


def test_what_failed_deletes_left_in_l2_goes_once_l2_commits_again(tmp_path: Path) -> None:
    """A fix review: blocks evicted while their L2 deletes failed stayed in
    L2's file until a Delete or Put of their keys (105 blocks in the file,
    5 counted by the index). Once a write commits again, they are deleted."""

    async def go() -> None:
        store, l2, writeback = await store_with_l2(tmp_path)
        working = l2._apply_locked

        deletes_fail = failing_deletes(working)

        keys = [b"e%d" % i for i in range(20)]
        try:
            for key in keys:
                await store.put_bytes("ns", key, b"x" * 4096, ack=AckLevel.LOCAL)
            l2._apply_locked = deletes_fail  # type: ignore[method-assign]
            writeback.disk_capacity = 0  # the disk-full trim evicts them
            writeback.trim()
            writeback.disk_capacity = None
            deadline = time.monotonic() + 10
            while not store.index.l2_deletes.left:
                assert time.monotonic() < deadline, "the failed deletes were never recorded"
                await asyncio.sleep(0.01)
            l2._apply_locked = working  # type: ignore[method-assign]
            store.index.l2_deletes.retried = 0.0  # (its once-a-second pace: not under test)
            await store.put_bytes("ns", b"after", b"y" * 4096, ack=AckLevel.LOCAL)
            deadline = time.monotonic() + 10
            while any(l2.read_into_sync(("ns", k), None) is not None for k in keys):
                assert time.monotonic() < deadline, "what the failed deletes left stayed"
                await asyncio.sleep(0.01)
            assert not store.index.l2_deletes.left
        finally:
            l2._apply_locked = working  # type: ignore[method-assign]
            await store.close()

    asyncio.run(go())


def test_an_overwrite_whose_pending_l2_delete_settles_meanwhile_is_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second fix review: the overwrite looked twice whether a delete of the
    key's L2 bytes was pending (to wait for one of its own, then to queue
    it); when the trim's delete committed between the two looks, nothing was
    queued and the Put, and every later overwrite of the key, waited for
    ever (2 of 10,000 in a stress run). The pause stands for a thread switch
    between the looks."""
    from kvstore.store.placement import Placement

    real = Placement._old_copy_deleted

    def switch_here(self: Placement, block: BlockId) -> Any:
        time.sleep(0.1)  # (the trim's delete commits meanwhile)
        return real(self, block)

    async def go() -> None:
        store, l2, writeback = await store_with_l2(tmp_path)
        working = l2._apply_locked

        def slow_deletes(batch: list[Any]) -> list[bool]:
            if has_deletes(batch):
                time.sleep(0.05)  # (the trim's delete on its way)
            return working(batch)

        try:
            await store.put_bytes("ns", b"k", b"old" * 1000, ack=AckLevel.LOCAL)
            l2._apply_locked = slow_deletes  # type: ignore[method-assign]
            writeback.capacity = 0  # the trim drops k's L2 copy (k stays in L1)
            writeback.trim()
            writeback.capacity = 1 << 30
            assert store.index.l2_deletes.pending(("ns", b"k"))
            monkeypatch.setattr(Placement, "_old_copy_deleted", switch_here)
            await asyncio.wait_for(
                store.put_bytes("ns", b"k", b"new" * 1000, ack=AckLevel.MEMORY), 10)
            monkeypatch.undo()
            await asyncio.wait_for(
                store.put_bytes("ns", b"k", b"newer" * 1000, ack=AckLevel.MEMORY), 10)
            assert await store.get_bytes("ns", b"k") == b"newer" * 1000
        finally:
            l2._apply_locked = working  # type: ignore[method-assign]
            await store.close()

    asyncio.run(go())
