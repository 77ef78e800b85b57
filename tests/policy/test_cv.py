"""The cross-validation harness (bench/replay/cv.py) and the hints an engine really has."""

from __future__ import annotations

import random
from array import array

import pytest

from bench.replay import cv
from bench.replay.workloads import (
    AGENT_DIR,
    HINT,
    SYNTHETIC_TOOLS,
    Session,
    _Req,
    agent_workload,
    engine_ends,
    load_sessions,
)
from kvstore.types import SessionEnd, TurnEnd, TurnEndReason


def test_folds_are_fixed_by_file_name() -> None:
    # the fold of a file is a function of its base name alone, the same in any directory
    assert cv.fold_of("trace_0001.json.gz") == cv.fold_of("/elsewhere/trace_0001.json.gz")
    assert [cv.fold_of(f"trace_{i:04d}.json.gz") for i in range(1, 9)] == \
        [cv.fold_of(f"trace_{i:04d}.json.gz") for i in range(1, 9)]
    assert {cv.fold_of(f"trace_{i:04d}.json.gz") for i in range(200)} == set(range(5))


@pytest.mark.skipif(not AGENT_DIR.is_dir(), reason=f"agent traces absent at {AGENT_DIR}")
def test_fold_sizes_on_the_shared_sessions() -> None:
    sizes = [0] * cv.FOLDS
    for p in cv.cv_files():
        sizes[cv.fold_of(p.name)] += 1
    assert sizes == [48, 66, 54, 57, 49]


def test_held_out_fold_needs_final() -> None:
    assert cv.folds_in_play([0, 1, 2, 3], final=False) == (0, 1, 2, 3)
    assert cv.folds_in_play([0, 1, 2, 3], final=True) == (0, 1, 2, 3, 4)
    with pytest.raises(SystemExit, match="held out"):
        cv.folds_in_play([0, 1, 2, 3, 4], final=False)
    with pytest.raises(SystemExit, match="held out"):
        cv.main(["--folds", "4"])  # refused before anything is loaded or replayed


def test_capacities_are_those_where_lru_is_in_range() -> None:
    lru = {0.25: 0.31, 0.5: 0.42, 1.0: 0.61, 2.0: 0.79, 3.0: 0.84, 5.0: 0.91}
    assert cv.pick_capacities(lru, 2) == [0.5, 3.0]  # lowest and highest in [40, 85] %
    assert cv.pick_capacities(lru, 3) == [0.5, 2.0, 3.0]
    assert cv.pick_capacities(lru, 5) == [0.5, 1.0, 2.0, 3.0]
    assert cv.pick_capacities({1.0: 0.2, 2.0: 0.9}, 2) == []


def _result(rates: dict[str, float], n: int = 1000) -> dict[str, object]:
    by = {f: [n, round(r * n)] for f, r in rates.items()}
    return {"refs": n * len(rates), "hits": sum(h for _, h in by.values()), "by_fold": by}


def test_cells_keep_only_folds_where_lru_is_in_range() -> None:
    base = {(16, 1, 1.0, "lru"): _result({"0": 0.50, "1": 0.90}),
            (16, 1, 1.0, "belady"): _result({"0": 0.70, "1": 0.95}),
            (16, 1, 1.0, "s3fifo"): _result({"0": 0.55, "1": 0.91})}
    cand = {(16, 1, 1.0): _result({"0": 0.60, "1": 0.93})}
    cells = cv.cells_for(base, cand, {(16, 1): [1.0]})
    # fold 1's LRU (90 %) is out of range; the whole replay's (70 %) is in
    assert [c["fold"] for c in cells] == [0, "all"]
    c = cells[0]
    assert c["gap_closed"] == pytest.approx(0.5)
    assert c["ahead_of_best"] and c["best_baseline"] == "s3fifo"
    s = cv.summarise(cells)
    assert s["per_K"]["16"]["worst"] == pytest.approx(0.5) and s["cells"] == 1


def _session(reqs: list[tuple[float, str, str, float, bool]]) -> Session:
    rs = [_Req(t, st, array("q", [i]), stop, api, sub)
          for i, (t, st, stop, api, sub) in enumerate(reqs)]
    ends: dict[str, float] = {}
    for q in rs:
        ends[q.stream] = max(ends.get(q.stream, 0.0), q.t + q.api_time)
    return Session(0, "s", max(ends.values(), default=0.0), rs, ends, "trace_9999.json.gz")


