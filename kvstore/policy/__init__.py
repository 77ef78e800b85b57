"""Placement policies (pure code; see base.py for the interface)."""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.errors import InvalidConfig
from kvstore.policy.base import Action, Evictable, Policy
from kvstore.policy.lru import LRUPolicy
from kvstore.types import TierName

POLICIES: dict[str, type[Policy]] = {
    LRUPolicy.name: LRUPolicy,
}


def make_policy(name: str, tiers: Sequence[TierName]) -> Policy:
    """The policy called ``name`` (config ``policy.name``) for these tiers."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise InvalidConfig(
            f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}"
        ) from None
    return cls(tiers)


__all__ = ["POLICIES", "Action", "Evictable", "LRUPolicy", "Policy", "make_policy"]
