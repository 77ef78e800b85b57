"""L1 placement: extents for blocks being put or promoted, eviction when
L1 is full, and the wait for room while every block is pinned.

A Put reserves an extent (:meth:`Placement.reserve`, evicting as needed),
its bytes are copied in (:class:`BlockWriter`, or a same-host client through
the shared-memory broker) and :meth:`Placement.commit` makes it visible. A
reservation not committed goes back with :meth:`Placement.release`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from kvstore._impl import verify as block_verify
from kvstore.checksum import copy_and_checksum
from kvstore.errors import (
    BlockTooLarge,
    CapacityExhausted,
    CorruptBlock,
    InvalidBlock,
    MalformedRequest,
)
from kvstore.policy import Action
from kvstore.store.index import DropDone, Entry
from kvstore.store.parts import Part, Shared, writer_settled
from kvstore.tiers.base import Buffer
from kvstore.types import BlockFormat, BlockId, TierName

# How long a Put waits for pinned L1 blocks (being written to L2 or read) to
# become evictable before it gives up with RESOURCE_EXHAUSTED.
ROOM_WAIT_SECONDS = 30.0
#: A promotion (a read from L2 or L3 copied into L1) waits at most this long for
#: room that other requests hold; then the block is served without promotion
#: (another client's L1-sized reservation must not stall every L2 read 30 s).
PROMOTE_ROOM_WAIT_SECONDS = 1.0

# Blocks up to this size are verified on the event loop (a few µs); larger
# ones in the executor (the native verify releases the GIL).
_VERIFY_INLINE_BYTES = 256 * 1024

# quota.l1: how long a Put waits for an over-quota namespace's blocks to
# become evictable (their L2 write-back) before evicting by the policy's choice.
QUOTA_WAIT_SECONDS = 1.0
#: Victims one reservation sends to L2 before it waits for their writes
#: (write-back: a dirty victim is written before it leaves L1).
DEMOTE_BATCH = 32


#: What :meth:`Placement._reserve_step` returns when it has no extent.
_WAIT_QUOTA, _WAIT_WRITES, _WAIT_ROOM, _NO_ROOM = -1, -2, -3, -4


class _Attempt:
    """One reservation's progress across its waits."""

    __slots__ = ("namespace", "quota_waited", "writing")

    def __init__(self, namespace: str = "") -> None:
        self.namespace = namespace  # whose block the room is for (quota.l1)
        self.quota_waited = False  # waited out QUOTA_WAIT_SECONDS: evict by the policy
        self.writing = 0  # victims this call queued for their L2 write (write-back)


