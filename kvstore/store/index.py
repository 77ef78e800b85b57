"""Where every block is: its entry (size, checksum, L1 offset, L2/L3
presence, pins) in the full index, or its compact record (blocks only in
L2, idle: :mod:`kvstore.store.coldindex`).

Every change of where a block is goes through :class:`Index`'s methods, so
that the per-tier occupancy counts, the dirty bytes, the busy pins and the
policy's view stay equal to the entries (tests recount them).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.policy import Policy
from kvstore.store.coldindex import ColdBlock, ColdIndex
from kvstore.store.l2deletes import DropDone, L2Deletes
from kvstore.store.stats import Stats
from kvstore.tiers.base import BlockMeta
from kvstore.tiers.lmdb_tier import LMDBTier
from kvstore.tiers.memory import MemoryTier
from kvstore.types import BlockId, ListedBlock, TierName

#: Entries a namespace's scan (Stats of a namespace, a listing) visits between
#: two chances for other calls to run (~1-2 ms of the loop).
_SCAN_SLICE = 2048

#: The checksum of a block found in L3 by a listing or HEAD (not known yet).
UNKNOWN_CHECKSUM = -1


@dataclass(slots=True, eq=False)
class Entry:
    size: int
    checksum: int
    created: float
    session: str | None = None
    l1_offset: int = -1  # arena offset of the L1 copy; -1 = not in L1
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
    #: L2 still holds the bytes of the block this one overwrote, left for
    #: this block's own L2 write to replace in one transaction (an overwrite
    #: acknowledged at local or remote); deleted if this block goes first.
    replaces_l2: bool = False

    @property
    def pinned(self) -> bool:
        return self.readers > 0 or self.l2_pending > 0

    def meta(self) -> BlockMeta:
        return BlockMeta(self.size, self.checksum, self.created)


def tiers_holding(record: Entry | ColdBlock) -> tuple[TierName, ...]:
    """The tiers that hold a copy of the block (a compact record: L2, and L3
    when it is there too)."""
    if isinstance(record, ColdBlock):
        return (TierName.L2, TierName.L3) if record.l3 else (TierName.L2,)
    return tuple(t for t, present in ((TierName.L1, record.l1_offset >= 0),
                                      (TierName.L2, record.l2), (TierName.L3, record.l3))
                 if present)


def tier_of(entry: Entry | None) -> TierName | None:
    """The fastest tier holding the block (None: not stored)."""
    if entry is None or entry.dead:
        return None
    if entry.l1_offset >= 0:
        return TierName.L1
    if entry.l2:
        return TierName.L2
    if entry.l3:
        return TierName.L3
    return None


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


def _drop_done(error: BaseException | None, existed: bool) -> None:
    """The L2 writer's callback for a delete nobody waits for."""


