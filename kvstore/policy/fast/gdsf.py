"""GDSF's Put phase for the simulator: ``Policy.fill`` with the calls inlined (same
decisions; a test compares them). A friend module of ``kvstore/policy/gdsf.py``."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

from kvstore.policy.base import Policy
from kvstore.policy.gdsf import GDSFPolicy
from kvstore.types import BlockId, TierName


def gdsf_fill(self: GDSFPolicy, tier: TierName, blocks: Sequence[BlockId], size: int,
              now: float, session: str | None, resident: set[BlockId],
              capacity: int) -> int:
    """``Policy.fill`` (per block: ``victim`` -> ``on_remove`` while full, then
    ``on_insert``) inlined for the simulator, with the default cost (every block's
    weight 1); same steps, same decisions (a test compares them)."""
    if self.cost_fn is not None:
        return Policy.fill(self, tier, blocks, size, now, session, resident, capacity)
    h = self._h[tier]
    keys, buckets, pri, freq, weight = h.keys, h.buckets, h.pri, h.freq, h.weight
    heappush = heapq.heappush
    lowest = h.lowest
    add, discard = resident.add, resident.discard
    nres = len(resident)
    n = 0
    for b in blocks:
        if b in resident:
            continue  # a repeat within the request
        while nres >= capacity:
            # victim: the oldest block of the lowest non-empty bucket
            bucket = lowest()
            if bucket is None:
                break  # nothing left to evict
            k = keys[0]
            v = next(iter(bucket))
            h.inflation = k
            if v in resident:
                discard(v)
                nres -= 1
            del pri[v]  # on_remove
            del freq[v]
            del weight[v]
            del bucket[v]
        if nres < capacity:
            add(b)
            nres += 1
            n += 1
            if b in pri:  # on_insert
                continue
            weight[b] = 1.0
            freq[b] = 1
            p = h.inflation + 1.0
            pri[b] = p
            bk = buckets.get(p)
            if bk is None:
                bk = buckets[p] = OrderedDict()
                heappush(keys, p)
            bk[b] = None
    return n

