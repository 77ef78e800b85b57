"""Storage tiers: mechanism only. Placement decisions live in kvstore.policy."""

from kvstore.tiers.base import BlockMeta, Tier, TierUsage

__all__ = ["BlockMeta", "Tier", "TierUsage"]
