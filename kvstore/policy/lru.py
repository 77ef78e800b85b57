"""Least recently used: the baseline every other policy is measured against."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvstore.policy.base import Action, Evictable, Policy
from kvstore.types import BlockId, TierName


class LRUPolicy(Policy):
    name = "lru"

    def __init__(self, tiers: Sequence[TierName]) -> None:
        super().__init__(tiers)
        # Per tier: blocks from least to most recently used.
        self._order: dict[TierName, OrderedDict[BlockId, None]] = {t: OrderedDict() for t in tiers}

    def on_insert(self, tier: TierName, block: BlockId, size: int, now: float,
                  session: str | None = None) -> None:
        order = self._order[tier]
        order[block] = None
        order.move_to_end(block)

    def on_hit(self, tier: TierName, block: BlockId, now: float,
               session: str | None = None) -> None:
        order = self._order[tier]
        if block in order:
            order.move_to_end(block)

    def on_hits(self, tier: TierName, blocks: Sequence[BlockId], now: float,
                session: str | None = None) -> None:
        order = self._order[tier]
        mte = order.move_to_end
        for block in blocks:
            if block in order:
                mte(block)

    def on_remove(self, tier: TierName, block: BlockId) -> None:
        self._order[tier].pop(block, None)

    def victim(self, tier: TierName, now: float,
               evictable: Evictable | None = None) -> tuple[BlockId, Action] | None:
        action = self.default_action(tier)
        for block in self._order[tier]:
            if evictable is None or evictable(block):
                return block, action
        return None
