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


def test_lab_reads_the_servers_environment_too(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay review: the lab ignored KVSTORE_CONFIG and KVSTORE_POLICY_SESSION_*,
    and so replayed another policy than a server started in the same environment."""
    from bench.replay import lab
    from kvstore.errors import InvalidConfig

    toml = tmp_path / "kvstore.toml"
    toml.write_text("[policy.session]\nplacing_scale = 1.0\n")
    monkeypatch.setenv("KVSTORE_CONFIG", str(toml))
    assert lab.session_config().placing_scale == 1.0
    monkeypatch.setenv("KVSTORE_POLICY_SESSION_PLACING_SCALE", "1.3")
    assert lab.session_config().placing_scale == kvconfig.load().policy.session.placing_scale \
        == 1.3
    monkeypatch.setenv("KVSTORE_POLICY_SESSION_PLACING_SCAEL", "1.1")
    with pytest.raises(InvalidConfig, match="PLACING_SCAEL"):
        lab.session_config()


def _session_file(path: Path, doc: object) -> Path:
    import gzip
    import json

    with gzip.open(path, "wt") as f:
        json.dump(doc, f)
    return path


def _doc(sid: object, agent: str = "a") -> dict[str, object]:
    sub = {"type": "subagent", "t": 2.0, "agent_id": agent,
           "requests": [{"t": 0.0, "hash_ids": [7, 8]}]}
    return {"id": sid, "block_size": 64, "hash_id_scope": "local",
            "requests": [{"t": 0.0, "hash_ids": [1, 2], "stop": "tool_use"}, sub, dict(sub),
                         {"t": 5.0, "hash_ids": [1, 2, 3]}]}


def test_sessions_with_null_or_repeated_ids_stay_apart(tmp_path: Path) -> None:
    """A null id read as the stream "None" (every such session one stream, the
    policy then LRU), and two sub-agents with one agent_id shared a stream."""
    from bench.replay.workloads import TraceError

    files = [_session_file(tmp_path / f"trace_{i}.json.gz", _doc(None)) for i in range(2)]
    streams = [{q.stream for q in s.reqs} for s in load_sessions(files)]
    assert streams[0].isdisjoint(streams[1])
    assert len(streams[0]) == 3  # the main stream and two sub-agents
    same = [_session_file(tmp_path / f"dup_{i}.json.gz", _doc("one")) for i in range(2)]
    with pytest.raises(TraceError, match="same session id 'one'"):
        load_sessions(same)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a readable session file"),
    (b"not gzip", "not a readable session file"),
    ({"id": "x", "requests": [{"hash_ids": [1]}]}, "field 't' missing"),
    ({"id": "x", "requests": "no"}, "a list 'requests'"),
    ({"id": "x", "hash_id_scope": "global", "requests": []}, "hash_id_scope 'global'"),
    ({"id": "x", "requests": [{"t": 0}]}, "no request has hash_ids"),
])
def test_a_bad_session_file_is_named_with_what_is_wrong(tmp_path: Path, content: object,
                                                         message: str) -> None:
    from bench.replay.workloads import TraceError

    path = tmp_path / "trace_bad.json.gz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _session_file(path, content)
    with pytest.raises(TraceError, match=message) as caught:
        load_sessions([path])
    assert str(path) in str(caught.value)


def test_plain_json_session_files_are_read(tmp_path: Path) -> None:
    """kv-cache-tester ships traces/trace_*.json uncompressed: they were skipped."""
    import json

    (tmp_path / "trace_plain.json").write_text(json.dumps(_doc("p")))
    _session_file(tmp_path / "trace_gz.json.gz", _doc("g"))
    files = agent_files(tmp_path)
    assert [f.name for f in files] == ["trace_gz.json.gz", "trace_plain.json"]
    assert [s.name for s in load_sessions(files)] == ["g", "p"]
