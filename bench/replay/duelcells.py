"""Quick look at session-policy candidates on chosen cross-validation cells (issue 16/17).

Replays only the session policy, on the cells of ``bench.replay.cv`` (folds 0-3, same
workloads and capacities), and scores each fold against the LRU and Belady hit rates of an
earlier ``cv-*.json`` (those do not depend on the policy), so a candidate costs one replay
per cell instead of a full cross-validation run. A screening tool: the figures that count
come from ``bench.replay.cv``.

    .venv/bin/python -m bench.replay.duelcells --k 16 --pct 1 --hints engine \\
        --cand base='{}' --cand z3='{"duel_z": 3}'
    # the duel's per-request hit difference (shadow - policy), to study a switching rule
    .venv/bin/python -m bench.replay.duelcells --k 16 --pct 1 --hints none \\
        --cand never='{"duel_warmup": 1000000000}' --trace /tmp/d.npy
    # the final layout (folds 0-4, the held-out fold 4 included: replay it once per
    # policy), scored against the final run's cells; --pct defaults to its capacities
    .venv/bin/python -m bench.replay.duelcells --final --k 64 --hints engine

With ``--final`` each fold's figure is printed as "before -> after" (before: the policy
of the reference run, in its cells for this hint variant, if it has them), and "==" marks
a fold whose hit rate equals the reference's exactly (a reproduction check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.replay import cv, sim
from bench.replay.lab import session_config
from bench.replay.workloads import agent_workload
from kvstore.policy import SessionPolicy
from kvstore.policy.session.duel import Duel
from kvstore.types import TierName

REF = "bench/replay/results/cv-c16-seed1.json"
ROBUST_REF = "bench/replay/results/cv-after-dev-robust-allk.json"
FINAL_REF = "bench/replay/results/cv-after-final.json"


def reference_rates(path: str, k: int, seed: int, pct: float) -> dict[str, tuple[float, float]]:
    """fold -> (LRU, Belady) hit rate of the cell in an earlier cv JSON."""
    d = json.loads(Path(path).read_text())
    out: dict[str, tuple[float, float]] = {}
    for cells in d["cells"].values():
        for c in cells:
            if c["K"] == k and c["seed"] == seed and c["pct"] == pct:
                out[str(c["fold"])] = (c["lru"], c["belady"])
    return out


def reference_policy(path: str, k: int, seed: int, pct: float,
                     variant: str) -> dict[str, float]:
    """fold -> the reference run's policy hit rate in the cell (its cells labelled
    ``<candidate> / <variant>``; empty if it did not replay that variant)."""
    d = json.loads(Path(path).read_text())
    for label, cells in d["cells"].items():
        if label.rpartition(" / ")[2] == variant:
            return {str(c["fold"]): c["policy"] for c in cells
                    if c["K"] == k and c["seed"] == seed and c["pct"] == pct}
    return {}


def final_capacities(path: str, k: int, seed: int) -> list[float]:
    """The capacities (% of unique blocks) the reference run chose for (K, seed)."""
    caps: dict[str, list[float]] = json.loads(Path(path).read_text())["protocol"]["capacities"]
    return caps.get(f"{k}/{seed}", [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay.duelcells", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pct", type=float, nargs="+", default=[],
                    help="capacities, %% of unique blocks (--final: the reference run's)")
    ap.add_argument("--hints", default="engine", help="cv variant: engine, none, wrong30, ...")
    ap.add_argument("--cand", action="append", default=[], help="LABEL=JSON session args")
    ap.add_argument("--ref", default="", help="cv JSON with the cells' LRU/Belady rates "
                    f"(default {REF}; --final: {FINAL_REF})")
    ap.add_argument("--final", action="store_true",
                    help=f"the final layout: folds 0-4 (the held-out fold {cv.HELD_OUT} "
                         "too), scored against the final run")
    ap.add_argument("--wrong-share", type=float, default=0.0,
                    help="> 0: hints 'wrong' with this share replaced (a stress test; the "
                         "cells' LRU/Belady do not depend on hints)")
    ap.add_argument("--trace", default="", help="save the duel's per-request hits (numpy)")
    args = ap.parse_args(argv)
    ref = args.ref or (FINAL_REF if args.final else REF)
    pcts = args.pct or (final_capacities(ref, args.k, args.seed) if args.final else [])
    if not pcts:
        ap.error("--pct is required (without --final, or for a K the final run did not have)")
    t0 = time.time()
    folds = cv.folds_in_play([0, 1, 2, 3], args.final)
    cv.SESSIONS = cv.load_folds(folds)
    hints, idle = cv.parse_variant(args.hints, cv.IDLE_END_S)
    spec: cv.Spec = (folds, args.k, args.seed, hints,
                     idle if hints.startswith("ends") else 0.0)
    if args.wrong_share:
        sessions = [s for s in cv.SESSIONS if cv.fold_of(s.file) in spec[0]]
        w = agent_workload(sessions, args.k, args.seed, "wrong", wrong_share=args.wrong_share,
                           name="cv", group_of=lambda f: str(cv.fold_of(f)))
    else:
        w = cv.workload(spec)
    print(f"workload K={args.k} seed={args.seed} {args.hints}: {w.n_unique} unique "
          f"({time.time() - t0:.0f} s)", flush=True)
    trace: list[tuple[int, int]] = []
    if args.trace:
        orig = Duel._duel

        def traced(self: Any, blocks: Any) -> None:
            trace.append((self._sh_pending, self._own_hits))
            orig(self, blocks)
        Duel._duel = traced  # type: ignore[method-assign]
    for c in args.cand or ["defaults={}"]:
        label, _, js = c.partition("=")
        cfg = session_config("", js)
        for pct in pcts:
            rates = reference_rates(ref, args.k, args.seed, pct)
            before = (reference_policy(ref, args.k, args.seed, pct, args.hints.partition("@")[0])
                      if args.final else {})
            pol = SessionPolicy([TierName.L1], cfg)
            r = sim.simulate(w, pol, cv.capacity(w, pct))
            parts = []
            gaps = []
            for g in sorted(k[5:] for k in r.extra if k.startswith("refs:")):
                n, h = r.extra[f"refs:{g}"], r.extra[f"hits:{g}"]
                if g not in rates:
                    continue
                lr, br = rates[g]
                pr = h / n
                gap = (pr - lr) / (br - lr)
                gaps.append(gap)
                parts.append(f"f{g} {_before(before.get(g), lr, br, pr, n)}{gap * 100:5.1f} "
                             f"({100 * (pr - lr):+.2f})")
            whole = r.hits / r.refs
            if "all" not in rates:
                # No LRU and Belady of this cell in the reference: a "gap closed"
                # would be against 0 and 1, which means nothing.
                print(f"{label:>12} {pct:g}% hits={r.hits} whole {whole * 100:.2f} | no "
                      f"LRU/Belady for K={args.k} seed {args.seed} {pct:g}% in {args.ref}: "
                      "run bench.replay.cv for this cell first (gap closed not shown)",
                      flush=True)
                continue
            lr, br = rates["all"]
            if before:
                parts.insert(0, f"whole {_before(before.get('all'), lr, br, whole, r.refs)}|")
            stats = {k: v for k, v in pol.stats.items() if k in ("to_lru", "to_session")}
            print(f"{label:>12} {pct:g}% hits={r.hits} whole {whole * 100:.2f} "
                  f"gap {100 * (whole - lr) / (br - lr):5.1f} ({100 * (whole - lr):+.2f}) | "
                  + " ".join(parts)
                  + (f" | mean {100 * sum(gaps) / len(gaps):.1f} worst {100 * min(gaps):.1f}"
                     if gaps else "")
                  + f" | {stats} {r.refs / max(r.seconds, 1e-9) / 1e6:.2f}M/s", flush=True)
            if args.trace:
                import numpy as np
                np.save(f"{args.trace}-{label}-{pct:g}.npy", np.array(trace, dtype=np.int64))
                trace.clear()
    return 0


def _before(rate: float | None, lru: float, belady: float, now: float, refs: float) -> str:
    """"<before's gap closed> -> " ("==" instead of "->": the same hit rate; else the
    difference in hits, from the rates), or ""."""
    if rate is None:
        return ""
    same = "==" if rate == now else f"[{round((now - rate) * refs):+d} hits] ->"
    return f"{100 * (rate - lru) / (belady - lru):5.1f} {same} "


if __name__ == "__main__":
    sys.exit(main())
