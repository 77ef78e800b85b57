"""TieredStore: the one place that knows all tiers.

It owns the block index (key -> where the block lives, its size, checksum,
pins and lease), asks the policy what to evict, demote or promote, and runs the
movers between tiers. Everything here runs on the event loop thread; blocking
work (LMDB reads, checksums of whole blocks) goes to executors and the single
LMDB writer thread.

Life of a block:

* Put: an extent is reserved in the L1 arena (evicting if needed), the chunks
  are copied straight into it while the checksum is computed, and the block
  becomes visible on commit. It is then queued for L2 (write-behind, bounded
  in bytes). Acknowledgement level local waits for that L2 commit.
* L1 eviction keeps the L2 copy (a demotion) or, when the policy says drop,
  removes the block everywhere. A block whose L2 copy is not yet written is
  pinned until it is, so nothing acknowledged is lost.
* Get: L1 hits stream from the arena while the block is pinned; L2 hits are
  read into a fresh L1 extent (a promotion) when the policy admits them, and
  verified against the checksum before they are served. A bad copy is dropped,
  counted and reported as a miss.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore._impl import verify as block_verify
from kvstore._malloc import trim_heap
from kvstore.checksum import checksum, copy_and_checksum
from kvstore.coldindex import ColdIndex
from kvstore.config import Config
from kvstore.errors import (
    BlockTooLarge,
    CapacityExhausted,
    MalformedRequest,
    ServerShuttingDown,
    TierNotConfigured,
    UnknownNamespace,
)
from kvstore.l3mover import L3Mover
from kvstore.policy import Action, Policy, make_policy
from kvstore.tiers.base import BlockMeta, Buffer
from kvstore.tiers.lmdb_tier import LMDBTier
from kvstore.tiers.memory import MemoryTier
from kvstore.types import (
    TIER_BY_CODE,
    AckLevel,
    BlockFormat,
    BlockId,
    LookupResult,
    SessionEvent,
    StoreStats,
    TierName,
    TierStats,
    validate_key,
    validate_keys,
    validate_namespace,
)

log = logging.getLogger("kvstore.store")

# Most L2 evictions in one go on the event loop; more continue in a later
# iteration (a restart with a smaller l2.capacity may have millions to do).
_TRIM_BATCH = 1024
# The rebuild indexes this many blocks at a time into the compact index.
_REBUILD_SLICE = 65536
# bytes.translate table: 1 (found in the compact index) -> 2 (kvstore.v1.TIER_L2).
_ONE_TO_L2 = bytes([0, 2]) + bytes(range(2, 256))

# Blocks up to this size are verified on the event loop (a few µs); larger
# ones in the executor (the native verify releases the GIL).
_VERIFY_INLINE_BYTES = 256 * 1024

# How long a Put waits for pinned L1 blocks (being written to L2 or read) to
# become evictable before it gives up with RESOURCE_EXHAUSTED.
ROOM_WAIT_SECONDS = 30.0


@dataclass(slots=True, eq=False)
class Entry:
    size: int
    checksum: int
    created: float
    session: str | None = None
    l1: int = -1  # arena offset; -1 = not in L1
    l2: bool = False  # committed in L2
    l3: bool = False  # stored in L3 (as far as this node knows)
    l3_pending: int = 0  # demotions to L3 in flight (they pin the L2 copy)
    l2_pending: int = 0  # L2 writes in flight that read the L1 copy (pins it)
    readers: int = 0  # Gets streaming the L1 copy (pins it)
    lease_until: float = 0.0
    dead: bool = False  # no longer in the index; free L1 once unpinned
    dirty: bool = False  # in L1 with no L2 copy and no L2 write queued
    generation: int = 0  # distinguishes successive uses of the same L1 extent
    pin_until: float = 0.0  # a session's pin keeps it in L1 until then
    loading: asyncio.Future[None] | None = field(default=None)

    @property
    def pinned(self) -> bool:
        return self.readers > 0 or self.l2_pending > 0

    def meta(self) -> BlockMeta:
        return BlockMeta(self.size, self.checksum, self.created)


class BlockIndex(dict[BlockId, Entry]):
    """The full entries, by ``(namespace, key)``, and the same entries by
    namespace then key (``by_namespace``): a Lookup finds a chain's keys in
    its namespace's dict without building a tuple per key. Only item
    assignment and ``del`` may change it (the two views stay equal)."""

    __slots__ = ("by_namespace",)

    def __init__(self) -> None:
        super().__init__()
        self.by_namespace: dict[str, dict[bytes, Entry]] = {}

    def __setitem__(self, block: BlockId, entry: Entry) -> None:
        super().__setitem__(block, entry)
        keys = self.by_namespace.get(block[0])
        if keys is None:
            keys = self.by_namespace[block[0]] = {}
        keys[block[1]] = entry

    def __delitem__(self, block: BlockId) -> None:
        super().__delitem__(block)
        keys = self.by_namespace[block[0]]
        del keys[block[1]]
        if not keys:
            del self.by_namespace[block[0]]

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("BlockIndex changes only by item assignment and del")

    pop = popitem = clear = update = setdefault = _refuse


class BlockReader:
    """A found block, pinned while its bytes are streamed out."""

    __slots__ = ("_release", "_view", "entry", "size", "tier")

    def __init__(self, view: Buffer, tier: TierName,
                 release: Callable[[], None] | None, entry: Entry | None = None) -> None:
        self._view = memoryview(view)
        self.size = len(self._view)
        self.tier = tier
        self._release = release
        # The index entry when the bytes are the block's L1 copy (pinned).
        self.entry = entry

    def chunks(self, chunk_bytes: int) -> Iterator[tuple[int, memoryview]]:
        view = self._view
        if self.size == 0:
            yield 0, view
        for offset in range(0, self.size, chunk_bytes):
            yield offset, view[offset : offset + chunk_bytes]

    @property
    def view(self) -> memoryview:
        return self._view

    def close(self) -> None:
        release, self._release = self._release, None
        self._view.release()
        if release is not None:
            release()


class BlockWriter:
    """One block being put: bytes land in its reserved L1 extent as they come."""

    __slots__ = ("_checksum", "_closed", "_dest", "_pos", "block", "format", "offset", "session",
                 "size", "store")

    def __init__(self, store: TieredStore, block: BlockId, size: int, offset: int,
                 session: str | None, block_format: BlockFormat = BlockFormat.RAW) -> None:
        self.format = block_format
        self.store = store
        self.block = block
        self.size = size
        self.offset = offset
        self.session = session
        self._dest = store.l1.slice(offset, size)
        self._pos = 0
        self._checksum = 0
        self._closed = False

    @property
    def complete(self) -> bool:
        return self._pos == self.size

    @property
    def received(self) -> int:
        return self._pos

    def write(self, data: Buffer) -> None:
        n = len(data)
        if self._pos + n > self.size:
            raise MalformedRequest(
                f"block {self.block[1].hex()[:16]}: {self._pos + n} bytes sent for a block "
                f"declared as {self.size} bytes"
            )
        self._checksum = copy_and_checksum(self._dest, self._pos, data, self._checksum)
        self._pos += n

    def commit(self) -> Entry:
        if not self.complete:
            raise MalformedRequest(
                f"block {self.block[1].hex()[:16]}: stream ended after {self._pos} of "
                f"{self.size} bytes"
            )
        self._closed = True
        self._dest.release()
        return self.store.commit_block(self.block, self.size, self._checksum, self.offset,
                                       self.session)

    def abort(self) -> None:
        """Drop a partial block: nothing of it becomes visible."""
        if self._closed:
            return
        self._closed = True
        self._dest.release()
        self.store.release_reserved(self.offset, self.size)


class TieredStore:
    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 executor: concurrent.futures.ThreadPoolExecutor | None = None) -> None:
        self.config = config
        self.clock = clock
        self.max_block_bytes = config.server.max_block_bytes
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            config.server.workers, thread_name_prefix="kvstore-io")
        self.l1 = MemoryTier(config.l1.capacity, config.l1.page_bytes, config.l1.prefault,
                             config.l1.shm_path)
        self.l2: LMDBTier | None = None
        if config.l2.enabled:
            self.l2 = LMDBTier(config.l2_path, config.l2.capacity, config.l2.initial_map_size,
                               config.l2.sync, config.l2.batch_bytes, executor=self._executor)
        self.l3: L3Mover | None = L3Mover(self, config.l3) if config.l3.url else None
        tiers = [TierName.L1] + ([TierName.L2] if self.l2 else []) + \
            ([TierName.L3] if self.l3 else [])
        self.policy: Policy = make_policy(config.policy.name, tiers)
        self._l3_loading: dict[BlockId, asyncio.Future[None]] = {}
        self.client_clock = config.policy.clock == "client"
        self._client_now = 0.0
        if self.client_clock:
            self.clock = self._client_time
        # The keys of each session's latest Lookup (for Prefetch by session).
        self._session_blocks: OrderedDict[tuple[str, str], list[BlockId]] = OrderedDict()
        self._pins: dict[BlockId, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Blocks with a full entry: in L1, in use, tracked by the policy.
        self.index = BlockIndex()
        # Blocks only in L2, idle: a compact record each (kvstore/coldindex.py).
        self.cold: ColdIndex | None = ColdIndex() if (
            self.l2 is not None and config.l2.compact_index) else None
        # Cold blocks being demoted to L3 on their way out of L2.
        self._cold_demoting: set[BlockId] = set()
        self._trim_pending = False  # a continuation of _trim_l2 is scheduled
        # Per-tier event counters; occupancy fields are filled in by stats().
        self._counters = {t: TierStats(t) for t in TierName}
        # Blocks and payload bytes per tier, kept as entries move (Stats and
        # L2's capacity check never scan the index).
        self._held: dict[TierName, list[int]] = {t: [0, 0] for t in TierName}
        self._busy_pins = 0  # readers + L2 writes in flight, over all entries
        self._l2_queued = 0  # bytes queued for the L2 writer
        self._l1_dirty = 0  # bytes of dirty entries (see Entry.dirty)
        self._write_always = config.l2.write_mode == "always"
        # Write-back keeps at most this many dirty bytes in L1.
        self._dirty_limit = int(config.l1.capacity * (1.0 - config.l2.clean_reserve))
        self._waiters: asyncio.Event | None = None
        self._allowed = frozenset(config.server.namespaces)
        self.puts = self.gets = self.get_hits = self.session_events = 0
        self._closing = False
        self._open_writers = 0  # reserved, uncommitted extents (BlockWriters, shm slots)
        self._generations = itertools.count(1)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the index from L2 metadata (no payload is read)."""
        self._waiters = asyncio.Event()
        if self.l2 is not None:
            await self._rebuild_from_l2()
        if self.l3 is not None:
            self.l3.start()  # lists the bucket in the background; serving meanwhile

    async def _rebuild_from_l2(self) -> None:
        """Index every block L2 holds from its metadata alone."""
        assert self.l2 is not None
        # Typed arrays rather than lists of ints and floats: no object per
        # value. Into the compact index in slices, so that the transient
        # lists stay small; the full index needs them all (it sorts by age).
        slice_blocks = _REBUILD_SLICE if self.cold is not None else 2**62
        if self.cold is not None:
            self.cold.reserve(self.l2.usage().blocks)
        namespaces: list[str] = []
        keys: list[bytes] = []
        sizes = array("Q")
        sums = array("L")
        created = array("d")
        total = 0
        async for block, meta in self.l2.scan():
            namespaces.append(block[0])
            keys.append(block[1])
            sizes.append(meta.size)
            sums.append(meta.checksum)
            created.append(meta.created)
            if len(keys) >= slice_blocks:
                self.index_l2_blocks(namespaces, keys, sizes, sums, created)
                total += len(keys)
                namespaces, keys = [], []
                sizes, sums, created = array("Q"), array("L"), array("d")
        self.index_l2_blocks(namespaces, keys, sizes, sums, created)
        total += len(keys)
        del namespaces, keys, sizes, sums, created
        trim_heap()
        if total:
            log.info("index rebuilt from L2: %d blocks, %d bytes%s", total,
                     self._l2_bytes, " (compact index)" if self.cold is not None else "")

    def index_l2_blocks(self, namespaces: list[str], keys: list[bytes], sizes: Sequence[int],
                        sums: Sequence[int], created: Sequence[float]) -> None:
        """Index blocks found in L2 (not indexed yet), older ones first in
        line for eviction, so that recency order survives a restart."""
        size_array = np.asarray(sizes, dtype=np.uint64)
        created_array = np.asarray(created, dtype=np.float64)
        if self.cold is not None:
            # All of them go to the compact index; its last-use times put
            # older blocks first.
            used = self.clock() - np.maximum(time.time() - created_array, 0.0)
            self.cold.add_many(namespaces, keys, size_array,
                               np.asarray(sums, dtype=np.uint32), created_array, used)
            self._count_held(TierName.L2, len(keys), int(size_array.sum()))
            return
        order = np.argsort(created_array, kind="stable")
        now = self.clock()
        index, policy, set_l2 = self.index, self.policy, self._set_l2
        for i in order.tolist():
            block = (namespaces[i], keys[i])
            entry = Entry(int(sizes[i]), int(sums[i]), float(created[i]))
            set_l2(entry, True)
            index[block] = entry
            policy.on_insert(TierName.L2, block, entry.size, now)

    async def close(self) -> None:
        """Write every block that is only in L1 to L2, finish queued writes
        and release every tier."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.l3 is not None:
            await self.l3.close()
        if self.l2 is not None:
            for block, entry in list(self.index.items()):
                if entry.dirty:
                    self._queue_l2_write(block, entry)
            await self.l2.close()
        await self.l1.close()
        self._executor.shutdown(wait=False)

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        return self._executor

    # -- validation ---------------------------------------------------------------------

    def check_namespace(self, namespace: str) -> str:
        validate_namespace(namespace)
        if self._allowed and namespace not in self._allowed:
            raise UnknownNamespace(f"namespace {namespace!r} is not served here")
        return namespace

    def check_ack(self, ack: AckLevel) -> None:
        if ack == AckLevel.LOCAL and self.l2 is None:
            raise TierNotConfigured("acknowledgement level local needs L2, which is disabled")
        if ack == AckLevel.REMOTE and self.l3 is None:
            raise TierNotConfigured("acknowledgement level remote needs an L3 tier; "
                                    "none is configured (l3.url)")

    # -- pins and progress ----------------------------------------------------------------

    def _progress(self) -> None:
        """Wake Puts waiting for L1 room or L2 queue room."""
        if self._waiters is not None:
            self._waiters.set()

    async def _wait_progress(self, deadline: float) -> bool:
        assert self._waiters is not None
        self._waiters.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(self._waiters.wait(), remaining)
        except TimeoutError:
            return False
        return True

    # -- where entries are (all changes go through these) -------------------------

    @property
    def _l2_bytes(self) -> int:
        return self._held[TierName.L2][1]

    def _count_held(self, tier: TierName, blocks: int, nbytes: int) -> None:
        held = self._held[tier]
        held[0] += blocks
        held[1] += nbytes

    def _set_l1(self, entry: Entry, offset: int) -> None:
        if (entry.l1 >= 0) != (offset >= 0):
            sign = 1 if offset >= 0 else -1
            self._count_held(TierName.L1, sign, sign * entry.size)
        entry.l1 = offset

    def _set_l2(self, entry: Entry, present: bool) -> None:
        if entry.l2 != present:
            sign = 1 if present else -1
            self._count_held(TierName.L2, sign, sign * entry.size)
        entry.l2 = present

    def listed_cold(self, block: BlockId, size: int) -> bool:
        """The L3 listing found a block the compact index holds: note that L3
        has it too. False when the compact index does not hold it."""
        if self.cold is None:
            return False
        record = self.cold.get(block[0], block[1])
        if record is None or record.size != size:
            return False
        if not record.l3:
            self.cold.set_l3(block[0], block[1], True)
            self._count_held(TierName.L3, 1, size)
        return True

    def set_l3(self, entry: Entry, present: bool) -> None:
        if entry.l3 != present:
            sign = 1 if present else -1
            self._count_held(TierName.L3, sign, sign * entry.size)
        entry.l3 = present

    def pin_reader(self, entry: Entry) -> None:
        entry.readers += 1
        self._busy_pins += 1

    def count(self, tier: TierName) -> TierStats:
        return self._counters[tier]

    def unpin_reader(self, entry: Entry) -> None:
        self._unpin_reader(None, entry)

    def _unpin_reader(self, block: BlockId | None, entry: Entry) -> None:
        entry.readers -= 1
        self._busy_pins -= 1
        self._maybe_free_dead(entry)
        self._progress()

    def _maybe_free_dead(self, entry: Entry) -> None:
        if entry.dead and not entry.pinned and entry.l1 >= 0:
            self._set_dirty(entry, False)
            self.l1.release(entry.l1, entry.size)
            self._set_l1(entry, -1)

    def _set_dirty(self, entry: Entry, dirty: bool) -> None:
        if entry.dirty != dirty:
            entry.dirty = dirty
            self._l1_dirty += entry.size if dirty else -entry.size

    # -- Put --------------------------------------------------------------------------------

    async def begin_put(self, namespace: str, key: bytes, size: int,
                        session: str | None = None,
                        block_format: BlockFormat = BlockFormat.RAW) -> BlockWriter:
        """Reserve room for one block; the caller writes its bytes then commits."""
        if self._closing:
            raise ServerShuttingDown("server is shutting down")
        validate_key(key)
        self.check_block_size(size)
        offset = await self.reserve_l1(size)
        return BlockWriter(self, (namespace, key), size, offset, session, block_format)

    async def verify_block(self, offset: int, size: int) -> None:
        """Check a block-format block in L1 (header fields, header and payload
        CRC-32C): InvalidBlock or CorruptBlock naming what is wrong."""
        view = self.l1.slice(offset, size)
        try:
            if size <= _VERIFY_INLINE_BYTES:
                block_verify(view)
            else:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, block_verify, view)
        finally:
            view.release()

    def check_block_size(self, size: int) -> None:
        if size <= 0:
            raise MalformedRequest(f"block_size must be at least 1 (got {size})")
        if size > self.max_block_bytes:
            raise BlockTooLarge(
                f"block of {size} bytes exceeds the limit of {self.max_block_bytes} bytes "
                "(server.max_block_bytes)"
            )
        if size > self.l1.capacity:
            raise BlockTooLarge(
                f"block of {size} bytes exceeds the L1 capacity of {self.l1.capacity} bytes "
                "(l1.capacity): every block passes through L1"
            )

    async def reserve_l1(self, size: int) -> int:
        """An L1 extent for a block about to be written (evicting if needed).
        The caller commits it with ``commit_block`` or gives it back with
        ``release_reserved``."""
        offset = await self._make_room_l1(size)
        self._open_writers += 1
        return offset

    def release_reserved(self, offset: int, size: int) -> None:
        self._open_writers -= 1
        self.l1.release(offset, size)
        self._progress()

    async def _make_room_l1(self, size: int) -> int:
        deadline = time.monotonic() + ROOM_WAIT_SECONDS
        while True:
            offset = self.l1.reserve(size)
            if offset >= 0:
                return offset
            now = self.clock()
            victim = self.policy.victim(TierName.L1, now, self._l1_evictable)
            if victim is not None:
                self._evict_l1(victim[0], victim[1])
                continue
            busy = self._open_writers > 0 or self._busy_pins > 0
            if not busy or not await self._wait_progress(deadline):
                raise CapacityExhausted(
                    f"L1 is full: no room for a {size}-byte block "
                    f"({self.l1.arena.used_bytes} of {self.l1.capacity} bytes in use, "
                    "the rest leased or in use)"
                )

    def _l1_evictable(self, block: BlockId) -> bool:
        entry = self.index.get(block)
        if entry is None or entry.l1 < 0:
            return True  # stale policy entry: evicting it only cleans up
        now = self.clock()
        return not entry.pinned and entry.lease_until <= now and entry.pin_until <= now

    def _evict_l1(self, block: BlockId, action: Action) -> None:
        entry = self.index.get(block)
        if entry is None or entry.l1 < 0:
            self.policy.on_remove(TierName.L1, block)
            return
        if action is Action.DEMOTE and self.l2 is not None and not entry.l2:
            # Not in L2 yet: write it first; it stays pinned until written.
            if entry.dirty:
                self._queue_l2_write(block, entry)
            return
        self._set_dirty(entry, False)
        self.l1.release(entry.l1, entry.size)
        self._set_l1(entry, -1)
        self.policy.on_remove(TierName.L1, block)
        c = self._counters[TierName.L1]
        c.evictions += 1
        if action is Action.DEMOTE and entry.l2:
            c.demotions += 1
            if self.cold is not None:
                self._cool(block, entry)
        else:
            self._forget(block, entry)

    # -- the compact index (blocks only in L2) ----------------------------------------

    def _cool(self, block: BlockId, entry: Entry) -> None:
        """An idle block that is only in L2 leaves the full index for the
        compact one (and the policy's view)."""
        assert self.cold is not None
        now = self.clock()
        if (entry.dead or entry.l1 >= 0 or not entry.l2 or entry.l2_pending or entry.l3_pending
                or entry.readers or entry.loading is not None or entry.lease_until > now
                or entry.pin_until > now or block in self._cold_demoting
                or self.index.get(block) is not entry or entry.checksum < 0):
            return
        del self.index[block]
        self.policy.on_remove(TierName.L2, block)
        if entry.l3:
            self.policy.on_remove(TierName.L3, block)
        entry.dead = True  # any holder of the old object sees it gone
        self.cold.add(block[0], block[1], entry.size, entry.checksum, entry.created, now,
                      entry.l3)

    def _warm(self, block: BlockId, track: bool = True) -> Entry | None:
        """The block's full entry, moved out of the compact index (None when
        it is not there). ``track``: tell the policy (a use is coming)."""
        assert self.cold is not None
        record = self.cold.take(block[0], block[1])
        if record is None:
            return None
        entry = Entry(record.size, record.checksum, record.created)
        entry.l2 = True  # occupancy already counts it
        entry.l3 = record.l3
        self.index[block] = entry
        if track:
            now = self.clock()
            self.policy.on_insert(TierName.L2, block, entry.size, now)
            if entry.l3:
                self.policy.on_insert(TierName.L3, block, entry.size, now)
        return entry

    def _entry(self, block: BlockId) -> Entry | None:
        """The block's full entry, from the compact index if need be."""
        entry = self.index.get(block)
        if entry is None and self.cold is not None and len(self.cold):
            entry = self._warm(block)
        return entry

    def _evict_cold_l2(self, drop: bool = False) -> bool:
        """Make room in L2 from the compact index: demote its least recently
        used block to L3 (or drop it when L3 has it or there is no L3; and,
        with ``drop``, when L3 is down). False when it gave none."""
        assert self.cold is not None and self.l2 is not None
        record = self.cold.victim()
        if record is None:
            return False
        block = (record.namespace, record.key)
        if self.l3 is not None and not record.l3 and not (drop and not self.l3.healthy):
            if not self.l3.healthy:
                return False  # the caller's outage rule applies
            entry = self._warm(block, track=False)
            assert entry is not None
            if self.l3.start_demotion(block, entry):
                self._cold_demoting.add(block)
                return True
            # In-flight demotions are at their bound: back in, wait for them.
            self._cool(block, entry)
            return False
        entry = self._warm(block, track=False)
        assert entry is not None
        self._drop_l2_copy(block, entry)
        self._counters[TierName.L2].evictions += 1
        if entry.l3:
            self.policy.on_insert(TierName.L3, block, entry.size, self.clock())
            self._counters[TierName.L2].demotions += 1
        else:
            self._forget(block, entry, delete_l2=False)
        return True

    def _finish_cold_demotion(self, block: BlockId, entry: Entry) -> None:
        """A cold block's demotion ended: once L3 has it, its L2 copy goes."""
        self._cold_demoting.discard(block)
        if self.index.get(block) is not entry or entry.dead or not entry.l2:
            return
        if entry.l3:
            self._drop_l2_copy(block, entry)
            self._counters[TierName.L2].evictions += 1
            if entry.l1 < 0:
                return  # now an L3-only block (mark() told the policy)
        elif entry.l1 < 0:
            self._cool(block, entry)  # not demoted (L2 read failed?): back in

    def commit_block(self, block: BlockId, size: int, crc: int, offset: int,
                     session: str | None) -> Entry:
        """Make a filled, reserved L1 extent (``reserve_l1``) visible as ``block``."""
        self._open_writers -= 1
        old = self._entry(block)
        if old is not None:
            # Its L2 copy goes too (the writer queue keeps the order: the new
            # block's write comes after this delete), so a restart before the
            # new block reaches L2 finds nothing rather than the old bytes;
            # so does its L3 copy, which a listing or another node's HEAD
            # would find for this key (an upload of the new block waits for
            # that delete: L3Mover keeps them in order).
            self._forget(block, old, delete_l3=old.l3 or old.l3_pending > 0)
        entry = Entry(size, crc, time.time(), session)
        self._set_l1(entry, offset)
        entry.generation = next(self._generations)
        self.index[block] = entry
        if self.l2 is not None:
            self._set_dirty(entry, True)
        self.puts += 1
        self.policy.on_insert(TierName.L1, block, entry.size, self.clock(), session)
        return entry

    async def finish_put(self, writer: BlockWriter, ack: AckLevel) -> asyncio.Future[Any] | None:
        """Commit a complete block. Returns a future that resolves once the
        block is durable at ``ack`` (None when it already is). A block in the
        kvstore block format is verified first; a bad one is never stored."""
        if writer.format == BlockFormat.KV_V1 and writer.complete:
            try:
                await self.verify_block(writer.offset, writer.size)
            except BaseException:
                writer.abort()
                raise
        entry = writer.commit()
        return await self.make_durable(writer.block, entry, ack)

    async def make_durable(self, block: BlockId, entry: Entry,
                           ack: AckLevel) -> asyncio.Future[Any] | None:
        """Start the writes that ``ack`` asks for (L2 write-back otherwise).
        Returns a future that resolves once they are done, or None."""
        if ack == AckLevel.REMOTE:
            assert self.l3 is not None
            local = await self._make_local(block, entry, AckLevel.LOCAL)
            remote = asyncio.get_running_loop().create_task(self.l3.write_remote(block, entry))
            return asyncio.ensure_future(
                asyncio.gather(remote, *([local] if local is not None else [])))
        return await self._make_local(block, entry, ack)

    async def _make_local(self, block: BlockId, entry: Entry,
                          ack: AckLevel) -> asyncio.Future[None] | None:
        if self.l2 is None:
            return None
        if ack == AckLevel.MEMORY and not self._write_always:
            self._clean_ahead()
            return None
        self.pin_reader(entry)  # it must not leave L1 before its L2 write is queued
        try:
            await self._wait_l2_queue_room(entry.size)
        finally:
            self._unpin_reader(block, entry)
        if self.index.get(block) is not entry:
            return None  # replaced or deleted meanwhile
        return self._queue_l2_write(block, entry, want_future=ack >= AckLevel.LOCAL)

    def _clean_ahead(self) -> None:
        """Write-back: queue L2 writes for the dirty blocks next in line for
        eviction, so that eviction rarely waits for the disk."""
        excess = self._l1_dirty - self._dirty_limit
        if excess <= 0:
            return
        queued = 0

        def pick(block: BlockId) -> bool:
            nonlocal queued
            entry = self.index.get(block)
            if entry is not None and entry.dirty and not entry.dead:
                self._queue_l2_write(block, entry)
                queued += entry.size
            return queued >= excess  # True ends the scan

        self.policy.victim(TierName.L1, self.clock(), pick)

    async def _wait_l2_queue_room(self, size: int) -> None:
        limit = self.config.l2.write_queue_bytes
        deadline = time.monotonic() + ROOM_WAIT_SECONDS
        while self._l2_queued + size > limit and self._l2_queued > 0:
            if not await self._wait_progress(deadline):
                raise CapacityExhausted("the L2 write queue stays full: the disk is too slow")

    def _queue_l2_write(self, block: BlockId, entry: Entry,
                        want_future: bool = False) -> asyncio.Future[None] | None:
        assert self.l2 is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] | None = loop.create_future() if want_future else None
        entry.l2_pending += 1
        self._busy_pins += 1
        self._set_dirty(entry, False)
        self._l2_queued += entry.size
        view = self.l1.slice(entry.l1, entry.size)

        def settle(error: BaseException | None) -> None:
            view.release()
            entry.l2_pending -= 1
            self._busy_pins -= 1
            self._l2_queued -= entry.size
            if error is None and not entry.dead and self.index.get(block) is entry:
                if not entry.l2:
                    self._set_l2(entry, True)
                    self.policy.on_insert(TierName.L2, block, entry.size, self.clock(),
                                          entry.session)
                self._trim_l2()
            elif error is not None:
                log.error("L2 write of %s failed: %s", block[1].hex()[:16], error)
                if not entry.dead and entry.l1 >= 0 and not entry.l2:
                    self._set_dirty(entry, True)
            self._maybe_free_dead(entry)
            self._progress()
            if fut is not None and not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

        def done(error: BaseException | None, existed: bool) -> None:
            loop.call_soon_threadsafe(settle, error)

        self.l2.submit(block, view, entry.meta(), done)
        return fut

    def _trim_l2(self) -> None:
        assert self.l2 is not None
        capacity = self.config.l2.capacity
        budget = _TRIM_BATCH
        while self._l2_bytes > capacity:
            budget -= 1
            if budget < 0:
                # Far over capacity (e.g. restarted with a smaller l2.capacity):
                # go on in a later loop iteration, letting calls in between.
                self._trim_later()
                return
            if self.cold is not None and len(self.cold):
                if self._evict_cold_l2():
                    continue
                if self.l3 is not None and self.l3.healthy:
                    return  # demotions in flight are at their bound: wait for them
                if self.l3 is not None and \
                        self._l2_bytes <= capacity * (1 + self.config.l3.outage_spill):
                    return  # L3 is down: hold (see below)
                self._evict_cold_l2(drop=True)
                continue
            victim = self.policy.victim(TierName.L2, self.clock(), self._l2_evictable)
            if victim is None:
                return
            block, action = victim
            entry = self.index.get(block)
            if entry is None or not entry.l2:
                self.policy.on_remove(TierName.L2, block)
                continue
            if action is Action.DEMOTE and self.l3 is not None and not entry.l3:
                if self.l3.start_demotion(block, entry):
                    continue  # its L2 copy goes once L3 has it (after_demotion)
                if self.l3.healthy:
                    return  # demotions in flight are at their bound: wait for them
                # L3 is down: keep its blocks in L2 a bounded amount over
                # capacity (they move once L3 is back), then drop.
                if self._l2_bytes <= capacity * (1 + self.config.l3.outage_spill):
                    return
            self.policy.on_remove(TierName.L2, block)
            self._drop_l2_copy(block, entry)
            self._counters[TierName.L2].evictions += 1
            if entry.l1 < 0 and not entry.l3:
                self._forget(block, entry, delete_l2=False)

    def _trim_later(self) -> None:
        if self._trim_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (closing): the next write trims again
        self._trim_pending = True

        def again() -> None:
            self._trim_pending = False
            if self.l2 is not None and not self._closing:
                self._trim_l2()

        loop.call_soon(again)

    def after_demotion(self, block: BlockId | None = None, entry: Entry | None = None) -> None:
        if block is not None and entry is not None and block in self._cold_demoting:
            self._finish_cold_demotion(block, entry)
        if self.l2 is not None:
            self._trim_l2()
        self._progress()

    def _l2_evictable(self, block: BlockId) -> bool:
        entry = self.index.get(block)
        if entry is None or not entry.l2:
            return True
        return entry.l2_pending == 0 and entry.l3_pending == 0 and \
            entry.lease_until <= self.clock()

    def _drop_l2_copy(self, block: BlockId, entry: Entry) -> None:
        assert self.l2 is not None
        self._set_l2(entry, False)
        if entry.l1 >= 0 and not entry.dead and not entry.l2_pending:
            self._set_dirty(entry, True)
        self.l2.submit(block, None, None, lambda e, x: None)

    def forget(self, block: BlockId, entry: Entry) -> None:
        self._forget(block, entry)

    def _forget(self, block: BlockId, entry: Entry, delete_l2: bool = True,
                delete_l3: bool = False) -> None:
        """Remove a block from the index and the local tiers (respecting pins);
        from the shared L3 only when asked (an explicit Delete, whether or not
        this node knows of an L3 copy; an overwrite of a block it has there)."""
        if self.index.get(block) is entry:
            del self.index[block]
        entry.dead = True
        self._set_dirty(entry, False)
        if entry.l1 >= 0:
            self.policy.on_remove(TierName.L1, block)
            if entry.pinned:
                pass  # freed by _maybe_free_dead when the last pin goes
            else:
                self.l1.release(entry.l1, entry.size)
                self._set_l1(entry, -1)
        if entry.l2:
            self.policy.on_remove(TierName.L2, block)
            if delete_l2:
                self._drop_l2_copy(block, entry)
            else:
                self._set_l2(entry, False)
        elif entry.l2_pending and delete_l2 and self.l2 is not None:
            # Its L2 write is still queued: a delete queued behind it (the
            # writer keeps the order) keeps it from coming back at a restart.
            self.l2.submit(block, None, None, lambda e, x: None)
        if entry.l3:
            self.set_l3(entry, False)
            self.policy.on_remove(TierName.L3, block)
        if delete_l3 and self.l3 is not None:
            self.l3.delete_later(block)

    # -- Get ----------------------------------------------------------------------------------

    async def open_read(self, block: BlockId, session: str | None = None) -> BlockReader | None:
        """The block, pinned for streaming, or None for a miss."""
        self.gets += 1
        entry = self._entry(block)
        c1 = self._counters[TierName.L1]
        pending = entry.loading if entry is not None else self._l3_loading.get(block)
        if pending is not None:
            await asyncio.shield(pending)
            entry = self._entry(block)
        if entry is None:
            c1.misses += 1
            if self.l2 is not None:
                self._counters[TierName.L2].misses += 1
            if self.l3 is not None:
                return await self._read_l3(block, None, session)
            return None
        now = self.clock()
        if entry.l1 >= 0:
            c1.hits += 1
            self.get_hits += 1
            self.policy.on_hit(TierName.L1, block, now, session)
            self.pin_reader(entry)
            return BlockReader(self.l1.slice(entry.l1, entry.size), TierName.L1,
                               lambda: self._unpin_reader(block, entry), entry)
        c1.misses += 1
        if entry.l2 and self.l2 is not None:
            reader = await self._read_l2(block, entry, session)
            if reader is not None or not entry.l3:
                return reader
        elif self.l2 is not None:
            self._counters[TierName.L2].misses += 1
        if entry.l3 and self.l3 is not None:
            return await self._read_l3(block, entry, session)
        return None

    async def _read_l3(self, block: BlockId, entry: Entry | None, session: str | None,
                       hint: bool = False) -> BlockReader | None:
        """Read from L3 (also blocks other nodes put) and promote into L1."""
        assert self.l3 is not None
        loop = asyncio.get_running_loop()
        loading: asyncio.Future[None] = loop.create_future()
        if entry is not None:
            entry.loading = loading
        else:
            self._l3_loading[block] = loading
        try:
            found = await self.l3.read(block, entry)
            if found is None:
                return None
            entry, payload = found
            if not hint:
                self.get_hits += 1
                self.policy.on_hit(TierName.L3, block, self.clock(), session)
            offset = -1
            if entry.l1 < 0 and self.policy.admit(TierName.L1, block, entry.size, self.clock()):
                with contextlib.suppress(CapacityExhausted):
                    offset = await self.reserve_l1(entry.size)
            if offset >= 0 and (entry.l1 >= 0 or entry.dead):
                self.release_reserved(offset, entry.size)
                offset = -1
            if offset >= 0:
                self.l1.slice(offset, entry.size)[:] = payload
                self._place_in_l1(block, entry, offset, session)
            if entry.l1 >= 0 and not entry.dead:
                self.pin_reader(entry)
                return BlockReader(self.l1.slice(entry.l1, entry.size), TierName.L3,
                                   lambda: self.unpin_reader(entry), entry)
            return BlockReader(payload, TierName.L3, None)
        finally:
            if self._l3_loading.get(block) is loading:
                del self._l3_loading[block]
            if entry is not None and entry.loading is loading:
                entry.loading = None
            if not loading.done():
                loading.set_result(None)

    def _place_in_l1(self, block: BlockId, entry: Entry, offset: int,
                     session: str | None) -> None:
        """A promoted block's bytes are in its reserved extent: index them."""
        self._open_writers -= 1
        self._set_l1(entry, offset)
        entry.generation = next(self._generations)
        if self.l2 is not None and not entry.l2:
            self._set_dirty(entry, True)
        self._counters[TierName.L1].promotions += 1
        self.policy.on_insert(TierName.L1, block, entry.size, self.clock(), session)

    async def _read_l2(self, block: BlockId, entry: Entry, session: str | None,
                       hint: bool = False) -> BlockReader | None:
        """Read from L2, verify, promote into L1 if admitted. ``hint``: a
        prefetch, not a reference (no hit counted, the policy is not told)."""
        assert self.l2 is not None
        c2 = self._counters[TierName.L2]
        loop = asyncio.get_running_loop()
        entry.loading = loop.create_future()
        offset = -1
        try:
            now = self.clock()
            if self.policy.admit(TierName.L1, block, entry.size, now):
                with contextlib.suppress(CapacityExhausted):
                    offset = await self.reserve_l1(entry.size)
            dest = self.l1.slice(offset, entry.size) if offset >= 0 else None
            result = await loop.run_in_executor(self._executor, self._read_verify_l2, block,
                                                entry.checksum, dest)
            if self.index.get(block) is not entry or result is None:
                if offset >= 0:
                    self.release_reserved(offset, entry.size)
                c2.misses += 1
                return None
            ok, payload = result
            if not ok:
                if offset >= 0:
                    self.release_reserved(offset, entry.size)
                c2.corrupt += 1
                c2.misses += 1
                log.warning("dropped corrupt L2 copy of %s/%s", block[0], block[1].hex()[:16])
                self.policy.on_remove(TierName.L2, block)
                self._drop_l2_copy(block, entry)
                if entry.l1 < 0 and not entry.l3:
                    self._forget(block, entry)
                return None
            c2.hits += 1
            if not hint:
                self.get_hits += 1
                self.policy.on_hit(TierName.L2, block, self.clock(), session)
            if offset >= 0:
                self._place_in_l1(block, entry, offset, session)
                self.pin_reader(entry)
                return BlockReader(self.l1.slice(offset, entry.size), TierName.L2,
                                   lambda: self._unpin_reader(block, entry), entry)
            return BlockReader(payload, TierName.L2, None)
        except BaseException:
            if offset >= 0 and entry.l1 != offset:
                self.release_reserved(offset, entry.size)
            raise
        finally:
            fut, entry.loading = entry.loading, None
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def read_l2_verified(self, block: BlockId, entry: Entry) -> bytes | None:
        """The block's L2 bytes, checked against its checksum (for demotion)."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, self._read_verify_l2, block,
                                            entry.checksum, None)
        if result is None or not result[0]:
            return None
        return bytes(result[1])

    def _read_verify_l2(self, block: BlockId, expected: int,
                        dest: memoryview | None) -> tuple[bool, Buffer] | None:
        assert self.l2 is not None
        found = self.l2.read_into_sync(block, dest)
        if found is None:
            return None
        meta, payload = found
        ok = meta.checksum == expected and len(payload) == meta.size \
            and checksum(payload) == expected
        return ok, payload

    # -- Lookup / Delete -----------------------------------------------------------------------

    @staticmethod
    def _tier_of(entry: Entry | None) -> TierName | None:
        if entry is None or entry.dead:
            return None
        if entry.l1 >= 0:
            return TierName.L1
        if entry.l2:
            return TierName.L2
        if entry.l3:
            return TierName.L3
        return None

    async def lookup(self, namespace: str, keys: Sequence[bytes], lease_ms: int = 0,
                     session: str | None = None) -> LookupResult:
        """How many leading keys are stored, and the fastest tier of each.
        Keys this node does not know are looked for in the shared L3 from the
        first local miss on, ``l3.concurrency`` at a time, up to the first
        key L3 lacks too (later keys are then reported as not stored)."""
        found, codes = await self.lookup_codes(namespace, keys, lease_ms, session)
        return LookupResult(found, [TIER_BY_CODE[c] for c in codes])

    async def lookup_codes(self, namespace: str, keys: Sequence[bytes], lease_ms: int = 0,
                           session: str | None = None) -> tuple[int, bytes]:
        """:meth:`lookup` with the tiers as one ``kvstore.v1.Tier`` value per
        key (0 = not stored) in a bytes object: what the servicer sends."""
        lengths = validate_keys(keys)
        if session:
            self._note_request(namespace, session, [(namespace, key) for key in keys])
        hot = self.index.by_namespace.get(namespace)
        entries: list[Entry | None] = list(map(hot.get, keys)) if hot else [None] * len(keys)
        # _tier_of as kvstore.v1.Tier values, inlined: this runs once per key
        # of every Lookup.
        if entries.count(None) == len(entries):
            codes = bytearray(len(entries))  # none has a full entry (e.g. all cold)
        else:
            codes = bytearray(
                0 if e is None else 1 if e.l1 >= 0 else 2 if e.l2 else 3 if e.l3 else 0
                for e in entries)
        if self.cold is not None and len(self.cold) and 0 in codes:
            # Blocks in the compact index are in L2 (2); no key is in both.
            in_cold = self.cold.contains_many(namespace, keys, lengths)
            n = len(codes)
            codes = bytearray((int.from_bytes(codes, "little") | int.from_bytes(
                in_cold.translate(_ONE_TO_L2), "little")).to_bytes(n, "little"))
            if lease_ms > 0:  # a lease needs the full entry
                for i in [i for i, c in enumerate(in_cold) if c]:
                    entries[i] = self._warm((namespace, keys[i]))
        found = codes.find(0)
        if found < 0:
            found = len(codes)
        elif self.l3 is not None and self.l3.healthy:
            tiers = [TIER_BY_CODE[c] for c in codes]
            await self._lookup_l3([(namespace, key) for key in keys], entries, tiers)
            codes = bytearray(0 if t is None else t.value for t in tiers)
            found = codes.find(0)
            if found < 0:
                found = len(codes)
        if lease_ms > 0:
            lease_until = self.clock() + min(lease_ms, self.config.server.max_lease_ms) / 1000.0
            for entry, code in zip(entries, codes, strict=True):
                if entry is not None and code:
                    entry.lease_until = max(entry.lease_until, lease_until)
        return found, bytes(codes)

    async def _lookup_l3(self, blocks: list[BlockId], entries: list[Entry | None],
                         tiers: list[TierName | None]) -> None:
        assert self.l3 is not None
        window = max(1, self.config.l3.concurrency)
        start = tiers.index(None)
        while start < len(blocks):
            todo = [i for i in range(start, min(start + window, len(blocks)))
                    if tiers[i] is None]
            heads = await asyncio.gather(*(self.l3.head(blocks[i]) for i in todo))
            for i, entry in zip(todo, heads, strict=True):
                entries[i] = entry
                tiers[i] = self._tier_of(entry)
            if any(entry is None for entry in heads):
                return
            start += window

    # -- sessions ---------------------------------------------------------------------

    def set_client_time(self, now: float) -> None:
        """policy.clock = client: the time a replay says it is (never goes back)."""
        if now > self._client_now:
            self._client_now = now

    def _client_time(self) -> float:
        return self._client_now

    def _note_request(self, namespace: str, session: str, blocks: list[BlockId]) -> None:
        """A session's request: tell the policy which blocks its context holds."""
        self.policy.on_request(blocks, self.clock(), session)
        key = (namespace, session)
        self._session_blocks[key] = blocks
        self._session_blocks.move_to_end(key)
        while len(self._session_blocks) > 10_000:
            self._session_blocks.popitem(last=False)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def prefetch(self, namespace: str, session: str, keys: Sequence[bytes]) -> tuple[int, int]:
        """Bring blocks into L1 in the background: ``keys``, or the blocks of
        the session's latest Lookup. Returns the blocks and bytes found."""
        for i, key in enumerate(keys):
            validate_key(key, i)
        blocks = [(namespace, k) for k in keys] if keys else \
            list(self._session_blocks.get((namespace, session), []))
        wanted = [(b, e) for b in blocks if (e := self._entry(b)) is not None]
        todo = [b for b, e in wanted if e.l1 < 0]
        if todo:
            self._spawn(self._promote_all(todo))
        return len(wanted), sum(e.size for _, e in wanted)

    async def _promote_all(self, blocks: list[BlockId]) -> None:
        for block in blocks:
            entry = self._entry(block)
            if entry is None or entry.l1 >= 0 or self._closing:
                continue
            reader: BlockReader | None = None
            with contextlib.suppress(Exception):
                if entry.l2 and self.l2 is not None:
                    reader = await self._read_l2(block, entry, None, hint=True)
                elif entry.l3 and self.l3 is not None:
                    reader = await self._read_l3(block, entry, None, hint=True)
            if reader is not None:
                reader.close()

    async def pin(self, namespace: str, keys: Sequence[bytes], ttl_ms: int) -> tuple[int, int]:
        """Keep blocks in L1 for ``ttl_ms`` (promoting them first), within the
        namespace's pin quota. Returns the blocks and bytes pinned."""
        for i, key in enumerate(keys):
            validate_key(key, i)
        cfg = self.config.server
        now = self.clock()
        until = now + min(ttl_ms or cfg.max_pin_ms, cfg.max_pin_ms) / 1000.0
        blocks = [(namespace, k) for k in keys]
        found = [(b, e) for b in blocks if (e := self._entry(b)) is not None]
        quota = int(cfg.pin_quota * self.l1.capacity)
        wanted = {b for b, _ in found}
        held = sum(e.size for b, until_b in self._pins.items()
                   if b[0] == namespace and until_b > now and b not in wanted
                   and (e := self.index.get(b)) is not None)
        asked = sum(e.size for _, e in found)
        if held + asked > quota:
            raise CapacityExhausted(
                f"pinning {asked} bytes would put namespace {namespace!r} over its pin quota "
                f"of {quota} bytes ({held} already pinned; server.pin_quota)")
        await self._promote_all([b for b, e in found if e.l1 < 0])
        pinned = 0
        nbytes = 0
        for block, entry in found:
            if entry.dead or entry.l1 < 0:
                continue
            entry.pin_until = until
            self._pins[block] = until
            pinned += 1
            nbytes += entry.size
        self.policy.pin([b for b, _ in found], until)
        self._drop_expired_pins(now)
        return pinned, nbytes

    def unpin(self, namespace: str, keys: Sequence[bytes]) -> tuple[int, int]:
        count = nbytes = 0
        for i, key in enumerate(keys):
            validate_key(key, i)
            block = (namespace, key)
            if self._pins.pop(block, None) is not None:
                entry = self.index.get(block)
                if entry is not None:
                    entry.pin_until = 0.0
                    count += 1
                    nbytes += entry.size
        self._progress()
        return count, nbytes

    def _drop_expired_pins(self, now: float) -> None:
        if len(self._pins) > 1024:
            for block in [b for b, t in self._pins.items() if t <= now]:
                del self._pins[block]

    async def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove blocks from every tier, the shared L3 included."""
        for i, key in enumerate(keys):
            validate_key(key, i)
        deleted = 0
        unknown: list[BlockId] = []
        for key in keys:
            block = (namespace, key)
            entry = self._entry(block)
            if entry is not None:
                self._forget(block, entry, delete_l3=True)
                deleted += 1
            else:
                unknown.append(block)
        self._progress()
        if self.l3 is not None and unknown and self.l3.healthy:
            # Blocks another node put in the shared bucket.
            results = await asyncio.gather(*(self.l3.tier.delete(b) for b in unknown),
                                           return_exceptions=True)
            deleted += sum(1 for r in results if r is True)
        return deleted

    def session_event(self, event: SessionEvent) -> None:
        self.session_events += 1
        self.policy.on_session_event(event, self.clock())

    # -- Stats ----------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        tiers = [self._tier_stats(TierName.L1, self.l1.capacity)]
        if self.l2 is not None:
            tiers.append(self._tier_stats(TierName.L2, self.config.l2.capacity))
        if self.l3 is not None:
            l3 = self._tier_stats(TierName.L3, 0)
            l3.available = self.l3.healthy
            tiers.append(l3)
        return StoreStats(tiers, self.puts, self.gets, self.get_hits, self.session_events,
                          self.policy.name)

    def _tier_stats(self, tier: TierName, capacity: int) -> TierStats:
        blocks, nbytes = self._held[tier]
        return dataclasses.replace(self._counters[tier], blocks=blocks, bytes=nbytes,
                                   capacity=capacity)

    # Convenience for tests and the CLI: one whole block in, one whole block out.

    async def put_bytes(self, namespace: str, key: bytes, data: Buffer,
                        ack: AckLevel = AckLevel.MEMORY, session: str | None = None) -> None:
        view = memoryview(data).cast("B")
        writer = await self.begin_put(namespace, key, len(view), session)
        try:
            writer.write(view)
        except BaseException:
            writer.abort()
            raise
        fut = await self.finish_put(writer, ack)
        if fut is not None:
            await fut

    async def get_bytes(self, namespace: str, key: bytes) -> bytes | None:
        reader = await self.open_read((namespace, key))
        if reader is None:
            return None
        try:
            return bytes(reader.view)
        finally:
            reader.close()