def test_engine_ends_hand_worked() -> None:
    s = _session([(0.0, "s", "tool_use", 1.0, False),
                  (5.0, "s/a1", "tool_use", 2.0, True),
                  (10.0, "s/a1", "end_turn", 3.0, True),  # the sub-agent is done at 13
                  (20.0, "s", "end_turn", 1.0, False),  # the user goes away at 21 ...
                  (2000.0, "s", "end_turn", 1.0, False)])  # ... and is back at 2000
    assert engine_ends(s, 900.0) == [(13.0, "s/a1"), (921.0, "s"), (2901.0, "s")]
    # a shorter pause than the timeout ends nothing but the sub-agent
    assert engine_ends(s, 2000.0) == [(13.0, "s/a1"), (4001.0, "s")]


def _random_session(rng: random.Random) -> Session:
    reqs = []
    t = 0.0
    for i in range(40):
        t += rng.choice([0.5, 3.0, 30.0, 200.0, 700.0, 1500.0])
        sub = rng.random() < 0.3
        stop = "end_turn" if rng.random() < 0.3 else "tool_use"
        reqs.append((t, f"s/a{i % 3}" if sub else "s", stop, rng.uniform(0.1, 40.0), sub))
    return _session(reqs)


@pytest.mark.parametrize("seed", range(6))
def test_engine_ends_use_no_future_information(seed: int) -> None:
    # what the engine has sent by time T depends only on the requests up to T: the ends
    # computed from the trace cut at T are the same, up to T, as those from the whole trace
    rng = random.Random(seed)
    s = _random_session(rng)
    for idle in (60.0, 300.0, 900.0):
        whole = engine_ends(s, idle)
        for cut in [q.t for q in s.reqs] + [rng.uniform(0, 20000) for _ in range(20)]:
            prefix = _session([(q.t, q.stream, q.stop, q.api_time, q.sub)
                               for q in s.reqs if q.t <= cut])
            assert [e for e in engine_ends(prefix, idle) if e[0] <= cut] == \
                [e for e in whole if e[0] <= cut], (idle, cut)
        # and an idle end comes only after that long without any request of the session
        for t, stream in whole:
            if any(q.stream == stream and q.sub and q.stop == "end_turn"
                   and q.t + q.api_time == t for q in s.reqs):
                continue  # a finished sub-agent
            assert not any(t - idle < q.t <= t for q in s.reqs)
            assert max(q.t + q.api_time for q in s.reqs if q.t <= t) == pytest.approx(t - idle)


def test_hint_variants_in_the_workload() -> None:
    sessions = [_random_session(random.Random(i)) for i in range(3)]
    for i, s in enumerate(sessions):
        s.index, s.file = i, f"trace_{9000 + i}.json.gz"
        for q in s.reqs:
            q.blocks = array("q", [(i << 20) | b for b in q.blocks])
    ends = agent_workload(sessions, 1, seed=2, hints="ends", idle_end_s=300.0)
    n_ends = sum(1 for e in ends.events if e[1] == HINT and isinstance(e[3].event, SessionEnd))
    assert n_ends == sum(len(engine_ends(s, 300.0)) for s in sessions)
    tools = agent_workload(sessions, 1, seed=2, hints="tools")
    names = {n for _, n in SYNTHETIC_TOOLS}
    for _, kind, _, ev in tools.events:
        if kind == HINT:
            te = ev.event
            assert isinstance(te, TurnEnd)
            assert (te.tool_name in names) == (te.reason == TurnEndReason.TOOL_CALL)
    with pytest.raises(ValueError, match="hints"):
        agent_workload(sessions, 1, hints="bogus")


@pytest.mark.skipif(not AGENT_DIR.is_dir(), reason=f"agent traces absent at {AGENT_DIR}")
def test_every_sub_agent_of_the_traces_ends_once_with_its_last_turn() -> None:
    # the rule an engine uses (a sub-agent's end_turn = finished) is exact on these traces
    for s in load_sessions(cv.cv_files()[:60]):
        subs = {q.stream for q in s.reqs if q.sub}
        sub_ends = [(t, st) for t, st in engine_ends(s, 1e12) if st in subs]
        assert sorted(st for _, st in sub_ends) == sorted(subs)
        assert all(t == s.stream_end[st] for t, st in sub_ends)