class Placement(Part):
    """Reserves, fills in and evicts L1 extents. ``queue_l2_write``: how an
    eviction that must keep the block writes its dirty L1 copy to L2 first."""

    def __init__(self, shared: Shared, has_l2: bool,
                 queue_l2_write: Callable[[BlockId, Entry], object],
                 max_block_bytes: int) -> None:
        super().__init__(shared)
        self.has_l2 = has_l2
        self.queue_l2_write = queue_l2_write
        self.max_block_bytes = max_block_bytes
        self.open_writers = 0  # reserved, uncommitted extents (BlockWriters, shm slots)
        #: Why blocks cannot leave L1 beyond the usual (set by the store: L2
        #: writes failing), appended to the "L1 is full" refusal.
        self.stuck_reason: Callable[[], str] = lambda: ""
        #: Whether L2 writes are held back after a failure (set by the store):
        #: a block still to be written cannot leave L1 then.
        self.writes_paused: Callable[[], bool] = lambda: False
        self._generations = itertools.count(1)
        self._l1_counters = self.stats.counters[TierName.L1]
        #: quota.l1 (limit_l1): namespace → L1 bytes allowed (0: none); None: no quotas.
        self._l1_limit: Callable[[str], int] | None = None
        self._l1_owned: dict[str, NamespaceL1] = {}
        # quota.l1: room reserved and not committed yet, per namespace and per
        # extent (a tenant's half-sent Puts or open ShmReserves counted for
        # nothing: within its quota on paper, it evicted another's blocks).
        self._l1_reserved: dict[str, int] = {}
        self._reserved_at: dict[int, tuple[str, int]] = {}
        # Until then a reservation does not wait for over-quota blocks (one
        # waited out QUOTA_WAIT_SECONDS: they are held by leases, not writes).
        self._quota_wait_off_until = 0.0
        #: Overwritten blocks whose old L2 copy's delete is queued (see commit).
        self.replacing: dict[BlockId, asyncio.Future[Any]] = {}
        #: Overwrites' L2 deletes not committed yet, by key: a later Put of
        #: the key is answered after them too (a second memory overwrite was
        #: answered at once, the first one's delete still queued).
        self._deleting_l2: dict[BlockId, asyncio.Future[Any]] = {}

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
        if not self.index.fits_l2(size):
            # (An outside review: taken, such a block was written to L2 and
            # trimmed from it at once whenever it was to leave L1, for ever:
            # L1 evicted nothing more, every later Put waited out its
            # deadline, and with L3 the loop spun a CPU.)
            raise BlockTooLarge(
                f"block of {size} bytes exceeds the L2 capacity of {self.index.l2_capacity} bytes "
                "(l2.capacity): every block that leaves L1 is written to L2"
            )

    async def verify_block(self, offset: int, size: int, index: int) -> None:
        """Check a block-format block in L1 (header fields, header and payload
        CRC-32C): InvalidBlock or CorruptBlock naming what is wrong, and
        which block of the request (``index``) it is."""
        if size <= _VERIFY_INLINE_BYTES:
            self.verify_block_now(offset, size, index)
            return
        view = self.l1.slice(offset, size)
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.executor, block_verify, view)
        except (InvalidBlock, CorruptBlock) as exc:
            raise exc.about(f"block #{index}") from None
        finally:
            view.release()

    def verifies_on_loop(self, size: int) -> bool:
        """Whether :meth:`verify_block` checks a block of ``size`` bytes on
        the calling thread (without waiting)."""
        return size <= _VERIFY_INLINE_BYTES

    def verify_block_now(self, offset: int, size: int, index: int) -> None:
        """:meth:`verify_block` on this thread (a small block, or one whose
        bytes were just read and are in cache)."""
        view = self.l1.slice(offset, size)
        try:
            block_verify(view)
        except (InvalidBlock, CorruptBlock) as exc:
            raise exc.about(f"block #{index}") from None
        finally:
            view.release()

    # -- extents ------------------------------------------------------------------------

    async def reserve(self, size: int, room_wait: float = ROOM_WAIT_SECONDS,
                      namespace: str = "") -> int:
        """An L1 extent for a block of ``namespace`` about to be written
        (evicting if needed). The caller commits it (:meth:`commit`,
        :meth:`place`) or gives it back (:meth:`release`). ``room_wait``: how
        long to wait when every block is held (read, leased, reserved) rather
        than on its way to L2."""
        deadline = time.monotonic() + ROOM_WAIT_SECONDS
        quota_deadline = min(deadline, time.monotonic() + QUOTA_WAIT_SECONDS)
        room_deadline = min(deadline, time.monotonic() + room_wait)
        attempt = _Attempt(namespace)
        while True:
            got = self._reserve_step(size, attempt)
            if got >= 0:
                return got
            if got == _WAIT_QUOTA:
                # Over-quota blocks are being written to L2 (write-back):
                # wait for them rather than evict a namespace within quota.
                if not await self.progress.wait(quota_deadline):
                    attempt.quota_waited = True
                    # Held by something else (leases): the next reservations
                    # do not wait for them again for a while.
                    self._quota_wait_off_until = time.monotonic() + QUOTA_WAIT_SECONDS
            elif got in (_WAIT_WRITES, _WAIT_ROOM):
                # Every block pinned (being written or read), or enough victims
                # on their way to L2: each further one waits for a write to end,
                # rather than queue the whole of L1 (each victim search walks
                # past every block being written, holding the GIL the writer
                # needs: quadratic, measured 30 s and a failed Put).
                if not await self.progress.wait(room_deadline if got == _WAIT_ROOM
                                                else deadline):
                    raise self._full(size)
            else:
                raise self._full(size)

    def reserve_now(self, size: int, namespace: str = "") -> int:
        """:meth:`reserve` without waiting: the extent's offset, or -1 where
        :meth:`reserve` would wait for room (or fail). Victims it evicted or
        queued for their L2 write stay so (as :meth:`reserve`'s would)."""
        got = self._reserve_step(size, _Attempt(namespace))
        return got if got >= 0 else -1

    def _reserve_step(self, size: int, attempt: _Attempt) -> int:
        """Reserve, evicting what can leave at once: an offset, or what to
        wait for (_WAIT_QUOTA, _WAIT_WRITES, _WAIT_ROOM) or _NO_ROOM."""
        while True:
            offset = self.l1.reserve(size)
            if offset >= 0:
                self.open_writers += 1
                if self._l1_limit is not None:
                    ns, extent = attempt.namespace, self.l1.extent(size)
                    self._reserved_at[offset] = (ns, extent)
                    self._l1_reserved[ns] = self._l1_reserved.get(ns, 0) + extent
                return offset
            victim = None
            evictable: Callable[[BlockId], bool] = self._evictable
            if self._l1_limit is not None:
                victim, over = self._quota_victim()
                if over and victim is None:
                    if (not attempt.quota_waited and self.index.busy_pins > 0
                            and time.monotonic() >= self._quota_wait_off_until):
                        return _WAIT_QUOTA
                    if attempt.namespace not in over:
                        # A lease keeps a namespace's blocks within its quota
                        # only: past it, another namespace's Put takes room
                        # from them. (A review: a tenant that filled free L1
                        # and leased it all, again and again, held twice its
                        # quota and refused every Put of a tenant holding
                        # nothing, for as long as it liked.)
                        victim = self._victim_past_lease(over)
                    # Else room comes from what of theirs can leave, from the
                    # requester's own blocks, or from namespaces without a
                    # quota -- never from another namespace within its quota
                    # (leases would otherwise let a tenant hold L1 past its
                    # quota and evict another's working set).
                    if victim is None:
                        evictable = self._fallback_evictable(over, attempt.namespace)
            if victim is None:
                victim = self.policy.victim(TierName.L1, self.clock(), evictable)
            if victim is not None:
                if self._evict(victim[0], victim[1]):
                    continue
                attempt.writing += 1
                if attempt.writing >= DEMOTE_BATCH:
                    return _WAIT_WRITES
                continue
            busy = self.open_writers > 0 or self.index.busy_pins > 0
            return _WAIT_ROOM if busy else _NO_ROOM

    def _full(self, size: int) -> CapacityExhausted:
        # (no node-wide figures: any tenant may read this; Stats has them for admins)
        return CapacityExhausted(
            f"L1 is full: no room for a {size}-byte block (every block that could "
            f"leave is leased, read or being written){self.stuck_reason()}"
        )

    def _end_reservation(self, offset: int) -> None:
        """The reservation at ``offset`` ends (committed, placed or released)."""
        self.open_writers -= 1
        held = self._reserved_at.pop(offset, None) if self._reserved_at else None
        if held is not None:
            ns, extent = held
            left = self._l1_reserved[ns] - extent
            if left > 0:
                self._l1_reserved[ns] = left
            else:
                del self._l1_reserved[ns]

    def release(self, offset: int, size: int) -> None:
        self._end_reservation(offset)
        self.l1.release(offset, size)
        self.progress.wake()

    def commit(self, block: BlockId, size: int, crc: int, offset: int,
               session: str | None, written_next: bool = False) -> Entry:
        """Make a filled, reserved L1 extent visible as ``block``.
        ``written_next``: the Put is acknowledged only once this block is in
        L2 (ack local or remote) and its write is queued before anything is
        awaited (store.room_for_write): the L2 copy of the block it
        overwrites may be left for that write to replace (see :meth:`_retire`)."""
        self._end_reservation(offset)
        index = self.index
        old = index.entry(block)
        if old is not None:
            left_in_l2 = self._retire(block, old, written_next)
        else:
            left_in_l2 = index.l2_deletes is not None and index.l2_deletes.take_left(block) \
                and self._retire_left(block, written_next)
        entry = Entry(size, crc, index.stamp(), session)
        entry.replaces_l2 = left_in_l2
        index.set_l1(entry, offset)
        entry.generation = next(self._generations)
        index.blocks[block] = entry
        if self.has_l2:
            index.set_dirty(entry, True, block)
        self.stats.puts += 1
        if self._l1_limit is not None:
            self._own(block, entry)
        self.policy.on_insert(TierName.L1, block, entry.size, self.clock(), session)
        return entry

    def _retire(self, block: BlockId, old: Entry, written_next: bool = False) -> bool:
        """Remove the block an overwrite replaces, from every tier. Returns
        whether its L2 copy was left for the new block's write to replace."""
        # Its L2 copy goes too (the writer queue keeps the order: the new
        # block's write comes after this delete), so a restart before the
        # new block reaches L2 finds nothing rather than the old bytes; so
        # does its L3 copy, which a listing or another node's HEAD would find
        # for this key (an upload of the new block waits for that delete: the
        # L3 mover keeps them in order). But when the new block's own L2
        # write is what acknowledges the Put, that write replaces the old
        # copy in one transaction: deleted first, a kill between the delete
        # and the write lost the old block, acknowledged at local, for an
        # overwrite never acknowledged.
        # ``written_next`` promises that nothing comes between this commit
        # and that write (it is queued before anything is awaited: a Delete
        # or another overwrite in between found the old bytes left for a
        # write never queued, and the Put was answered over them).
        # (looked at once: forget is told, so that the delete this Put waits
        # for is queued even if the pending one settles in between)
        l2_deletes = self.index.l2_deletes
        pending = l2_deletes is not None and l2_deletes.pending(block)
        has_copy = self._has_l2_copy(old) or pending
        delete_l3 = self._maybe_in_l3(old)
        earlier_delete = self._deleting_l2.get(block)
        keep = written_next and has_copy
        done = self._old_copy_deleted(block) if has_copy and not keep else None
        if earlier_delete is not None and done is None:
            # An earlier overwrite's delete is still on its way: this Put is
            # answered after it too.
            earlier = self.replacing.get(block)
            self.replacing[block] = earlier_delete if earlier is None else \
                asyncio.ensure_future(asyncio.gather(earlier, earlier_delete))
        if done is None:
            recorded = self.index.forget(block, old, delete_l2=not keep, delete_l3=delete_l3,
                                         l2_pending=pending)
        else:
            recorded = self.index.forget(block, old, delete_l3=delete_l3, l2_done=done,
                                         l2_pending=pending)
        if recorded is not None:
            # The Put waits for the L3 delete's record too (it may be an
            # earlier delete's record, queued before this L2 delete).
            earlier = self.replacing.get(block)
            self.replacing[block] = recorded if earlier is None else \
                asyncio.ensure_future(asyncio.gather(earlier, recorded))
        return keep

    def _retire_left(self, block: BlockId, written_next: bool) -> bool:
        """As :meth:`_retire`, for bytes L2 still holds under the key with no
        entry (a failed delete left them: L2Deletes.left): deleted before the
        Put's answer, or left for its own write to replace. Returns whether
        they were left."""
        if written_next:
            return True
        done = self._old_copy_deleted(block)
        assert self.index.l2_deletes is not None
        self.index.l2_deletes.submit(block, None, done)
        return False

    def drop_replaced(self, block: BlockId) -> None:
        """An overwrite already answered as stored whose new bytes failed
        their check: the key's earlier block goes as the overwrite would have
        taken it (a miss, never the bytes the client was told were replaced)."""
        old = self.index.entry(block)
        if old is not None:
            self._retire(block, old)

    def _has_l2_copy(self, entry: Entry) -> bool:
        """Whether ``entry`` has an L2 copy (or one on its way) that its
        overwrite must delete first."""
        return self.has_l2 and (entry.l2 or entry.l2_pending > 0 or entry.replaces_l2)

    def replace_waits(self, block: BlockId) -> bool:
        """Whether a Put of ``block`` now would be answered only after an L2
        write (store.make_durable): it overwrites a block with an L2 copy, or
        one whose delete is still pending, or one with an L3 copy (whose
        delete is recorded in L2 first)."""
        index = self.index
        if block in self.replacing or block in self._deleting_l2:
            return True
        l2_deletes = index.l2_deletes
        if l2_deletes is not None and (block in l2_deletes.left or l2_deletes.pending(block)):
            return True
        old = self.index.entry(block)
        return old is not None and (self._has_l2_copy(old) or (
            self.has_l2 and self.index.delete_l3 is not None and self._maybe_in_l3(old)))

    def _maybe_in_l3(self, old: Entry) -> bool:
        """Whether an overwrite of ``old`` deletes an L3 object of it: one put
        or found there, or (L3 off) one written before the first run without L3."""
        return old.l3 or old.l3_pending > 0 or old.created < self.index.l3_off_since

    def _old_copy_deleted(self, block: BlockId) -> DropDone | None:
        """The writer's callback for the delete of an overwritten block's L2
        copy; it settles a future in ``replacing`` that the Put awaits before
        it is acknowledged (store.make_durable). Without it an ack=memory
        overwrite could be answered, the process killed before the writer
        reached that delete, and the restart serve the old bytes."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # not on a loop (a unit test's direct call): nobody waits
        settled, done = writer_settled(loop)
        earlier = self._deleting_l2.get(block)
        self.replacing[block] = self._deleting_l2[block] = settled if earlier is None else \
            asyncio.ensure_future(asyncio.gather(earlier, settled))
        waited = self._deleting_l2[block]

        def committed(_: asyncio.Future[Any]) -> None:
            if self._deleting_l2.get(block) is waited:
                del self._deleting_l2[block]

        waited.add_done_callback(committed)
        return done

    def place(self, block: BlockId, entry: Entry, offset: int, session: str | None) -> None:
        """A promoted block's bytes are in its reserved extent: index them."""
        self._end_reservation(offset)
        self.index.set_l1(entry, offset)
        entry.generation = next(self._generations)
        if self.has_l2 and not entry.l2 and self.index.fits_l2(entry.size):
            self.index.set_dirty(entry, True, block)
        self._l1_counters.promotions += 1
        if self._l1_limit is not None:
            self._own(block, entry)
        self.policy.on_insert(TierName.L1, block, entry.size, self.clock(), session)

    # -- per-namespace L1 quotas (quota.l1) ----------------------------------------------

    def limit_l1(self, limit: Callable[[str], int]) -> None:
        """Give each namespace an L1 quota (``limit(ns)`` bytes, 0: none). When
        L1 needs room, blocks of namespaces at or over their quota are the
        victims first, so a tenant that floods L1 evicts its own blocks, not
        another's working set. Below its quota a namespace may use free room."""
        self._l1_limit = limit
        self.index.left_l1 = self._disown

    def _disown(self, block: BlockId, entry: Entry) -> None:
        owned = self._l1_owned.get(block[0])
        if owned is not None:
            owned.discard(block[1], entry)

    def _own(self, block: BlockId, entry: Entry) -> None:
        owned = self._l1_owned.get(block[0])
        if owned is None:
            owned = self._l1_owned[block[0]] = NamespaceL1(self.l1.extent)
        owned.add(block[1], entry)

    def _fallback_evictable(self, over: set[str], namespace: str) -> Callable[[BlockId], bool]:
        assert self._l1_limit is not None
        limit, evictable = self._l1_limit, self._evictable

        def allowed(block: BlockId) -> bool:
            ns = block[0]
            return (ns == namespace or ns in over or not limit(ns)) and evictable(block)
        return allowed

    def _quota_victim(self) -> tuple[tuple[BlockId, Action] | None, set[str]]:
        """A victim among the namespaces at or over their quota, and those
        namespaces (empty: none is)."""
        assert self._l1_limit is not None
        limit = self._l1_limit
        over = set()
        empty = []
        reserved = self._l1_reserved
        for namespace, owned in self._l1_owned.items():
            quota = limit(namespace)
            held = owned.bytes + reserved.get(namespace, 0)
            if quota and held >= quota and owned.due_reconcile():
                owned.reconcile()  # Deletes free L1 behind placement's back
                held = owned.bytes + reserved.get(namespace, 0)
            if quota and held >= quota:
                over.add(namespace)
            elif not owned.blocks:
                empty.append(namespace)
        for namespace, nbytes in reserved.items():  # (reservations, nothing committed)
            quota = limit(namespace)
            if quota and nbytes >= quota and namespace not in self._l1_owned:
                over.add(namespace)
        for namespace in empty:  # (a namespace with nothing in L1 costs nothing)
            del self._l1_owned[namespace]
        if not over:
            return None, over
        evictable = self._evictable
        victim = self.policy.victim(TierName.L1, self.clock(),
                                    lambda b: b[0] in over and evictable(b))
        if victim is None:
            for namespace in over:
                mine = self._l1_owned.get(namespace)
                if mine is not None:
                    mine.reconcile()
        return victim, over

    # -- eviction -----------------------------------------------------------------------

    def _evictable(self, block: BlockId) -> bool:
        entry = self.index.blocks.get(block)
        if entry is None or entry.l1_offset < 0:
            return True  # stale policy entry: evicting it only cleans up
        now = self.clock()
        return entry.lease_until <= now and self._may_leave(entry, now)

    def _may_leave(self, entry: Entry, now: float) -> bool:
        """Whether an L1 block may leave now, leases aside: not being read or
        written, nor pinned by its session."""
        if entry.pinned or entry.pin_until > now:
            return False
        # (a write queued now would fail as the last did: room waits, or is refused)
        return not (entry.dirty and self.writes_paused())

    def _victim_past_lease(self, over: set[str]) -> tuple[BlockId, Action] | None:
        """A victim among the blocks of the namespaces past their quota (of
        those ``over``: at or past it), leased ones too (a block being read
        or written, or pinned by its session, still stays)."""
        assert self._l1_limit is not None
        limit, reserved = self._l1_limit, self._l1_reserved
        # Past the quota, not at it (a fix review: two tenants each at
        # exactly their quota lost leased blocks to a third's Put).
        past = {ns for ns in over if (owned := self._l1_owned.get(ns)) is not None
                and owned.bytes + reserved.get(ns, 0) > limit(ns)}
        if not past:
            return None
        blocks, now, may_leave = self.index.blocks, self.clock(), self._may_leave

        def evictable(block: BlockId) -> bool:
            if block[0] not in past:
                return False
            entry = blocks.get(block)
            return entry is None or entry.l1_offset < 0 or may_leave(entry, now)
        return self.policy.victim(TierName.L1, now, evictable)

    def _evict(self, block: BlockId, action: Action) -> bool:
        """Evict ``block`` from L1: False when it must first be written to L2
        (its write is queued; it leaves at a later eviction), else True."""
        index = self.index
        entry = index.blocks.get(block)
        if entry is None or entry.l1_offset < 0:
            self.policy.on_remove(TierName.L1, block)
            return True
        if action is Action.DEMOTE and self.has_l2 and not entry.l2 and \
                index.fits_l2(entry.size):
            # Not in L2 yet: write it first; it stays pinned until written.
            # (One larger than L2 leaves as it is: its copy is L3's.)
            if entry.dirty:
                self.queue_l2_write(block, entry)
            return False
        index.set_dirty(entry, False)
        self.l1.release(entry.l1_offset, entry.size)
        index.set_l1(entry, -1)
        self.policy.on_remove(TierName.L1, block)
        if self._l1_limit is not None:
            owned = self._l1_owned.get(block[0])
            if owned is not None:
                owned.discard(block[1], entry)
                if not owned.blocks:
                    del self._l1_owned[block[0]]
        c = self._l1_counters
        c.evictions += 1
        if action is Action.DEMOTE and entry.l2:
            c.demotions += 1
            if index.cold is not None:
                index.cool(block, entry)
        elif not entry.l3:
            # (A block L3 holds too stays indexed there: forgotten, its object
            # was left uncounted, never deleted, and brought back by the next
            # listing.)
            index.forget(block, entry)
        return True


