"""Live replay against a real server: hit rate within 1 point of the simulator's."""

from __future__ import annotations

import pytest

from bench.replay.workloads import AGENT_DIR

pytestmark = pytest.mark.skipif(not AGENT_DIR.is_dir(),
                                reason=f"agent traces absent at {AGENT_DIR}")


@pytest.fixture(scope="module")
def live() -> object:
    from bench.replay import live as live_mod

    if not live_mod.server_has_client_clock():
        pytest.skip("kvstore serve has no --policy-clock yet (server-side client clock "
                    "missing): the live replay cannot drive the policy with trace time")
    return live_mod


@pytest.mark.parametrize("policy", ["session", "lru"])
def test_live_matches_simulator(live: object, policy: str) -> None:
    from bench.replay.live import compare, slice_workload

    w = slice_workload(sessions=6, refs=800, hints="engine", max_requests=40)
    assert w.n_refs >= 500
    for pct in (5, 25):
        cap = max(2, w.n_unique * pct // 100)
        d = compare(policy, w, cap)
        assert d["live"]["refs"] == d["refs"]
        assert abs(d["diff_points"]) <= 1.0, d
        # the server counted the same L1 hits the client saw
        assert d["live"]["server_l1_hits"] == d["live"]["hits"], d
