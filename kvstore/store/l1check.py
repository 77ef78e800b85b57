"""Checks of L1 bytes on their way out of the process (a Get, an L2 write,
an L3 upload) against the checksum the block was stored with, and what
happens to a copy that fails: it is dropped from L1, counted in L1's
``corrupt``, and never written down.

L1 in a shared-memory file (``l1.shm_path``) is mapped read-write by every
attached client, so a bug or a late writer there could change a block's
bytes behind the index's back. An anonymous arena is written by this
process only, which checked every block as it came in: its bytes are not
checked again unless ``l1.verify_reads`` is ``always`` (the check costs a
pass over the bytes, ~20 % of a TCP Get's server CPU: docs/performance.md).
The checks use the native CRC-32C (the GIL is released for large buffers).
"""

from __future__ import annotations

import logging

from kvstore.checksum import checksum
from kvstore.ratelimit import RateLimitedWarning
from kvstore.store.index import Entry
from kvstore.store.parts import Part, Shared
from kvstore.tiers.base import Buffer
from kvstore.types import BlockId, TierName

log = logging.getLogger("kvstore.store")


def l1_intact(view: Buffer, entry: Entry) -> bool:
    """Whether the L1 bytes ``view`` still match the entry's checksum."""
    return checksum(view) == entry.checksum


class L1Check(Part):
    """Checks L1 bytes on their way out (when the arena needs it) and drops
    copies found corrupt."""

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self.enabled = shared.verify_l1
        # A client writing bad bytes into a shared arena can cause one a block.
        self._dropped_log = RateLimitedWarning(log, "dropped corrupt L1 copies", 10.0)

    def intact(self, view: Buffer, entry: Entry) -> bool:
        """Whether the L1 bytes ``view`` may leave the process: they match the
        entry's checksum, or the arena is not checked (``enabled`` False)."""
        return not self.enabled or l1_intact(view, entry)

    def drop_corrupt(self, block: BlockId, entry: Entry, where: str,
                     own_pins: int = 0) -> None:
        """The entry's L1 copy failed its checksum (found by ``where``): count
        it and drop it. A good L2 or L3 copy stays and is served next time;
        with none, the block is gone (a miss beats wrong bytes). Call it with
        no view of the caller's own left on the copy; ``own_pins``: reader
        pins of the caller's still on the entry (given back later)."""
        index = self.index
        if entry.dead or index.blocks.get(block) is not entry or entry.l1_offset < 0:
            return  # replaced, deleted or evicted meanwhile: not a copy anyone serves
        self.stats.counters[TierName.L1].corrupt += 1
        self._dropped_log.note(f"{block[0]}/{block[1].hex()[:16]}, found by {where}")
        if (entry.l2 or entry.l3) and entry.readers <= own_pins and not entry.l2_pending:
            index.set_dirty(entry, False)
            index.free_l1(block, entry)
            self.policy.on_remove(TierName.L1, block)
            return
        # No other copy, or other readers still hold this one (its extent
        # cannot be freed under them): forget the block here; the L3 copy,
        # if any, stays and is found again by the next Get.
        index.forget(block, entry)