class NamespaceL1:
    """The L1 blocks of one namespace and the L1 bytes they take (whole pages:
    a 1-byte block takes a page of L1, and a quota counts what L1 gives).
    Placement sees every block enter L1 and every eviction, and the index
    tells it of every other way out (Index.left_l1: a Delete, an overwrite);
    :meth:`reconcile` (amortised: at most once per quarter of the blocks
    added) drops any entry no longer in L1 that was missed."""

    __slots__ = ("_added", "_extent", "blocks", "bytes")

    def __init__(self, extent: Callable[[int], int]) -> None:
        self.blocks: dict[bytes, Entry] = {}
        self.bytes = 0
        self._added = 0
        self._extent = extent  # MemoryTier.extent

    def extent(self, entry: Entry) -> int:
        return self._extent(entry.size)

    def add(self, key: bytes, entry: Entry) -> None:
        old = self.blocks.get(key)
        if old is not None:
            self.bytes -= self.extent(old)
        self.blocks[key] = entry
        self.bytes += self.extent(entry)
        self._added += 1

    def discard(self, key: bytes, entry: Entry) -> None:
        if self.blocks.get(key) is entry:
            del self.blocks[key]
            self.bytes -= self.extent(entry)

    def due_reconcile(self) -> bool:
        return self._added > 16 + len(self.blocks) // 4

    def reconcile(self) -> None:
        gone = [k for k, e in self.blocks.items() if e.l1_offset < 0]
        for key in gone:
            self.bytes -= self.extent(self.blocks.pop(key))
        self._added = 0


