"""L2: blocks in LMDB on local NVMe, in the :class:`~kvstore.tiers.base.KeyValueTier` role.

One environment per data directory with two sub-databases: ``data`` (payloads)
and ``meta`` (BlockMeta, 24 bytes each), so a restart rebuilds the index by
scanning ``meta`` without reading payloads.

Writes go through one writer thread that drains a queue and commits each
batch in one transaction (group commit): LMDB allows one writer at a time,
and batching turns many small commits into one. A flush puts a barrier in the
same queue: the writer commits what came before it, syncs and releases the
waiter. Reads run in short read transactions on executor threads and copy
straight into the caller's buffer. When the map is full the writer grows it
(doubling) once no read transaction is open — LMDB forbids resizing under an
open transaction — and retries the batch, so clients never see MapFullError.
Every other ``lmdb.Error`` leaves this module as a
:class:`~kvstore.errors.StorageError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb

from kvstore.errors import StorageError
from kvstore.tiers.base import BlockMeta, Buffer, TierUsage, WriteDone
from kvstore.types import BlockId

if TYPE_CHECKING:
    from kvstore.tiers.base import KeyValueTier

log = logging.getLogger(__name__)

_SCAN_BATCH = 10_000


def encode_key(block: BlockId) -> bytes:
    ns = block[0].encode()
    return bytes((len(ns),)) + ns + block[1]


def decode_key(raw: bytes) -> BlockId:
    n = raw[0]
    # Interned: millions of keys share a handful of namespaces.
    return sys.intern(raw[1 : 1 + n].decode()), bytes(raw[1 + n :])


class _ReadWriteLock:
    """Many readers or one resizer (who waits for readers to leave)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    def acquire_read(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._resizing = True
            while self._readers:
                self._cond.wait()

    def release_write(self) -> None:
        with self._cond:
            self._resizing = False
            self._cond.notify_all()


@dataclass(slots=True)
class _Op:
    key: bytes
    data: Buffer | None  # None = delete
    meta: bytes
    size: int
    done: WriteDone


@dataclass(slots=True)
class _Barrier:
    """Queued by flush: set once everything queued before it is committed and synced."""

    reached: threading.Event
    error: BaseException | None = None


_STOP = object()


class LMDBTier:
    def __init__(self, path: str | Path, capacity: int, initial_map_size: int = 1 << 30,
                 sync: bool = False, batch_bytes: int = 64 << 20,
                 executor: concurrent.futures.Executor | None = None) -> None:
        self.path = Path(path)
        self.capacity = capacity
        self.batch_bytes = batch_bytes
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(
                str(self.path), map_size=initial_map_size, max_dbs=4, subdir=True,
                sync=sync, metasync=sync, readahead=False, max_readers=512, lock=True,
            )
        except (OSError, lmdb.Error) as exc:
            raise self._storage_error("open", exc) from exc
        try:
            self._data = self._env.open_db(b"data")
            self._meta = self._env.open_db(b"meta")
            self._blocks, self._bytes = self._count()
        except lmdb.Error as exc:
            self._env.close()
            raise self._storage_error("open", exc) from exc
        self._rw = _ReadWriteLock()
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            4, thread_name_prefix="kvstore-l2-read")
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        # Orders "closed?" against queueing: nothing is queued behind the stop.
        self._gate = threading.Lock()
        self.map_grows = 0
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="kvstore-l2-writer",
                                        daemon=True)
        self._writer.start()

    def _storage_error(self, what: str, exc: BaseException) -> StorageError:
        return StorageError(f"L2 {what} failed at {self.path}: {type(exc).__name__}: {exc}")

    def _count(self) -> tuple[int, int]:
        blocks = total = 0
        with self._env.begin(db=self._meta, buffers=True) as txn:
            for _, raw in txn.cursor():
                blocks += 1
                total += BlockMeta.unpack(raw).size
        return blocks, total

    # -- the writer thread ------------------------------------------------------------

    def submit(self, block: BlockId, data: Buffer | None, meta: BlockMeta | None,
               done: WriteDone) -> None:
        """Queue a write (data) or a delete (data None); see KeyValueTier.submit."""
        op = _Op(encode_key(block), data, meta.pack() if meta else b"", meta.size if meta else 0,
                 done)
        with self._gate:
            if not self._closed:
                self._queue.put(op)
                return
        done(StorageError(f"L2 at {self.path} is closed"), False)

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            if isinstance(first, _Barrier):
                self._pass_barrier(first)
                continue
            batch = [first]
            nbytes = first.size
            after: Any = None  # a barrier or _STOP that ends the batch
            while nbytes < self.batch_bytes:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or isinstance(nxt, _Barrier):
                    after = nxt
                    break
                batch.append(nxt)
                nbytes += nxt.size
            self._commit(batch)
            if after is _STOP:
                return
            if after is not None:
                self._pass_barrier(after)

    def _pass_barrier(self, barrier: _Barrier) -> None:
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            barrier.error = self._storage_error("sync", exc)
        barrier.reached.set()

    def _commit(self, batch: list[_Op]) -> None:
        error: BaseException | None = None
        existed: list[bool] = [False] * len(batch)
        try:
            existed = self._apply_growing(batch)
        except lmdb.Error as exc:  # a disk error: every waiter hears of it
            error = self._storage_error("write", exc)
        except Exception as exc:  # a bug: reported as it is
            error = exc
        for op, was in zip(batch, existed, strict=True):
            try:
                op.done(error, was)
            except Exception:  # a callback must not stop the writer
                log.exception("L2 write callback failed")

    def _apply_growing(self, batch: list[_Op]) -> list[bool]:
        while True:
            try:
                return self._apply(batch)
            except lmdb.MapFullError:
                self._grow()

    def _apply(self, batch: list[_Op]) -> list[bool]:
        existed: list[bool] = []
        d_blocks = d_bytes = 0
        with self._env.begin(write=True) as txn:
            for op in batch:
                old = txn.get(op.key, db=self._meta)
                old_size = BlockMeta.unpack(old).size if old is not None else 0
                existed.append(old is not None)
                if op.data is None:
                    if old is not None:
                        txn.delete(op.key, db=self._data)
                        txn.delete(op.key, db=self._meta)
                        d_blocks -= 1
                        d_bytes -= old_size
                else:
                    txn.put(op.key, op.data, db=self._data)
                    txn.put(op.key, op.meta, db=self._meta)
                    d_blocks += 0 if old is not None else 1
                    d_bytes += op.size - old_size
        with self._count_lock:
            self._blocks += d_blocks
            self._bytes += d_bytes
        return existed

    def _grow(self) -> None:
        self._rw.acquire_write()
        try:
            new_size = self._env.info()["map_size"] * 2
            self._env.set_mapsize(new_size)
            self.map_grows += 1
        finally:
            self._rw.release_write()

    @property
    def map_size(self) -> int:
        return int(self._env.info()["map_size"])

    # -- reads -------------------------------------------------------------------------

    def read_into_sync(self, block: BlockId,
                       dest: memoryview | None) -> tuple[BlockMeta, Any] | None:
        """Blocking read. With ``dest`` (at least the block's size) the payload
        is copied there and returned as a view of it; without, as bytes."""
        key = encode_key(block)
        self._rw.acquire_read()
        try:
            with self._env.begin(buffers=True) as txn:
                raw_meta = txn.get(key, db=self._meta)
                if raw_meta is None:
                    return None
                meta = BlockMeta.unpack(raw_meta)
                value = txn.get(key, db=self._data)
                if value is None:
                    return None
                n = len(value)
                if dest is not None and len(dest) >= n:
                    dest[:n] = value
                    return meta, dest[:n]
                return meta, bytes(value)
        except lmdb.Error as exc:
            raise self._storage_error("read", exc) from exc
        finally:
            self._rw.release_read()

    def _scan_batch(self, after: bytes | None) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        self._rw.acquire_read()
        try:
            with self._env.begin(db=self._meta) as txn:
                cur = txn.cursor()
                ok = cur.set_range(after) if after is not None else cur.first()
                if ok and after is not None and cur.key() == after:
                    ok = cur.next()
                while ok and len(out) < _SCAN_BATCH:
                    out.append((cur.key(), cur.value()))
                    ok = cur.next()
        except lmdb.Error as exc:
            raise self._storage_error("scan", exc) from exc
        finally:
            self._rw.release_read()
        return out

    async def scan(self) -> AsyncIterator[tuple[BlockId, BlockMeta]]:
        loop = asyncio.get_running_loop()
        after: bytes | None = None
        while True:
            batch = await loop.run_in_executor(self._executor, self._scan_batch, after)
            for raw_key, raw_meta in batch:
                yield decode_key(raw_key), BlockMeta.unpack(raw_meta)
            if len(batch) < _SCAN_BATCH:
                return
            after = batch[-1][0]

    def usage(self) -> TierUsage:
        with self._count_lock:
            return TierUsage(self._blocks, self._bytes, self.capacity)

    # -- barrier and shutdown ------------------------------------------------------------

    def flush_sync(self) -> None:
        """Wait until every write queued before the call has committed and
        the data is synced to disk (a barrier through the writer's queue)."""
        barrier = _Barrier(threading.Event())
        with self._gate:
            if self._closed:
                return
            self._queue.put(barrier)
        barrier.reached.wait()
        if barrier.error is not None:
            raise barrier.error

    async def flush(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.flush_sync)

    async def close(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.close_sync)

    def close_sync(self) -> None:
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._writer.join()
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            raise self._storage_error("sync", exc) from exc
        finally:
            if self._own_executor:
                self._executor.shutdown(wait=True)
            self._env.close()


if TYPE_CHECKING:  # mypy checks that the class plays its role
    _plays_role: type[KeyValueTier] = LMDBTier
