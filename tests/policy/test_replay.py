"""Belady bound and the simulator on hand-made and (a tiny slice of) real traces."""

from __future__ import annotations

import random
from array import array

import pytest

from bench.replay import sim
from bench.replay.workloads import (
    AGENT_DIR,
    MOONCAKE_DIR,
    REQ,
    Workload,
    _count,
    agent_files,
    agent_workload,
    load_mooncake,
    load_sessions,
)
from kvstore.policy import POLICIES
from kvstore.types import TierName


def workload(reqs: list[list[int]]) -> Workload:
    ev = [(float(i), REQ, "s", array("q", r)) for i, r in enumerate(reqs)]
    return _count(Workload("hand", 1, ev))  # type: ignore[arg-type]


def test_belady_hand_worked() -> None:
    # cap 2, refs A B C A B: MIN keeps A and B -> hits on A and B at the end
    w = workload([[1, 2, 3, 1, 2]])
    assert sim.belady(w, 2).hits == 2
    assert sim.simulate(w, POLICIES["lru"]([TierName.L1]), 2).hits == 0


@pytest.mark.parametrize("seed", range(8))
def test_belady_never_worse(seed: int) -> None:
    rng = random.Random(seed)
    reqs = [[rng.randrange(12) for _ in range(rng.randrange(1, 6))] for _ in range(60)]
    w = workload(reqs)
    for cap in (1, 3, 6):
        bound = sim.belady(w, cap).hits
        for name, cls in POLICIES.items():
            r = sim.simulate(w, cls([TierName.L1]), cap)
            assert r.hits <= bound, (name, cap)
            assert r.refs == w.n_refs


@pytest.mark.skipif(not AGENT_DIR.is_dir(), reason=f"agent traces absent at {AGENT_DIR}")
def test_agent_smoke() -> None:
    sessions = load_sessions(agent_files()[:3], max_requests=25)
    for hints in ("engine", "session_end", "none", "wrong"):
        w = agent_workload(sessions, 1, seed=3, hints=hints)
        cap = max(1, w.n_unique // 3)
        bel = sim.belady(w, cap).hits / w.n_refs
        for name in ("lru", "session"):
            r = sim.simulate(w, POLICIES[name]([TierName.L1]), cap)
            hit = r.hits / r.refs
            assert 0.2 < hit <= bel < 1.0, (name, hints, hit, bel)


@pytest.mark.skipif(not MOONCAKE_DIR.is_dir(), reason=f"mooncake traces absent at {MOONCAKE_DIR}")
def test_mooncake_smoke() -> None:
    w = load_mooncake("conversation", limit=400)
    cap = w.n_unique // 4
    lru = sim.simulate(w, POLICIES["lru"]([TierName.L1]), cap).hits / w.n_refs
    ses = sim.simulate(w, POLICIES["session"]([TierName.L1]), cap).hits / w.n_refs
    bel = sim.belady(w, cap).hits / w.n_refs
    assert 0.0 < lru <= bel < 1.0
    assert abs(ses - lru) < 0.01  # no sessions: the session policy is LRU


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_on_hits_is_on_hit_per_block(name: str) -> None:
    """The batched hit path (used by the simulator) changes nothing but speed."""
    from kvstore.policy.base import Policy

    rng = random.Random(7)
    reqs = [[rng.randrange(40) for _ in range(rng.randrange(1, 12))] for _ in range(300)]
    ev = [(float(i), REQ, f"s{i % 3}", r) for i, r in enumerate(reqs)]
    w = _count(Workload("hand", 1, ev))  # type: ignore[arg-type]

    class PerBlock(POLICIES[name]):  # type: ignore[misc, valid-type]
        on_hits = Policy.on_hits

    for cap in (5, 17):
        fast = sim.simulate(w, POLICIES[name]([TierName.L1]), cap)
        slow = sim.simulate(w, PerBlock([TierName.L1]), cap)
        assert (fast.hits, fast.inserts) == (slow.hits, slow.inserts), (name, cap)


def test_request_order_is_lookup_get_put() -> None:
    # cap 2: request [1, 2, 3] after [1, 2]: 1 and 2 are hits (read before any insert),
    # then 3 evicts one of them; block-by-block interleaving would have hit both as well,
    # but [3, 1, 2] shows the difference: 3 is Put after the Get of 1 and 2
    w = workload([[1, 2], [3, 1, 2]])
    assert sim.simulate(w, POLICIES["lru"]([TierName.L1]), 2).hits == 2
