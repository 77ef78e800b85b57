"""Cross-validation of the session policy over the 274 shared agent sessions (issue 16).

    .venv/bin/python -m bench.replay.cv                                  # folds 0-3, defaults
    .venv/bin/python -m bench.replay.cv --config a.toml --config b.toml  # two candidates
    .venv/bin/python -m bench.replay.cv --final --tag final              # fold 4 too (once)

Protocol (fixed; docs/replay-results.md, "Cross-validation (issue 16)"):

* **Folds** by file name: ``zlib.crc32(basename) % 5`` over ``dev/`` and ``dev-extra/``
  (sizes 48/66/54/57/49). **Fold 4 is held out**: it is replayed only with ``--final``.
* **Layout**: the sessions of the folds in play (0-3, or 0-4 with ``--final``) are replayed
  together, arriving as a seeded Poisson process with K concurrent on average
  (``workloads.poisson_offsets``); hits and references are attributed to each session's fold
  (``Workload.groups``). One fold (~55 sessions) cannot average K=64 over its own arrival
  window (at most ~n/2), hence one replay for all folds, as the lab's ``all:64`` did for
  the halves. K in {16, 32, 64, 96}, arrival seeds {1, 2}.
* **Capacities** (% of the replay's unique blocks), chosen from LRU alone, before any
  session result: per (K, seed), LRU runs on the ladder ``LADDER`` around both ends of the
  range (``_ladder_task``);
  the rungs where the whole replay's LRU hit rate is in [40 %, 85 %] are kept (at most
  ``MAX_CAPS``: the lowest and the highest; with 3, the middle one of the rungs replayed).
* **Cells**: (fold, K, seed, capacity) where that fold's own LRU hit rate is in
  [40 %, 85 %]. Metric per cell: **gap closed** = (policy - LRU) / (Belady - LRU) in hit
  rate (Belady: MIN with bypass over the whole replay, its hits attributed per fold).
  A candidate is judged by its **worst** cell; the mean is reported too.

Baseline results (LRU, Belady, S3-FIFO, SIEVE, GDSF) are cached per replay in
``bench/replay/.cvcache/`` (git-ignored), so a candidate run replays only the candidate.
A candidate is a server config file (``--config FILE.toml``: its ``[policy.session]``
table, as the lab reads it; repeat for several); hint variants (``--variants``):

* ``engine``: TurnEnd with each turn's stop reason (what every engine adapter sends);
* ``ends``: engine hints plus the SessionEnds an engine knows (a sub-agent's stream ends when
  it finishes; a main session after ``--idle`` s of trace time without a request;
  ``workloads.engine_ends``); ``ends@S``: the same with an idle timeout of S seconds;
* ``oracle``: SessionEnd right after each stream's last turn (a bound, not a goal);
* ``none`` / ``wrong30``: no hints / 30 % of the engine hints wrong (robustness);
* ``tools`` / ``ends+tools``: engine hints with SYNTHETIC tool names
  (``workloads.synthetic_tool_names``): what tool names could be worth.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.replay import sim
from bench.replay.lab import session_config
from bench.replay.workloads import (
    AGENT_DIR,
    AGENT_EXTRA_DIR,
    IDLE_END_S,
    Session,
    Workload,
    agent_files,
    agent_workload,
    load_sessions,
)
from kvstore.config import SessionPolicyConfig
from kvstore.policy import POLICIES, SessionPolicy
from kvstore.types import TierName

FOLDS = 5
HELD_OUT = 4
KS = (16, 32, 64, 96)
SEEDS = (1, 2)
LADDER = (0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)
IN_RANGE = (0.40, 0.85)
MAX_CAPS = 2
BASELINES = ("lru", "belady", "s3fifo", "sieve", "gdsf")
BEST_OF = ("s3fifo", "sieve", "gdsf")
#: variant label -> hint mode of the workload
VARIANTS = {"engine": "engine", "ends": "ends", "oracle": "session_end", "none": "none",
            "wrong30": "wrong", "tools": "tools", "ends+tools": "ends+tools"}
DEFAULT_VARIANTS = "engine,ends,oracle,none,wrong30"
#: variants replayed with the first seed only (time: see docs/replay-results.md)
DEFAULT_ONE_SEED = "oracle,none,wrong30,tools,ends+tools"
#: baseline results and parsed sessions; ``KVSTORE_CV_CACHE`` may point at another
#: checkout's (the baselines do not depend on the session policy's code)
CACHE = Path(os.environ.get("KVSTORE_CV_CACHE")
             or Path(__file__).resolve().parent / ".cvcache")
#: bump when the replay of the baselines changes (invalidates the cache)
CACHE_VERSION = 1


def fold_of(name: str) -> int:
    """The fixed fold of a trace file, by its base name (e.g. ``trace_0001.json.gz``)."""
    return zlib.crc32(Path(name).name.encode()) % FOLDS


def cv_files() -> list[Path]:
    """All shared agent sessions (dev and dev-extra), by name: the order fixes each one's
    block namespace, so a replay of any subset names blocks the same way."""
    files = agent_files(AGENT_DIR) + agent_files(AGENT_EXTRA_DIR)
    return sorted(files, key=lambda p: p.name)


def replayed_files() -> list[Path]:
    """:func:`cv_files`, which a replay needs: without them it says where it looked (it
    died with an IndexError)."""
    files = cv_files()
    if not files:
        raise SystemExit(f"no agent sessions in {AGENT_DIR} nor {AGENT_EXTRA_DIR}: the replay "
                         "reads the shared traces (KVSTORE_TRACES, else shared/traces beside "
                         "the checkout)")
    return files


def folds_in_play(folds: list[int], final: bool) -> tuple[int, ...]:
    """The folds a run replays: ``folds``, plus the held-out fold only with ``final``."""
    if HELD_OUT in folds and not final:
        raise SystemExit(f"fold {HELD_OUT} is held out: it is replayed only with --final")
    chosen = set(folds) | ({HELD_OUT} if final else set())
    return tuple(sorted(chosen))


def load_folds(folds: tuple[int, ...]) -> list[Session]:
    """The sessions of ``folds`` (pickled once under CACHE: parsing 274 files takes a while)."""
    files = replayed_files()
    path = CACHE / f"sessions-{trace_set_id()}.pkl"
    if path.exists():
        with path.open("rb") as f:
            everything: list[Session] = pickle.load(f)
    else:
        everything = load_sessions(files)
        _cache_dir()
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(everything, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)
    return [s for s in everything if fold_of(s.file) in folds]


def _cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    ignore = CACHE / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return CACHE


def pick_capacities(lru_by_pct: dict[float, float], max_caps: int = MAX_CAPS) -> list[float]:
    """The rungs whose LRU hit rate is in range: at most ``max_caps`` (lowest, middle, highest)."""
    lo, hi = IN_RANGE
    ok = sorted(p for p, h in lru_by_pct.items() if lo <= h <= hi)
    if len(ok) <= max_caps:
        return ok
    if max_caps == 1:
        return [ok[len(ok) // 2]]
    inner = [ok[round(i * (len(ok) - 1) / (max_caps - 1))] for i in range(max_caps)]
    return sorted(set(inner))


# --------------------------------------------------------------------------- replays
# A "spec" names one workload: (folds, K, seed, hint mode, idle timeout). Workers build it
# once (the last one is kept) and replay one or more policies on it.

SESSIONS: list[Session] = []
PER_FOLD = 0  # > 0: only the first sessions of each fold (smoke tests, not results)
CANDIDATES: dict[str, SessionPolicyConfig] = {}
_wl: dict[tuple[Any, ...], Workload] = {}
_nxt: dict[tuple[Any, ...], Any] = {}

Spec = tuple[tuple[int, ...], int, int, str, float]


def workload(spec: Spec) -> Workload:
    w = _wl.get(spec)
    if w is None:
        _wl.clear()
        _nxt.clear()
        folds, k, seed, hints, idle = spec
        sessions = [s for s in SESSIONS if fold_of(s.file) in folds]
        w = agent_workload(sessions, k, seed, hints, name="cv",
                           group_of=lambda f: str(fold_of(f)), idle_end_s=idle)
        _wl[spec] = w
    return w


def capacity(w: Workload, pct: float) -> int:
    return max(1, int(w.n_unique * pct / 100))


def replay(spec: Spec, policy: str, pct: float) -> dict[str, Any]:
    """One replay; ``policy``: a baseline name or ``session:<candidate label>``."""
    w = workload(spec)
    cap = capacity(w, pct)
    if policy == "belady":
        if spec not in _nxt:
            _nxt[spec] = sim.next_uses(w)
        r = sim.belady(w, cap, _nxt[spec])
    elif policy.startswith("session:"):
        r = sim.simulate(w, SessionPolicy([TierName.L1], CANDIDATES[policy[8:]]), cap)
    else:
        r = sim.simulate(w, POLICIES[policy]([TierName.L1]), cap)
    groups = sorted(k[5:] for k in r.extra if k.startswith("refs:"))
    return {"refs": r.refs, "hits": r.hits, "capacity": cap, "n_unique": w.n_unique,
            "seconds": r.seconds, "window_s": w.meta.get("window_s"),
            "by_fold": {g: [int(r.extra[f"refs:{g}"]), int(r.extra[f"hits:{g}"])]
                        for g in groups}}


def _log(spec: Spec, policy: str, pct: float, d: dict[str, Any]) -> None:
    print(f"  K={spec[1]} seed={spec[2]} {spec[3]:>10} {pct:>4}% {policy:>22} "
          f"hit={d['hits'] / d['refs']:.4f} ({d['refs'] / max(d['seconds'], 1e-9) / 1e6:.2f}M "
          f"refs/s)", flush=True)


def _run_task(task: tuple[Spec, str, float]) -> None:
    """One replay, its result appended to the cache at once (a stopped run loses only the
    replays in flight)."""
    spec, policy, pct = task
    d = replay(spec, policy, pct)
    store(spec, policy, pct, d)
    _log(spec, policy, pct, d)


def _ladder_task(task: tuple[Spec, tuple[int, int]]) -> None:
    """LRU on the ladder around each end of the range (LRU's hit rate grows with the
    capacity): from ``start`` (the rungs of the lowest and the highest capacity in range
    found before, e.g. on the development folds; else 1 %), walk down while the rung is in
    range or up while it is below, and the same for the top end, so that the lowest and the
    highest in-range rungs are known with one rung either side (cached rungs are not
    replayed). ``pick_capacities`` then sees the same rungs at the ends as with the whole
    ladder."""
    spec, (lo_i, hi_i) = task
    lo, hi = IN_RANGE

    def rate(i: int) -> float:
        pct = LADDER[i]
        d = RESULTS.get(key(spec, "lru", pct))
        if d is None:
            d = replay(spec, "lru", pct)
            store(spec, "lru", pct, d)
            _log(spec, "ladder lru", pct, d)
        return float(d["hits"]) / d["refs"]

    i = lo_i  # the lowest rung in range: rate(i) >= lo > rate(i - 1)
    if rate(i) >= lo:
        while i > 0 and rate(i - 1) >= lo:
            i -= 1
    else:
        while i < len(LADDER) - 1 and rate(i) < lo:
            i += 1
    j = max(hi_i, i)  # the highest rung in range: rate(j) <= hi < rate(j + 1)
    if rate(j) <= hi:
        while j < len(LADDER) - 1 and rate(j + 1) <= hi:
            j += 1
    else:
        while j > 0 and rate(j) > hi:
            j -= 1


def ladder_start(spec: Spec) -> tuple[int, int]:
    """Where the ladder starts: the ends of the range found for the same K and seed on any
    other set of folds already replayed (from the cache), else 1 %."""
    _, k, seed, _, _ = spec
    found: dict[float, float] = {}
    for key_s, d in RESULTS.items():
        parts = key_s.split("|")
        if (len(parts) == 7 and parts[-1] == "lru" and parts[1] == f"t{trace_set_id()}"
                and parts[3] == f"K{k}" and parts[4] == f"s{seed}"):
            found[float(parts[5])] = float(d["hits"]) / d["refs"]
    ok = pick_capacities(found, 2)
    if not ok:
        one = LADDER.index(1.0)
        return one, one
    return LADDER.index(ok[0]), LADDER.index(ok[-1])


# --------------------------------------------------------------------------- result cache
# Every replay's result, one JSON line each: baselines by (folds, K, seed, capacity,
# policy); session candidates also by their options and a hash of the policy's code, so a
# cached result is reused only for the same policy.

RESULTS: dict[str, dict[str, Any]] = {}
CODE_HASH = ""


def code_hash() -> str:
    """Of the session policy's code and the simulator (what a candidate's result depends on
    besides its options and the workload)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha1()
    for p in sorted([*(root / "kvstore" / "policy").rglob("*.py"), root / "bench" / "replay"
                     / "sim.py"]):
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


