"""What the sync Client's hand-over of a main-thread gRPC call to its own thread
costs (kvstore/client/_calldriver.py): same process, same client, main thread,
the hand-over against the direct grpc call (as before 0.29.0), rounds interleaved.

    .venv/bin/python -m bench.handover [--rounds 10]

Per call kind and round, each of the two times the call N times and keeps the p50;
reported: the median over rounds of each, and of the per-round ratio (hand-over ÷
direct). gRPC only (``data_plane=False``: the data plane's calls are not handed over).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import kvstore.client._calldriver as calldriver
from bench._server import BenchServer
from bench.peers import positive_int
from kvstore import Client


def p50_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--calls-scale", type=float, default=1.0,
                        help="multiply each call kind's count (a smoke run: 0.05)")
    args = parser.parse_args(argv)
    handed_over = calldriver.on_main_thread
    with BenchServer(l1_capacity="256MiB") as server, \
            Client(server.tcp, namespace="handover", timeout=20, data_plane=False) as c:
        c.put({b"4k": os.urandom(4096), b"1m": os.urandom(1 << 20),
               b"8m": os.urandom(8 << 20)})
        calls: dict[str, tuple[Callable[[], object], int]] = {
            "Get 4 KiB (GetSmall)": (lambda: c.get([b"4k"]), 400),
            "Lookup, 2 keys": (lambda: c.lookup([b"4k", b"1m"]), 400),
            "Delete, a missing key": (lambda: c.delete([b"missing"]), 400),
            "Get 1 MiB (GetSmall)": (lambda: c.get([b"1m"]), 100),
            "Get 8 MiB (stream)": (lambda: c.get([b"8m"]), 20),
        }
        calls = {k: (fn, max(1, int(n * args.calls_scale))) for k, (fn, n) in calls.items()}
        runs: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in calls}
        for _ in range(args.rounds):
            for name, (fn, count) in calls.items():
                runs[name][0].append(p50_us(fn, count))
                calldriver.on_main_thread = lambda: False  # the direct call
                try:
                    runs[name][1].append(p50_us(fn, count))
                finally:
                    calldriver.on_main_thread = handed_over
    print(f"{'call':24s} {'hand-over':>10s} {'direct':>10s}  ratio median (range)")
    for name, (over, direct) in runs.items():
        ratios = [a / b for a, b in zip(over, direct, strict=True)]
        print(f"{name:24s} {statistics.median(over):8.0f}us {statistics.median(direct):8.0f}us"
              f"  {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
