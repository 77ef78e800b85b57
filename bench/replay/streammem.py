"""The session policy's memory per tracked stream (issue 16: "state the bytes per stream").

    .venv/bin/python -m bench.replay.streammem                      # ~2 min
    .venv/bin/python -m bench.replay.streammem --config FILE.toml

Replays the first N sessions of the development folds (0-3, in name order; fold 4 never)
at K=8, capacity ``--cap`` blocks, with engine hints and with engine-knowable session ends.
Each replay runs under ``tracemalloc``, started after the workload is built: what is still
allocated when it returns is the policy's whole state (block ids are ints shared with the
workload: the keys themselves are left out, the store's index holds them anyway). Per
stream, what a stream holds directly (``stream_bytes``): a live stream keeps the block set
of its latest request (its whole context: ~1,500 blocks at 100k tokens), an ended one only
its record.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tracemalloc

from bench.replay import sim
from bench.replay.cv import HELD_OUT, fold_of, load_folds
from bench.replay.lab import session_config
from bench.replay.workloads import agent_workload
from kvstore.policy import SessionPolicy
from kvstore.types import TierName


def stream_bytes(p: SessionPolicy) -> tuple[float, float, float]:
    """Bytes each stream holds directly (``sys.getsizeof`` of the Stream, its latest
    request's block tuple, its per-tier dicts; the block ids are the store's),
    plus its share of the policy's block -> live-stream count map (``_nlive``, one entry per
    block of a live stream's latest request): (mean over live streams, mean over ended or
    emptied streams, max)."""
    nlive = p._nlive  # (a measurement of the policy's own state)
    refs = sum(len(s.cur) for s in p._streams.values()) or 1
    per_ref = sys.getsizeof(nlive) / refs
    live, idle = [], []
    for st in p._streams.values():
        b = (sys.getsizeof(st) + sys.getsizeof(st.cur)
             + sys.getsizeof(st.res) + sum(sys.getsizeof(d) for d in st.res.values())
             + len(st.cur) * per_ref)
        (live if st.cur else idle).append(b)
    mean = statistics.fmean
    return (mean(live) if live else 0.0, mean(idle) if idle else 0.0,
            max(live + idle, default=0.0))


def measured(sessions: list, hints: str, cap: int, cfg: object
             ) -> tuple[int, int, int, tuple[float, float, float]]:
    """(bytes of the policy's state, streams tracked, streams holding a latest request,
    ``stream_bytes``)."""
    w = agent_workload(sessions, 8, 1, hints)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    p = SessionPolicy([TierName.L1], cfg)  # type: ignore[arg-type]
    sim.simulate(w, p, cap)
    gc.collect()
    size = tracemalloc.get_traced_memory()[0] - before  # what the replay left: the policy
    tracemalloc.stop()
    streams = p._streams  # (a measurement of the policy's own state)
    return size, len(streams), sum(1 for s in streams.values() if s.cur), stream_bytes(p)


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
        for n in args.sessions:
            b, s, live, (per_live, per_idle, top) = measured(pool[:n], hints, args.cap, cfg)
            print(f"{hints:>6}: {n} sessions: policy {b / 1e6:.2f} MB (tracemalloc), {s} "
                  f"streams tracked, {live} holding their latest request's blocks; per "
                  f"stream: {per_live:,.0f} B live, {per_idle:,.0f} B ended, max "
                  f"{top:,.0f} B", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