@functools.cache
def trace_set_id() -> str:
    """Of the trace files replayed (names and contents): a result is only ever
    reused for the sessions it was computed on (a replay of other sessions
    with the same cache printed the earlier sessions' figures; so did one of
    a file edited in place to the same size)."""
    h = hashlib.sha1()
    for p in cv_files():
        h.update(p.name.encode() + b"\0" + hashlib.sha1(p.read_bytes()).digest())
    return h.hexdigest()[:12]


def key(spec: Spec, policy: str, pct: float) -> str:
    folds, k, seed, hints, idle = spec
    subset = f"|first{PER_FOLD}" if PER_FOLD else ""
    head = (f"v{CACHE_VERSION}|t{trace_set_id()}|{''.join(map(str, folds))}{subset}|K{k}|"
            f"s{seed}|{pct:g}")
    if not policy.startswith("session:"):
        return f"{head}|{policy}"
    cfg = json.dumps(dataclasses.asdict(CANDIDATES[policy[8:]]), sort_keys=True)
    return (f"{head}|{hints}@{idle:g}|session|{CODE_HASH}|"
            f"{hashlib.sha1(cfg.encode()).hexdigest()[:12]}")


def _results_path() -> Path:
    return CACHE / "results.jsonl"


def load_results() -> None:
    p = _results_path()
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # (a line a stopped run left half written)
            RESULTS[row["key"]] = row["result"]


