"""The L2 deletes the index queues, and what L2 still holds when one fails.

On a disk filled to its last pages LMDB cannot commit deletes. A failed delete
used to pass silently: a Delete or an overwrite at memory was answered, and a
restart served the deleted block or the old bytes again; a block evicted
while its delete failed left bytes no entry accounted for, which the next
Delete or Put of its key did not know of (docs/reliability.md, "On a disk
filled to its last pages"). Every L2 delete of the index goes through
:class:`L2Deletes`, which remembers what is still there: the key's entry is
marked ``replaces_l2`` (its write replaces the bytes, its delete or overwrite
deletes them), or, with no entry, the block joins :attr:`L2Deletes.left`.
A delete not settled yet counts as pending, so that a Delete or an
overwrite of its key meanwhile queues its own and waits for it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore.types import BlockId

if TYPE_CHECKING:
    from kvstore.store.coldindex import ColdIndex
    from kvstore.store.index import BlockIndex, Entry
    from kvstore.tiers.lmdb_tier import LMDBTier

#: The L2 writer's callback for a delete: (error, whether the block existed).
DropDone = Callable[[BaseException | None, bool], None]

#: The most blocks :meth:`L2Deletes.retry` queues deletes for at a time.
RETRY_AT_ONCE = 1024


class L2Deletes:
    """``l2``: the tier; ``blocks`` and ``cold``: the index's full entries
    and compact records (who accounts for a key's bytes now)."""

    def __init__(self, l2: LMDBTier, blocks: BlockIndex, cold: ColdIndex | None) -> None:
        self.l2 = l2
        self.blocks = blocks
        self.cold = cold
        #: Blocks L2 may still hold that no entry or compact record accounts
        #: for (their delete failed); a Delete or a Put of the key deletes them
        #: again, and :meth:`retry` once writes commit.
        self.left: set[BlockId] = set()
        #: Deletes queued and not settled, per block. One that fails stays
        #: counted until :meth:`_failed` has recorded it, on the loop: there is
        #: no moment it is in neither place.
        self._pending: dict[BlockId, int] = {}
        self._lock = threading.Lock()  # (the writer thread settles them)
        #: Blocks whose entry has no L1 copy (in L3 only) whose L2 bytes a
        #: failed delete left (``replaces_l2``): nothing will write over them.
        self._stale: set[BlockId] = set()
        self.retried = 0.0  # (monotonic: see retry)

    def submit(self, block: BlockId, entry: Entry | None,
               done: DropDone | None = None) -> None:
        """Queue the delete of what L2 holds under the block's key (``entry``'s
        copy; None: bytes no entry accounts for). Should it fail, what is
        still there is recorded (on the loop, before ``done``'s waiter runs)."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # (a unit test's direct call)
        with self._lock:
            self._pending[block] = self._pending.get(block, 0) + 1

        def watched(error: BaseException | None, existed: bool) -> None:  # writer thread
            try:
                if error is not None and loop is not None:
                    loop.call_soon_threadsafe(self._failed, block, entry)
                else:
                    self._settled(block)
            except RuntimeError:  # (the loop is closed: stopping)
                self._settled(block)
            if done is not None:
                done(error, existed)

        self.l2.submit(block, None, None, watched)

    def _settled(self, block: BlockId) -> None:
        with self._lock:
            left = self._pending.get(block, 0) - 1
            if left > 0:
                self._pending[block] = left
            else:
                self._pending.pop(block, None)

    def _failed(self, block: BlockId, entry: Entry | None) -> None:
        """On the loop: a delete of the block's L2 bytes failed, they are still
        there. The entry the key has now (``entry`` itself, or a newer one) is
        marked as replacing them; with none, the block joins :attr:`left`."""
        try:
            current = self.blocks.get(block)
            if current is not None:
                if not current.l2:
                    current.replaces_l2 = True
                    if current.l1_offset < 0:
                        self._stale.add(block)
                return
            if self.cold is not None and self.cold.get(block[0], block[1]) is not None:
                return  # (a compact record: a later write of the key replaced them)
            self.left.add(block)
        finally:
            self._settled(block)  # (recorded first)

    def pending(self, block: BlockId) -> bool:
        """Whether a delete of the block's L2 bytes is queued, not settled."""
        return block in self._pending

    def take_left(self, block: BlockId) -> bool:
        """Whether L2 may hold bytes no entry accounts for under the key: left
        by a failed delete (taken off :attr:`left`), or under a delete not
        settled yet. The caller queues a delete of its own and waits for it."""
        if block in self.left:
            self.left.discard(block)
            return True
        return block in self._pending

    def delete_left(self, block: BlockId, done: DropDone | None = None) -> bool:
        """Queue a delete of what L2 may hold under the key with no entry
        accounting for it (see :meth:`take_left`); whether there was any."""
        if not self.take_left(block):
            return False
        self.submit(block, None, done)
        return True

    def unaccounted(self, namespace: str) -> list[BlockId]:
        """The namespace's blocks in :attr:`left` or with a delete pending."""
        with self._lock:
            pending = [b for b in self._pending if b[0] == namespace]
        return pending + [b for b in self.left if b[0] == namespace]

    def retry(self) -> None:
        """Delete again what failed deletes left (a write just committed: the
        disk takes commits again), RETRY_AT_ONCE blocks at most once a
        second: a review's 20,000 in one go held the loop 150 ms, and where
        deletes kept failing the writer tried them every second. (Else they
        stayed until a Delete or Put of their keys: L2's file held more than
        the index counted.)"""
        if not (self.left or self._stale):
            return  # (the usual case: every write's settle looks)
        now = time.monotonic()
        if now - self.retried < 1.0:
            return
        self.retried = now
        budget = RETRY_AT_ONCE
        while self.left and budget:
            self.submit(self.left.pop(), None)
            budget -= 1
        while self._stale and budget:
            block = self._stale.pop()
            entry = self.blocks.get(block)
            if entry is not None and entry.replaces_l2 and not entry.l2 \
                    and entry.l1_offset < 0 and not entry.l2_pending:
                entry.replaces_l2 = False  # (marked again if this one fails too)
                self.submit(block, entry)
                budget -= 1
