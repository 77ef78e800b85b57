"""GDSF (Greedy-Dual-Size-Frequency, Cherkasova 1998): cost-aware, frequency-aware, aged.

Each block has priority ``H = L + freq * cost / size``; the victim is the lowest H and the
tier's inflation value L becomes the victim's H, so blocks not re-referenced age out.

Cost of a block (documented in docs/policy.md): the time a miss costs, i.e. recomputing its
tokens by prefill minus loading it back: ``cost = size * (1/prefill_rate - 1/load_rate)``
per byte-equivalent token. With uniform per-token rates ``cost/size`` is one constant
(``cost_per_byte``), so for equal-sized blocks GDSF is LFU with dynamic ageing (LFU-DA);
a caller can pass ``cost_fn(block, size)`` for a position- or model-dependent cost.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvstore.policy.base import Action, Evictable, Policy
from kvstore.types import BlockId, TierName

#: Seconds per byte saved by a hit: prefill at 10k tokens/s minus a load at 100k tokens/s,
#: for a 64-token block of 64 KiB (1 KiB/token); only the ratio cost/size matters.
DEFAULT_COST_PER_BYTE = (1 / 10_000 - 1 / 100_000) / 1024


class _Heap:
    """Blocks bucketed by priority: one FIFO (OrderedDict) per distinct H, a min-heap of
    the distinct H values. Equal H: the block updated (inserted or hit) longest ago goes
    first. With uniform cost/size every H is an integer (L starts at 0 and becomes a
    victim's H; H = L + freq), so there are few buckets and a hit costs O(1)."""

    __slots__ = ("buckets", "freq", "inflation", "keys", "pri", "weight")

    def __init__(self) -> None:
        self.inflation = 0.0
        self.pri: dict[BlockId, float] = {}
        self.freq: dict[BlockId, int] = {}
        self.weight: dict[BlockId, float] = {}  # cost / size
        self.buckets: dict[float, OrderedDict[BlockId, None]] = {}
        self.keys: list[float] = []  # heap of the keys of ``buckets``

    def lowest(self) -> OrderedDict[BlockId, None] | None:
        """The non-empty bucket of the lowest priority (its key is ``keys[0]``), dropping
        the empty ones before it; None if no block is left."""
        keys, buckets = self.keys, self.buckets
        while keys:
            bucket = buckets[keys[0]]
            if bucket:
                return bucket
            del buckets[heapq.heappop(keys)]
        return None

    def place(self, block: BlockId, pri: float) -> None:
        self.pri[block] = pri
        b = self.buckets.get(pri)
        if b is None:
            b = self.buckets[pri] = OrderedDict()
            heapq.heappush(self.keys, pri)
        b[block] = None


class GDSFPolicy(Policy):
    name = "gdsf"

    def __init__(self, tiers: Sequence[TierName],
                 cost_fn: Callable[[BlockId, int], float] | None = None) -> None:
        super().__init__(tiers)
        self.cost_fn = cost_fn
        self._h = {t: _Heap() for t in tiers}

    def _weight(self, block: BlockId, size: int) -> float:
        if self.cost_fn is None or size <= 0:
            return 1.0  # cost/size is DEFAULT_COST_PER_BYTE for every block: use 1
        return self.cost_fn(block, size) / size

    def on_insert(self, tier: TierName, block: BlockId, size: int, now: float,
                  session: str | None = None) -> None:
        h = self._h[tier]
        if block in h.pri:
            return
        w = 1.0 if self.cost_fn is None else self._weight(block, size)
        h.weight[block] = w
        h.freq[block] = 1
        h.place(block, h.inflation + w)

    def on_hit(self, tier: TierName, block: BlockId, now: float,
               session: str | None = None) -> None:
        h = self._h[tier]
        f = h.freq.get(block)
        if f is None:
            return
        f += 1
        h.freq[block] = f
        del h.buckets[h.pri[block]][block]
        h.place(block, h.inflation + f * h.weight[block])

    def on_hits(self, tier: TierName, blocks: Sequence[BlockId], now: float,
                session: str | None = None) -> None:
        h = self._h[tier]
        freq, pri, weight, buckets = h.freq, h.pri, h.weight, h.buckets
        get = freq.get
        infl = h.inflation
        place = h.place
        for block in blocks:
            f = get(block)
            if f is None:
                continue
            f += 1
            freq[block] = f
            del buckets[pri[block]][block]
            place(block, infl + f * weight[block])

    def on_remove(self, tier: TierName, block: BlockId) -> None:
        h = self._h[tier]
        p = h.pri.pop(block, None)
        if p is not None:
            del h.freq[block]
            del h.weight[block]
            del h.buckets[p][block]

    def victim(self, tier: TierName, now: float,
               evictable: Evictable | None = None) -> tuple[BlockId, Action] | None:
        h = self._h[tier]
        keys = h.keys
        skipped: list[float] = []
        found: tuple[BlockId, Action] | None = None
        while (bucket := h.lowest()) is not None:
            block: BlockId | None = next(iter(bucket))
            if evictable is not None and not evictable(block):  # type: ignore[arg-type]
                block = next((b for b in bucket if evictable(b)), None)
            if block is None:
                skipped.append(heapq.heappop(keys))  # none evictable: set aside
                continue
            h.inflation = keys[0]
            found = (block, Action.DROP if tier is self.tiers[-1] else Action.DEMOTE)
            break
        for k in skipped:
            heapq.heappush(keys, k)
        return found