def store(spec: Spec, policy: str, pct: float, d: dict[str, Any]) -> None:
    k = key(spec, policy, pct)
    RESULTS[k] = d
    _cache_dir()
    with _results_path().open("a") as f:  # one short line per write: appends interleave
        f.write(json.dumps({"key": k, "result": d}) + "\n")


def _pool_run(fn: Any, tasks: list[Any], jobs: int) -> None:
    if not tasks:
        return
    if jobs <= 1 or len(tasks) == 1:
        for t in tasks:
            fn(t)
    else:
        with mp.get_context("fork").Pool(min(jobs, len(tasks))) as pool:
            for _ in pool.imap_unordered(fn, tasks, chunksize=1):
                pass
    load_results()  # (the workers' results)


# --------------------------------------------------------------------------- cells


def _rate(d: dict[str, Any], fold: str | None) -> float:
    if fold is None:
        return float(d["hits"]) / d["refs"] if d["refs"] else 0.0
    n, h = d["by_fold"][fold]
    return h / n if n else 0.0


def cells_for(base: dict[tuple[int, int, float, str], dict[str, Any]],
              cand: dict[tuple[int, int, float], dict[str, Any]],
              caps: dict[tuple[int, int], list[float]]) -> list[dict[str, Any]]:
    """Per (fold, K, seed, capacity) with the fold's LRU in range: the candidate's gap
    closed, LRU, Belady, best baseline."""
    out = []
    lo, hi = IN_RANGE
    for (k, seed), pcts in sorted(caps.items()):
        for pct in pcts:
            p = cand.get((k, seed, pct))
            lru, bel = base.get((k, seed, pct, "lru")), base.get((k, seed, pct, "belady"))
            if p is None or lru is None or bel is None:
                continue  # (not replayed: --report-only on a partial cache)
            for fold in [*sorted(lru["by_fold"]), None]:  # None: the whole replay
                lr = _rate(lru, fold)
                if not lo <= lr <= hi:
                    continue
                br, pr = _rate(bel, fold), _rate(p, fold)
                bests = {b: _rate(base[(k, seed, pct, b)], fold) for b in BEST_OF
                         if (k, seed, pct, b) in base}
                best = max(bests, key=lambda b: bests[b]) if bests else ""
                out.append({
                    "fold": int(fold) if fold is not None else "all", "K": k,
                    "seed": seed, "pct": pct, "lru": lr, "belady": br, "policy": pr,
                    "gap_closed": (pr - lr) / (br - lr) if br > lr else 0.0,
                    "vs_lru_points": 100 * (pr - lr), "best_baseline": best,
                    "best_baseline_hit": bests.get(best, 0.0),
                    "ahead_of_best": pr > bests[best] if best else None,
                    "baseline_gap_closed": {b: (v - lr) / (br - lr) if br > lr else 0.0
                                            for b, v in bests.items()}})
    return out


