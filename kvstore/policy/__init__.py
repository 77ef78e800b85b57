"""Placement policies (pure code; see base.py for the interface)."""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.config import PolicyConfig
from kvstore.errors import InvalidConfig
from kvstore.policy.base import Action, Evictable, Policy
from kvstore.policy.gdsf import GDSFPolicy
from kvstore.policy.lru import LRUPolicy
from kvstore.policy.s3fifo import S3FIFOPolicy
from kvstore.policy.session import SessionPolicy
from kvstore.policy.sieve import SievePolicy
from kvstore.types import TierName

POLICIES: dict[str, type[Policy]] = {
    LRUPolicy.name: LRUPolicy,
    S3FIFOPolicy.name: S3FIFOPolicy,
    SievePolicy.name: SievePolicy,
    GDSFPolicy.name: GDSFPolicy,
    SessionPolicy.name: SessionPolicy,
}


def make_policy(config: PolicyConfig | str, tiers: Sequence[TierName]) -> Policy:
    """The policy ``config`` names (``policy.name``) for these tiers, with its options
    (``[policy.session]``). A bare name means that policy with the default options."""
    if isinstance(config, str):
        config = PolicyConfig(name=config)
    try:
        cls = POLICIES[config.name]
    except KeyError:
        raise InvalidConfig(
            f"unknown policy {config.name!r}; choose one of {', '.join(sorted(POLICIES))}"
        ) from None
    if cls is SessionPolicy:
        return SessionPolicy(tiers, config.session)
    return cls(tiers)


__all__ = ["POLICIES", "Action", "Evictable", "GDSFPolicy", "LRUPolicy", "Policy",
           "S3FIFOPolicy", "SessionPolicy", "SievePolicy", "make_policy"]
