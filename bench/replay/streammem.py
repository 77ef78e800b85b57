"""The session policy's memory per tracked stream (issue 16: "state the bytes per stream").

    .venv/bin/python -m bench.replay.streammem                      # ~2 min
    .venv/bin/python -m bench.replay.streammem --config FILE.toml

Replays the first N sessions of the development folds (0-3; sessions in name order, fold 4
never) at K=8, capacity ``--cap`` blocks (the same for every N, so the per-block state is
the same), for two values of N, with engine hints and with engine-knowable session ends.
After each replay the policy is deep-copied under ``tracemalloc``: the bytes that copy
allocates are the policy's state (block ids are ints shared with the workload, not copied:
the figure leaves out the keys themselves, which the store's index holds anyway). The
difference between the two N, divided by the difference in streams the policy tracks, is
the cost of one more stream.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tracemalloc

from bench.replay import sim
from bench.replay.cv import HELD_OUT, fold_of, load_folds
from bench.replay.lab import session_config
from bench.replay.workloads import agent_workload
from kvstore.policy import SessionPolicy
from kvstore.types import TierName


def measured(sessions: list, hints: str, cap: int, cfg: object) -> tuple[int, int, int]:
    """(bytes of the policy's state, streams tracked, streams holding a latest request)."""
    w = agent_workload(sessions, 8, 1, hints)
    p = SessionPolicy([TierName.L1], cfg)  # type: ignore[arg-type]
    sim.simulate(w, p, cap)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    twin = copy.deepcopy(p)
    gc.collect()
    size = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    streams = twin._streams  # (a measurement of the policy's own state)
    return size, len(streams), sum(1 for s in streams.values() if s.cur)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay.streammem", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs=2, default=[30, 60])
    ap.add_argument("--cap", type=int, default=20_000, help="capacity, blocks")
    ap.add_argument("--config", default="")
    args = ap.parse_args(argv)
    cfg = session_config(args.config)
    pool = [s for s in load_folds((0, 1, 2, 3)) if fold_of(s.file) != HELD_OUT]
    for hints in ("engine", "ends"):
        rows = [measured(pool[:n], hints, args.cap, cfg) for n in args.sessions]
        (b1, s1, l1), (b2, s2, l2) = rows
        for n, (b, s, live) in zip(args.sessions, rows, strict=True):
            print(f"{hints:>6}: {n} sessions: {b / 1e6:.2f} MB, {s} streams tracked "
                  f"({live} holding their latest request's blocks)")
        print(f"{hints:>6}: {(b2 - b1) / (s2 - s1):,.0f} bytes per tracked stream; "
              f"{(b2 - b1) / max(l2 - l1, 1):,.0f} per stream holding its latest request",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
