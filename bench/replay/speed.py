"""Simulator speed on a fixed slice: block references per second per policy.

    .venv/bin/python -m bench.replay.speed --rounds 5 --policies lru,session

The slice (docs/replay-results.md, "Simulator speed"): the first 30 sessions of half b at
K=16, capacity 5% of the unique blocks, engine hints (3.32 M references, ~50% hits for
the session policy: miss-heavy, the slow case). The policies run one after the other,
``--rounds`` times, in one process on one loaded workload, so that a policy's figures
can be compared with LRU's from the same moment; the medians (wall clock, as the lab
reports them, and process CPU time, less sensitive to other load) are printed with every
run's figure and the hit count (identical across rounds: the runs are deterministic).

Before/after: ``--before DIR`` adds ``lru@before`` and ``session@before`` rows, run with
``DIR/sim.py`` and ``DIR/session.py`` (e.g. the versions before the speed work, commit
d4238a0)::

    mkdir -p /tmp/before
    git show d4238a0:bench/replay/sim.py > /tmp/before/sim.py
    git show d4238a0:kvstore/policy/session.py > /tmp/before/session.py
    .venv/bin/python -m bench.replay.speed --rounds 5 --before /tmp/before

Since the session policy became a package (commit after 41b62fd), ``--before`` takes
``kvstore/policy/session.py`` and ``bench/replay/sim.py`` of 41b62fd (or earlier): the old
single-module policy still loads on its own.

(``defer_shared``, which once reproduced that version's order of shared blocks, is
retired: see docs/policy.md, issue 16.)

``--before-tree DIR`` compares with an earlier checkout of the whole package instead
(e.g. ``git archive 1a2d51d kvstore bench | tar -x -C DIR``, plus the built
``kvstore/_native*.so`` and ``kvstore/v1/``): every round first runs this script, in a
child process, on that tree's modules (same workload, same policies, named ``NAME@tree``),
then here, so that both see the same load::

    .venv/bin/python -m bench.replay.speed --all-sessions --k 32 --pct 2 --rounds 3 \\
        --policies session --before-tree /tmp/before

``--config FILE`` runs it with the
``[policy.session]`` options of a server config file (as the lab does).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.replay import sim
from bench.replay.cv import FOLDS, cv_files, load_folds
from bench.replay.lab import session_config
from bench.replay.workloads import agent_files, agent_workload, load_sessions, split_half
from kvstore.policy import POLICIES, SessionPolicy
from kvstore.types import TierName


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay.speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="lru,session",
                    help="comma-separated, the first is the reference (belady allowed)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--half", default="b")
    ap.add_argument("--sessions", type=int, default=30)
    ap.add_argument("--k", type=float, default=16.0)
    ap.add_argument("--pct", type=float, default=5.0)
    ap.add_argument("--hints", default="engine")
    ap.add_argument("--all-sessions", action="store_true",
                    help="all 274 shared sessions (dev and dev-extra, the held-out fold "
                         "included: run it with the final evaluation) instead of --half "
                         "and --sessions")
    ap.add_argument("--config", default="",
                    help="the server's TOML config file: its [policy.session] options")
    ap.add_argument("--session-args", default="",
                    help='session policy options (JSON, override --config), e.g. '
                         '\'{"duel": false}\'')
    ap.add_argument("--before", default="",
                    help="a folder with an earlier sim.py and session.py to compare with")
    ap.add_argument("--before-tree", default="",
                    help="an earlier checkout's root (its kvstore/ and bench/, e.g. a git "
                         "archive): each round also runs this script's --policies there, "
                         "in a child process on the same workload, as NAME@tree")
    args = ap.parse_args(argv)
    if args.all_sessions:
        files = cv_files()
        sessions = load_folds(tuple(range(FOLDS)))  # (parsed once, cached by cv.py)
        w = agent_workload(sessions, args.k, 1, args.hints, name="agent-274")
    else:
        files = split_half(agent_files(), args.half)[:args.sessions]
        if not files:
            ap.error(f"no agent sessions for half {args.half!r} (are the shared traces there? "
                     "KVSTORE_TRACES, else shared/traces beside the checkout)")
        w = agent_workload(load_sessions(files), args.k, 1, args.hints,
                           name=f"agent-{args.half}")
    cap = max(1, int(w.n_unique * args.pct / 100))
    names = args.policies.split(",")
    # name -> (simulate function, policy class)
    runs: dict[str, tuple[Any, Any]] = {p: (sim.simulate, POLICIES.get(p)) for p in names}
    if (args.config or args.session_args) and "session" in runs:
        cfg = session_config(args.config, args.session_args)
        runs["session"] = (sim.simulate, functools.partial(SessionPolicy, config=cfg))
    if args.before:
        old_sim = _load(Path(args.before) / "sim.py", "_before_sim")
        old_ses = _load(Path(args.before) / "session.py", "_before_session")
        runs["lru@before"] = (old_sim.simulate, POLICIES["lru"])
        runs["session@before"] = (old_sim.simulate, old_ses.SessionPolicy)
        names += ["lru@before", "session@before"]
    print(f"{w.name}: {len(files)} sessions, {w.n_refs:,} refs, {w.n_unique:,} unique, "
          f"capacity {cap:,} ({args.pct:g}%)", flush=True)
    wall: dict[str, list[float]] = {p: [] for p in names}
    cpu: dict[str, list[float]] = {p: [] for p in names}
    hits: dict[str, set[int]] = {p: set() for p in names}
    nxt = sim.next_uses(w) if "belady" in names else None
    tree: dict[str, list[tuple[float, float, int]]] = {}
    for _ in range(args.rounds):
        if args.before_tree:  # (alternating with this tree's runs: the same load)
            for name, run in _run_tree(args.before_tree, argv).items():
                tree.setdefault(f"{name}@tree", []).append(run)
        for name in names:
            c0 = time.process_time()
            if name == "belady":
                r = sim.belady(w, cap, nxt)
            else:
                simulate, cls = runs[name]
                r = simulate(w, cls([TierName.L1]), cap)
            c = time.process_time() - c0
            wall[name].append(r.refs / r.seconds / 1e6)
            cpu[name].append(r.refs / c / 1e6 if c > 0 else 0.0)
            hits[name].add(r.hits)
    for name, runs in tree.items():
        names.append(name)
        wall[name] = [r[0] for r in runs]
        cpu[name] = [r[1] for r in runs]
        hits[name] = {r[2] for r in runs}
    base = statistics.median(wall[names[0]])
    for name in names:
        mw = statistics.median(wall[name])
        print(f"{name:>14}: {mw:.2f}M refs/s (median wall, {mw / base:.2f}x {names[0]}), "
              f"{statistics.median(cpu[name]):.2f}M (median CPU); runs "
              f"{', '.join(f'{x:.2f}' for x in wall[name])}; hits {sorted(hits[name])}")
    return 0


def _run_tree(root: str, argv: list[str] | None) -> dict[str, tuple[float, float, int]]:
    """One round of this script's policies run from an earlier checkout ``root``:
    name -> (wall M refs/s, CPU M refs/s, hits), read from its output."""
    args = list(sys.argv[1:] if argv is None else argv)
    i = args.index("--before-tree")
    del args[i:i + 2]
    env = dict(os.environ, PYTHONPATH=str(Path(root).resolve()))
    out = subprocess.run([sys.executable, __file__, *args, "--rounds", "1"], cwd=root, env=env,
                         check=True, capture_output=True, text=True).stdout
    runs = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+): ([\d.]+)M refs/s .*?, ([\d.]+)M \(median CPU\).*hits \[(\d+)\]",
                     line)
        if m:
            runs[m[1]] = (float(m[2]), float(m[3]), int(m[4]))
    return runs


if __name__ == "__main__":
    sys.exit(main())
