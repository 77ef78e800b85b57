"""L2: the write-back queue from L1, and trimming L2 back to its capacity
(demoting to L3 or dropping what the policy picks, cold blocks first).

Every Put is written behind to L2 (bounded in queued bytes); with
acknowledgement level local the Put waits for that write. With
``l2.write_mode = back`` a memory-acknowledged block stays dirty in L1 until
it nears eviction (:meth:`WriteBack.clean_ahead`), and is written then. A
block whose L2 copy is not written yet stays pinned in L1 until it is.
The L1 bytes are checked against the block's checksum before they are
queued: a corrupt copy is dropped, never written down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kvstore.checksum import checksum
from kvstore.config import Config
from kvstore.errors import CapacityExhausted, CorruptBlock, StorageError
from kvstore.policy import Action
from kvstore.ratelimit import RateLimitedWarning
from kvstore.store.coldindex import ColdBlock
from kvstore.store.index import Entry
from kvstore.store.l1check import L1Check
from kvstore.store.l3 import L3Mover
from kvstore.store.parts import LoopHandoff, Part, Shared
from kvstore.store.placement import ROOM_WAIT_SECONDS
from kvstore.tiers.base import Buffer
from kvstore.tiers.lmdb_tier import LMDBTier
from kvstore.types import AckLevel, BlockId, TierName

log = logging.getLogger("kvstore.store")

# Most L2 evictions in one go on the event loop; more continue in a later
# iteration (a restart with a smaller l2.capacity may have millions to do).
_TRIM_BATCH = 1024
#: After an L2 write fails, no write is started for this long (a Put at
#: ``local`` still tries its own): with the disk full every write failed at
#: once, and evictions waiting for room queued the same blocks again in a
#: spin (100 % CPU, 3,300 log lines a second); reads waited 30 s for room.
WRITE_PAUSE_S = 1.0


class WriteBack(Part):
    """Writes L1 copies to L2 and keeps L2 within its capacity. ``l3``: the
    mover L2 victims are demoted to (set once by the store; None: no L3)."""

    def __init__(self, shared: Shared, l2: LMDBTier, config: Config) -> None:
        super().__init__(shared)
        self.l2 = l2
        self.l3: L3Mover | None = None
        self.capacity = config.l2.capacity
        self.queue_limit = config.l2.write_queue_bytes
        self.outage_spill = config.l3.outage_spill
        #: A Put acknowledged at ``memory`` is answered without waiting for
        #: the writer (write-back; l2.write_mode ``always`` queues every block
        #: first).
        self.memory_ack_now = config.l2.write_mode != "always"
        # Write-back keeps at most this many dirty bytes in L1.
        self.dirty_limit = int(config.l1.capacity * (1.0 - config.l2.clean_reserve))
        # ... and cleans ahead at most this many bytes at a time: blocks being
        # written are pinned, and an eviction that finds them at the head of
        # the policy's order walks past each of them (so a writer slower than
        # the Puts must not leave a quarter of L1 pinned there).
        # (A block larger than that is still cleaned, alone.)
        self.ahead_limit = max(1, (config.l1.capacity - self.dirty_limit) // 8)
        self.queued = 0  # bytes queued for the L2 writer
        self.failed_writes = 0  # L2 writes of L1 blocks that failed (each logged)
        #: When the last one failed (monotonic s) and whether the disk was full.
        self.last_failure: tuple[float, bool] | None = None
        #: No write is started before this (monotonic s): see WRITE_PAUSE_S.
        self.paused_until = 0.0
        #: What L2 may hold while its disk is full (None: l2.capacity): held
        #: below what it holds, so that the blocks trimmed free pages inside
        #: LMDB's file for the writes (the file cannot grow).
        self.disk_capacity: int | None = None
        #: How many times disk_capacity went down: a write queued before the
        #: last time (before that trim's deletes) failing says nothing new.
        self._shrinks = 0
        self._failure_log = RateLimitedWarning(log, "L2 writes failing", 10.0, logging.ERROR)
        self._handoff: LoopHandoff | None = None  # the writer's completions to the loop
        self.closing = False
        self._trim_pending = False  # a continuation of trim is scheduled
        self._l2_counters = self.stats.counters[TierName.L2]
        #: quota.l2: namespace → L2 bytes allowed (0: none); None: no L2 quotas.
        self.l2_limit: Callable[[str], int] | None = \
            config.quota.l2_limit if config.quota.l2_enabled else None
        self.check = L1Check(shared)

    # -- reads for demotion and promotion -------------------------------------------------

    def read_verify_sync(self, block: BlockId, expected: int,
                         dest: memoryview | None) -> tuple[bool, Buffer] | None:
        """(On an executor thread.) The block's L2 bytes (into ``dest`` when
        given) and whether they match ``expected``; None when L2 lacks it."""
        found = self.l2.read_into_sync(block, dest)
        if found is None:
            return None
        meta, payload = found
        ok = meta.checksum == expected and len(payload) == meta.size \
            and checksum(payload) == expected
        return ok, payload

    async def read_verified(self, block: BlockId, entry: Entry) -> bytes | None:
        """The block's L2 bytes, checked against its checksum (for demotion);
        None when they are missing, bad, or L2 cannot read them (damage)."""
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.executor, self.read_verify_sync, block,
                                                entry.checksum, None)
        except StorageError as exc:
            log.warning("L2 read of %s for demotion failed: %s", block[1].hex()[:16], exc)
            return None
        if result is None or not result[0]:
            return None
        return bytes(result[1])

    # -- the write queue ------------------------------------------------------------------

    async def make_local(self, block: BlockId, entry: Entry,
                         ack: AckLevel) -> asyncio.Future[None] | None:
        """Queue the block's L2 write as ``ack`` asks; a future for it when
        the caller waits for it (acknowledgement level local)."""
        if ack == AckLevel.MEMORY and self.memory_ack_now:
            self.clean_ahead()
            return None
        index = self.index
        index.pin_reader(entry)  # it must not leave L1 before its L2 write is queued
        try:
            await self.wait_room(entry.size)
        finally:
            index.unpin_reader(entry)
        if index.blocks.get(block) is not entry:
            return None  # replaced or deleted meanwhile
        return self.queue_write(block, entry, want_future=ack >= AckLevel.LOCAL)

    def clean_ahead(self) -> None:
        """Write-back: queue L2 writes for the oldest dirty blocks, so that
        eviction rarely waits for the disk: dirty bytes are kept at most
        ``dirty_limit`` (the rest of L1 is free or already in L2), with at
        most ``ahead_limit`` bytes queued at a time.

        Oldest first, not the policy's victim order: finding the dirty blocks
        in that order meant walking past every clean block at its head on
        every Put (O(L1 blocks) per Put, measured: 105 M steps for 40 k Puts
        of 4 KiB into 64 MiB), while a block's age is what makes it likely
        to be a victim soon. A victim still dirty is written when evicted."""
        index = self.index
        excess = min(index.dirty_bytes - self.dirty_limit, self.ahead_limit - self.queued)
        if excess <= 0 or self.paused():
            return
        picked: list[tuple[BlockId, Entry]] = []
        queued = 0
        for block, entry in index.dirty_order.values():
            if queued >= excess:
                break
            picked.append((block, entry))
            queued += entry.size
        # Queued after the walk: a write clears the entry's dirty mark (and may
        # drop a corrupt copy), which changes the order walked.
        for block, entry in picked:
            self.queue_write(block, entry)

    async def wait_room(self, size: int) -> None:
        """Room for ``size`` bytes in the L2 write queue (CapacityExhausted
        when it stays full: the disk is too slow)."""
        deadline = time.monotonic() + ROOM_WAIT_SECONDS
        while self.queued + size > self.queue_limit and self.queued > 0:
            if not await self.progress.wait(deadline):
                raise CapacityExhausted("the L2 write queue stays full: the disk is too slow")

    def queue_write(self, block: BlockId, entry: Entry,
                    want_future: bool = False) -> asyncio.Future[None] | None:
        """Write the block's L1 copy to L2 (it stays pinned until written).
        A copy that fails its checksum is dropped instead (the future, if
        any, fails with CorruptBlock)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] | None = loop.create_future() if want_future else None
        index = self.index
        view = self.l1.slice(entry.l1_offset, entry.size)
        if not self.check.intact(view, entry):
            view.release()
            self.check.drop_corrupt(block, entry, "its L2 write")
            self.progress.wake()
            if fut is not None:
                fut.set_exception(CorruptBlock(
                    f"block {block[1].hex()} failed its checksum in L1 before it reached L2 "
                    "(dropped)"))
            return fut
        index.begin_l2_write(entry)
        self.queued += entry.size
        shrinks = self._shrinks

        def settle(error: BaseException | None) -> None:
            view.release()
            index.end_l2_write(entry)
            self.queued -= entry.size
            if error is None and not entry.dead and index.blocks.get(block) is entry:
                entry.replaces_l2 = False  # (replaced in the same transaction)
                if not entry.l2:
                    index.set_l2(block, entry, True)
                    self.policy.on_insert(TierName.L2, block, entry.size, self.clock(),
                                          entry.session)
                if self.disk_capacity is not None and not self.l2.disk_nearly_full():
                    self.disk_capacity = None
                    log.warning("L2's disk has room again: L2 may grow to l2.capacity")
                if index.l2_deletes is not None:
                    index.l2_deletes.retry()  # (L2 commits again: what failed deletes left)
                self.trim()
            elif error is not None:
                self._write_failed(block, entry, error, shrinks)
            index.free_if_dead(entry)
            self.progress.wake()
            if fut is not None and not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

        handoff = self._handoff
        if handoff is None or handoff.loop is not loop:
            handoff = self._handoff = LoopHandoff(loop)

        def done(error: BaseException | None, existed: bool) -> None:  # writer thread
            handoff.call(settle, error)

        self.l2.submit(block, view, entry.meta(), done)
        return fut

    def _write_failed(self, block: BlockId, entry: Entry, error: BaseException,
                      shrinks: int) -> None:
        """A write failed: the block stays dirty in L1, no write starts for
        WRITE_PAUSE_S, and with the disk full L2 is trimmed below what it
        holds, so that the next writes reuse the pages freed."""
        self.failed_writes += 1
        now = time.monotonic()
        full = self.l2.disk_nearly_full()
        self.last_failure = (now, full)
        self.paused_until = now + WRITE_PAUSE_S
        self._failure_log.note(f"{block[1].hex()[:16]}: {error}")
        index = self.index
        if not entry.dead and entry.l1_offset >= 0 and not entry.l2 and \
                index.fits_l2(entry.size):
            index.set_dirty(entry, True, block)
        if full and shrinks == self._shrinks:
            # Large blocks need runs of free pages in LMDB's file (overflow
            # pages): free a twentieth of L2 at least, not just the block's
            # size (freeing twice the size left 118 of 200 Puts refused).
            # Only for a write queued after the last shrink (behind its
            # trim's deletes), not for each failed write: a failed batch is
            # retried in halves and each of its blocks failed on its own, so
            # one full disk took L2 to nothing (an outside review: every
            # block acknowledged at local gone after a kill -9, and the
            # writer spinning on the blocks the trim had made dirty again).
            # (Once a second was too few: Puts refused for seconds.)
            self._shrinks += 1
            room = max(0, index.l2_bytes - max(4 * entry.size, index.l2_bytes // 20))
            if self.disk_capacity is None:
                log.warning("L2's disk is full: L2 is held below the %d bytes it holds (not "
                            "l2.capacity) until the disk has room", index.l2_bytes)
            self.disk_capacity = room if self.disk_capacity is None else \
                min(room, self.disk_capacity)
            self.trim()

    def paused(self) -> bool:
        """Whether writes are held back after a failure (WRITE_PAUSE_S)."""
        return time.monotonic() < self.paused_until

    def flush_dirty(self) -> None:
        """At close: queue every block that is only in L1."""
        for block, entry in list(self.index.blocks.items()):
            if entry.dirty:
                self.queue_write(block, entry)

    # -- trimming -------------------------------------------------------------------------

    def _within_outage_spill(self) -> bool:
        """L3 is down, or slower than the writes (its uploads at their
        bound): the blocks due for it stay in L2 up to l3.outage_spill over
        capacity (they move as L3 takes them); past it the coldest go
        without an upload. (Slow but healthy, L2 grew without bound: 9 GB
        over a 96 MiB capacity in 10 minutes of an outside soak.)"""
        return self.index.l2_bytes <= self.capacity * (1 + self.outage_spill)

    def trim(self) -> None:
        """Evict from L2 until it is within its capacity: first from the
        namespaces at or over their L2 quota (quota.l2), then any."""
        index = self.index
        capacity = self.capacity if self.disk_capacity is None else \
            min(self.capacity, self.disk_capacity)
        budget = _TRIM_BATCH
        l3 = self.l3
        # Blocks on their way to L3 leave L2 once there: counted as gone, or
        # each write that settles would start more demotions (up to
        # l3.write_queue_bytes: ~130,000 blocks of 4 KiB), and each step's
        # victim search walks past every one still in flight (the event loop
        # at 100 % of a CPU, uploads to a local directory timing out).
        while index.l2_bytes - (l3.demoting if l3 is not None else 0) > capacity:
            budget -= 1
            if budget < 0:
                # Far over capacity (e.g. restarted with a smaller l2.capacity):
                # go on in a later loop iteration, letting calls in between.
                self._trim_later()
                return
            over = self._over_quota()
            if over:
                step = self._trim_step(over)
                if step is not None:
                    if step:
                        continue
                    return
                # None of their blocks can go now: any namespace's may.
            if not self._trim_step(None):
                return

    def _over_quota(self) -> set[str] | None:
        """The namespaces at or over their L2 quota (None: no L2 quotas)."""
        limit = self.l2_limit
        if limit is None:
            return None
        over = set()
        for namespace, nbytes in self.index.l2_namespace_bytes.items():
            quota = limit(namespace)
            if quota and nbytes >= quota:
                over.add(namespace)
        return over

    def _trim_step(self, among: set[str] | None) -> bool | None:
        """Evict (or start demoting) one L2 block, of a namespace in ``among``
        when given. True: one went, go on; False: stop for now (demotions in
        flight are at their bound, or L3 is down within the outage spill, or
        nothing is evictable); None: ``among`` has no block to give."""
        index, l3 = self.index, self.l3
        if index.cold is not None and len(index.cold):
            record = index.cold.victim() if among is None else index.cold.victim_of(among)
            if record is not None:
                if self._evict_cold(record):
                    return True
                if l3 is not None and self._within_outage_spill():
                    return False  # demotions at their bound, or L3 down: hold (see below)
                self._evict_cold(record, drop=True)
                return True
        evictable = self._evictable
        victim = self.policy.victim(
            TierName.L2, self.clock(),
            evictable if among is None else lambda b: b[0] in among and evictable(b))
        if victim is None:
            return None if among is not None else False
        block, action = victim
        entry = index.blocks.get(block)
        if entry is None or not entry.l2:
            self.policy.on_remove(TierName.L2, block)
            return True
        if action is Action.DEMOTE and l3 is not None and not entry.l3:
            if l3.start_demotion(block, entry):
                return True  # its L2 copy goes once L3 has it (after_demotion)
            # Demotions in flight at their bound (L3 slower than the writes)
            # or L3 down: keep its blocks in L2 a bounded amount over
            # capacity (they move as L3 takes them), then drop.
            if self._within_outage_spill():
                return False
        self._l2_counters.evictions += 1
        if self.disk_capacity is not None and entry.l1_offset >= 0 and not entry.l3:
            # The disk is full: the block goes from L1 too (forget tells the
            # policy). Its L2 copy dropped alone, it was dirty in L1 again:
            # written back (and trimmed again, the writer spinning), and a
            # block acknowledged at local was in RAM only (lost at a kill -9).
            index.forget(block, entry)
            return True
        self.policy.on_remove(TierName.L2, block)
        index.drop_l2_copy(block, entry)
        if entry.l1_offset < 0 and not entry.l3:
            index.forget(block, entry, delete_l2=False)
        return True

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
            if not self.closing:
                self.trim()

        loop.call_soon(again)

    def _evictable(self, block: BlockId) -> bool:
        entry = self.index.blocks.get(block)
        if entry is None or not entry.l2:
            return True
        return entry.l2_pending == 0 and entry.l3_pending == 0 and \
            entry.lease_until <= self.clock()

    def _evict_cold(self, record: ColdBlock, drop: bool = False) -> bool:
        """Make room in L2 from the compact index: demote ``record``'s block
        (its least recently used, as sampled) to L3 (or drop it when L3 has it
        or there is no L3; and, with ``drop``, past the outage spill). False
        when it gave none."""
        index, l3 = self.index, self.l3
        assert index.cold is not None
        block = (record.namespace, record.key)
        if l3 is not None and not record.l3 and not drop:
            if not l3.healthy:
                return False  # the caller's outage rule applies
            entry = index.warm(block, track=False)
            assert entry is not None
            if l3.start_demotion(block, entry):
                index.cold_demotion_started(block)
                return True
            # In-flight demotions are at their bound: back in, wait for them.
            index.cool(block, entry)
            return False
        entry = index.warm(block, track=False)
        assert entry is not None
        index.drop_l2_copy(block, entry)
        c2 = self._l2_counters
        c2.evictions += 1
        if entry.l3:
            self.policy.on_insert(TierName.L3, block, entry.size, self.clock())
            c2.demotions += 1
        else:
            index.forget(block, entry, delete_l2=False)
        return True

    def after_demotion(self, block: BlockId | None = None, entry: Entry | None = None) -> None:
        """A demotion to L3 ended (or L3 came back: no block): go on trimming."""
        if block is not None and entry is not None and self.index.cold_demotion_ended(block):
            self._finish_cold_demotion(block, entry)
        self.trim()
        self.progress.wake()

    def _finish_cold_demotion(self, block: BlockId, entry: Entry) -> None:
        """A cold block's demotion ended: once L3 has it, its L2 copy goes."""
        index = self.index
        if index.blocks.get(block) is not entry or entry.dead or not entry.l2:
            return
        if entry.l3:
            index.drop_l2_copy(block, entry)
            self._l2_counters.evictions += 1
            if entry.l1_offset < 0:
                return  # now an L3-only block (mark_l3 told the policy)
        elif entry.l1_offset < 0:
            index.cool(block, entry)  # not demoted (L2 read failed?): back in
