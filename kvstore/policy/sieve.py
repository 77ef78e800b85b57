"""SIEVE (Zhang et al., NSDI'24): one FIFO queue, a visited bit per block and a moving hand.

Blocks are inserted at the head (newest). A hit only sets the visited bit. To evict, the
hand walks from where it stopped towards newer blocks (wrapping from the head back to the
tail, the oldest): a visited block has its bit cleared and is passed over; the first
unvisited one is the victim. Survivors are never moved, so hits cost one dict store.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.policy.base import Action, Evictable, Policy
from kvstore.types import BlockId, TierName


class _Sieve:
    __slots__ = ("hand", "head", "newer", "older", "tail", "visited")

    def __init__(self) -> None:
        self.visited: dict[BlockId, bool] = {}
        self.newer: dict[BlockId, BlockId | None] = {}
        self.older: dict[BlockId, BlockId | None] = {}
        self.head: BlockId | None = None  # newest
        self.tail: BlockId | None = None  # oldest
        self.hand: BlockId | None = None


class SievePolicy(Policy):
    name = "sieve"

    def __init__(self, tiers: Sequence[TierName]) -> None:
        super().__init__(tiers)
        self._s = {t: _Sieve() for t in tiers}

    def on_insert(self, tier: TierName, block: BlockId, size: int, now: float,
                  session: str | None = None) -> None:
        s = self._s[tier]
        if block in s.visited:
            return
        s.visited[block] = False
        head = s.head
        s.older[block] = head
        s.newer[block] = None
        if head is None:
            s.tail = block
        else:
            s.newer[head] = block
        s.head = block

    def on_hit(self, tier: TierName, block: BlockId, now: float,
               session: str | None = None) -> None:
        visited = self._s[tier].visited
        if block in visited:
            visited[block] = True

    def on_hits(self, tier: TierName, blocks: Sequence[BlockId], now: float,
                session: str | None = None) -> None:
        visited = self._s[tier].visited
        for block in blocks:
            if block in visited:
                visited[block] = True

    def on_remove(self, tier: TierName, block: BlockId) -> None:
        s = self._s[tier]
        if s.visited.pop(block, None) is None:
            return
        older = s.older.pop(block)
        newer = s.newer.pop(block)
        if older is None:
            s.tail = newer
        else:
            s.newer[older] = newer
        if newer is None:
            s.head = older
        else:
            s.older[newer] = older
        if s.hand == block:
            s.hand = newer

    def victim(self, tier: TierName, now: float,
               evictable: Evictable | None = None) -> tuple[BlockId, Action] | None:
        s = self._s[tier]
        visited, newer = s.visited, s.newer
        h = s.hand if s.hand is not None else s.tail
        budget = 2 * len(visited) + 2
        while h is not None and budget > 0:
            budget -= 1
            if visited[h]:
                visited[h] = False
            elif evictable is None or evictable(h):
                s.hand = h
                return h, self.default_action(tier)
            h = newer[h]
            if h is None:
                h = s.tail
        return None
