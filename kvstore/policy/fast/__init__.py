"""Simulator accelerators: each policy's Put phase (``Policy.fill``) with the per-block calls
inlined, making exactly the decisions of the per-block path (victim -> on_remove while
full, then on_insert), which is what the server runs. Only the trace simulator
(``bench/replay``) imports this package; the server never does, so a policy's decisions
live in the policy alone and this is purely speed (tests/policy compare the two).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from kvstore.policy.base import Policy
from kvstore.policy.fast.gdsf import gdsf_fill
from kvstore.policy.fast.s3fifo import s3fifo_fill
from kvstore.policy.fast.session import session_fill
from kvstore.policy.gdsf import GDSFPolicy
from kvstore.policy.s3fifo import S3FIFOPolicy
from kvstore.policy.session import SessionPolicy
from kvstore.types import BlockId, TierName

#: ``fill(tier, blocks, size, now, session, resident, capacity) -> inserted``
Fill = Callable[[TierName, Sequence[BlockId], int, float, str | None, set[BlockId], int], int]

_FAST: dict[type[Policy], Callable[..., int]] = {
    SessionPolicy: session_fill,
    S3FIFOPolicy: s3fifo_fill,
    GDSFPolicy: gdsf_fill,
}


def fill_for(policy: Policy) -> Fill:
    """The fastest Put phase for ``policy``: its accelerator if its class has one (exactly
    that class: a subclass may change a step), else its own ``fill``."""
    fast = _FAST.get(type(policy))
    return policy.fill if fast is None else functools.partial(fast, policy)


__all__ = ["Fill", "fill_for"]
