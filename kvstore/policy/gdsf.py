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
from collections.abc import Callable, Sequence

from kvstore.policy.base import Action, Evictable, Policy
from kvstore.types import BlockId, TierName

#: Seconds per byte saved by a hit: prefill at 10k tokens/s minus a load at 100k tokens/s,
#: for a 64-token block of 64 KiB (1 KiB/token); only the ratio cost/size matters.
DEFAULT_COST_PER_BYTE = (1 / 10_000 - 1 / 100_000) / 1024


class _Heap:
    __slots__ = ("freq", "heap", "inflation", "pri", "seq", "weight")

    def __init__(self) -> None:
        self.inflation = 0.0
        self.pri: dict[BlockId, float] = {}
        self.freq: dict[BlockId, int] = {}
        self.weight: dict[BlockId, float] = {}  # cost / size
        self.heap: list[tuple[float, int, BlockId]] = []
        self.seq = 0


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
        w = self._weight(block, size)
        h.weight[block] = w
        h.freq[block] = 1
        pri = h.inflation + w
        h.pri[block] = pri
        h.seq += 1
        heapq.heappush(h.heap, (pri, h.seq, block))

    def on_hit(self, tier: TierName, block: BlockId, now: float,
               session: str | None = None) -> None:
        h = self._h[tier]
        f = h.freq.get(block)
        if f is None:
            return
        f += 1
        h.freq[block] = f
        pri = h.inflation + f * h.weight[block]
        h.pri[block] = pri
        h.seq += 1
        heapq.heappush(h.heap, (pri, h.seq, block))
        if len(h.heap) > 4 * len(h.pri) + 1024:
            h.heap = [(p, i, b) for i, (b, p) in enumerate(h.pri.items())]
            heapq.heapify(h.heap)

    def on_remove(self, tier: TierName, block: BlockId) -> None:
        h = self._h[tier]
        if h.pri.pop(block, None) is not None:
            del h.freq[block]
            del h.weight[block]

    def victim(self, tier: TierName, now: float,
               evictable: Evictable | None = None) -> tuple[BlockId, Action] | None:
        h = self._h[tier]
        heap, pri = h.heap, h.pri
        skipped: list[tuple[float, int, BlockId]] = []
        found: tuple[BlockId, Action] | None = None
        while heap:
            entry = heap[0]
            p, _, block = entry
            if pri.get(block) != p:
                heapq.heappop(heap)  # stale
                continue
            if evictable is not None and not evictable(block):
                skipped.append(heapq.heappop(heap))
                continue
            h.inflation = p
            found = (block, self.default_action(tier))
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found
