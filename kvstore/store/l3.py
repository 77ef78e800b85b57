"""L3: demotion to the object store, reads from it, the background listing
that rebuilds the L3 part of the index.

Mechanism only; what to demote is the policy's call (made in
:meth:`kvstore.store.writeback.WriteBack.trim`), and every change to the
index goes through :class:`kvstore.store.index.Index`'s methods. Rules:

* A block demoted from L2 keeps its L2 copy until the object store has it, so
  an outage never loses a block: the demotion retries until L3 comes back
  (or the block is deleted). Bytes in flight to L3 are bounded by
  ``l3.write_queue_bytes``; when that is full, L2 stays over its capacity a
  little longer rather than drop blocks (back-pressure, never unbounded
  memory). While L3 is down (circuit breaker open), L2 keeps the blocks due
  for L3 up to ``l3.outage_spill`` over its capacity, and they move once L3
  is back; beyond that bound L2 evictions drop.
* Reads from L3 run under the tier's deadline (``l3.timeout_s``); an outage,
  a timeout or a corrupt object is a miss, never a hang or an error. Reads
  have request slots of their own (``l3.read_concurrency``): the drain of a
  demotion backlog after an outage, paced to ``l3.drain_concurrency``
  uploads at once, never holds them.
* Blocks other nodes put in the shared bucket are found by Lookup and Get
  (one HEAD / GET), and by the listing at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any

from kvstore.checksum import checksum
from kvstore.config import L3Config
from kvstore.errors import CorruptBlock, TierUnavailable
from kvstore.store.index import UNKNOWN_CHECKSUM, Entry
from kvstore.store.l1check import L1Check
from kvstore.store.parts import Part, Shared, spawn, writer_settled
from kvstore.store.stats import HintCounters
from kvstore.tiers.base import KeyValueTier, WriteDone
from kvstore.tiers.object import ListProgress, ObjectTier
from kvstore.types import BlockId, TierName, TierStats

log = logging.getLogger("kvstore.l3")

# How long a key found absent from L3 is not asked for again.
NEGATIVE_TTL_S = 2.0
#: Deletes of objects this node never had (best effort) waiting at once.
BEST_EFFORT_MAX = 4096
#: An object found corrupt counts as absent this long (it stays corrupt until a
#: node overwrites it; each look would download and drop it again).
CORRUPT_TTL_S = 60.0
#: Bits of the filter of blocks whose delete was sent while the listing at
#: start runs (4 MiB while it runs; 1 M deletes in it make ~3 % of the other
#: listed blocks look deleted too, each costing a header read, no more).
GONE_FILTER_BITS = 1 << 25


def settled_quietly(error: BaseException | None, existed: bool) -> None:
    """A state write to L2 nobody waits for (a failure is the writer's to log)."""


async def _nothing() -> None:
    """The write of a retried delete: _in_order does the delete first."""


#: A write's place in its block's write order: the block's write before it
#: (None: none in flight), and its own, settled when it has finished.
_Turn = tuple["asyncio.Future[None] | None", "asyncio.Future[None]"]


@dataclasses.dataclass(slots=True, eq=False)
class _Landing:
    """One Delete's or Flush's wait for its L3 deletes (deletes_landed)."""

    left: int = 0
    failed: bool = False
    event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class L3Mover(Part):
    """Moves blocks to and from L3. ``read_l2``: a block's verified L2 bytes
    (for a demotion); ``after_demotion``: called when one ends (L2 goes on
    trimming). Both are set once by the store, before :meth:`start`."""

    def __init__(self, shared: Shared, config: L3Config,
                 namespaces: Iterable[str] = (), max_payload: int | None = None) -> None:
        """``namespaces``: the only ones this node serves (``server.namespaces``;
        empty: all): the listing indexes no other namespace's objects.
        ``max_payload``: ``server.max_block_bytes`` (larger objects are not read)."""
        super().__init__(shared)
        self.namespaces = frozenset(namespaces)
        self._l2_counters = self.stats.counters[TierName.L2]
        self._counters = self.stats.counters[TierName.L3]
        self.check = L1Check(shared)
        self.read_l2: Callable[[BlockId, Entry], Awaitable[bytes | None]] | None = None
        self.after_demotion: Callable[[BlockId, Entry], None] | None = None
        self.tier = ObjectTier.from_config(config, max_payload)
        self.queue_limit = config.write_queue_bytes
        self.list_on_start = config.list_on_start
        self.retry_s = max(config.breaker_reset_s, 0.05)
        # The drain is paced: at most this many demotions upload at once, the
        # others wait here, before their request deadline starts (a backlog
        # never times out in the tier's queue, nor opens the breaker), and
        # some write slots stay free for ack=remote Puts and deletes.
        self._drain = asyncio.Semaphore(max(1, min(config.drain_concurrency,
                                                   config.concurrency)))
        self.queued = 0  # bytes being demoted or written for ack=remote
        #: Bytes of L2 blocks on their way to L3 (demotions started, not ended):
        #: L2's trim counts them as gone (WriteBack.trim).
        self.demoting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # The last object-store write (upload or delete) of each block with
        # one in flight: the next one waits for it, so that the writes of a
        # block land in the order they were made (an old version's upload
        # can never land over a newer one, or after the block's delete).
        self._last_write: dict[BlockId, asyncio.Future[None]] = {}
        self._delete_tasks: set[asyncio.Task[None]] = set()
        # Blocks with a delete not yet done: reads, HEADs and the listing
        # treat them as absent (a Delete is final at once for this node).
        self._deleting: dict[BlockId, int] = {}
        # Deletes and Flushes waiting for their deletes to reach the bucket
        # (deletes_landed): settled True once the block has no delete left,
        # False when one fails (L3 down or slow: retried, not waited for).
        self._landed: dict[BlockId, list[_Landing]] = {}
        # Deletes that failed (L3 down or too slow), with how many: retried by
        # _redo_loop, and before any later write of the block (an upload must
        # not land first and then be deleted, nor the old object outlive it).
        self._redo: dict[BlockId, int] = {}
        self._redo_wake = asyncio.Event()
        self._redo_task: asyncio.Task[None] | None = None
        #: L2, where a delete not yet done is recorded (a tombstone) so that it
        #: survives a restart; None without L2 (then it is retried while the
        #: process lives). Set once by the store, before :meth:`start`.
        self.tombs: KeyValueTier | None = None
        self._tombstoned: set[BlockId] = set()  # blocks with a record in L2
        # The checksum of the object a record found at start is to delete:
        # only that object goes (another may have been written under the key
        # since: by another node, or by a release that did not read records).
        self._recorded: dict[BlockId, int] = {}
        # Blocks (and namespaces) of Deletes and Flushes not answered yet: the
        # deletes of their objects remove whatever is under the key, as the
        # call asked ("gone from the bucket"), another node's overwrite made
        # before it included. Only a delete that lands after its call was
        # answered (a retry, a start left late) is conditional on the version
        # it is for: by then another node may have written the key anew.
        self._answering: dict[BlockId, int] = {}
        self._answering_namespaces: dict[str, int] = {}
        #: The L3 delete records in L2 are for another l3.url (TieredStore):
        #: dropped at start, not done.
        self.records_are_foreign = False
        # Records on their way to L2 (a second delete of the block waits for them).
        self._recording: dict[BlockId, asyncio.Future[BaseException | None]] = {}
        # Blocks whose delete record's removal is on its way to L2 (_untombstone)
        self._unrecording: dict[BlockId, asyncio.Future[BaseException | None]] = {}
        self.delete_wait_s = config.timeout_s * (config.retries + 1)
        self._redo_width = max(1, config.concurrency)
        # Deletes of objects this node never had (a Delete's other keys):
        # paced through their own few slots, and at most BEST_EFFORT_MAX waiting.
        self._bulk_width = max(1, config.concurrency // 4)
        self._bulk = asyncio.Semaphore(self._bulk_width)
        # This node's own deletes (overwrites, Deletes, Flushes) wait here,
        # before their request's deadline starts, as many at once as the
        # write slots: a Flush's thousands no longer time out in the queue,
        # and an overwrite's delete is not held to the few slots above (at
        # concurrency/4, 200 overwrites at remote took twice as long).
        self._own_deletes = asyncio.Semaphore(max(1, config.concurrency))
        self._best_effort: set[BlockId] = set()
        self.best_effort_skipped = 0
        self._absent: dict[BlockId, float] = {}
        # Reads and HEADs in flight of blocks this node had no entry for, and
        # those of them a Delete named meanwhile: what such a probe finds is
        # not indexed (it would bring the deleted object back into L1 after
        # the Delete was answered). Bounded by the probes in flight.
        self._probing: dict[BlockId, int] = {}
        self._voided: set[BlockId] = set()
        # Blocks a Delete (or Flush) of keys unknown here is removing from the
        # bucket now: absent until it answers (see :meth:`deleting`).
        self._hidden: dict[BlockId, int] = {}
        self.scan_task: asyncio.Task[None] | None = None
        self.listed = 0
        # Blocks written from then on (Unix time) may have an older object
        # under their key that this node did not know of when it wrote them:
        # the listing checks such an object's header before it counts it as
        # theirs (_settle_listed). Set by start().
        self.unlisted_since = 0.0
        self.stale_found = 0  # objects the listing found older than the held block
        self._unsettled_left = False  # an object's header could not be read
        # Blocks whose delete ended (this node's, or a Delete's of keys it did
        # not know) while the listing ran: a page listed before that may name
        # the object that is gone now, and the listing asks the store what
        # the key holds instead of taking it for the block's L3 copy. (An
        # outside review: a delete recorded before a kill -9 landed after the
        # start's listing took its page; the listing then counted the newer
        # L2 block, of the same size, as held in L3, and L2 dropped its only
        # copy.) A fixed-size filter, not a set: however many deletes land, a
        # block wrongly taken for one of them costs one header read.
        self._gone_filter: bytearray | None = None
        self.scan_done = asyncio.Event()
        self._window_closed = False  # a listing ended with every block settled
        self._closing = False

    @property
    def healthy(self) -> bool:
        return self.tier.healthy

    def start(self) -> None:
        if self.tombs is not None:
            # Deletes recorded before a restart are done first: the listing
            # below skips their objects, and an upload of such a block waits
            # for its delete (_in_order). Those recorded for the bucket of an
            # earlier l3.url without a checksum are dropped: done in this one,
            # they deleted whatever this bucket has under their keys.
            records = self.tombs.tombstones_sync()
            dropped = 0
            if self.records_are_foreign:
                for block, checksum in records:
                    if checksum is None:
                        self.tombs.submit_tombstone(block, False, settled_quietly)
                        dropped += 1
                records = [(b, c) for b, c in records if c is not None]
            if dropped:
                log.warning("L3: %d deletes recorded without a checksum for another l3.url "
                            "dropped", dropped)
            for block, checksum in records:
                self._deleting[block] = self._deleting.get(block, 0) + 1
                self._redo[block] = self._redo.get(block, 0) + 1
                self._tombstoned.add(block)
                if checksum is not None:
                    self._recorded[block] = checksum
            if self._redo:
                log.info("L3: %d deletes recorded before the restart to finish",
                         len(self._redo))
        self._redo_task = asyncio.get_running_loop().create_task(self._redo_loop())
        if self._redo:
            self._redo_wake.set()
        # Until a listing has ended, an overwrite (or a first Put here) of a
        # key whose object this node has not listed yet leaves that object
        # behind, older bytes of the same key. The time that window opened
        # is kept in L2 until a listing ends, so that a later run's listing
        # still checks the blocks written in it (it otherwise took an older
        # object of the same size for theirs, and dropped their L2 copy).
        earlier = self.tombs.unlisted_since if self.tombs is not None else None
        now = self.index.stamp()
        self.unlisted_since = now if earlier is None else min(earlier, now)
        if self.tombs is not None and (earlier is None or now < earlier):
            # (a window kept from a run whose clock was ahead opens now: kept
            # as it was, a block written in this run looked written before it)
            self.tombs.set_unlisted_since(now, settled_quietly)
        self.index.on_earlier_stamp = self._window_goes_back
        if self.list_on_start:
            self.scan_task = asyncio.get_running_loop().create_task(self._scan())
        else:
            self.scan_done.set()

    async def close(self) -> None:
        self._closing = True
        # Uploads in flight land (or fail) and then deletes finish, each
        # bounded by the tier's timeout: a block deleted just before shutdown
        # must not come back from L3 after the restart (an upload cancelled
        # mid-request may still land, after its block's delete).
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.delete_wait_s)
        if self._delete_tasks:
            await asyncio.wait(list(self._delete_tasks), timeout=self.delete_wait_s)
        tasks = list(self._tasks) + list(self._delete_tasks) + [
            t for t in (self.scan_task, self._redo_task) if t is not None]
        if self._redo:
            log.warning("L3: %d deletes not done at shutdown (L3 unavailable)%s", len(self._redo),
                        "; recorded in L2, done after the restart" if self.tombs is not None
                        else "; without L2 they are lost: the objects may be served again")
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.tier.close()

    # -- index ---------------------------------------------------------------------------

    async def _scan(self) -> None:
        """List the bucket (no request per object) and index what it holds;
        the server serves meanwhile. Retried while L3 is unavailable."""
        started = time.monotonic()
        progress = ListProgress()  # a failed page is listed again, not the whole bucket
        while not self._closing:
            try:
                async for block, size in self.tier.list_blocks(self.namespaces, progress):
                    self.listed += 1
                    if block in self._deleting or block in self._hidden or (
                            self.namespaces and block[0] not in self.namespaces):
                        continue
                    entry = self.index.blocks.get(block)
                    if entry is not None and entry.l3_pending:
                        # Its upload is on the way: what it does says whether
                        # L3 holds the block (taken from the listing, a failed
                        # upload left the block counted in L3 on an older
                        # object of its size, and L2 dropped it; a fix review).
                        continue
                    if self._gone_since_listed(block) and self.index.peek(block) is None:
                        await self.head(block)  # what the key holds now, if anything
                    elif self._unsettled(block, entry) or self._gone_since_listed(block):
                        # Written while this node may not have known the object,
                        # or deleted since the page was listed: the object's
                        # header (if it is still there) says whose bytes it holds.
                        await self._settle_listed(block)
                    elif entry is None and self.index.listed_cold(block, size):
                        pass  # in the compact index, now marked as in L3 too
                    elif entry is None:
                        self.index.discovered(block, size, UNKNOWN_CHECKSUM, self.index.stamp())
                    elif entry.size == size:
                        self.index.mark_l3(block, entry)
                    if self.listed % 1000 == 0:
                        await asyncio.sleep(0)  # let calls in between
                break
            except TierUnavailable as exc:
                log.warning("L3 listing failed (%s); retrying in %.1f s", exc, self.retry_s)
                await asyncio.sleep(self.retry_s)
        self._gone_filter = None
        if not self._closing and not self._unsettled_left:
            self._window_closed = True
            if self.tombs is not None:
                self.tombs.set_unlisted_since(None, settled_quietly)
        self.scan_done.set()
        log.info("L3 listing: %d blocks in %.2f s", self.listed, time.monotonic() - started)

    def _window_goes_back(self, created: float) -> None:
        """A block is created before the listing's window opened (the clock
        stepped back): the window opens that much earlier, here and in L2 (a
        block older than that but written before the start is then checked
        by a HEAD too: its header says whose bytes the object holds)."""
        if self._window_closed or created >= self.unlisted_since:
            return
        log.warning("the clock went back %.1f s while the L3 listing had not ended: blocks "
                    "created since then are checked against their objects' headers",
                    self.unlisted_since - created)
        self.unlisted_since = created
        if self.tombs is not None:
            self.tombs.set_unlisted_since(created, settled_quietly)

    def _gone(self, block: BlockId) -> None:
        """The block's delete ended: remembered while the listing runs
        (:meth:`_gone_since_listed`)."""
        if self.scan_task is None or self.scan_done.is_set():
            return
        if self._gone_filter is None:
            self._gone_filter = bytearray(GONE_FILTER_BITS // 8)
        bit = hash(block) & (GONE_FILTER_BITS - 1)
        self._gone_filter[bit >> 3] |= 1 << (bit & 7)

    def _gone_since_listed(self, block: BlockId) -> bool:
        """Whether the listed object may be one whose delete ended after its
        page was listed (then gone, or another version written since)."""
        if self._gone_filter is None:
            return False
        bit = hash(block) & (GONE_FILTER_BITS - 1)
        return bool(self._gone_filter[bit >> 3] & (1 << (bit & 7)))

    def _unsettled(self, block: BlockId, entry: Entry | None) -> bool:
        """Whether the block (``entry``, or the compact index's record) was
        written since :attr:`unlisted_since` and is not known in L3: an
        object the listing finds under its key may hold older bytes."""
        if entry is not None:
            return entry.created >= self.unlisted_since and not entry.l3 and \
                not entry.l3_pending
        record = self.index.peek(block)
        return record is not None and record.created >= self.unlisted_since and not record.l3

    async def _settle_listed(self, block: BlockId) -> None:
        """The listing found an object under the key of a block this node
        wrote while it did not know of the object. Its header decides: this
        block's bytes (an upload of its own, before a restart) count as its
        L3 copy; older bytes of the key (written before it, and never
        deleted: the overwrite did not know of them) are deleted, recorded
        first; newer ones (another node's, written since) are left, as an
        object of another size is. Raises TierUnavailable (the listing is
        retried from that page)."""
        try:
            meta = await self.tier.head_meta(block)
        except TierUnavailable:
            # The listing goes on after this object: the window stays open
            # in L2 for the next run's listing to settle it.
            self._unsettled_left = True
            raise
        if meta is None or block in self._deleting:
            return
        current = self.index.peek(block)
        entry = current if isinstance(current, Entry) else None
        if current is None or current.l3 or (entry is not None and entry.l3_pending):
            return  # gone meanwhile, or known in L3 (its own upload): nothing to settle
        if meta.size == current.size and meta.checksum == current.checksum:
            if entry is not None:
                self.index.mark_l3(block, entry)
            else:
                self.index.listed_cold(block, meta.size)
            return
        if meta.created > current.created:
            # Written after this block (another node's): left, and this node's
            # older copy dropped for it (kept, it stayed outside L3, and its
            # demotion later uploaded the older bytes over the newer object).
            log.info("L3 object %s/%s holds bytes newer than this node's block (another "
                     "node's): this node's copy dropped for it", block[0], block[1].hex()[:16])
            older = self.index.entry(block)  # (a compact record: warmed to be forgotten)
            if older is not None:
                self.index.forget(block, older)
                self.index.discovered(block, meta.size, meta.checksum, meta.created)
            return
        self.stale_found += 1
        log.info("L3 object %s/%s holds bytes older than this node's block (checksum %#x, "
                 "not %#x): deleted", block[0], block[1].hex()[:16], meta.checksum,
                 current.checksum)
        # As a delete recorded before a restart is done: the object's own
        # checksum in the record, deleted only if it is still that object,
        # before any upload of the block (_in_order).
        if self.tombs is not None and block not in self._tombstoned:
            self._record(block, meta.checksum)
        self._recorded[block] = meta.checksum
        self._deleting[block] = self._deleting.get(block, 0) + 1
        self._redo[block] = self._redo.get(block, 0) + 1
        self._redo_wake.set()

    # -- writes --------------------------------------------------------------------------

    def hold_for_upload(self, entry: Entry) -> None:
        """ack=remote, called as the Put commits the block (before anything is
        awaited): until its :meth:`write_remote` task ends (the caller then
        calls :meth:`end_upload`), the block's L1 copy stays
        (pinned: its local write and its upload read it) and counts as on its
        way to L3, so that an overwrite or a Delete meanwhile deletes the
        object after the upload lands (else the upload left the replaced
        bytes in the bucket, served again after a restart or an eviction)."""
        self.index.pin_reader(entry)
        self.index.begin_l3_copy(entry)

    def end_upload(self, entry: Entry) -> None:
        """What :meth:`hold_for_upload` took, given back."""
        self.index.end_l3_copy(entry)
        self.index.unpin_reader(entry)

    async def write_remote(self, block: BlockId, entry: Entry) -> None:
        """ack=remote: write the block's L1 copy to L3 now (raises
        TierUnavailable when L3 cannot take it), under the Put's
        :meth:`hold_for_upload`."""
        if not self.index.is_current(block, entry):
            return  # replaced or deleted before its turn: nothing to make remote
        if not self.healthy:
            raise TierUnavailable("L3 is unavailable (circuit breaker open): "
                                  "acknowledgement level remote cannot be met now")
        view = self.l1.slice(entry.l1_offset, entry.size)
        try:
            if not self.check.intact(view, entry):  # a corrupt L1 copy is never uploaded
                view.release()
                self.check.drop_corrupt(block, entry, "its L3 upload", own_pins=1)
                raise CorruptBlock(f"block {block[1].hex()} failed its checksum in L1 "
                                   "before it reached L3 (dropped)")
            self.queued += entry.size
            try:
                if not await self._in_order(
                        block, functools.partial(self.tier.put, block, view, entry.meta()),
                        functools.partial(self.index.is_current, block, entry)):
                    return  # deleted or replaced meanwhile: nothing to make remote
            except Exception:
                # The PUT failed, perhaps after the object store took it (a
                # timeout): an object may be there that nothing here counts
                # on, and that an overwrite or Delete would then leave behind.
                # It is deleted behind the attempt (recorded, retried); the
                # block stays in L1/L2. Not when the block was replaced or
                # deleted meanwhile: that queued a delete behind the attempt
                # already, and one queued now would come after the newer
                # block's own upload.
                if self.index.is_current(block, entry):
                    self.delete_later(block, in_l3=True, checksum=entry.checksum)
                raise
            finally:
                self.queued -= entry.size
        finally:
            view.release()
        self.index.mark_l3(block, entry)
        self._absent.pop(block, None)  # (a good copy is there now)

    def start_demotion(self, block: BlockId, entry: Entry) -> bool:
        """Copy an L2 victim to L3 in the background; False when L3 is down
        or the in-flight bytes are at their bound."""
        if not self.healthy or (self.queued and self.queued + entry.size > self.queue_limit):
            return False
        self.index.begin_l3_copy(entry)
        self.queued += entry.size
        self.demoting += entry.size
        spawn(self._tasks, self._demote(block, entry))
        return True

    async def _demote(self, block: BlockId, entry: Entry) -> None:
        index = self.index
        assert self.read_l2 is not None and self.after_demotion is not None
        try:
            while not self._closing:
                if not index.is_current(block, entry) or not entry.l2:
                    return
                written: bool | None  # None: L3 is unavailable, try again
                try:
                    async with self._drain:
                        # The bytes are read once the upload may start, not when
                        # it is queued: a backlog waiting for slow L3 (up to
                        # l3.write_queue_bytes) stays on disk, not in memory.
                        if not index.is_current(block, entry) or not entry.l2:
                            return
                        data = await self.read_l2(block, entry)
                        if data is None:
                            return
                        try:
                            written = await self._in_order(
                                block, functools.partial(self.tier.put, block, data,
                                                         entry.meta()),
                                functools.partial(index.is_current, block, entry))
                        finally:
                            del data
                except TierUnavailable as exc:
                    log.info("demotion of %s waits for L3: %s", block[1].hex()[:16], exc)
                    written = None
                if written is None:
                    # Keep the L2 copy and try again once the breaker may let us;
                    # jittered, so that a backlog does not come back as one burst
                    # (slept outside the except: its traceback holds the upload's
                    # buffers, and a backlog of sleepers would hold them all).
                    await asyncio.sleep(self.retry_s * random.uniform(1.0, 2.0))
                    continue
                if not written:
                    return  # deleted or replaced meanwhile
                self.index.mark_l3(block, entry)
                self._absent.pop(block, None)
                self._l2_counters.demotions += 1
                return
        finally:
            index.end_l3_copy(entry)
            self.queued -= entry.size
            self.demoting -= entry.size
            self.after_demotion(block, entry)

    def _claim_turn(self, block: BlockId) -> _Turn:
        """The block's next place in its write order, taken now: a write
        made later (an ``ack=remote`` Put's upload) lands after this one."""
        before = self._last_write.get(block)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_write[block] = mine
        return before, mine

    def _end_turn(self, block: BlockId, turn: _Turn) -> None:
        mine = turn[1]
        if not mine.done():
            mine.set_result(None)
        if self._last_write.get(block) is mine:
            del self._last_write[block]

    async def _in_order(self, block: BlockId, write: Callable[[], Awaitable[Any]],
                        wanted: Callable[[], bool] | None = None,
                        turn: _Turn | None = None) -> bool:
        """Run an object-store write of the block after the block's previous
        one has finished (whether it succeeded or not). ``wanted`` is asked
        once it is this write's turn: an upload of a block deleted or
        replaced meanwhile is skipped (False), or it would land after the
        delete. ``turn``: its place, taken when the write was decided
        (:meth:`_claim_turn`; by default, now)."""
        if turn is None:
            turn = self._claim_turn(block)
        before = turn[0]
        try:
            if before is not None:
                await asyncio.wait([before])
            if block in self._redo:
                # A delete of this block failed earlier: it goes first.
                checksum = self._recorded.get(block)
                if checksum is None:
                    await self.tier.delete(block)
                else:
                    await self._delete_version(block, checksum)
                    self._recorded.pop(block, None)
                self._deleted(block, 0)
            removing = self._unrecording.get(block) if wanted is not None else None
            if removing is not None:
                # An upload right after the block's delete: that delete's
                # record goes from L2 first. Left there (a kill -9 before the
                # writer got to its removal), the restart did the delete
                # again, and deleted this upload's object: a record without
                # checksum deletes whatever is under the key (187 of 200
                # objects acknowledged at remote, gone from the bucket).
                await asyncio.wait([removing])
            if wanted is not None and not wanted():
                return False
            await write()
            return True
        finally:
            self._end_turn(block, turn)

    def delete_later(self, block: BlockId, in_l3: bool = True,
                     checksum: int | None = None) -> asyncio.Future[Any] | None:
        """Delete the block's object in the background, after the block's
        writes already in flight (an upload that lands later would bring the
        block back).

        ``in_l3``: this node put the object there (or found it): the delete
        is retried until it is done, across restarts, and the returned future
        settles once it is recorded in L2 (the caller answers after it: a
        kill right after the answer must not bring the object back; None
        without L2). Otherwise the object, if any, is another node's: one
        paced attempt, dropped when L3 cannot take it or too many are
        waiting (so a Delete of many blocks while L3 is down or slow costs
        no memory, tombstones or L3 slots beyond a bound). ``checksum``:
        that of the object to delete, kept in its record."""
        # An upload of the block in flight (ack=remote) may land first: durable too.
        if not in_l3 and block not in self._last_write:
            if block in self._deleting or len(self._best_effort) >= BEST_EFFORT_MAX:
                self.best_effort_skipped += 1
                return None
            self._best_effort.add(block)
            self._deleting[block] = self._deleting.get(block, 0) + 1
            self._spawn_in_turn(block, self._delete_once)
            return None
        recorded: asyncio.Future[Any] | None = None
        if self.tombs is not None:
            # (an earlier record still on its way to L2 is waited for too)
            recorded = self._recording.get(block)
            if recorded is None and block not in self._tombstoned:
                # A block known only from the listing has no checksum yet: its
                # record deletes whatever object is under the key, as records
                # from before checksums did.
                recorded = self._record(block, None if checksum == UNKNOWN_CHECKSUM
                                        else checksum)
        if checksum is not None and checksum != UNKNOWN_CHECKSUM and \
                block not in self._deleting and block not in self._redo:
            # Kept for a retry. Not while another delete of the block is
            # pending: that one may be of an older object (one known only
            # from the listing, without a checksum), which a retry made
            # conditional on this newer version's would leave in the bucket.
            self._recorded.setdefault(block, checksum)
        self._deleting[block] = self._deleting.get(block, 0) + 1
        # (the turn is taken now, not when the task starts: a Put's upload
        # decided in between would land first, and be deleted)
        self._spawn_in_turn(block, functools.partial(
            self._delete, checksum=None if checksum == UNKNOWN_CHECKSUM else checksum))
        return recorded

    def _spawn_in_turn(self, block: BlockId,
                       delete: Callable[[BlockId, _Turn], Coroutine[Any, Any, None]]) -> None:
        turn = self._claim_turn(block)
        task = spawn(self._delete_tasks, delete(block, turn))
        # (a task cancelled before it started never ran its finally: the
        # writes of the block behind it waited for ever)
        task.add_done_callback(lambda _: self._end_turn(block, turn))

    async def _slotted_delete(self, slots: asyncio.Semaphore, block: BlockId) -> bool:
        """Delete the block's object once one of ``slots`` is free: it waits
        here, before its request's deadline starts. (A Flush queues a delete
        for every object it knew: thousands at once waited for a request
        slot inside their deadline, were started with little of it left and
        timed out, opening the breaker: L3 unavailable to every tenant, and
        the Flush failed.)"""
        async with slots:
            return bool(await self.tier.delete(block))

    async def _slotted_own_delete(self, block: BlockId, checksum: int | None) -> bool:
        """:meth:`_slotted_delete` of an object this node put or found: when
        its checksum is known (``checksum``, the version this delete is for,
        else the one recorded for the key), only if the object under the key
        is still that one (a delete retried after a failure, or slow to
        start, deleted whatever was there: another node's newer block,
        acknowledged at remote, gone from the bucket)."""
        async with self._own_deletes:
            wanted = self._recorded.get(block) if checksum is None else checksum
            if wanted is None:
                return bool(await self.tier.delete(block))
            deleted = await self._delete_version(block, wanted)
            if self._recorded.get(block) == wanted:
                del self._recorded[block]
            return deleted

    async def _delete_once(self, block: BlockId, turn: _Turn) -> None:
        done = False
        try:
            await self._in_order(block, functools.partial(self._slotted_delete, self._bulk, block),
                                 turn=turn)
            done = True
        except TierUnavailable:
            pass  # another node's object, if any: not this node's to keep trying
        finally:
            self._best_effort.discard(block)
            left = self._deleting.get(block, 0) - 1
            if left > 0:
                self._deleting[block] = left
            else:
                self._deleting.pop(block, None)
                if done:  # (one L3 never took changed nothing the listing saw)
                    self._gone(block)
                self._untombstone(block)
                self._settle_landed(block, True)

    def _settle_landed(self, block: BlockId, landed: bool) -> None:
        for group in self._landed.pop(block, ()):
            group.left -= 1
            group.failed = group.failed or not landed
            group.event.set()

    async def _delete_version(self, block: BlockId, checksum: int) -> bool:
        """Delete the block's object: whatever version is there while a Delete
        or Flush of it waits for its answer (asked when the store is reached:
        a delete waiting out an earlier one in doubt may start before the
        answer and land seconds after it), else only the version ``checksum``
        (another node may have written the key anew since the answer)."""
        if self._call_waits(block):
            deleted = await self.tier.delete(block, still=lambda: self._call_waits(block))
            if deleted is not None:
                return deleted
        return await self.tier.delete_if(block, checksum)

    def _call_waits(self, block: BlockId) -> bool:
        """A Delete or Flush of the block waits for its answer (:meth:`answering`)."""
        return block in self._answering or block[0] in self._answering_namespaces

    @contextlib.contextmanager
    def answering(self, namespace: str, keys: Sequence[bytes] | None = None) -> Iterator[None]:
        """While a Delete of ``keys`` (a Flush of the namespace: None) waits
        for its answer: its own deletes remove whatever object is under each
        key, not only the version this node knew (a Delete answered 1 left
        another node's overwrite, made before the call, in the bucket, and
        served it; 0.23.0 deleted it)."""
        counts: dict[Any, int]
        names: list[Any]
        if keys is None:
            counts, names = self._answering_namespaces, [namespace]
        else:
            counts, names = self._answering, [(namespace, key) for key in keys]
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        try:
            yield
        finally:
            for name in names:
                left = counts[name] - 1
                if left:
                    counts[name] = left
                else:
                    del counts[name]

    async def deletes_landed(self, blocks: Iterable[BlockId], idle_s: float) -> bool:
        """Wait until this node's deletes of ``blocks`` queued so far have
        reached the object store, for as long as one lands at least every
        ``idle_s`` seconds. Without it a Delete was answered once its deletes
        were recorded, and another node sharing the bucket served the deleted
        blocks until they landed (seconds for thousands of them). False when
        L3 is down, or none landed for ``idle_s``: those are recorded and
        retried, not waited for (a delete that failed while L3 is up is
        retried, and waited for)."""
        group = _Landing()
        for block in blocks:
            if block in self._deleting:
                self._landed.setdefault(block, []).append(group)
                group.left += 1
        while group.left and not group.failed:
            if not self.healthy:
                return False
            group.event.clear()
            try:
                await asyncio.wait_for(group.event.wait(), idle_s)
            except TimeoutError:
                return False
        return not group.failed

    async def delete_unknown(self, blocks: list[BlockId],
                             delete: Callable[[BlockId], Awaitable[bool]]) -> int:
        """Delete objects of blocks this node does not index (another node's;
        ``delete`` is the one :meth:`deleting` yields for them), a few at a
        time (``l3.concurrency`` / 4 requests), so that a Delete naming many
        keys neither floods the object store's request slots (other tenants'
        ``ack=remote`` Puts and reads need them) nor times out requests that
        waited for a slot. Stops at the first that L3 cannot take. Returns
        how many existed."""
        deleted = 0
        width = self._bulk_width
        for start in range(0, len(blocks), width):
            if not self.healthy:
                break
            results = await asyncio.gather(*(delete(b) for b in blocks[start:start + width]),
                                           return_exceptions=True)
            deleted += sum(1 for r in results if r is True)
            if any(isinstance(r, BaseException) for r in results):
                break
        return deleted

    @contextlib.contextmanager
    def deleting(self, blocks: Sequence[BlockId], wide: bool = False
                 ) -> Iterator[Callable[[BlockId], Awaitable[bool]]]:
        """While a Delete (or Flush) removes objects this node has no entry
        for: the blocks count as absent (a Get or Lookup that starts now does
        not find, and index, an object about to go), the probes of them
        already in flight find nothing to index, and each block's place in
        its write order is taken now, so that an ``ack=remote`` Put of one
        of them made meanwhile uploads after its delete (its upload landed
        first, and the delete then removed the acknowledged object). Yields
        the delete to run for each block (True: an object was there), paced
        to ``l3.concurrency`` / 4 requests at once (``wide``: to
        ``l3.concurrency``), waiting for its turn before it takes a slot."""
        self.void_probes(blocks)
        # (not ``_deleting``: that says a delete of this node's is still to be
        # done, which would make a later Delete skip its own)
        hidden = self._hidden
        turns: dict[BlockId, _Turn] = {}
        for block in blocks:
            hidden[block] = hidden.get(block, 0) + 1
            if block not in turns:
                turns[block] = self._claim_turn(block)
        slots = self._own_deletes if wide else self._bulk

        async def delete(block: BlockId) -> bool:
            existed = False

            async def paced() -> None:
                nonlocal existed
                existed = await self._slotted_delete(slots, block)

            await self._in_order(block, paced, turn=turns.pop(block, None))
            return existed

        try:
            yield delete
        finally:
            for block, turn in turns.items():  # (those not deleted: L3 failed)
                self._end_turn(block, turn)
            for block in blocks:
                left = hidden.get(block, 0) - 1
                if left > 0:
                    hidden[block] = left
                else:
                    hidden.pop(block, None)
                    if block not in turns:  # (its delete was sent; else L3 failed first)
                        self._gone(block)

    def _record(self, block: BlockId,
                checksum: int | None) -> asyncio.Future[BaseException | None]:
        assert self.tombs is not None
        recorded, done = self._l2_write(self._recording, block)

        def settled(_: asyncio.Future[BaseException | None]) -> None:
            if recorded.cancelled():
                return  # the server is stopping: the delete is done again after a restart
            error = recorded.result()
            if error is not None:
                log.error("L3 delete of %s/%s could not be recorded in L2 (%s): a restart "
                          "before it is done may serve the object again", block[0],
                          block[1].hex()[:16], error)

        recorded.add_done_callback(settled)
        self._tombstoned.add(block)
        self.tombs.submit_tombstone(block, True, done, checksum)
        return recorded

    @staticmethod
    def _l2_write(pending: dict[BlockId, asyncio.Future[BaseException | None]],
                  block: BlockId) -> tuple[asyncio.Future[BaseException | None], WriteDone]:
        """A write about ``block`` on its way to L2 (a delete record, or its
        removal): its future, kept in ``pending`` until it settles, and the
        writer's completion callback."""
        future, done = writer_settled(asyncio.get_running_loop())
        pending[block] = future

        def settled(_: asyncio.Future[BaseException | None]) -> None:
            if pending.get(block) is future:
                del pending[block]
        future.add_done_callback(settled)
        return future, done

    async def _delete(self, block: BlockId, turn: _Turn, checksum: int | None = None) -> None:
        try:
            await self._in_order(block, functools.partial(self._slotted_own_delete, block,
                                                          checksum),
                                 turn=turn)
        except TierUnavailable as exc:
            log.info("L3 delete of %s waits for L3: %s", block[1].hex()[:16], exc)
            if checksum is not None and self._deleting.get(block, 0) <= 1:
                # The retry deletes only this object (else whatever is there,
                # another node's newer block put meanwhile included).
                self._recorded.setdefault(block, checksum)
            self._redo[block] = self._redo.get(block, 0) + 1
            self._redo_wake.set()
            if not self.healthy:
                self._settle_landed(block, False)  # (retried once L3 is back: not waited for)
            return
        self._deleted(block, 1)

    def _deleted(self, block: BlockId, done: int) -> None:
        """The block's object is gone: ``done`` deletes finished, and every
        earlier one that had failed is settled by it."""
        left = self._deleting.get(block, 0) - done - self._redo.pop(block, 0)
        if left > 0:
            self._deleting[block] = left
            return
        self._deleting.pop(block, None)
        self._gone(block)
        self._untombstone(block)
        self._settle_landed(block, True)

    def _untombstone(self, block: BlockId) -> None:
        """No delete of the block is left: its record goes (a record left
        behind would delete whatever object the key has after a restart)."""
        if block in self._tombstoned:
            self._tombstoned.discard(block)
            assert self.tombs is not None
            _, done = self._l2_write(self._unrecording, block)
            self.tombs.submit_tombstone(block, False, done)

    async def _redo_loop(self) -> None:
        """Retry the deletes that failed, a few at a time, once L3 may take them."""
        while not self._closing:
            await self._redo_wake.wait()
            self._redo_wake.clear()
            while self._redo and not self._closing:
                batch = list(itertools.islice(self._redo, self._redo_width))
                results = await asyncio.gather(
                    *(self._in_order(block, _nothing) for block in batch),
                    return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException) and not isinstance(
                            result, TierUnavailable):
                        log.error("L3 delete retry failed: %r", result)
                if any(isinstance(r, BaseException) for r in results):
                    await asyncio.sleep(self.retry_s * random.uniform(1.0, 2.0))

    # -- reads ---------------------------------------------------------------------------

    def known_absent(self, block: BlockId) -> bool:
        if block in self._deleting or block in self._hidden:
            return True
        until = self._absent.get(block)
        if until is None:
            return False
        if until < time.monotonic():
            del self._absent[block]
            return False
        return True

    def _note_absent(self, block: BlockId, ttl: float = NEGATIVE_TTL_S) -> None:
        if len(self._absent) > 100_000:
            self._absent.clear()
        self._absent[block] = time.monotonic() + ttl

    def has_object(self, block: BlockId, entry: Entry) -> bool:
        """Whether an object of this node's may be under the block's key: its
        L3 copy, an upload in flight, a write of it in order (else what is
        there, if anything, is another node's)."""
        return entry.l3 or entry.l3_pending > 0 or block in self._last_write

    def void_probes(self, blocks: Iterable[BlockId]) -> None:
        """A Delete of ``blocks``: reads and HEADs of them in flight that
        started with no entry must not index what they find."""
        probing = self._probing
        for block in blocks:
            if block in probing:
                self._voided.add(block)

    def _begin_probe(self, block: BlockId) -> None:
        self._probing[block] = self._probing.get(block, 0) + 1

    def _end_probe(self, block: BlockId) -> bool:
        """A probe ended; whether a Delete voided it meanwhile."""
        left = self._probing[block] - 1
        voided = block in self._voided
        if left:
            self._probing[block] = left
        else:
            del self._probing[block]
            self._voided.discard(block)
        return voided

    async def head(self, block: BlockId) -> Entry | None:
        """Is the block in L3 (put by any node)? Indexes it when found."""
        if not self.healthy or self.known_absent(block):
            return None
        self._begin_probe(block)
        try:
            size = await self.tier.head_size(block)
        except TierUnavailable:
            return None
        finally:
            voided = self._end_probe(block)
        if size is None:
            self._note_absent(block)
            return None
        entry = self.index.entry(block)  # (an L2 copy counts: never hidden by L3's)
        if entry is not None:
            # Known here meanwhile (a Put, or another probe's find). A HEAD
            # tells the object's size, not its bytes: only an entry that came
            # from the bucket itself is marked as in it (one Put here with
            # other bytes, marked, would be dropped from L2 as "in L3").
            if entry.checksum == UNKNOWN_CHECKSUM and entry.size == size:
                self.index.mark_l3(block, entry)
            return entry
        if voided:
            return None  # deleted while it was asked for: never indexed again
        return self.index.discovered(block, size, UNKNOWN_CHECKSUM, self.index.stamp())

    async def read(self, block: BlockId, entry: Entry | None,
                   hint: bool = False) -> tuple[Entry, memoryview] | None:
        """The block's verified bytes from L3, or None (a miss: absent, L3
        unavailable or too slow, or a corrupt object, counted). ``hint``: a
        prefetch, whose hits and misses are not counted (reads are)."""
        counters = HintCounters(self._counters) if hint else self._counters
        if not self.healthy or (entry is None and self.known_absent(block)):
            counters.misses += 1
            return None
        if entry is not None:
            return await self._read(block, entry, counters, hint)
        self._begin_probe(block)
        try:
            return await self._read(block, None, counters, hint)
        finally:
            self._end_probe(block)

    async def _read(self, block: BlockId, entry: Entry | None,
                    counters: TierStats | HintCounters,
                    hint: bool = False) -> tuple[Entry, memoryview] | None:
        try:
            found = await self.tier.get_with_meta(block, prefetch=hint)
        except TierUnavailable as exc:
            log.info("L3 read of %s failed: %s", block[1].hex()[:16], exc)
            counters.misses += 1
            return None
        except CorruptBlock as exc:
            log.warning("%s", exc)
            counters.corrupt += 1
            counters.misses += 1
            self.index.lost_l3(block, entry)
            self._note_absent(block, CORRUPT_TTL_S)  # not found again by the next probe
            return None
        if found is None:
            counters.misses += 1
            self._note_absent(block)
            self.index.lost_l3(block, entry)
            return None
        meta, payload = found
        expected = meta.checksum
        if entry is not None and entry.checksum != UNKNOWN_CHECKSUM:
            expected = entry.checksum
        loop = asyncio.get_running_loop()
        actual = await loop.run_in_executor(self.executor, checksum, payload)
        if actual != meta.checksum:  # bytes that do not match their own header: damaged
            log.warning("dropped corrupt L3 copy of %s/%s", block[0], block[1].hex()[:16])
            counters.corrupt += 1
            counters.misses += 1
            self.index.lost_l3(block, entry)
            self._note_absent(block, CORRUPT_TTL_S)  # not found again by the next probe
            return None
        if meta.checksum != expected:
            # An intact object of another version of the key, not damage (it
            # was counted corrupt, and the key held absent for 60 s): this
            # node's own overwrite landed while the read was on its way, or
            # another node wrote the key since it was indexed here. A miss
            # now; the current entry, or the next look, finds the new one.
            counters.misses += 1
            if entry is not None and self.index.blocks.get(block) is entry:
                # (Not judged older or newer by its header's time: an upload
                # lands long after the Put it carries, nodes' clocks differ,
                # and deleting it here lost another node's current block.)
                log.info("L3 object of %s/%s is another version (checksum %#x, not %#x): "
                         "indexed again", block[0], block[1].hex()[:16], meta.checksum,
                         expected)
                self.index.lost_l3(block, entry)
            return None
        if entry is not None and meta.size != entry.size:
            # Another node replaced the object with one of another size since it
            # was indexed here: a miss now; the next look finds the new one.
            log.info("L3 object of %s/%s changed size (%d -> %d bytes): indexed again",
                     block[0], block[1].hex()[:16], entry.size, meta.size)
            counters.misses += 1
            self.index.lost_l3(block, entry)
            return None
        if entry is None:
            # Nothing was known of the block when the read began. What is now:
            current = self.index.entry(block)
            if current is None:
                if block in self._voided:
                    counters.misses += 1
                    return None  # deleted while it was read: never indexed again
                current = self.index.discovered(block, meta.size, meta.checksum, meta.created)
            elif current.size != meta.size or \
                    current.checksum not in (meta.checksum, UNKNOWN_CHECKSUM):
                # Put here meanwhile: the object is not its bytes.
                counters.misses += 1
                return None
            entry = current
        elif self.index.blocks.get(block) is not entry:
            counters.misses += 1
            return None
        self.index.learn_checksum(entry, expected)
        self.index.mark_l3(block, entry)
        counters.hits += 1
        return entry, payload