def summarise(cells: list[dict[str, Any]], folds: tuple[int | str, ...] | None = None
              ) -> dict[str, Any]:
    """Mean and worst gap closed per K and over the cells of ``folds`` (default: every fold;
    ``("all",)``: the whole-replay cells)."""
    cs = [c for c in cells if (folds is None and c["fold"] != "all")
          or (folds is not None and c["fold"] in folds)]
    if not cs:
        return {"cells": 0}
    per_k = {}
    for k in sorted({c["K"] for c in cs}):
        g = [c["gap_closed"] for c in cs if c["K"] == k]
        per_k[str(k)] = {"mean": statistics.fmean(g), "worst": min(g), "cells": len(g)}
    gaps = [c["gap_closed"] for c in cs]
    worst = min(cs, key=lambda c: c["gap_closed"])
    return {"cells": len(cs), "mean": statistics.fmean(gaps), "worst": worst["gap_closed"],
            "worst_cell": {k: worst[k] for k in ("fold", "K", "seed", "pct", "lru")},
            "per_K": per_k, "ahead_of_best": sum(c["ahead_of_best"] is True for c in cs),
            "with_baselines": sum(c["ahead_of_best"] is not None for c in cs),
            "min_vs_lru_points": min(c["vs_lru_points"] for c in cs)}