class Index:
    """The full index, the compact index and the counts kept with them.

    ``blocks``: the full entries. ``cold``: the compact index (None when
    ``l2.compact_index`` is off or there is no L2). ``loading``: the blocks
    being read from L2 or L3 into L1, each with the future a concurrent Get
    waits on (:mod:`kvstore.store.reads` adds and removes them; a loading
    block stays in the full index). ``delete_l3``: how :meth:`forget` deletes
    a block's L3 copy (set once by the store when an L3 is configured).
    """

    def __init__(self, stats: Stats, policy: Policy, clock: Callable[[], float],
                 l1: MemoryTier, l2: LMDBTier | None, wake: Callable[[], None],
                 compact: bool) -> None:
        self._held = stats.held
        self.policy = policy
        self.clock = clock
        self.l1 = l1
        self.l2 = l2
        self._wake = wake
        self.blocks = BlockIndex()
        self.cold: ColdIndex | None = ColdIndex() if l2 is not None and compact else None
        self.loading: dict[BlockId, asyncio.Future[None]] = {}
        #: Told when a block leaves L1 other than by placement's eviction (a
        #: Delete, an overwrite, a Flush, a corrupt copy dropped): placement's
        #: per-namespace count for quota.l1 (set by Placement.limit_l1).
        self.left_l1: Callable[[BlockId, Entry], None] | None = None
        #: l2.capacity with L2 (None without; set by the store): a larger block
        #: (promoted from a shared L3, or L2 shrunk since) is never written to
        #: L2 (:meth:`fits_l2`), and Puts of one are refused (Placement).
        self.l2_capacity: int | None = None
        self.delete_l3: Callable[[BlockId, bool, int], asyncio.Future[Any] | None] | None = \
            None
        #: When this run began without the L3 an earlier run had (0: it has
        #: L3, or none was ever recorded): blocks written before then count
        #: as in L3 for ``delete_l3``.
        self.l3_off_since = 0.0
        #: With ``l3_off_since``: blocks created at or after this time were
        #: written by a run without L3 (this one, or one before it whose
        #: window no listing has closed yet); it moves back with the clock.
        self.run_window = math.inf
        #: The earliest creation time this run handed out (stamp()), and who is
        #: told when one goes below it (the clock stepped back).
        self.earliest_stamp = math.inf
        self.on_earlier_stamp: Callable[[float], None] | None = None
        #: The newest creation time found in L2 at start (0: none).
        self.newest_l2_created = 0.0
        # Cold blocks being demoted to L3 on their way out of L2.
        self._cold_demoting: set[BlockId] = set()
        self.busy_pins = 0  # readers + L2 writes in flight, over all entries
        #: L2 bytes per namespace, full and compact entries together, kept as
        #: copies come and go (L2 quotas check them on every trim, no scan).
        self.l2_namespace_bytes: dict[str, int] = {}
        self.dirty_bytes = 0  # bytes of dirty entries (see Entry.dirty)
        #: The dirty entries, oldest first: id(entry) -> (block, entry). Write-back
        #: cleans from its head (WriteBack.clean_ahead) in O(1) per block; walking
        #: the policy's victim order instead passed over every clean block at the
        #: head of L1 on every Put (a quarter of L1 with l2.clean_reserve 0.25).
        self.dirty_order: dict[int, tuple[BlockId, Entry]] = {}
        #: The listings in flight: each one's namespace, and the keys of that
        #: namespace :meth:`forget` removed since it began.
        self._listings: dict[int, tuple[str, set[bytes]]] = {}
        #: The L2 deletes it queues, and what L2 still holds when one fails
        #: (None without L2).
        self.l2_deletes: L2Deletes | None = \
            L2Deletes(l2, self.blocks, self.cold) if l2 is not None else None

    # -- creation times -------------------------------------------------------------

    def stamp(self) -> float:
        """A creation time for a block written now (the wall clock). One
        earlier than every other of this run (the first, or the clock stepped
        back) is told to ``on_earlier_stamp``: the L3 listing's window (blocks
        written since it opened may have older bytes in the bucket) goes back
        with it. A clock stepped back (NTP) after the window opened made the
        blocks written then look written before it, and an overwritten
        block's old object stayed, served by other nodes. (Holding creation
        times at the latest one handed out instead pinned them, for good
        once read back from L2, to a clock that had once run years ahead.)"""
        now = time.time()
        if now < self.earliest_stamp:
            self.earliest_stamp = now
            if self.on_earlier_stamp is not None:
                self.on_earlier_stamp(now)
        return now

    # -- counts kept with the entries -------------------------------------------------

    @property
    def l2_bytes(self) -> int:
        return self._held[TierName.L2][1]

    def _count(self, tier: TierName, blocks: int, nbytes: int) -> None:
        held = self._held[tier]
        held[0] += blocks
        held[1] += nbytes

    def set_l1(self, entry: Entry, offset: int) -> None:
        if (entry.l1_offset >= 0) != (offset >= 0):
            sign = 1 if offset >= 0 else -1
            self._count(TierName.L1, sign, sign * entry.size)
        entry.l1_offset = offset

    def set_l2(self, block: BlockId, entry: Entry, present: bool) -> None:
        if entry.l2 != present:
            sign = 1 if present else -1
            self._count(TierName.L2, sign, sign * entry.size)
            self._count_l2_namespace(block[0], sign * entry.size)
        entry.l2 = present

    def _count_l2_namespace(self, namespace: str, nbytes: int) -> None:
        counts = self.l2_namespace_bytes
        left = counts.get(namespace, 0) + nbytes
        if left:
            counts[namespace] = left
        else:
            counts.pop(namespace, None)  # a namespace gone from L2 leaves no trace

    def set_l3(self, entry: Entry, present: bool) -> None:
        if entry.l3 != present:
            sign = 1 if present else -1
            self._count(TierName.L3, sign, sign * entry.size)
        entry.l3 = present

    def set_dirty(self, entry: Entry, dirty: bool, block: BlockId | None = None) -> None:
        """Mark the entry's L1 copy as the only one (``dirty``; name its
        ``block``) or as written down / gone."""
        if entry.dirty != dirty:
            entry.dirty = dirty
            if dirty:
                assert block is not None, "a dirty entry is queued for write-back by block"
                self.dirty_bytes += entry.size
                self.dirty_order[id(entry)] = (block, entry)
            else:
                self.dirty_bytes -= entry.size
                del self.dirty_order[id(entry)]

    def pin_reader(self, entry: Entry) -> None:
        entry.readers += 1
        self.busy_pins += 1

    def unpin_reader(self, entry: Entry) -> None:
        entry.readers -= 1
        self.busy_pins -= 1
        self.free_if_dead(entry)
        self._wake()

    def begin_l2_write(self, entry: Entry) -> None:
        """An L2 write of the entry's L1 copy is queued (it pins that copy)."""
        entry.l2_pending += 1
        self.busy_pins += 1
        self.set_dirty(entry, False)

    def end_l2_write(self, entry: Entry) -> None:
        entry.l2_pending -= 1
        self.busy_pins -= 1

    def free_l1(self, block: BlockId, entry: Entry) -> None:
        """Free the block's L1 extent (a copy no one reads, not placement's
        eviction) and count it out of its namespace's L1 at once (left_l1):
        counted until a reconcile, ~a quarter of the namespace's blocks put
        later, a deleted block's pages made the tenant look over its quota
        and its live working set was evicted. (A pinned dead block, a
        lease's, keeps its pages: free_if_dead frees it and a reconcile
        counts it out; counted out at once, a tenant that leased and deleted
        its blocks held L1 past its quota.)"""
        self.l1.release(entry.l1_offset, entry.size)
        self.set_l1(entry, -1)
        if self.left_l1 is not None:
            self.left_l1(block, entry)

    def free_if_dead(self, entry: Entry) -> None:
        """Free a forgotten entry's L1 extent once its last pin is gone."""
        if entry.dead and not entry.pinned and entry.l1_offset >= 0:
            self.set_dirty(entry, False)
            self.l1.release(entry.l1_offset, entry.size)
            self.set_l1(entry, -1)

    # -- L3 presence (the L3 mover's view) ----------------------------------------------

    def is_current(self, block: BlockId, entry: Entry) -> bool:
        """The entry is still the block's (not deleted, replaced or cooled)."""
        return not entry.dead and self.blocks.get(block) is entry

    def mark_l3(self, block: BlockId, entry: Entry) -> None:
        """L3 holds the block's current bytes."""
        if not entry.l3 and not entry.dead and self.blocks.get(block) is entry:
            self.set_l3(entry, True)
            self.policy.on_insert(TierName.L3, block, entry.size, self.clock(), entry.session)

    def lost_l3(self, block: BlockId, entry: Entry | None) -> None:
        """L3 does not (validly) hold the block: forget that it did."""
        if entry is None or not entry.l3:
            return
        self.set_l3(entry, False)
        self.policy.on_remove(TierName.L3, block)
        if entry.l1_offset < 0 and not entry.l2:
            self.forget(block, entry)

    def discovered(self, block: BlockId, size: int, checksum: int, created: float) -> Entry:
        """An entry for a block found in L3 that this node did not know."""
        entry = Entry(size, checksum, created)
        # (what a failed delete left under its key: its delete or overwrite removes them)
        entry.replaces_l2 = self.l2_deletes is not None and self.l2_deletes.take_left(block)
        self.blocks[block] = entry
        self.mark_l3(block, entry)
        return entry

    def learn_checksum(self, entry: Entry, checksum: int) -> None:
        """A discovered block's checksum, once its verified bytes told it."""
        entry.checksum = checksum

    def begin_l3_copy(self, entry: Entry) -> None:
        """A demotion to L3 started (it pins the L2 copy)."""
        entry.l3_pending += 1

    def end_l3_copy(self, entry: Entry) -> None:
        entry.l3_pending -= 1

    def listed_cold(self, block: BlockId, size: int) -> bool:
        """The L3 listing found a block the compact index holds: note that L3
        has it too (when the sizes agree; an object of another size is other
        bytes, and this node's L2 copy stays the one it serves, as a full
        entry's would). False when the compact index does not hold it."""
        if self.cold is None:
            return False
        record = self.cold.get(block[0], block[1])
        if record is None:
            return False
        if record.size != size:
            return True
        if not record.l3:
            self.cold.set_l3(block[0], block[1], True)
            self._count(TierName.L3, 1, size)
        return True

    # -- the compact index (blocks only in L2) ----------------------------------------

    def peek(self, block: BlockId) -> Entry | ColdBlock | None:
        """The block's full entry, or its compact record (size, checksum,
        created, l3), changing nothing: no record is warmed into the full
        index (:meth:`entry` does that)."""
        entry = self.blocks.get(block)
        if entry is not None or self.cold is None or not len(self.cold):
            return entry
        return self.cold.get(block[0], block[1])

    def entry(self, block: BlockId) -> Entry | None:
        """The block's full entry, from the compact index if need be."""
        entry = self.blocks.get(block)
        if entry is None and self.cold is not None and len(self.cold):
            entry = self.warm(block)
        return entry

    def cool(self, block: BlockId, entry: Entry) -> None:
        """An idle block that is only in L2 leaves the full index for the
        compact one (and the policy's view)."""
        assert self.cold is not None
        now = self.clock()
        if (entry.dead or entry.l1_offset >= 0 or not entry.l2 or entry.l2_pending
                or entry.l3_pending or entry.readers or block in self.loading
                or entry.lease_until > now or entry.pin_until > now
                or block in self._cold_demoting
                or self.blocks.get(block) is not entry or entry.checksum < 0):
            return
        del self.blocks[block]
        self.policy.on_remove(TierName.L2, block)
        if entry.l3:
            self.policy.on_remove(TierName.L3, block)
        entry.dead = True  # any holder of the old object sees it gone
        self.cold.add(block[0], block[1], entry.size, entry.checksum, entry.created, now,
                      entry.l3)

    def warm(self, block: BlockId, track: bool = True) -> Entry | None:
        """The block's full entry, moved out of the compact index (None when
        it is not there). ``track``: tell the policy (a use is coming)."""
        assert self.cold is not None
        record = self.cold.take(block[0], block[1])
        if record is None:
            return None
        entry = Entry(record.size, record.checksum, record.created)
        entry.l2 = True  # occupancy already counts it
        entry.l3 = record.l3
        self.blocks[block] = entry
        if track:
            now = self.clock()
            self.policy.on_insert(TierName.L2, block, entry.size, now)
            if entry.l3:
                self.policy.on_insert(TierName.L3, block, entry.size, now)
        return entry

    def cold_demotion_started(self, block: BlockId) -> None:
        """A cold block's demotion to L3 began (it stays warm until it ends)."""
        self._cold_demoting.add(block)

    def cold_demotion_ended(self, block: BlockId) -> bool:
        """Whether the block's demotion was a cold block's (now ended)."""
        if block in self._cold_demoting:
            self._cold_demoting.discard(block)
            return True
        return False

    # -- the index rebuilt from L2 ------------------------------------------------------

    def add_l2_blocks(self, namespaces: list[str], keys: list[bytes], sizes: Sequence[int],
                      sums: Sequence[int], created: Sequence[float]) -> None:
        """Index blocks found in L2 (not indexed yet), older ones first in
        line for eviction, so that recency order survives a restart."""
        size_array = np.asarray(sizes, dtype=np.uint64)
        created_array = np.asarray(created, dtype=np.float64)
        if len(created_array):
            self.newest_l2_created = max(self.newest_l2_created, float(created_array.max()))
        if self.cold is not None:
            # All of them go to the compact index; its last-use times put
            # older blocks first.
            used = self.clock() - np.maximum(time.time() - created_array, 0.0)
            self.cold.add_many(namespaces, keys, size_array,
                               np.asarray(sums, dtype=np.uint32), created_array, used)
            self._count(TierName.L2, len(keys), int(size_array.sum()))
            self._count_l2_namespaces(namespaces, size_array)
            return
        order = np.argsort(created_array, kind="stable")
        now = self.clock()
        blocks, policy, set_l2 = self.blocks, self.policy, self.set_l2
        for i in order.tolist():
            block = (namespaces[i], keys[i])
            entry = Entry(int(sizes[i]), int(sums[i]), float(created[i]))
            set_l2(block, entry, True)
            blocks[block] = entry
            policy.on_insert(TierName.L2, block, entry.size, now)

    def _count_l2_namespaces(self, namespaces: list[str], sizes: np.ndarray) -> None:
        """Add blocks found in L2 to the per-namespace L2 bytes (a batch is
        usually one namespace: one sum)."""
        names = sorted(set(namespaces))
        if len(names) == 1:
            self._count_l2_namespace(names[0], int(sizes.sum()))
            return
        ids = {name: i for i, name in enumerate(names)}
        column = np.fromiter((ids[name] for name in namespaces), np.int64, len(namespaces))
        totals = np.bincount(column, weights=sizes.astype(np.float64), minlength=len(names))
        for name, total in zip(names, totals.tolist(), strict=True):
            self._count_l2_namespace(name, int(total))

    # -- removal ----------------------------------------------------------------------

    def fits_l2(self, size: int) -> bool:
        """Whether a block of ``size`` bytes may be written to L2. (Written,
        one larger than L2 was trimmed at once, and L1's eviction wrote it
        again, for ever: an outside review.)"""
        return self.l2_capacity is None or size <= self.l2_capacity

    def drop_l2_copy(self, block: BlockId, entry: Entry, done: DropDone = _drop_done) -> None:
        assert self.l2 is not None
        self.set_l2(block, entry, False)
        if entry.l1_offset >= 0 and not entry.dead and not entry.l2_pending and \
                self.fits_l2(entry.size):
            self.set_dirty(entry, True, block)
        assert self.l2_deletes is not None
        self.l2_deletes.submit(block, entry, done)

    def forget(self, block: BlockId, entry: Entry, delete_l2: bool = True,
               delete_l3: bool = False, l2_done: DropDone = _drop_done,
               l2_pending: bool = False) -> asyncio.Future[None] | None:
        """Remove a block from the index and the local tiers (respecting pins);
        from the shared L3 only when asked (an explicit Delete, whether or not
        this node knows of an L3 copy; an overwrite of a block it has there).
        With ``delete_l3``, returns a future that settles once that delete is
        recorded in L2 (None without L2, or without L3)."""
        if self.blocks.get(block) is entry:
            del self.blocks[block]
        if self._listings:
            for namespace, removed in self._listings.values():
                if namespace == block[0]:
                    removed.add(block[1])
        entry.dead = True
        self.set_dirty(entry, False)
        if entry.l1_offset >= 0:
            self.policy.on_remove(TierName.L1, block)
            if not entry.pinned:  # else freed by free_if_dead when the last pin goes
                self.free_l1(block, entry)
        if entry.l2:
            self.policy.on_remove(TierName.L2, block)
            if delete_l2:
                self.drop_l2_copy(block, entry, l2_done)
            else:
                self.set_l2(block, entry, False)
        elif self.l2_deletes is not None and delete_l2 and (
                entry.l2_pending or entry.replaces_l2 or l2_pending
                or self.l2_deletes.pending(block)):
            # Its L2 write is still queued (or the bytes it overwrote are
            # still there, or another delete of them is still on its way and
            # may fail): a delete queued behind it (the writer keeps the
            # order) keeps it from coming back at a restart.
            self.l2_deletes.submit(block, None, l2_done)
        in_l3 = entry.l3 or entry.l3_pending > 0
        if entry.l3:
            self.set_l3(entry, False)
            self.policy.on_remove(TierName.L3, block)
        # A block written by a run without L3 (even one whose clock was
        # behind the recorded start of such runs: that start alone counted it
        # as one in L3, whose own version's delete left the older object)
        written_without_l3 = bool(self.l3_off_since) and entry.created >= self.run_window
        if delete_l3 and self.delete_l3 is not None:
            # (a block from before a run with L3 off may have its object there)
            return self.delete_l3(
                block, (in_l3 or entry.created < self.l3_off_since) and not written_without_l3,
                entry.checksum)
        if written_without_l3 and self.delete_l3 is not None:
            # A block of a run without the L3 an earlier run had, gone with no
            # Delete (evicted, overwritten): the bucket may hold an older
            # object of its key, which this run never listed. Recorded, it is
            # deleted before the next run with L3 lists the bucket (that
            # listing took the older object for the key's block, and served
            # bytes an acknowledged Put had replaced).
            self.delete_l3(block, False, entry.checksum)
        return None

    # -- one namespace (ops commands: kvstore ls, stats --namespace, flush) -------------

    def holds_namespace(self, namespace: str) -> bool:
        """Whether the index knows a block of ``namespace`` (full or compact)."""
        if self.blocks.by_namespace.get(namespace):
            return True
        return self.cold is not None and self.cold.namespace_usage(namespace)[0] > 0

    async def namespace_held(self, namespace: str) -> dict[TierName, tuple[int, int, int]]:
        """Blocks, bytes and capacity taken (L1: whole pages; else bytes) per
        tier of one namespace (a scan of its entries, letting other calls in
        between slices; vectorised over its compact records)."""
        held = {t: [0, 0] for t in (TierName.L1, TierName.L2, TierName.L3)}
        l1_pages = 0
        extent = self.l1.extent
        # Both indexes' keys at one instant (a block moves between them
        # meanwhile: read afterwards, it was counted twice or not at all), each
        # full-index key looked up as it is when its slice is counted (an
        # overwrite meanwhile replaced the entry: the old one counts nothing).
        keys = list(self.blocks.by_namespace.get(namespace, {}))
        cold = self.cold.namespace_usage(namespace) if self.cold is not None else None
        for start in range(0, len(keys), _SCAN_SLICE):
            if start:
                await asyncio.sleep(0)
            for key in keys[start:start + _SCAN_SLICE]:
                record = self.peek((namespace, key))
                if record is None:
                    continue  # deleted meanwhile
                for tier in tiers_holding(record):
                    held[tier][0] += 1
                    held[tier][1] += record.size
                    if tier is TierName.L1:
                        l1_pages += extent(record.size)
        if cold is not None:
            blocks, nbytes, l3_blocks, l3_bytes = cold
            held[TierName.L2][0] += blocks
            held[TierName.L2][1] += nbytes
            held[TierName.L3][0] += l3_blocks
            held[TierName.L3][1] += l3_bytes
        return {tier: (blocks, nbytes, l1_pages if tier is TierName.L1 else nbytes)
                for tier, (blocks, nbytes) in held.items()}

    async def listing(self, namespace: str, prefix: bytes, limit: int,
                      now: float) -> tuple[list[ListedBlock], bool]:
        """The first ``limit`` blocks of the namespace whose key starts with
        ``prefix``, in key order, and whether more matched. ``now``: wall
        time (blocks' creation times are wall times). Other calls run
        between slices of the scan (a listing of 200,000 blocks held every
        Get for 0.6 s): blocks deleted meanwhile are left out."""
        removed: set[bytes] = set()
        self._listings[id(removed)] = (namespace, removed)
        try:
            return await self._listing(namespace, prefix, limit, now, removed)
        finally:
            del self._listings[id(removed)]

    async def _listing(self, namespace: str, prefix: bytes, limit: int, now: float,
                       removed: set[bytes]) -> tuple[list[ListedBlock], bool]:
        entries = self.blocks.by_namespace.get(namespace, {})
        # Both indexes at one instant: a block a Get warms from the compact
        # index into the full one meanwhile was in neither when the compact
        # one was read after the awaits (left out, the listing said complete).
        keys = list(entries)
        records, cold_total = self.cold.namespace_blocks(namespace, prefix, limit) \
            if self.cold is not None else ([], 0)
        if prefix:
            matched: list[bytes] = []
            for start in range(0, len(keys), _SCAN_SLICE):
                if start:
                    await asyncio.sleep(0)
                matched.extend(k for k in keys[start:start + _SCAN_SLICE] if k.startswith(prefix))
        else:
            matched = keys
        total = len(matched)
        if limit >= total:
            matched.sort()  # (in C: a whole listing)
        else:
            matched = heapq.nsmallest(limit, matched)  # O(n log limit), not a full sort
        await asyncio.sleep(0)
        found: list[ListedBlock] = []
        for start in range(0, len(matched), _SCAN_SLICE):
            if start:
                await asyncio.sleep(0)
            for key in matched[start:start + _SCAN_SLICE]:
                entry = self.peek((namespace, key))  # (as it is now)
                if not isinstance(entry, Entry):
                    if entry is not None:  # into the compact index meanwhile
                        records.append(entry)
                    continue  # (None: deleted meanwhile)
                tiers = tiers_holding(entry)
                if tiers:  # not a block being removed
                    found.append(ListedBlock(key, entry.size, tiers,
                                             max(now - entry.created, 0.0)))
        total += cold_total
        # From here to the answer, no await: what is listed is as it is now.
        if removed:
            # A Delete that pauses between its keys (for other calls, this
            # listing's slices included) may have removed, and been answered
            # for, blocks an earlier slice had looked at. (Looking at every
            # listed block again held the event loop 0.26 s for 100,000.)
            found = [b for b in found if b.key not in removed
                     or self._still_held(namespace, b.key)]
        if records:
            # As they are now (a Delete answered meanwhile removed some; a Get
            # warmed some into the full index).
            for r in records:
                current = self.peek((namespace, r.key))
                if current is None:
                    continue  # deleted meanwhile
                tiers = tiers_holding(current)
                if tiers:
                    found.append(ListedBlock(r.key, current.size, tiers,
                                             max(now - current.created, 0.0)))
            found.sort(key=lambda b: b.key)
        return found[:limit], total > limit

    def _still_held(self, namespace: str, key: bytes) -> bool:
        """Whether a tier still holds the block (a listing's last look)."""
        current = self.peek((namespace, key))
        return current is not None and bool(tiers_holding(current))

    def namespace_keys(self, namespace: str) -> list[bytes]:
        """Every key of the namespace the index knows (full and compact)."""
        keys = list(self.blocks.by_namespace.get(namespace, ()))
        if self.cold is not None:
            keys.extend(self.cold.namespace_keys(namespace))
        return keys
