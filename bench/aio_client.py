"""AsyncClient per call: the data plane against gRPC, in one run.

Starts one kvstore server (TCP and unix socket) and times AsyncClient Put,
Get and Get-into-a-buffer of one block per call, for each block size, with
the data plane (``data_plane="tcp"`` / ``"unix"``) and without
(``data_plane=False``, the same transport for gRPC). Systems run interleaved,
round by round, so load changes hit all of them; the figure is the median
per-call latency over every round (and p99). ``--concurrency N`` runs N
coroutines at once (asyncio.gather) and reports the aggregate rate. A Get that
misses stops the run; after each timed op, each coroutine's last Get is
compared with the bytes Put.

    python -m bench.aio_client --sizes 4KiB,1MiB --rounds 5 --calls 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench._server import BenchServer
from bench.peers import positive_int
from kvstore import AsyncClient
from kvstore.config import parse_size

SYSTEMS: dict[str, tuple[str, bool | str]] = {
    "grpc-tcp": ("tcp", False),
    "dp-tcp": ("tcp", "tcp"),
    "grpc-unix": ("unix", False),
    "dp-unix": ("unix", "unix"),
}
OPS = ("put", "get", "get_into")


async def _time_calls(n: int, concurrency: int, call: Callable[[int], Awaitable[Any]]
                      ) -> tuple[list[float], float, list[int], list[tuple[int, Any]]]:
    """Per-call seconds of ``n`` calls (``concurrency`` at a time), the wall
    time, the calls whose answer held a None (a miss), and each coroutine's
    last (call, answer) for ``_check``."""
    times: list[float] = []
    missed: list[int] = []
    last: list[tuple[int, Any]] = []

    async def worker(first: int) -> None:
        i, got = -1, None
        for i in range(first, n, concurrency):
            t0 = time.perf_counter()
            got = await call(i)
            times.append(time.perf_counter() - t0)
            # A miss is no Get (without this, misses were timed as Gets).
            if type(got) is list and None in got:
                missed.append(i)
        if i >= 0:
            last.append((i, got))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return times, time.perf_counter() - t0, missed, last


def _check(name: str, op: str, keys: list[bytes], payload: bytes, buffers: list[bytearray],
           missed: list[int], last: list[tuple[int, Any]]) -> None:
    """After a timed op: no Get missed, and each coroutine's last Get left the
    bytes Put (a Get's size or a non-None answer alone lets one that writes
    nothing pass as a fast one)."""
    import numpy as np

    if missed:
        raise RuntimeError(f"{name}: {op} of {keys[missed[0]].decode()} missed ({len(missed)} "
                           f"of {len(keys)} calls; --calls blocks of every size must fit the "
                           "server's 2 GiB L1, no L2)")
    if op == "put":
        return
    want = np.frombuffer(payload, dtype=np.uint8)
    for i, got in last:
        value = got[0] if op == "get" else buffers[i % len(buffers)]
        if not np.array_equal(np.frombuffer(value, dtype=np.uint8), want):
            raise RuntimeError(f"{name}: {op} of {keys[i].decode()} returned bytes other than "
                               "those Put under it")


def _calls(c: AsyncClient, keys: list[bytes], payload: bytes,
           buffers: list[bytearray]) -> dict[str, Callable[[int], Awaitable[Any]]]:
    """Call ``i`` of each op: its own key; a Get reads what the Puts stored."""
    return {
        "put": lambda i: c.put({keys[i]: payload}),
        "get": lambda i: c.get([keys[i]]),
        "get_into": lambda i: c.get_into([keys[i]], [buffers[i % len(buffers)]]),
    }


async def bench(args: argparse.Namespace, server: BenchServer) -> dict[str, Any]:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    clients: dict[str, AsyncClient] = {}
    for name in systems:
        transport, dp = SYSTEMS[name]
        target = server.tcp if transport == "tcp" else server.unix_target
        clients[name] = AsyncClient(target, namespace="bench", data_plane=dp)
    for name, c in clients.items():
        used = await c.data_plane_active()
        if used != (SYSTEMS[name][1] is not False):
            raise SystemExit(f"{name}: the data plane is {'on' if used else 'off'}")
    samples: dict[tuple[str, int, str], list[float]] = {}
    walls: dict[tuple[str, int, str], float] = {}
    for size in sizes:
        payload = os.urandom(size)
        keys = [f"{size}-{i}".encode() for i in range(args.calls)]
        buffers = [bytearray(size) for _ in range(args.concurrency)]
        for _ in range(args.rounds):
            for name in systems:
                ops = _calls(clients[name], keys, payload, buffers)
                for op in OPS:
                    if op == "get_into":
                        # Before the timing: what an earlier system left in the
                        # reused buffers (the same bytes) would pass _check for
                        # a get_into that writes nothing.
                        for b in buffers:
                            b[:] = bytes(size)
                    times, wall, missed, last = await _time_calls(args.calls, args.concurrency,
                                                                  ops[op])
                    _check(name, op, keys, payload, buffers, missed, last)
                    samples.setdefault((name, size, op), []).extend(times)
                    walls[(name, size, op)] = walls.get((name, size, op), 0.0) + wall
    for c in clients.values():
        await c.close()
    rows = []
    for (name, size, op), times in samples.items():
        times.sort()
        calls = len(times)
        rows.append({"system": name, "size": size, "op": op, "calls": calls,
                     "p50_us": statistics.median(times) * 1e6,
                     "p99_us": times[min(calls - 1, int(calls * 0.99))] * 1e6,
                     "calls_per_s": calls / walls[(name, size, op)],
                     "mb_per_s": calls * size / walls[(name, size, op)] / 1e6})
    return {"concurrency": args.concurrency, "rounds": args.rounds, "calls": args.calls,
            "load": os.getloadavg(), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aio_client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4KiB,1MiB")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--calls", type=positive_int, default=200,
                   help="calls per op, system and round")
    p.add_argument("--concurrency", type=positive_int, default=1)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    with BenchServer("--server-namespaces", "bench", "--server-max-block-bytes", "64MiB",
                     l1_capacity="2GiB", unix=True) as server:
        result = asyncio.run(bench(args, server))
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    print(f"AsyncClient, one block per call, concurrency {args.concurrency}, "
          f"{args.rounds} rounds x {args.calls} calls; load {result['load'][0]:.2f}")
    print(f"{'size':>8} {'op':>9} {'system':>10} {'p50 us':>9} {'p99 us':>9} {'calls/s':>9} "
          f"{'MB/s':>8}  grpc/dp p50")
    rows = {(r["system"], r["size"], r["op"]): r for r in result["rows"]}
    for r in sorted(result["rows"], key=lambda r: (r["size"], OPS.index(r["op"]),
                                                    r["system"])):
        ratio = ""
        if r["system"].startswith("dp-"):
            peer = rows.get(("grpc-" + r["system"][3:], r["size"], r["op"]))
            if peer is not None:
                ratio = f"{peer['p50_us'] / r['p50_us']:.2f}x"
        print(f"{r['size']:>8} {r['op']:>9} {r['system']:>10} {r['p50_us']:>9.0f} "
              f"{r['p99_us']:>9.0f} {r['calls_per_s']:>9.0f} {r['mb_per_s']:>8.0f}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