@pytest.mark.parametrize("start", [(0, 0), (2, 2), (1, 5), (8, 8), (4, 3), (2, 6)])
def test_ladder_walk_finds_the_same_ends_as_the_whole_ladder(
        start: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    # LRU's hit rate per rung (grows with the capacity); in range: rungs 2..6
    rates = dict(zip(cv.LADDER, [0.2, 0.35, 0.41, 0.5, 0.6, 0.7, 0.84, 0.9, 0.95], strict=True))
    replayed: list[float] = []

    def fake_replay(spec: object, policy: str, pct: float) -> dict[str, object]:
        replayed.append(pct)
        return {"refs": 100, "hits": round(rates[pct] * 100), "seconds": 1.0}

    monkeypatch.setattr(cv, "replay", fake_replay)
    monkeypatch.setattr(cv, "store", lambda spec, policy, pct, d:
                        cv.RESULTS.__setitem__(cv.key(spec, policy, pct), d))
    monkeypatch.setattr(cv, "RESULTS", {})
    spec = ((0,), 16, 1, "none", 0.0)
    cv._ladder_task((spec, start))
    seen = {pct: rates[pct] for pct in replayed}
    assert cv.pick_capacities(seen, 2) == cv.pick_capacities(rates, 2) == [1.0, 6.0]
    assert len(replayed) == len(set(replayed))  # none twice
    if start == (2, 6):  # started at the ends: each end and its neighbour outside, no more
        assert sorted(replayed) == [0.5, 1.0, 6.0, 8.0]


def test_a_cached_result_is_only_reused_for_the_same_sessions(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay of other sessions (an outside review's) with the same cache
    printed the earlier sessions' figures: the trace set is in the key."""
    from pathlib import Path

    def traces(name: str, sizes: list[int]) -> Path:
        d = Path(str(tmp_path)) / name
        d.mkdir()
        for i, n in enumerate(sizes):
            (d / f"trace_{i:04}.json.gz").write_bytes(b"x" * n)
        return d

    spec = ((0,), 16, 1, "engine", 0.0)
    keys = []
    for name, sizes in (("a", [10, 20]), ("b", [10, 21]), ("c", [10, 20, 30])):
        monkeypatch.setattr(cv, "AGENT_DIR", traces(name, sizes))
        monkeypatch.setattr(cv, "AGENT_EXTRA_DIR", Path(str(tmp_path)) / "none")
        cv.trace_set_id.cache_clear()
        keys.append(cv.key(spec, "lru", 1.0))
    cv.trace_set_id.cache_clear()
    assert len(set(keys)) == 3


def test_hash_ids_of_any_size_never_name_another_sessions_blocks(tmp_path: object) -> None:
    """Blocks are (file, hash id). Ids of 2^20 and more fell into the next
    file's range (renaming one session's ids invented hits across sessions)
    and ids of 2^63 crashed the loader."""
    import gzip
    import json
    from pathlib import Path

    def write(name: str, ids: list[list[int]]) -> Path:
        p = Path(str(tmp_path)) / name
        reqs = [{"t": float(i), "hash_ids": h, "type": "request"} for i, h in enumerate(ids)]
        with gzip.open(p, "wt") as f:
            json.dump({"id": name, "requests": reqs}, f)
        return p

    small = [[1, 2, 3], [1, 2, 3, 4]]
    shifted = [[h + (1 << 20) for h in r] for r in small]
    huge = [[(1 << 63) + h for h in r] for r in small]
    sessions = load_sessions([write("a.json.gz", small), write("b.json.gz", shifted),
                              write("c.json.gz", huge)])
    per_file = [{b for q in s.reqs for b in q.blocks} for s in sessions]
    assert [len(blocks) for blocks in per_file] == [4, 4, 4]
    assert not (per_file[0] & per_file[1]) and not (per_file[1] & per_file[2])
    assert not (per_file[0] & per_file[2])
    # Within a file, the same id is the same block, whatever its size.
    for s in sessions:
        assert list(s.reqs[0].blocks) == list(s.reqs[1].blocks)[:3]
