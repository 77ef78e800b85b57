"""Storage tiers: mechanism only. Placement decisions live in kvstore.policy."""

from kvstore.tiers.base import BlockArena, BlockMeta, KeyValueTier, ObjectStore, TierUsage

__all__ = ["BlockArena", "BlockMeta", "KeyValueTier", "ObjectStore", "TierUsage"]