class BlockWriter:
    """One block being put: bytes land in its reserved L1 extent as they come."""

    __slots__ = ("_checksum", "_closed", "_dest", "_pos", "block", "format", "offset",
                 "placement", "session", "size")

    def __init__(self, placement: Placement, block: BlockId, size: int, offset: int,
                 session: str | None, block_format: BlockFormat = BlockFormat.RAW) -> None:
        self.format = block_format
        self.placement = placement
        self._dest = placement.l1.slice(offset, size)
        self.block = block
        self.size = size
        self.offset = offset
        self.session = session
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
                f"{self._pos + n} bytes sent for a block declared as {self.size} bytes")
        self._checksum = copy_and_checksum(self._dest, self._pos, data, self._checksum)
        self._pos += n

    def commit(self, written_next: bool = False) -> Entry:
        """See :meth:`Placement.commit` for ``written_next``."""
        if not self.complete:
            raise MalformedRequest(
                f"block {self.block[1].hex()[:16]}: stream ended after {self._pos} of "
                f"{self.size} bytes"
            )
        self._closed = True
        self._dest.release()
        return self.placement.commit(self.block, self.size, self._checksum, self.offset,
                                     self.session, written_next)

    def abort(self) -> None:
        """Drop a partial block: nothing of it becomes visible."""
        if self._closed:
            return
        self._closed = True
        self._dest.release()
        self.placement.release(self.offset, self.size)