def table(results: dict[str, dict[str, Any]], ks: list[int]) -> str:
    head = ("| candidate / hints | " + " | ".join(f"K={k} mean / worst" for k in ks)
            + " | all: mean | worst | ahead of best | min vs LRU (pts) |")
    lines = [head, "|" + " --- |" * (len(ks) + 5)]
    for label, s in results.items():
        if not s.get("cells"):
            continue
        row = [label]
        for k in ks:
            pk = s["per_K"].get(str(k))
            row.append(f"{pk['mean'] * 100:.1f} / {pk['worst'] * 100:.1f}" if pk else "-")
        row += [f"**{s['mean'] * 100:.1f}**", f"**{s['worst'] * 100:.1f}**",
                f"{s['ahead_of_best']}/{s['with_baselines']}", f"{s['min_vs_lru_points']:+.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def compare(paths: list[str], held_out: bool = False) -> str:
    """One markdown table of several runs' summaries (e.g. before and after): per candidate
    and variant, mean / worst gap closed per K and overall."""
    rows: dict[str, dict[str, Any]] = {}
    ks: list[int] = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        part = d["summary_held_out"] if held_out else d["summary"]
        ks = sorted(set(ks) | set(d["protocol"]["ks"]))
        for label, s in part.items():
            rows[f"{Path(p).stem.removeprefix('cv-')}: {label}"] = s
    return table(rows, ks)


def parse_variant(v: str, idle: float) -> tuple[str, float]:
    """``ends@300`` -> ("ends", 300.0); ``engine`` -> ("engine", idle)."""
    name, _, at = v.partition("@")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {v!r}: one of {', '.join(VARIANTS)} (ends@SECONDS)")
    return VARIANTS[name], float(at) if at else idle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay.cv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3],
                    help="the folds replayed (the held-out fold 4 needs --final)")
    ap.add_argument("--final", action="store_true",
                    help=f"the final run: the held-out fold {HELD_OUT} is replayed too")
    ap.add_argument("--ks", type=int, nargs="+", default=list(KS))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--max-caps", type=int, default=MAX_CAPS)
    ap.add_argument("--config", action="append", default=[],
                    help="a candidate: a server TOML file, its [policy.session] table "
                         "(repeat for several; none: the defaults); LABEL=FILE names it")
    ap.add_argument("--session-args", default="",
                    help="options (JSON) over every candidate's, e.g. '{\"duel\": false}'")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"hint variants, comma-separated: {', '.join(VARIANTS)}, ends@S")
    ap.add_argument("--one-seed", default=DEFAULT_ONE_SEED,
                    help="variants replayed with the first seed only (comma-separated)")
    ap.add_argument("--idle", type=float, default=IDLE_END_S,
                    help="idle timeout (s of trace time) after which the engine ends a "
                         "main session (variant 'ends')")
    ap.add_argument("--sessions-per-fold", type=int, default=0,
                    help="only the first N sessions of each fold: a smoke test, not a result")
    ap.add_argument("--baseline-seeds", type=int, nargs="+", default=[1],
                    help="seeds whose cells S3-FIFO, SIEVE and GDSF replay (LRU and Belady: all)")
    ap.add_argument("--baselines", default=",".join(BEST_OF),
                    help="the baselines a candidate must beat, replayed on --baseline-seeds")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--tag", default="dev")
    ap.add_argument("--out", default="bench/replay/results")
    ap.add_argument("--report-only", action="store_true",
                    help="replay nothing: the tables from the cached results (cells missing "
                         "from the cache are left out and listed); with no cached result "
                         "at all, it stops and writes nothing")
    ap.add_argument("--compare", nargs="+", default=[], metavar="CV.json",
                    help="only print the summaries of earlier runs side by side")
    ap.add_argument("--held-out", action="store_true",
                    help="with --compare: the held-out fold's summaries (final runs)")
    args = ap.parse_args(argv)
    unknown = sorted({b for b in args.baselines.split(",") if b} - set(POLICIES))
    if unknown:
        ap.error(f"--baselines: unknown policies {', '.join(unknown)}; policies: "
                 f"{', '.join(sorted(POLICIES))}")
    if args.compare:
        print(compare(args.compare, args.held_out))
        return 0
    folds = folds_in_play(args.folds, args.final)
    t0 = time.time()

    global SESSIONS, PER_FOLD
    SESSIONS = load_folds(folds)
    PER_FOLD = args.sessions_per_fold
    if PER_FOLD:
        seen: dict[int, int] = defaultdict(int)
        subset = []
        for s in SESSIONS:
            f = fold_of(s.file)
            seen[f] += 1
            if seen[f] <= PER_FOLD:
                subset.append(s)
        SESSIONS = subset
    CANDIDATES.clear()
    for spec_s in args.config or [""]:
        label, _, path = spec_s.rpartition("=") if "=" in spec_s else ("", "", spec_s)
        label = label or (Path(path).stem if path else "defaults")
        CANDIDATES[label] = session_config(path, args.session_args)
    variants = [v for v in args.variants.split(",") if v]
    global CODE_HASH
    CODE_HASH = code_hash()
    load_results()
    print(f"folds {folds}: {len(SESSIONS)} sessions, K {args.ks}, seeds {args.seeds}, "
          f"candidates {list(CANDIDATES)}, variants {variants} "
          f"({time.time() - t0:.0f} s to load)", flush=True)

    # 1. capacities, from LRU alone
    plain = {(k, seed): (folds, k, seed, "none", 0.0) for k in args.ks for seed in args.seeds}
    run = (lambda fn, tasks, jobs: None) if args.report_only else _pool_run
    run(_ladder_task, [(spec, ladder_start(spec)) for spec in plain.values()], args.jobs)
    caps: dict[tuple[int, int], list[float]] = {}
    for (k, seed), spec in plain.items():
        rates = {pct: _rate(RESULTS[key(spec, "lru", pct)], None) for pct in LADDER
                 if key(spec, "lru", pct) in RESULTS}
        caps[(k, seed)] = pick_capacities(rates, args.max_caps)
        print(f"K={k} seed={seed}: LRU " + ", ".join(f"{p:g}% {r * 100:.1f}"
                                                      for p, r in sorted(rates.items()))
              + f" -> capacities {caps[(k, seed)]}", flush=True)

    # 2. baselines on the chosen capacities (cached): Belady on every cell, S3-FIFO, SIEVE
    # and GDSF on the first seed's unless --baseline-seeds says more
    tasks = []
    for (k, seed), pcts in caps.items():
        spec = plain[(k, seed)]
        others = [b for b in args.baselines.split(",") if b]
        pols = ["lru", "belady"] + (others if seed in args.baseline_seeds else [])
        tasks += [(spec, b, pct) for pct in pcts for b in pols
                  if key(spec, b, pct) not in RESULTS]
    tasks.sort(key=lambda t: (t[1] != "belady", t[0]))
    run(_run_task, tasks, args.jobs)
    base = {(k, seed, pct, b): RESULTS[key(plain[(k, seed)], b, pct)]
            for (k, seed), pcts in caps.items() for pct in pcts for b in BASELINES
            if key(plain[(k, seed)], b, pct) in RESULTS}

    # 3. the candidates, per variant (in the order given: the first ones finish first)
    tasks = []
    queued: set[str] = set()
    wanted = []
    for v in variants:
        hints, idle = parse_variant(v, args.idle)
        for (k, seed), pcts in caps.items():
            if v in args.one_seed.split(",") and seed != args.seeds[0]:
                continue
            spec = (folds, k, seed, hints, idle if hints.startswith("ends") else 0.0)
            for c in CANDIDATES:
                for pct in pcts:
                    wanted.append((c, v, spec, pct))
                    job = (spec, f"session:{c}", pct)
                    if key(*job) not in RESULTS and key(*job) not in queued:
                        queued.add(key(*job))
                        tasks.append(job)
    run(_run_task, tasks, args.jobs)
    cand: dict[tuple[str, str], dict[tuple[int, int, float], dict[str, Any]]] = defaultdict(dict)
    missing = []
    for c, v, spec, pct in wanted:
        d = RESULTS.get(key(spec, f"session:{c}", pct))
        if d is None:
            missing.append(f"{c}/{v} K={spec[1]} seed={spec[2]} {pct:g}%")
        else:
            cand[(c, v)][(spec[1], spec[2], pct)] = d

    # 4. cells and tables
    dev_folds = tuple(f for f in folds if f != HELD_OUT)
    out: dict[str, Any] = {
        "protocol": {"folds": folds, "held_out": HELD_OUT, "final": args.final, "ks": args.ks,
                     "seeds": args.seeds, "ladder": LADDER, "in_range": IN_RANGE,
                     "max_caps": args.max_caps, "capacities": {f"{k}/{s}": p for (k, s), p
                                                               in caps.items()},
                     "idle_end_s": args.idle},
        "candidates": {c: dataclasses.asdict(cfg) for c, cfg in CANDIDATES.items()},
        "summary": {}, "summary_held_out": {}, "summary_whole_replay": {}, "baselines": {},
        "cells": {}}
    base_cells = {}
    for b in BEST_OF:
        bc = cells_for(base, {key[:3]: d for key, d in base.items() if key[3] == b}, caps)
        base_cells[b] = bc
        out["baselines"][b] = summarise(bc, dev_folds)
    for (c, v), res in cand.items():
        label = f"{c} / {v}"
        cs = cells_for(base, res, caps)
        out["cells"][label] = cs
        out["summary"][label] = summarise(cs, dev_folds)
        out["summary_whole_replay"][label] = summarise(cs, ("all",))
        if args.final:
            out["summary_held_out"][label] = summarise(cs, (HELD_OUT,))
    out["wall_s"] = time.time() - t0
    out["not_replayed"] = missing + [f"{b} K={k} seed={sd} {p:g}%" for (k, sd), ps in caps.items()
                                     for p in ps for b in ("lru", "belady")
                                     if (k, sd, p, b) not in base]
    if out["not_replayed"]:
        print(f"NOT REPLAYED (--report-only on a partial cache): {out['not_replayed']}")
    if args.report_only and not any(ps for ps in caps.values()):
        # (a docs review's --report-only on a fresh clone, with no cache,
        # wrote empty tables over the committed JSON)
        raise SystemExit(f"cv: no cached results in {CACHE} for these folds, K and seeds "
                         "(the cache is not in the repository): nothing written; replay "
                         "without --report-only, or read the committed "
                         "bench/replay/results/cv-*.json with --compare")
    path = Path(args.out) / f"cv-{args.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\nfolds {dev_folds} (gap closed %, per K mean / worst over cells):")
    print(table(out["summary"], args.ks))
    print("\nthe whole replay (all folds in play together, one cell per K, seed, capacity):")
    print(table(out["summary_whole_replay"], args.ks))
    print("\nbaselines:")
    print(table({f"{b}": s for b, s in out["baselines"].items()}, args.ks))
    if args.final:
        print(f"\nheld-out fold {HELD_OUT}:")
        print(table(out["summary_held_out"], args.ks))
    print(f"\nwrote {path} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
