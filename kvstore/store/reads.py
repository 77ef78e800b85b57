"""Get: an L1 hit streams from the arena while the block is pinned; an L2 or
L3 hit is read into a fresh L1 extent (a promotion) when the policy admits
it, verified against the checksum before it is served. A bad copy is
dropped, counted and reported as a miss; so is one L2 cannot read (a
StorageError: a damaged LMDB page), the block then comes from L3 if it is
there.

An L1 hit's bytes are checked against the block's checksum as they leave
(:meth:`BlockReader.intact` before the first byte for a block small enough,
else chunk by chunk, the last chunk withheld on a mismatch): a copy that
fails is dropped from L1 when the reader closes (:mod:`kvstore.store.l1check`).

One loading mechanism for both lower tiers: while a block is being read
into L1, ``Index.loading`` holds a future for it, and a concurrent Get of
the block waits for that read instead of starting its own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterator

from kvstore.checksum import checksum
from kvstore.errors import CapacityExhausted, CorruptBlock, StorageError
from kvstore.store.index import Entry
from kvstore.store.l1check import L1Check
from kvstore.store.l3 import L3Mover
from kvstore.store.parts import Part, Shared
from kvstore.store.placement import PROMOTE_ROOM_WAIT_SECONDS, Placement
from kvstore.store.stats import HintCounters
from kvstore.store.workers import run_filling
from kvstore.tiers.base import Buffer
from kvstore.types import BlockId, TierName, TierStats

log = logging.getLogger("kvstore.store")

#: Reads a block's L2 bytes on an executor thread (into a given L1 extent)
#: and checks them: (matches the checksum, bytes), or None when L2 lacks it.
ReadVerifyL2 = Callable[[BlockId, int, memoryview | None], tuple[bool, Buffer] | None]


#: A block of at most this many bytes is checked whole before its first
#: chunk is sent (a mismatch is then a miss, or the next tier's copy); a
#: larger one is checked as its chunks go and its last chunk is withheld on
#: a mismatch (the stream ends with DATA_LOSS naming the block).
WHOLE_CHECK_BYTES = 4 * 1024**2

#: How many times a Get looks again for a block Put again while its L2 copy
#: was being read (each look reads the newer copy; a key overwritten faster
#: than it can be read is then a miss).
REREADS_AFTER_REPLACE = 3

#: A corrupt L1 copy found: drop it (called once the reader's pin is gone).
OnCorrupt = Callable[[str], None]


class BlockReader:
    """A found block, pinned while its bytes are streamed out. An L1 copy
    (``expected`` set) is checked against its checksum on the way out."""

    __slots__ = ("_corrupt", "_expected", "_on_corrupt", "_release", "_view", "block",
                 "entry", "size", "tier")

    def __init__(self, view: Buffer, tier: TierName,
                 release: Callable[[], None] | None, entry: Entry | None = None,
                 block: BlockId | None = None, on_corrupt: OnCorrupt | None = None) -> None:
        self._view = memoryview(view)
        self.size = len(self._view)
        self.tier = tier
        self._release = release
        # The index entry when the bytes are the block's L1 copy (pinned).
        self.entry = entry
        self.block = block
        # The checksum the bytes must match (-1: checked on their way in, or
        # an L1 copy in an arena that is not checked: l1.verify_reads).
        self._expected = entry.checksum if on_corrupt is not None and entry is not None else -1
        self._on_corrupt = on_corrupt
        self._corrupt = ""  # who found the bytes bad ("": not found bad)

    @property
    def needs_check(self) -> bool:
        """Whether the bytes are still to be checked before they leave."""
        return self._expected >= 0

    def intact(self, whole_limit: int = WHOLE_CHECK_BYTES) -> bool:
        """Check the whole block now when it is at most ``whole_limit`` bytes
        (False: corrupt; close this reader, it is dropped); a larger one is
        checked by :meth:`chunks`. True when nothing needs checking."""
        expected = self._expected
        if expected < 0 or self.size > whole_limit:
            return True
        self._expected = -1  # checked: chunks() need not check it again
        if checksum(self._view) == expected:
            return True
        self._corrupt = "a Get"
        return False

    def chunks(self, chunk_bytes: int) -> Iterator[tuple[int, memoryview]]:
        view = self._view
        size = self.size
        if size == 0:
            yield 0, view
        expected = self._expected
        if expected < 0:
            for offset in range(0, size, chunk_bytes):
                yield offset, view[offset : offset + chunk_bytes]
            return
        crc = 0
        last = (size - 1) // chunk_bytes * chunk_bytes
        for offset in range(0, size, chunk_bytes):
            piece = view[offset : offset + chunk_bytes]
            crc = checksum(piece, crc)
            if offset == last and crc != expected:
                self._corrupt = "a Get"
                name = self.block
                raise CorruptBlock(
                    f"block {name[1].hex() if name else '?'} failed its checksum in L1 "
                    "while it was sent (dropped; ask again for the next tier's copy)")
            yield offset, piece

    @property
    def view(self) -> memoryview:
        return self._view

    def close(self) -> None:
        release, self._release = self._release, None
        self._view.release()
        if release is not None:
            release()
        corrupt, self._corrupt = self._corrupt, ""
        if corrupt and self._on_corrupt is not None:
            self._on_corrupt(corrupt)


class Reads(Part):
    """Serves Gets and promotes into L1. ``read_verify_l2``: None without L2;
    ``l3``: None without L3."""

    def __init__(self, shared: Shared, placement: Placement,
                 read_verify_l2: ReadVerifyL2 | None, l3: L3Mover | None) -> None:
        super().__init__(shared)
        self.placement = placement
        self.read_verify_l2 = read_verify_l2
        self.l3 = l3
        index = self.index
        self._entry = index.entry
        self._hot = index.blocks.get
        self._arena = self.l1.arena.view
        self._loading = index.loading
        #: Until then a promotion does not wait for L1 room (monotonic s).
        self._no_room_until = 0.0
        self._unpin = index.unpin_reader
        self._c1 = self.stats.counters[TierName.L1]
        self._c2 = self.stats.counters[TierName.L2]
        self.check = L1Check(shared)
        self._verify = self.check.enabled

    def _l1_reader(self, block: BlockId, entry: Entry, tier: TierName) -> BlockReader:
        """A reader of the entry's L1 copy (pinned), checked on its way out
        when the arena is checked."""
        self.index.pin_reader(entry)
        return BlockReader(self.l1.slice(entry.l1_offset, entry.size), tier,
                           functools.partial(self._unpin, entry), entry, block,
                           functools.partial(self.drop_read_corrupt, block, entry, tier)
                           if self._verify else None)

    def drop_read_corrupt(self, block: BlockId, entry: Entry, tier: TierName,
                          where: str) -> None:
        """A reader's L1 copy failed its checksum: dropped, and the hit its
        read counted (in ``tier``) taken back (a Get of it counted an L1 hit
        and an L2 hit, the two reads' hits and Gets); the read that follows
        (``open_read(reread=True)``, or the client's next Get) counts the
        L1 miss and where it found the block."""
        self.check.drop_corrupt(block, entry, where)
        self.stats.counters[tier].hits -= 1
        self.stats.get_hits -= 1

    def uncount(self, reader: BlockReader) -> None:
        """Take back what :meth:`open_read` counted for a read that served
        ``reader`` from outside L1 (an L2 or L3 copy: no room to promote it),
        for a caller whose client reads the block again (ShmAcquire's
        Unleased answer: the client's Get counts it)."""
        self.stats.gets -= 1
        self.stats.get_hits -= 1
        self.stats.counters[reader.tier].hits -= 1
        self._c1.misses -= 1
        if reader.tier is TierName.L3 and self.read_verify_l2 is not None:
            self._c2.misses -= 1

    async def open_read(self, block: BlockId, session: str | None = None,
                        reread: bool = False) -> BlockReader | None:
        """The block, pinned for streaming, or None for a miss. ``reread``:
        the caller's first read of it found a corrupt L1 copy (this one is
        not another Get)."""
        if not reread:
            self.stats.gets += 1
        c1 = self._c1
        for attempt in range(REREADS_AFTER_REPLACE + 1):
            entry = self._entry(block)
            if self._loading:
                pending = self._loading.get(block)
                if pending is not None:
                    await asyncio.shield(pending)
                    entry = self._entry(block)
            if entry is None:
                c1.misses += 1
                if self.read_verify_l2 is not None:
                    self._c2.misses += 1
                if self.l3 is not None:
                    return await self.read_l3(block, None, session)
                return None
            if entry.l1_offset >= 0:
                self._count_l1_hit(block, session)
                return self._l1_reader(block, entry, TierName.L1)
            if attempt == 0:
                c1.misses += 1
            if entry.l2 and self.read_verify_l2 is not None:
                reader = await self.read_l2(block, entry, session)
                if reader is not None:
                    return reader
                if self._entry(block) not in (entry, None):
                    # Put again while L2 read the copy it replaced: the key is
                    # stored all along, so look again (it was a miss).
                    continue
                if not entry.l3:
                    return None
            elif self.read_verify_l2 is not None:
                self._c2.misses += 1
            if entry.l3 and self.l3 is not None:
                return await self.read_l3(block, entry, session)
            return None
        return None  # replaced again at every look: a miss

    def _count_l1_hit(self, block: BlockId, session: str | None) -> None:
        self._c1.hits += 1
        self.stats.get_hits += 1
        self.policy.on_hit(TierName.L1, block, self.clock(), session)

    def l1_ready(self, block: BlockId, whole_limit: int) -> memoryview | None:
        """The block's L1 bytes when a Get of it is an L1 hit that can be
        served at once: its L1 copy is at most ``whole_limit`` bytes, no
        load of it is in flight, and its bytes match its checksum now. None
        otherwise (a miss, a block in a lower tier, a large or a corrupt
        copy: the caller takes :meth:`open_read`, which also drops a corrupt
        copy). The checksum is checked only when the arena is (``l1.verify_reads``).
        Changes nothing: no counter, no policy call, no pin (pin the
        entry with ``index.pin_reader`` to keep the bytes past an await)."""
        entry = self._hot(block)  # an L1 copy is always in the full index
        if entry is None or entry.l1_offset < 0 or entry.size > whole_limit or (
                self._loading and block in self._loading):
            return None
        view = self._arena[entry.l1_offset:entry.l1_offset + entry.size]
        if self._verify and checksum(view) != entry.checksum:
            return None
        return view

    def count_l1_hit(self, block: BlockId, session: str | None) -> None:
        """What :meth:`open_read` counts and tells the policy for an L1 hit,
        for a hit served from :meth:`l1_ready`'s entry (no reader)."""
        self.stats.gets += 1
        self._count_l1_hit(block, session)

    def _begin_load(self, block: BlockId) -> asyncio.Future[None]:
        loading: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loading[block] = loading
        return loading

    def _end_load(self, block: BlockId, loading: asyncio.Future[None]) -> None:
        if self._loading.get(block) is loading:
            del self._loading[block]
        if not loading.done():
            loading.set_result(None)

    async def _reserve_if_admitted(self, block: BlockId, size: int) -> int:
        """An L1 extent for a promotion the policy admits, or -1. After a
        promotion found no room within its wait, those of the next such wait
        take only what is free at once: each read of a many-block Get whose
        own earlier blocks (or leases) fill L1 waited a second of its own."""
        if not self.policy.admit(TierName.L1, block, size, self.clock()):
            return -1
        if time.monotonic() < self._no_room_until:
            return self.placement.reserve_now(size, block[0])
        try:
            return await self.placement.reserve(size, PROMOTE_ROOM_WAIT_SECONDS, block[0])
        except CapacityExhausted:
            self._no_room_until = time.monotonic() + PROMOTE_ROOM_WAIT_SECONDS
            return -1

    def _promoted(self, block: BlockId, entry: Entry, offset: int, tier: TierName,
                  session: str | None) -> BlockReader:
        """Index the promoted copy in ``offset`` and serve it from there."""
        self.placement.place(block, entry, offset, session)
        self.index.pin_reader(entry)
        return BlockReader(self.l1.slice(offset, entry.size), tier,
                           functools.partial(self._unpin, entry), entry)

    async def read_l2(self, block: BlockId, entry: Entry, session: str | None,
                      hint: bool = False) -> BlockReader | None:
        """Read from L2, verify, promote into L1 if admitted. ``hint``: a
        prefetch, not a reference (no hit counted, the policy is not told)."""
        assert self.read_verify_l2 is not None
        c2: TierStats | HintCounters = HintCounters(self._c2) if hint else self._c2
        loading = self._begin_load(block)
        offset = -1
        try:
            offset = await self._reserve_if_admitted(block, entry.size)
            dest = self.l1.slice(offset, entry.size) if offset >= 0 else None
            try:
                # (into ``dest``: a cancel here waits for the copy before the
                # extent goes back below)
                result = await run_filling(self.executor, self.read_verify_l2, block,
                                           entry.checksum, dest)
            except StorageError as exc:
                # A miss, the copy kept: a failed read (an I/O error, the
                # environment closing at shutdown) is not a wrong checksum, and
                # dropping a block that may be sound would lose it.
                log.warning("L2 read of %s/%s failed: %s", block[0], block[1].hex()[:16], exc)
                result = None
            if self.index.blocks.get(block) is not entry or result is None:
                if offset >= 0:
                    self.placement.release(offset, entry.size)
                if result is None or self.index.blocks.get(block) is None:
                    c2.misses += 1  # (replaced: open_read looks again)
                return None
            ok, payload = result
            if not ok:
                if offset >= 0:
                    self.placement.release(offset, entry.size)
                c2.corrupt += 1
                c2.misses += 1
                log.warning("dropped bad L2 copy of %s/%s", block[0], block[1].hex()[:16])
                self.policy.on_remove(TierName.L2, block)
                self.index.drop_l2_copy(block, entry)
                if entry.l1_offset < 0 and not entry.l3:
                    self.index.forget(block, entry)
                return None
            c2.hits += 1
            if not hint:
                self.stats.get_hits += 1
                self.policy.on_hit(TierName.L2, block, self.clock(), session)
            if offset >= 0:
                return self._promoted(block, entry, offset, TierName.L2, session)
            return BlockReader(payload, TierName.L2, None)
        except BaseException:
            if offset >= 0 and entry.l1_offset != offset:
                self.placement.release(offset, entry.size)
            raise
        finally:
            self._end_load(block, loading)

    async def read_l3(self, block: BlockId, entry: Entry | None, session: str | None,
                      hint: bool = False) -> BlockReader | None:
        """Read from L3 (also blocks other nodes put) and promote into L1."""
        assert self.l3 is not None
        loading = self._begin_load(block)
        try:
            found = await self.l3.read(block, entry, hint)
            if found is None:
                return None
            entry, payload = found
            if not hint:
                self.stats.get_hits += 1
                self.policy.on_hit(TierName.L3, block, self.clock(), session)
            offset = -1
            try:
                if entry.l1_offset < 0:
                    offset = await self._reserve_if_admitted(block, entry.size)
                if offset >= 0 and (entry.l1_offset >= 0 or entry.dead):
                    self.placement.release(offset, entry.size)
                    offset = -1
                if offset >= 0:
                    self.l1.slice(offset, entry.size)[:] = payload
                    return self._promoted(block, entry, offset, TierName.L3, session)
            except BaseException:
                if offset >= 0 and entry.l1_offset != offset:
                    self.placement.release(offset, entry.size)  # (never lost to L1)
                raise
            if entry.l1_offset >= 0 and not entry.dead:
                return self._l1_reader(block, entry, TierName.L3)
            return BlockReader(payload, TierName.L3, None)
        finally:
            self._end_load(block, loading)
