"""S3-FIFO's Put phase for the simulator: ``Policy.fill`` with the calls inlined (same
decisions; a test compares them). A friend module of ``kvstore/policy/s3fifo.py``."""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.policy.s3fifo import S3FIFOPolicy
from kvstore.types import BlockId, TierName


def s3fifo_fill(self: S3FIFOPolicy, tier: TierName, blocks: Sequence[BlockId], size: int,
                now: float, session: str | None, resident: set[BlockId],
                capacity: int) -> int:
    """``Policy.fill`` (per block: ``victim`` -> ``on_remove`` while full, then
    ``on_insert``) with the calls inlined for the simulator; same steps, same
    decisions (a test compares them)."""
    q = self._q[tier]
    small, main, ghost, freq = q.small, q.main, q.ghost, q.freq
    next_victim = self._next_victim
    add, discard = resident.add, resident.discard
    nres = len(resident)
    n = 0
    for b in blocks:
        if b in resident:
            continue  # a repeat within the request
        while nres >= capacity:
            v = next_victim(q, None)
            if v is None:
                break
            if v in resident:
                discard(v)
                nres -= 1
            # -- on_remove(tier, v)
            if freq.pop(v, None) is not None or v in small or v in main:
                small.pop(v, None)
                main.pop(v, None)
        if nres < capacity:
            add(b)
            nres += 1
            n += 1
            # -- on_insert(tier, b, ...)
            if b in freq:
                continue
            freq[b] = 0
            if b in ghost:
                del ghost[b]
                main[b] = None
            else:
                small[b] = None
    return n

