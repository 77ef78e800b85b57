"""S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO and a ghost FIFO.

* New blocks enter the small queue S (target 10% of the tier's blocks), unless they are in
  the ghost queue G (recently evicted from S), in which case they go straight to main M.
* Each hit increments a 2-bit frequency (capped at 3).
* Evicting from S: the oldest block moves to M if it was hit at least ``move_threshold``
  times while in S (frequency reset), otherwise it is evicted and remembered in G.
* Evicting from M: the oldest block with frequency > 0 is reinserted with frequency - 1
  (CLOCK-like); the first with frequency 0 is evicted.

The tier's capacity is not known to a policy: S's target is a share of the blocks the tier
holds when ``victim`` is called; G holds at most as many ids as M holds blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvstore.policy.base import Action, Evictable, Policy
from kvstore.types import BlockId, TierName


class _Queues:
    __slots__ = ("freq", "ghost", "main", "small")

    def __init__(self) -> None:
        self.small: OrderedDict[BlockId, None] = OrderedDict()
        self.main: OrderedDict[BlockId, None] = OrderedDict()
        self.ghost: OrderedDict[BlockId, None] = OrderedDict()
        self.freq: dict[BlockId, int] = {}


class S3FIFOPolicy(Policy):
    name = "s3fifo"

    def __init__(self, tiers: Sequence[TierName], small_ratio: float = 0.1,
                 move_threshold: int = 1) -> None:
        super().__init__(tiers)
        self.small_ratio = small_ratio
        self.move_threshold = move_threshold
        self._q = {t: _Queues() for t in tiers}

    def on_insert(self, tier: TierName, block: BlockId, size: int, now: float,
                  session: str | None = None) -> None:
        q = self._q[tier]
        if block in q.freq:
            return
        q.freq[block] = 0
        if block in q.ghost:
            del q.ghost[block]
            q.main[block] = None
        else:
            q.small[block] = None

    def on_hit(self, tier: TierName, block: BlockId, now: float,
               session: str | None = None) -> None:
        freq = self._q[tier].freq
        f = freq.get(block)
        if f is not None and f < 3:
            freq[block] = f + 1

    def on_hits(self, tier: TierName, blocks: Sequence[BlockId], now: float,
                session: str | None = None) -> None:
        freq = self._q[tier].freq
        get = freq.get
        for block in blocks:
            f = get(block)
            if f is not None and f < 3:
                freq[block] = f + 1

    def on_remove(self, tier: TierName, block: BlockId) -> None:
        q = self._q[tier]
        if q.freq.pop(block, None) is not None or block in q.small or block in q.main:
            q.small.pop(block, None)
            q.main.pop(block, None)

    def victim(self, tier: TierName, now: float,
               evictable: Evictable | None = None) -> tuple[BlockId, Action] | None:
        block = self._next_victim(self._q[tier], evictable)
        return None if block is None else (block, self.default_action(tier))

    def _next_victim(self, q: _Queues, evictable: Evictable | None) -> BlockId | None:
        """The block to evict (moving blocks between the queues on the way), or None."""
        small, main, freq = q.small, q.main, q.freq
        target = max(1, int(len(freq) * self.small_ratio))
        budget = 4 * len(freq) + 8  # bounds the loop when blocks are not evictable
        while budget > 0 and (small or main):
            budget -= 1
            if small and (len(small) >= target or not main):
                block = next(iter(small))
                if freq[block] >= self.move_threshold:
                    del small[block]
                    main[block] = None
                    freq[block] = 0
                    continue
                if evictable is not None and not evictable(block):
                    small.move_to_end(block)
                    continue
                q.ghost[block] = None
                while len(q.ghost) > max(len(main), 1):
                    q.ghost.popitem(last=False)
                return block
            block = next(iter(main))
            f = freq[block]
            if f > 0:
                freq[block] = f - 1
                main.move_to_end(block)
                continue
            if evictable is not None and not evictable(block):
                main.move_to_end(block)
                continue
            return block
        return None
