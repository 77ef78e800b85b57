"""Belady bound and the simulator on hand-made and (a tiny slice of) real traces."""

from __future__ import annotations

import random
from array import array
from pathlib import Path

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
from kvstore import config as kvconfig
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


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_fill_is_victim_remove_insert_per_block(name: str) -> None:
    """The Put phase as one ``fill`` call (the session policy inlines it) decides exactly
    as the per-block victim -> on_remove -> on_insert sequence of ``Policy.fill``."""
    from kvstore.policy.base import Policy

    rng = random.Random(11)
    reqs = [[rng.randrange(60) for _ in range(rng.randrange(1, 15))] for _ in range(400)]
    ev = [(float(i), REQ, f"s{i % 4}", r) for i, r in enumerate(reqs)]
    w = _count(Workload("hand", 1, ev))  # type: ignore[arg-type]

    class PerBlock(POLICIES[name]):  # type: ignore[misc, valid-type]
        fill = Policy.fill

    for cap in (3, 9, 30):
        fast = sim.simulate(w, POLICIES[name]([TierName.L1]), cap)
        slow = sim.simulate(w, PerBlock([TierName.L1]), cap)
        assert (fast.hits, fast.inserts) == (slow.hits, slow.inserts), (name, cap)


def test_lab_session_options_are_the_servers(tmp_path: Path) -> None:
    """The lab's session policy reads the server's [policy.session] table, and
    --session-args overrides it option by option, parsed as the server parses them."""
    from bench.replay import lab
    from kvstore.config import SessionPolicyConfig
    from kvstore.errors import InvalidConfig

    toml = tmp_path / "kvstore.toml"
    toml.write_text('[policy]\nname = "session"\n\n[policy.session]\nhorizon = 0.0\n'
                    'duel = false\n')
    cfg = lab.session_config(str(toml), '{"tool_min": "12"}')
    assert cfg == SessionPolicyConfig(horizon=0.0, duel=False, tool_min=12)
    served = kvconfig.load(env={}, file=toml).policy.session  # what the server runs
    assert lab.session_config(str(toml)) == served and not served.duel
    with pytest.raises(InvalidConfig, match="no_such_option"):
        lab.session_config("", '{"no_such_option": 1}')
    with pytest.raises(InvalidConfig, match="duel_decay"):
        lab.session_config("", '{"duel_decay": 2}')

    w = workload([[1, 2, 3], [1, 2, 4], [5, 6], [1, 2, 3, 4]])
    spec = ("mooncake", "hand-made")
    lab._cache.clear()
    lab._cache[spec] = w
    try:
        lab.SESSION_CONFIG = cfg
        d = lab.run_one((spec, "session", "session", 50))
        assert d["hits"] >= 0
        assert lab.run_one((spec, "lru", "lru", 50))["hits"] >= 0  # only the session policy
    finally:
        lab.SESSION_CONFIG = SessionPolicyConfig()
        lab._cache.clear()


@pytest.mark.skipif(not AGENT_DIR.is_dir(), reason=f"agent traces absent at {AGENT_DIR}")
def test_speed_script_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.replay import speed

    assert speed.main(["--sessions", "3", "--k", "1", "--rounds", "2", "--pct", "20",
                       "--policies", "lru,session,belady"]) == 0
    out = capsys.readouterr().out
    for name in ("lru", "session", "belady"):
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{name}:"))
        assert "refs/s" in line and line.count("hits [") == 1  # one hit count: deterministic


@pytest.mark.skipif(not AGENT_DIR.is_dir(), reason=f"agent traces absent at {AGENT_DIR}")
def test_speed_script_runs_an_earlier_tree_beside(capsys: pytest.CaptureFixture[str]) -> None:
    """--before-tree: each round also runs the policies from another checkout (here this
    one) in a child process on the same workload; its rows carry the same hit counts."""
    from pathlib import Path

    from bench.replay import speed

    root = str(Path(speed.__file__).resolve().parents[2])
    assert speed.main(["--sessions", "2", "--k", "1", "--rounds", "1", "--pct", "20",
                       "--policies", "lru", "--before-tree", root]) == 0
    rows = {x.split(":")[0].strip(): x for x in capsys.readouterr().out.splitlines()
            if "refs/s" in x}
    assert set(rows) == {"lru", "lru@tree"}
    assert rows["lru"].split("hits ")[1] == rows["lru@tree"].split("hits ")[1]
