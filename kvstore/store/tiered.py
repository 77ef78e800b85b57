"""TieredStore: the one place that knows all tiers, a thin façade over the
store's parts (see :mod:`kvstore.store` for who does what).

It builds the parts and wires them once, validates requests, and joins
the parts where one call needs several (a Put: placement, then write-back
and the L3 upload; a Delete: the index, then the shared L3). The hot calls
(Get, Lookup, prefetch, pins) are the parts' own bound methods, set as
attributes here: no extra call per request. Everything here runs on the
event loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from kvstore._malloc import trim_heap
from kvstore.config import Config, format_size
from kvstore.errors import (
    BlockTooLarge,
    InvalidArgument,
    ServerShuttingDown,
    StorageError,
    TierNotConfigured,
    TierUnavailable,
    UnknownNamespace,
)
from kvstore.policy import Policy, make_policy
from kvstore.policy.namespaced import NamespacedSessions
from kvstore.store.index import UNKNOWN_CHECKSUM, Entry, Index
from kvstore.store.l3 import L3Mover, settled_quietly
from kvstore.store.leases import Leases
from kvstore.store.lookup import Lookup
from kvstore.store.parts import Progress, Shared, writer_settled
from kvstore.store.placement import BlockWriter, Placement
from kvstore.store.reads import Reads
from kvstore.store.stats import Stats
from kvstore.store.workers import start_workers
from kvstore.store.writeback import WriteBack
from kvstore.tiers.base import Buffer
from kvstore.tiers.lmdb_tier import LMDBTier
from kvstore.tiers.memory import MemoryTier
from kvstore.types import (
    MAX_KEY_BYTES,
    AckLevel,
    BlockFormat,
    BlockId,
    ListedBlock,
    SessionEnd,
    SessionEvent,
    StoreStats,
    TierName,
    TierStats,
    validate_key,
    validate_keys,
    validate_namespace,
)

log = logging.getLogger("kvstore.store")
#: How long after an L2 write failed the "L1 is full" refusal names it.
L2_TROUBLE_S = 60.0

#: How far ahead of the clock the newest block in L2 may be for the start of
#: a run without L3 to be taken after it (TieredStore._start_of_a_run_without_l3).
MAX_CLOCK_BEHIND_S = 86_400.0
#: The keys whose delete of "whatever is under the key" runs without L3
#: record, for the blocks they write and lose, until a run with L3 does them
#: (:meth:`TieredStore._record_l3_delete`).
MAX_KEY_RECORDS = 65_536
# The rebuild indexes this many blocks at a time into the compact index.
_REBUILD_SLICE = 65536
#: A namespace listing's length when the caller gives none, and its cap.
LIST_DEFAULT_LIMIT = 1000
LIST_MAX_LIMIT = 100_000
# A Delete or Flush of many blocks lets other calls run after this long (s):
# one Delete of 65,536 keys held the event loop 1-3 s, and a Flush's slices of
# 4,096 blocks 0.1-1 s each (every other client's Get waited that long).
_REMOVE_SLICE_S = 0.005


def _ignore_queued(block: BlockId, entry: Entry) -> None:
    """Without L2 an eviction never has an L2 write to queue."""


def _check_replaced(block: BlockId, outcome: Any) -> None:
    """What an overwrite waited for (the L2 delete of the block it replaces,
    and the record of its L3 delete: each an error or None, gathered in
    lists): a failure fails the Put. Answered anyway (a full disk), a
    restart served the older block."""
    pending = [outcome]
    while pending:
        item = pending.pop()
        if isinstance(item, BaseException):
            raise StorageError(
                f"the Put of {block[1].hex()[:16]} replaced a block whose removal from L2 "
                f"failed ({item}): not acknowledged, as a restart could serve the older "
                "block; put it again once the disk has room") from item
        if isinstance(item, (list, tuple)):
            pending.extend(item)


class _FailedL2Deletes:
    """The L2 writer's callback for the deletes of one Delete or Flush: counts
    those that failed (from the writer's thread), for the call to fail."""

    __slots__ = ("errors",)

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def __call__(self, error: BaseException | None, existed: bool) -> None:
        if error is not None:
            self.errors.append(error)

    def check(self, what: str) -> None:
        """Raise StorageError if a delete failed (once everything queued
        before has settled: after :meth:`TieredStore._l2_caught_up`)."""
        if self.errors:
            raise StorageError(
                f"{what}: L2 could not remove {len(self.errors)} of the blocks "
                f"({self.errors[0]}): they are no longer served, but a restart could find "
                "them again; repeat the call once the disk has room")


async def all_durable(durable: Sequence[Awaitable[Any]]) -> None:
    """Wait for the durable writes of a request's blocks, all of them, then
    raise the first failure. (Raised as soon as one failed, the answer came
    while later blocks' L2 writes were still queued: a kill -9 right after
    lost blocks the error said were kept; a fix review.)"""
    for result in await asyncio.gather(*durable, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


async def _uploaded_and_local(upload: Awaitable[None], local: Awaitable[None] | None) -> None:
    """ack=remote: the block's upload and its L2 write. A failed upload is
    reported once the L2 write has settled, and says the block is kept (an
    outside review: reported at once, "stored" was not yet true, and a kill
    -9 right after it lost the block behind a busy L2 writer); a failed L2
    write is reported as such."""
    results = await asyncio.gather(upload, *([local] if local is not None else []),
                                   return_exceptions=True)
    for result in results[1:]:
        if isinstance(result, BaseException):
            raise result
    error = results[0]
    if isinstance(error, TierUnavailable):
        kept = "as at level local" if local is not None else "in L1 (no L2 write)"
        raise TierUnavailable(f"{error}; the block is stored on this node {kept} and "
                              "served: only its L3 copy is missing") from error
    if isinstance(error, BaseException):
        raise error


class TieredStore:
    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 executor: concurrent.futures.ThreadPoolExecutor | None = None) -> None:
        self.config = config
        self.client_clock = config.policy.clock == "client"
        self._client_now = 0.0
        self.clock = self._client_time if self.client_clock else clock
        clock = self.clock
        self._own_executor = executor is None
        self.executor = executor or start_workers(config.server.workers)
        self.l2: LMDBTier | None = None
        # Whatever construction fails on (L2 that cannot open, an L3 directory
        # that cannot be made...), what it made before is released: the L1
        # arena's file in /dev/shm, L2's environment and threads, the workers.
        try:
            self.l1 = MemoryTier(config.l1.capacity, config.l1.page_bytes, config.l1.prefault,
                                 config.l1.shm_path)
            if config.l2.enabled:
                self.l2 = LMDBTier(config.l2_path, config.l2.capacity, config.l2.initial_map_size,
                                   config.l2.sync, config.l2.batch_bytes, executor=self.executor,
                                   recover=config.l2.recover,
                                   state_file=config.l2_state_path)
            has_l3 = bool(config.l3.url)
            tiers = [TierName.L1] + ([TierName.L2] if self.l2 else []) + \
                ([TierName.L3] if has_l3 else [])
            # (session ids qualified by their namespace: tenants' ids never meet)
            self.policy: Policy = NamespacedSessions(make_policy(config.policy, tiers))
            self._allowed = frozenset(config.server.namespaces)
            self._closing = False
            #: Blocks only in L1 whose L2 write failed at :meth:`close` (lost).
            self.lost_at_close = 0

            # The parts, wired once (kvstore/store/__init__.py says who calls what).
            self.counts = Stats()
            if self.l2 is not None:  # (damaged records L2 dropped as it opened)
                self.counts.counters[TierName.L2].corrupt += self.l2.dropped_at_open
            self.progress = Progress()
            self.index = Index(self.counts, self.policy, clock, self.l1, self.l2,
                               self.progress.wake, config.l2.compact_index)
            # (docs/reliability.md, "L1 checks")
            shared = Shared(self.index, self.counts, self.policy, clock, self.l1, self.executor,
                            self.progress, config.l1.reads_checked)
            self.l3: L3Mover | None = None
            self._kept_window = math.inf  # (a run without L3: see _keep_window_from)
            #: (a run without L3: see _record_l3_delete)
            self._key_records: set[BlockId] = set()
            self._said_key_records = False
            if has_l3:
                self.l3 = L3Mover(shared, config.l3, config.server.namespaces,
                                  config.server.max_block_bytes)
                self.index.delete_l3 = self.l3.delete_later
            elif self.l2 is not None:
                # L3 off for this run: a block an earlier run put in L3 and
                # deleted or overwritten now gets its delete record in L2, done
                # when L3 is back (its listing brought the old object back).
                self.index.delete_l3 = self._record_l3_delete
            self.writeback: WriteBack | None = None
            if self.l2 is not None:
                self.writeback = WriteBack(shared, self.l2, config)
                self.writeback.l3 = self.l3
                if self.l3 is not None:
                    self.l3.read_l2 = self.writeback.read_verified
                    self.l3.after_demotion = self.writeback.after_demotion
                    self.l3.tombs = self.l2
            self.placement = Placement(
                shared, self.l2 is not None,
                self.writeback.queue_write if self.writeback is not None else _ignore_queued,
                config.server.max_block_bytes)
            if self.writeback is not None:
                self.index.l2_capacity = config.l2.capacity
                self.placement.stuck_reason = self._l2_trouble
                self.placement.writes_paused = self.writeback.paused
            self.reads = Reads(
                shared, self.placement,
                self.writeback.read_verify_sync if self.writeback is not None else None, self.l3)
            self.leases = Leases(shared, self.reads, config.server)
            self.lookups = Lookup(self.index, self.leases, self.l3, config.l3.concurrency)

            # The parts' calls the server makes, bound once.
            self.open_read = self.reads.open_read
            self.lookup = self.lookups.lookup
            #: Lookup with one TierName value per key (0: not stored) in bytes.
            self.lookup_codes = self.lookups.lookup_tiers
            self.prefetch = self.leases.prefetch
            self.pin = self.leases.pin
            self.unpin = self.leases.unpin
            self.check_block_size = self.placement.check_block_size
            self.index_l2_blocks = self.index.add_l2_blocks
        except BaseException:
            self.abandon()
            raise

    def _mind_the_l3_url(self) -> None:
        """L2 records the l3.url it last ran with. A run without that L3
        records the deletes of the blocks from before it (any of them may be
        there), done when L3 is back; a run with another URL is warned
        about: what it deletes stays in the first bucket."""
        assert self.l2 is not None
        url, recorded, off = self.config.l3.url, self.l2.l3_url, self.l2.l3_off_since
        if url:
            if off is not None:
                self.l2.set_l3_off_since(None, settled_quietly)  # (its records are done now)
            if recorded and recorded.rstrip("/") != url.rstrip("/"):
                log.warning("l3.url is %s, but this L2 last ran with %s: blocks deleted or "
                            "overwritten while this node uses another bucket are not deleted "
                            "in that one, and may be served from it again if it comes back; "
                            "the L3 deletes recorded for that bucket without a checksum are "
                            "dropped, not done in this one", url, recorded)
                assert self.l3 is not None
                self.l3.records_are_foreign = True
            if recorded is None or recorded.rstrip("/") != url.rstrip("/"):
                self.l2.set_l3_url(url, settled_quietly)
        elif recorded:
            if off is None:  # the first run without it: blocks from before may be there
                off = self._start_of_a_run_without_l3()
                self.l2.set_l3_off_since(off, settled_quietly)
            self.index.l3_off_since = off
            # What this run writes under a key whose object it does not know
            # (one only in L3, which L2 does not index) is settled by the next
            # run's listing, which reads that object's header: the window opens
            # at this run's first block at the latest, and earlier with the
            # clock (at ``off``, after a clock stepped back, the blocks of this
            # run looked written before it: the listing took an older object of
            # the key for their copy, and their L2 copies were dropped).
            since = self.l2.unlisted_since
            opened = min(off, time.time())
            self._kept_window = opened if since is None else min(since, opened)
            self.index.run_window = self._kept_window
            # The keys whose "whatever is under it" delete is recorded already
            # (by this run or one before it without L3): the bound counts keys.
            self._key_records = {block for block, checksum in self.l2.tombstones_sync()
                                 if checksum is None}
            if since is None or since > opened:
                self.l2.set_unlisted_since(opened, settled_quietly)
            self.index.on_earlier_stamp = self._keep_window_from
            log.warning("L3 off (this L2 last ran with l3.url %s): Deletes and overwrites of "
                        "the blocks from before are recorded in L2 and done in that bucket when "
                        "a run has it again", recorded)

    def _keep_window_from(self, created: float) -> None:
        """A run without L3 created a block before the listing window kept in
        L2 (the clock stepped back): the window opens then."""
        if created < self._kept_window and self.l2 is not None:
            self._kept_window = created
            self.index.run_window = created
            self.l2.set_unlisted_since(created, settled_quietly)

    def _start_of_a_run_without_l3(self) -> float:
        """When the first run without L3 began, as the creation times of the
        blocks before it count it: after every block found in L2, whatever
        the clock says now (a clock stepped back since they were written made
        them look written after it, and a Delete in this run left their
        objects, served again once L3 was back), unless that block is more
        than a day ahead of the clock (a clock that far off, or a time from
        another node's header). While the clock is behind that start, the
        blocks this run writes count as maybe in L3 too: their Deletes record
        an L3 delete (conditional on the block's checksum) that finds nothing.
        (Stamping them after the start instead put times up to a day ahead
        into their L3 headers once L3 was back, and a listing then took
        another node's newer object for an older one and deleted it.)"""
        now = time.time()
        newest = self.index.newest_l2_created
        if newest - now > MAX_CLOCK_BEHIND_S:
            log.warning("the newest block in L2 was created %.0f s after what this host's clock "
                        "says now: the start of this run without L3 is taken from the clock; "
                        "blocks created after it that a Delete of this run removes may come "
                        "back from the bucket once L3 is on again", newest - now)
            return now
        return max(now, math.nextafter(newest, math.inf))

    def _record_l3_delete(self, block: BlockId, in_l3: bool,
                          checksum: int) -> asyncio.Future[Any] | None:
        """Index.delete_l3 while L3 is off: record the delete of the block's
        L3 object as L3Mover does when L3 is down; the next run with L3 does
        it first. ``in_l3``: the object an earlier run put or found there,
        deleted if it is still that version (its checksum). Else, for a block
        this run wrote (``index.l3_off_since`` set: an earlier run had L3),
        whatever object is under the key: one older than the block, which
        this run never listed (a Delete, an eviction, a Flush of the block
        left it; the next run's listing took it for the key's block, and
        served bytes an acknowledged Put had replaced). That may delete
        another node's newer object put meanwhile: a miss, never stale bytes."""
        if self.l2 is None or not (in_l3 or self.index.l3_off_since):
            return None
        if not in_l3 and block not in self._key_records:
            # (each record is ~0.5 KB of memory at the next start with L3,
            # and a request then: bounded, in keys, over the runs without L3)
            if len(self._key_records) >= MAX_KEY_RECORDS:
                if not self._said_key_records:
                    self._said_key_records = True
                    log.warning("runs without L3 have recorded %d L3 deletes of keys they "
                                "wrote and lost: no more are recorded; older objects of the "
                                "keys lost from now on may be served again once L3 is on "
                                "(turn L3 back on, or clear the bucket)", MAX_KEY_RECORDS)
                return None
            self._key_records.add(block)
        recorded, done = writer_settled(asyncio.get_running_loop())
        self.l2.submit_tombstone(block, True, done,
                                 None if checksum == UNKNOWN_CHECKSUM or not in_l3 else checksum)
        return recorded

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the index from L2 metadata (no payload is read)."""
        self.progress.start()
        if self.l2 is not None:
            # (after the rebuild: the creation times found in L2 are the floor
            # of the time this run records as the start of a run without L3)
            await self._rebuild_from_l2()
            self._mind_the_l3_url()
            if self.writeback is not None:
                # Restarted with a smaller l2.capacity (the way out of a full
                # disk): trimmed now, not after the first write (which the
                # full disk fails).
                self._say_l2_is_over_capacity()
                self.writeback.trim()
        if self.l3 is not None:
            self.l3.start()  # lists the bucket in the background; serving meanwhile

    def _say_l2_is_over_capacity(self) -> None:
        """Say so when L2 holds more than l2.capacity at the start: the trim
        that follows moves or drops blocks, and the log said nothing of it
        (a review restarted with a quarter of the capacity: 80 % of L2 went
        unsaid). A WARNING when more than L1 is over: a stop writes what
        only L1 holds to L2 past its capacity (INFO), no stop writes more."""
        held, capacity = self.index.l2_bytes, self.config.l2.capacity
        if held <= capacity:
            return
        over = held - capacity
        # (whole blocks: at least that much; one block larger than the new
        # capacity goes whole)
        what = "moves at least %.1f MiB of its blocks to L3 (dropped if L3 cannot take them)" \
            if self.l3 is not None else \
            "drops at least %.1f MiB of its blocks (no L3: they are no longer served)"
        if over > self.config.l1.capacity:
            log.warning("L2 holds %.1f MiB, more than l2.capacity (%s; smaller than the "
                        "last run's?): the policy now " + what, held / 2**20,
                        format_size(capacity), over / 2**20)
        else:
            log.info("L2 holds %.1f MiB, more than l2.capacity (%s: the last stop wrote "
                     "L1's blocks to it, or the capacity is smaller than the last run's): "
                     "the policy now " + what, held / 2**20,
                     format_size(capacity), over / 2**20)

    async def _rebuild_from_l2(self) -> None:
        """Index every block L2 holds from its metadata alone."""
        assert self.l2 is not None
        # Typed arrays rather than lists of ints and floats: no object per
        # value. Into the compact index in slices, so that the transient
        # lists stay small; the full index needs them all (it sorts by age).
        cold = self.index.cold
        slice_blocks = _REBUILD_SLICE if cold is not None else 2**62
        if cold is not None:
            cold.reserve(self.l2.usage().blocks)
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
                self.index.add_l2_blocks(namespaces, keys, sizes, sums, created)
                total += len(keys)
                namespaces, keys = [], []
                sizes, sums, created = array("Q"), array("L"), array("d")
        self.index.add_l2_blocks(namespaces, keys, sizes, sums, created)
        total += len(keys)
        del namespaces, keys, sizes, sums, created
        trim_heap()
        if total:
            log.info("index rebuilt from L2: %d blocks, %d bytes%s", total,
                     self.index.l2_bytes, " (compact index)" if cold is not None else "")
        ahead = self.index.newest_l2_created - time.time()
        if ahead > 1.0:
            log.warning("the newest block in L2 was created %.0f s after what this host's "
                        "clock says now: the clock was stepped back, or another node that "
                        "wrote one of them runs ahead (nodes sharing a bucket need their "
                        "clocks in sync)", ahead)

    def abandon(self) -> None:
        """Release what the constructor made, for a store that is not started
        (its construction failed, or the server's did): L2's environment and
        threads, the L1 arena (its file removed, its descriptor closed) and
        the workers this store started. Nothing is written down: no Put was
        taken. A started store is stopped with :meth:`close`."""
        l2, self.l2 = self.l2, None
        if l2 is not None:
            with contextlib.suppress(Exception):  # (the failure being reported matters)
                l2.close_sync()
        l1 = getattr(self, "l1", None)  # (None: the arena itself failed, and released itself)
        if l1 is not None:
            l1.arena.close()
        if self._own_executor:
            self.executor.shutdown(wait=False)

    async def close(self) -> None:
        """Write every block that is only in L1 to L2, finish queued writes
        and release every tier."""
        self._closing = True
        if self.writeback is not None:
            self.writeback.closing = True
        await self.leases.close()
        if self.l3 is not None:
            await self.l3.close()
        if self.l2 is not None:
            assert self.writeback is not None
            failed = self.writeback.failed_writes
            self.writeback.flush_dirty()
            await self.l2.close()
            # (the writes' callbacks ran before close's own answer did)
            self.lost_at_close = self.writeback.failed_writes - failed
        await self.l1.close()
        self.executor.shutdown(wait=False)

    def after_demotion(self) -> None:
        """L3 is back: move what L2 held during the outage."""
        if self.writeback is not None:
            self.writeback.after_demotion()
        else:
            self.progress.wake()

    # -- validation ---------------------------------------------------------------------

    def check_namespace(self, namespace: str) -> str:
        validate_namespace(namespace)
        if self._allowed and namespace not in self._allowed:
            raise UnknownNamespace(f"namespace {namespace!r} is not served here")
        return namespace

    def check_held_namespace(self, namespace: str) -> str:
        """:meth:`check_namespace` for the ops calls (a namespace's Stats,
        ListBlocks, Flush): a namespace taken out of ``server.namespaces``
        whose blocks this node still holds may still be counted, listed and
        flushed (else a retired tenant's blocks could not be purged without
        serving it again)."""
        validate_namespace(namespace)
        if self._allowed and namespace not in self._allowed \
                and not self.index.holds_namespace(namespace):
            raise UnknownNamespace(f"namespace {namespace!r} is not served here (and this "
                                   "node holds no block of it)")
        return namespace

    def check_ack(self, ack: AckLevel) -> None:
        if ack == AckLevel.LOCAL and self.l2 is None:
            raise TierNotConfigured("acknowledgement level local needs L2, which is disabled")
        if ack != AckLevel.REMOTE:
            return
        if self.l3 is None:
            raise TierNotConfigured("acknowledgement level remote needs an L3 tier; "
                                    "none is configured (l3.url)")
        if not self.l3.healthy:
            # Refused before any block is stored: refused after its commit, the
            # Put's blocks were stored all the same (a review: its error said
            # they were not).
            raise TierUnavailable("L3 is unavailable (circuit breaker open): acknowledgement "
                                  "level remote cannot be met now; nothing of this request "
                                  "was stored")

    # -- Put ----------------------------------------------------------------------------

    async def begin_put(self, namespace: str, key: bytes, size: int,
                        session: str | None = None,
                        block_format: BlockFormat = BlockFormat.RAW) -> BlockWriter:
        """Reserve room for one block; the caller writes its bytes then commits."""
        if self._closing:
            raise ServerShuttingDown("server is shutting down")
        validate_key(key)
        self.placement.check_block_size(size)
        offset = await self.placement.reserve(size, namespace=namespace)
        return BlockWriter(self.placement, (namespace, key), size, offset, session, block_format)

    async def finish_put(self, writer: BlockWriter, ack: AckLevel,
                         index: int = 0) -> asyncio.Future[Any] | None:
        """Commit a complete block, the request's ``index``-th. Returns a
        future that resolves once the block is durable at ``ack`` (None when
        it already is). A block in the kvstore block format is verified
        first; a bad one is never stored."""
        if writer.format == BlockFormat.KV_V1 and writer.complete:
            try:
                await self.placement.verify_block(writer.offset, writer.size, index)
            except BaseException:
                writer.abort()
                raise
        try:
            written_next = await self.room_for_write(ack, writer.size)
        except BaseException:
            writer.abort()
            raise
        entry = writer.commit(written_next)
        return await self.make_durable(writer.block, entry, ack)

    def _l2_trouble(self) -> str:
        """What keeps blocks from leaving L1 for L2, when it is not the usual
        (no paths or figures: any tenant may read it)."""
        failed = self.writeback.last_failure if self.writeback is not None else None
        if failed is None or time.monotonic() - failed[0] > L2_TROUBLE_S:
            return ""
        return ("; the L2 disk is full: blocks cannot be written down to make room" if failed[1]
                else "; L2 writes are failing: blocks cannot be written down to make room")

    async def room_for_write(self, ack: AckLevel, size: int) -> bool:
        """Before the commit of a Put: for one acknowledged at local or
        remote, room in the L2 write queue (CapacityExhausted if it stays
        full), so that :meth:`make_durable` queues its write as it commits,
        before anything is awaited. Whether it does: the commit's
        ``written_next`` (Placement.commit)."""
        if ack < AckLevel.LOCAL or self.writeback is None:
            return False
        self.check_durable_size(ack, size)
        await self.writeback.wait_room(size)
        return True

    def check_durable_size(self, ack: AckLevel, size: int, index: int | None = None) -> None:
        """A block acknowledged at local with no L3 must fit L2 (its only
        durable copy is there): one larger than ``l2.capacity`` was
        acknowledged, then evicted from L2 at once and lost to the next kill.
        (With L3, such a block moves there when L2 evicts it; at remote its
        durable copy is L3's.)"""
        capacity = self.config.l2.capacity
        if ack == AckLevel.LOCAL and self.l3 is None and self.l2 is not None and \
                size > capacity:
            which = "" if index is None else f"block #{index}: "
            raise BlockTooLarge(
                f"{which}a block of {size} bytes cannot be acknowledged at local: it is "
                f"larger than L2 (l2.capacity {capacity} bytes), its only durable copy")

    async def make_durable(self, block: BlockId, entry: Entry,
                           ack: AckLevel) -> asyncio.Future[Any] | None:
        """Start the writes that ``ack`` asks for (L2 write-back otherwise).
        Returns a future that resolves once they are done, or None. An
        overwrite returns only once the old L2 copy's delete has committed,
        whatever ``ack`` (a crash after the answer must not bring it back)."""
        gone = self.placement.replacing.pop(block, None)
        if ack == AckLevel.REMOTE:
            l3 = self.l3
            assert l3 is not None
            l3.hold_for_upload(entry)  # before anything is awaited; the upload's end ends it
            try:
                # Queued first (it may replace the old L2 copy: Placement._retire),
                # then the deletes queued before it are waited for.
                local = await self._make_local(block, entry, AckLevel.LOCAL)
                if gone is not None:
                    _check_replaced(block, await gone)
            except BaseException:
                l3.end_upload(entry)
                raise
            remote = asyncio.get_running_loop().create_task(l3.write_remote(block, entry))

            def uploaded(task: asyncio.Task[None]) -> None:
                # (a callback: it runs even if the task is cancelled before it
                # starts, e.g. at shutdown)
                if not task.cancelled():
                    task.exception()  # retrieved (the Put reports it, if still waiting)
                l3.end_upload(entry)

            remote.add_done_callback(uploaded)
            # Shielded: a Put cancelled by its client (a deadline, a
            # disconnect) does not cut its upload short, which could land
            # after the hold ended and be counted on by nothing.
            return asyncio.ensure_future(_uploaded_and_local(asyncio.shield(remote), local))
        if ack == AckLevel.LOCAL:
            local = await self._make_local(block, entry, ack)  # (queued first: as above)
            if gone is not None:
                _check_replaced(block, await gone)
            return local
        if gone is not None:
            _check_replaced(block, await gone)
        return await self._make_local(block, entry, ack)

    def acked_now(self) -> bool:
        """Whether a Put acknowledged at ``memory`` may be answered without
        waiting (:meth:`make_durable_now`), unless it overwrites a block with
        an L2 copy (``placement.replace_waits``): no write-back that writes
        every block before the answer."""
        return self.writeback is None or self.writeback.memory_ack_now

    def make_durable_now(self) -> None:
        """:meth:`make_durable` of a block acknowledged at ``memory``, where
        :meth:`acked_now` and ``placement.replace_waits`` allow it."""
        if self.writeback is not None:
            self.writeback.clean_ahead()

    async def _make_local(self, block: BlockId, entry: Entry,
                          ack: AckLevel) -> asyncio.Future[None] | None:
        if self.writeback is None:
            return None
        return await self.writeback.make_local(block, entry, ack)

    # -- Delete, sessions, Stats ----------------------------------------------------------

    async def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove blocks from every tier, the shared L3 included: whatever
        object is under each key, while the call waits (another node's
        overwrite included)."""
        validate_keys(keys)
        if self.l3 is None:
            return await self._delete(namespace, keys)
        with self.l3.answering(namespace, keys):
            return await self._delete(namespace, keys)

    async def _delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        l3 = self.l3
        if l3 is not None:
            l3.void_probes((namespace, key) for key in keys)
        # Split first (no await): the keys this node does not know are
        # absent, and their places in the write order taken, before any other
        # call runs (one of this node's Puts made meanwhile then uploads after
        # their delete).
        blocks, cold = self.index.blocks, self.index.cold
        known: list[BlockId] = []
        unknown: list[BlockId] = []
        failed = _FailedL2Deletes()
        left = 0  # keys whose L2 bytes a failed delete left, or one on its way: deleted again
        l2_deletes = self.index.l2_deletes
        for key in keys:
            block = (namespace, key)
            if block in blocks or (cold is not None and block in cold):
                known.append(block)  # (one whose L2 delete is pending: forget queues another)
            else:
                unknown.append(block)
                if l2_deletes is not None and l2_deletes.delete_left(block, failed):
                    left += 1
        vanished: list[BlockId] = []
        local: list[BlockId] = []
        if l3 is None or not unknown:
            deleted = found = await self._forget_blocks(known, vanished, local, failed)
        else:
            # Blocks another node put in the shared bucket (deleted paced):
            # absent here from now on, so that a Get meanwhile does not index one.
            with l3.deleting(unknown) as delete_other:
                deleted = found = await self._forget_blocks(known, vanished, local, failed)
                if found or left:
                    await self._l2_caught_up()
                if l3.healthy:
                    deleted += await l3.delete_unknown(unknown, delete_other)
        if (vanished or local) and l3 is not None:
            # What is under these keys in the bucket, if anything, is another
            # node's, deleted as the unknown keys' is, while the call waits:
            # keys known at the start but evicted before their turn (the loop
            # lets other calls in: the object was left), and keys this node
            # held without an L3 copy (their deletes were one attempt each,
            # not waited for, and none past 4,096 waiting: left, and served).
            # One indexed again meanwhile (a Put here) goes as a known one.
            again = len(self._forget_indexed(vanished))
            found += again
            deleted += again
            self._forget_indexed(local)  # (counted already)
            self.progress.wake()
            with l3.deleting(vanished + local) as delete_other:
                if l3.healthy:
                    deleted += await l3.delete_unknown(vanished, delete_other)
                if l3.healthy:
                    await l3.delete_unknown(local, delete_other)  # (counted already)
        if found or left:
            if l3 is None or not unknown:
                await self._l2_caught_up()
            if l3 is not None and found:
                await self._l3_caught_up(namespace, keys)
        failed.check("delete")
        return deleted

    def _forget_indexed(self, blocks: list[BlockId]) -> list[BlockId]:
        """Forget, with their L3 objects, those of ``blocks`` the index holds
        (now), taking them out of the list; returns them."""
        kept, indexed = [], []
        for block in blocks:
            entry = self.index.entry(block)
            if entry is None:
                kept.append(block)
            else:
                self.index.forget(block, entry, delete_l3=True)
                indexed.append(block)
        blocks[:] = kept
        return indexed

    def _only_local(self, block: BlockId, entry: Entry) -> bool:
        """With L3: no object of this node's can be under the block's key (what
        is there, if anything, is another node's). Index.forget's rule."""
        return self.l3 is not None and not self.l3.has_object(block, entry) and \
            entry.created >= self.index.l3_off_since

    async def _forget_blocks(self, blocks: list[BlockId], vanished: list[BlockId],
                             local: list[BlockId], failed: _FailedL2Deletes) -> int:
        """Remove the blocks the index knows from every tier (their L3 objects
        through the mover), letting other calls in every _REMOVE_SLICE_S: how
        many it knew. Those gone from the index before their turn are added
        to ``vanished``; those without an object of this node's in L3 (with
        L3) to ``local``, for the caller to delete what is under their keys.
        (In one go, a Delete of 65,536 keys held the event loop 1-3 s: each
        compact record is made a full entry to be removed.)"""
        forgotten = 0
        pause = time.monotonic() + _REMOVE_SLICE_S
        for block in blocks:
            entry = self.index.entry(block)
            if entry is None:
                vanished.append(block)
            elif self._only_local(block, entry):
                self.index.forget(block, entry, l2_done=failed)
                local.append(block)
                forgotten += 1
            else:
                self.index.forget(block, entry, delete_l3=True, l2_done=failed)
                forgotten += 1
            if time.monotonic() >= pause:
                await asyncio.sleep(0)
                pause = time.monotonic() + _REMOVE_SLICE_S
        self.progress.wake()
        return forgotten

    async def _l3_caught_up(self, namespace: str, keys: Sequence[bytes]) -> bool:
        """Wait (while L3 takes them, one at least every l3.timeout_s) until
        the L3 deletes of ``keys`` reached the bucket: answered before,
        another node served the deleted blocks until they did. Those that
        cannot land now are recorded and retried (the Delete is still
        answered)."""
        assert self.l3 is not None
        return await self.l3.deletes_landed(((namespace, key) for key in keys),
                                            self.config.l3.timeout_s)

    async def _l2_caught_up(self) -> None:
        """Wait until L2 has committed what was queued so far, and synced it
        to disk (even with l2.sync off): a Delete's L2 deletes and the records
        of its L3 deletes. Answered before the commit, a kill right after the
        answer brought the blocks back at the restart; before the sync, a
        power cut did (l2.sync off: from L2, and from L3 where the object's
        delete had not landed)."""
        if self.l2 is None:
            return
        caught_up, done = writer_settled(asyncio.get_running_loop())
        self.l2.after_queued(done, durable=True)
        await caught_up

    def set_client_time(self, now: float) -> None:
        """policy.clock = client: the time a replay says it is (never goes back)."""
        if now > self._client_now:
            self._client_now = now

    def _client_time(self) -> float:
        return self._client_now

    def session_event(self, event: SessionEvent) -> None:
        self.counts.session_events += 1
        self.policy.on_session_event(event, self.clock())
        if isinstance(event.event, SessionEnd):
            self.leases.forget_session(event.namespace, event.session_id)

    def stats(self) -> StoreStats:
        """Per-tier counters and occupancy (see :meth:`namespace_stats` for one
        namespace)."""
        counts = self.counts
        tiers = [counts.tier(TierName.L1, self.l1.capacity)]
        # (whole pages: 4,096 blocks of 100 bytes fill a 16 MiB L1 that
        # their payload, 400 KiB, said was 2 % full)
        tiers[0].used = self.l1.used_bytes
        if self.l2 is not None:
            tiers.append(counts.tier(TierName.L2, self.config.l2.capacity))
        if self.l3 is not None:
            l3 = counts.tier(TierName.L3, 0)
            l3.available = self.l3.healthy
            tiers.append(l3)
        return counts.snapshot(tiers, self.policy.name)

    async def namespace_stats(self, namespace: str) -> StoreStats:
        """One namespace's blocks and bytes per tier only (the event counters
        are server-wide)."""
        held = await self.index.namespace_held(namespace)
        capacity = {TierName.L1: self.l1.capacity, TierName.L2: self.config.l2.capacity,
                    TierName.L3: 0}
        configured = [TierName.L1] + ([TierName.L2] if self.l2 is not None else []) + \
            ([TierName.L3] if self.l3 is not None else [])
        tiers = [TierStats(t, blocks=held[t][0], bytes=held[t][1], capacity=capacity[t],
                           used=held[t][2]) for t in configured]
        if self.l3 is not None:
            tiers[-1].available = self.l3.healthy
        return StoreStats(tiers, policy=self.policy.name, namespace=namespace)

    # -- ops commands: listing and flushing a namespace ----------------------------------

    async def list_blocks(self, namespace: str, prefix: bytes = b"",
                          limit: int = 0) -> tuple[list[ListedBlock], bool]:
        """The namespace's blocks this node's index knows whose key starts
        with ``prefix``, in key order: at most ``limit`` (0: the default;
        capped), and whether more matched."""
        if len(prefix) > MAX_KEY_BYTES:
            raise InvalidArgument(f"prefix is {len(prefix)} bytes; keys are at most "
                                  f"{MAX_KEY_BYTES}")
        if limit < 0:
            raise InvalidArgument(f"limit {limit} is negative")
        limit = min(limit or LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT)
        return await self.index.listing(namespace, prefix, limit, time.time())

    async def flush(self, namespace: str) -> int:
        """Remove every block of the namespace from every tier, as
        :meth:`delete` does per key: the blocks the index knows, then the
        namespace's other objects in the shared L3 (put by other nodes).
        Returns the number of blocks removed. Blocks put while it runs may
        stay or go, each whole (entry and object). Raises TierUnavailable
        when L3 cannot be listed or cleared
        (the local tiers are flushed by then; flushing again finishes)."""
        if self.l3 is None:
            return await self._flush(namespace)
        with self.l3.answering(namespace):
            return await self._flush(namespace)

    async def _flush(self, namespace: str) -> int:
        flushed = 0
        known = self.index.namespace_keys(namespace)
        if self.l3 is not None:
            self.l3.void_probes((namespace, key) for key in known)
        pause = time.monotonic() + _REMOVE_SLICE_S
        forgotten: set[bytes] = set()
        local: set[bytes] = set()  # held here without an L3 copy: counted already
        failed = _FailedL2Deletes()
        # (what failed deletes left in L2 with no entry, or one on its way)
        l2_deletes = self.index.l2_deletes
        left = l2_deletes.unaccounted(namespace) if l2_deletes is not None else []
        for block in left:
            assert l2_deletes is not None
            if self.index.blocks.get(block) is None:  # (an entry's: forget deletes them)
                l2_deletes.delete_left(block, failed)
        for key in known:
            block = (namespace, key)
            entry = self.index.entry(block)
            if entry is not None:
                if self._only_local(block, entry):
                    # What is under its key in the bucket, if anything, is
                    # another node's: the listing finds it, deleted while the
                    # call waits (one attempt not waited for, none past 4,096).
                    self.index.forget(block, entry, l2_done=failed)
                    local.add(key)
                else:
                    self.index.forget(block, entry, delete_l3=True, l2_done=failed)
                    forgotten.add(key)
                flushed += 1
            if time.monotonic() >= pause:
                await asyncio.sleep(0)  # let requests in between slices
                pause = time.monotonic() + _REMOVE_SLICE_S
        self.progress.wake()
        if flushed or left:
            await self._l2_caught_up()
        failed.check(f"flush of namespace {namespace!r}")
        if self.l3 is None:
            return flushed
        # Before the listing and the answer: the deletes of the blocks known
        # here reach the bucket (another node would serve them meanwhile).
        if known and not await self._l3_caught_up(namespace, known):
            raise TierUnavailable(
                f"flush of namespace {namespace!r}: the local tiers are flushed, but deletes "
                "of its L3 objects are not done yet (they are recorded and retried; another "
                "node may serve those blocks until then): flush again to wait for them")
        # The mover deletes the L3 copies of the blocks just forgotten; the
        # listing finds the rest (those evicted before their turn included:
        # another node's object under such a key was left, and served).
        gone = forgotten
        listed = [block async for block, _ in self.l3.tier.list_blocks([namespace])
                  if block[0] == namespace and block[1] not in gone]
        # Those indexed here while the listing ran (a Put here whose object
        # the listing found, or a read of another node's) go as the known
        # ones did, entry and object: deleted as another node's, the object
        # went and the entry stayed (an acknowledged Put's entry counting on
        # an object gone). Nothing is awaited between this split and
        # deleting(), which orders a later Put's upload after the delete of
        # its key.
        others = listed
        indexed = [block[1] for block in self._forget_indexed(others)]
        step = max(1, self.config.l3.concurrency)
        with self.l3.deleting(others, wide=True) as delete_other:
            if indexed:
                flushed += len(indexed)
                self.progress.wake()
                await self._l2_caught_up()
                if not await self._l3_caught_up(namespace, indexed):
                    raise TierUnavailable(
                        f"flush of namespace {namespace!r}: deletes of its L3 objects are not "
                        "done yet (they are recorded and retried): flush again to wait for them")
            for start in range(0, len(others), step):
                chunk = others[start:start + step]
                results = await asyncio.gather(*(delete_other(b) for b in chunk))
                flushed += sum(r for b, r in zip(chunk, results, strict=True)
                               if b[1] not in local)
        return flushed

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
