"""kvstore next to Redis and a raw socket: the same Put/Get workload, side by side.

    .venv/bin/python -m bench.peers [--quick] [--out results.json] [--png chart.png]

In one run, against:

* ``kvstore-dp-tcp``   kvstore's framed data plane over TCP on 127.0.0.1
                    (``kvstore.Client``, its default path: the session opened
                    through gRPC, blocks inline in frames);
* ``kvstore-dp-unix``  the same over the data plane's unix socket;
* ``kvstore-dp-shm``   the data plane's unix socket for the control frames,
                    block bytes through the server's shared-memory L1 arena
                    (``ShmClient``; server started with ``--l1-shm-path``);
* ``kvstore-tcp`` / ``kvstore-unix`` / ``kvstore-shm``  the same clients with
                    ``data_plane=False``: every call over gRPC;
* ``redis-tcp`` / ``redis-unix``  a private Redis 7 (``redis-server`` from
                    PATH, or apt-installed when missing and running as root),
                    ``--save "" --appendonly no``, redis-py with hiredis;
* ``raw-tcp`` / ``raw-unix``  a plain socket moving the same bytes (the floor
                    under any RPC over that transport);
* ``memcpy``        the same bytes copied between two buffers in the client
                    process (the ceiling for a same-host path).

Workload: each client process puts N blocks (keys ``system/worker/size/i``),
then gets them back, in batches of ``--batch`` blocks per call: kvstore
``put(pairs)`` / ``get_into(keys, buffers)`` (one stream each), Redis
``MSET`` / ``MGET`` (one command each), raw: one request moving the whole
batch. Block sizes 1 MiB and 4 MiB, 1 and 4 client processes. Rounds of the
systems are interleaved (round r of every system, then round r+1), after one
warm-up round each, so noise on this shared machine hits them alike; the
median GB/s over rounds is reported with p50/p99 latency per call and per
block (call ÷ blocks in it), CPU seconds per GB (server process from
/proc/PID/task/*/schedstat, in ns; clients from getrusage()), ratios and
the issue's targets.
JSON to stdout (and --out), progress and a table to stderr, a bar chart with
--png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

KiB = 1024
MiB = 1024 * KiB

# The SDK's default path (the framed data plane, docs/dataplane.md), then the
# same clients with data_plane=False (every call over gRPC).
DP_SYSTEMS = ["kvstore-dp-tcp", "kvstore-dp-unix", "kvstore-dp-shm"]
GRPC_SYSTEMS = ["kvstore-tcp", "kvstore-unix", "kvstore-shm"]
KV_SYSTEMS = DP_SYSTEMS + GRPC_SYSTEMS
REDIS_SYSTEMS = ["redis-tcp", "redis-unix"]
# Only with --mooncake-venv (bench/_peers/mooncake_proc.py says how to make one).
MOONCAKE_SYSTEMS = ["mooncake-tcp"]
BASE_SYSTEMS = ["raw-tcp", "raw-unix", "memcpy"]
# The previous client paths, for before/after comparisons in one run (only
# when named with --systems): grpc's sync Put stream, and shared-memory Gets
# with a ShmRelease per call and ordinary (cached) stores in the copies.
OLD_SYSTEMS = ["kvstore-tcp-syncput", "kvstore-shm-2rpc", "kvstore-tcp-stream",
               "kvstore-unix-stream", "kvstore-tcp-threaded", "kvstore-dp-tcp-nopoll",
               "kvstore-dp-unix-nopoll", "kvstore-dp-shm-nopoll"]
DEFAULT_SYSTEMS = KV_SYSTEMS + REDIS_SYSTEMS + BASE_SYSTEMS
ALL_SYSTEMS = DEFAULT_SYSTEMS + OLD_SYSTEMS + MOONCAKE_SYSTEMS

API = {
    "kvstore-dp-tcp": {"put": "Client.put([(key, view)] * batch) — one PUT frame exchange "
                              "on the data plane's TCP connection (header + block views sent "
                              "with sendmsg, no join), ack=memory",
                       "get": "Client.get_into(keys, buffers) — one GET frame exchange, "
                              "each block received with recv_into straight into the reused "
                              "pre-faulted numpy buffers; an answer to a small-block Get is "
                              "busy-polled for (busy_poll_us, 50 µs by default)"},
    "kvstore-dp-unix": {"put": "Client.put (as kvstore-dp-tcp, over the data plane's unix "
                               "socket)",
                        "get": "Client.get_into (as kvstore-dp-tcp, over the data plane's "
                               "unix socket)"},
    "kvstore-dp-shm": {"put": "ShmClient.put: reserve and commit frames on the data plane's "
                              "unix socket, copy+CRC32C into the mapped arena between them",
                       "get": "ShmClient.get_into: acquire frame (its answer busy-polled "
                              "for, busy_poll_us), copy+CRC32C out of the arena into reused "
                              "buffers, release on the next acquire"},
    "kvstore-tcp": {"put": "Client(data_plane=False).put([(key, view)] * batch) — one Put "
                           "stream, ack=memory",
                    "get": "Client(data_plane=False).get_into(keys, buffers) — GetSmall or "
                           "one Get stream into reused pre-faulted numpy buffers"},
    "kvstore-unix": {"put": "Client(data_plane=False).put (as kvstore-tcp, over the unix "
                            "socket)",
                     "get": "Client(data_plane=False).get_into (as kvstore-tcp, over the unix "
                            "socket)"},
    "kvstore-shm": {"put": "ShmClient(data_plane=False).put: ShmReserve, copy+CRC32C into the "
                           "mapped arena, ShmCommit (server re-verifies the CRC)",
                    "get": "ShmClient(data_plane=False).get_into: ShmAcquire, copy+CRC32C out "
                           "of the arena into reused buffers, release on the next acquire"},
    "kvstore-tcp-syncput": {"put": "Client(aio_put=False).put: grpc's sync stream call "
                                   "(the path before the private grpc.aio loop)",
                            "get": "Client.get_into (as kvstore-tcp)"},
    "kvstore-shm-2rpc": {"put": "ShmClient.put with cached stores in its copies",
                         "get": "ShmClient(release_on_acquire=False).get_into: ShmAcquire, copy "
                                "with cached stores, ShmRelease (the path before releases "
                                "rode on the next ShmAcquire)"},
    "kvstore-tcp-stream": {"put": "Client.put (as kvstore-tcp)",
                           "get": "Client(unary_get=False).get_into: always a Get stream "
                                  "(the path before GetSmall)"},
    "kvstore-unix-stream": {"put": "Client.put (as kvstore-unix)",
                            "get": "Client(unary_get=False).get_into over the unix socket"},
    "kvstore-tcp-threaded": {"put": "Client.put (as kvstore-tcp)",
                             "get": "Client(unary_get=False) with grpc's thread per Get "
                                    "stream (the path at 41b62fd)"},
    "kvstore-dp-tcp-nopoll": {"put": "Client(busy_poll_us=0).put (as kvstore-dp-tcp, no busy "
                                     "poll: the path before it)",
                              "get": "Client(busy_poll_us=0).get_into (as kvstore-dp-tcp)"},
    "kvstore-dp-unix-nopoll": {"put": "Client(busy_poll_us=0).put (as kvstore-dp-unix)",
                               "get": "Client(busy_poll_us=0).get_into (as kvstore-dp-unix)"},
    "kvstore-dp-shm-nopoll": {"put": "ShmClient(busy_poll_us=0).put (as kvstore-dp-shm)",
                              "get": "ShmClient(busy_poll_us=0).get_into (as kvstore-dp-shm)"},
    "redis-tcp": {"put": "MSET of the batch (redis-py, hiredis)",
                  "get": "MGET of the batch → new bytes objects (redis-py has no read-into "
                         "API; not copied further, which favours Redis)"},
    "redis-unix": {"put": "MSET (as redis-tcp, over the unix socket)",
                   "get": "MGET (as redis-tcp, over the unix socket)"},
    "mooncake-tcp": {"put": "MooncakeDistributedStore.batch_upsert_from (registered source "
                            "buffers; TCP transport to a separate process holding the "
                            "segment)",
                     "get": "batch_get_into registered, reused buffers"},
    "raw-tcp": {"put": "sendall of each block, one 1-byte ack per batch",
                "get": "recv_into the reused buffers"},
    "raw-unix": {"put": "as raw-tcp over a unix socket", "get": "as raw-tcp over a unix socket"},
    "memcpy": {"put": "memoryview copy source → a per-worker 'store' buffer",
               "get": "memoryview copy store → the reused buffers"},
}

TRANSPORT_PEERS = {  # kvstore system -> (Redis on the same transport, raw baseline)
    "kvstore-dp-tcp": ("redis-tcp", "raw-tcp"),
    "kvstore-dp-unix": ("redis-unix", "raw-unix"),
    "kvstore-dp-shm": ("redis-unix", "memcpy"),
    "kvstore-tcp": ("redis-tcp", "raw-tcp"),
    "kvstore-unix": ("redis-unix", "raw-unix"),
    "kvstore-shm": ("redis-unix", "memcpy"),
    "kvstore-tcp-syncput": ("redis-tcp", "raw-tcp"),
    "kvstore-shm-2rpc": ("redis-unix", "memcpy"),
    "kvstore-tcp-stream": ("redis-tcp", "raw-tcp"),
    "kvstore-unix-stream": ("redis-unix", "raw-unix"),
    "kvstore-tcp-threaded": ("redis-tcp", "raw-tcp"),
    "kvstore-dp-tcp-nopoll": ("redis-tcp", "raw-tcp"),
    "kvstore-dp-unix-nopoll": ("redis-unix", "raw-unix"),
    "kvstore-dp-shm-nopoll": ("redis-unix", "memcpy"),
}


def _busy_poll_us() -> int:
    """The SDK's busy poll for the data-plane systems (KVSTORE_BUSY_POLL_US
    or its default; the -nopoll systems use 0)."""
    from kvstore.client.dataplane import busy_poll_setting

    return busy_poll_setting(None)


def _fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of a whole process (its live threads), in seconds: the
    scheduler's nanosecond count (/proc/PID/task/*/schedstat), since
    /proc/PID/stat's utime + stime come in clock ticks (10 ms), coarser than
    a round of a small cell; the ticks where schedstat is missing."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[0])
            except FileNotFoundError:
                pass  # the thread ended meanwhile
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass  # the thread ended meanwhile


def placement(mode: str) -> tuple[set[int], set[int]] | None:
    """(server CPUs, client CPUs) for ``--pin``; None: the scheduler's choice.

    On a VM, waking a process on another, idle vCPU costs tens of µs (about
    40 µs per wake-up measured here), so a request/answer round trip's latency
    depends on whether client and server share a CPU more than on either
    program: unpinned, each system gets its own placement and a latency
    comparison measures the scheduler. ``same``: every server and client on
    one CPU; ``apart``: servers on one, clients on another."""
    if mode == "none":
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "apart" and len(cpus) < 2:
        raise SystemExit("--pin apart needs two CPUs")
    server = {cpus[0]}
    return server, (server if mode == "same" else {cpus[1]})


class Progress:
    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def status(self, text: str) -> None:
        if self.tty:
            print(f"\r\x1b[K{text}", end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        if self.tty:
            print("\r\x1b[K", end="", file=sys.stderr)
        print(text, file=sys.stderr, flush=True)


class Pool:
    """``n`` client processes (spawn), each running the rounds it is sent."""

    def __init__(self, n: int, cfg: dict[str, Any]) -> None:
        from bench._peers.worker import worker_main

        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for wid in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, wid, cfg), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.ask(len(self.conns), ("hello",))

    def ask(self, clients: int, msg: tuple[Any, ...]) -> list[Any]:
        for c in self.conns[:clients]:
            c.send(msg)
        out = []
        errors = []
        for c in self.conns[:clients]:
            status, value = c.recv()
            if status != "ok":
                errors.append(value)
            out.append(value)
        if errors:
            raise RuntimeError("a client process failed:\n" + errors[0])
        return out

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(15)
            if p.is_alive():
                p.terminate()


def _round(pool: Pool, system: str, op: str, block: int, batch: int, clients: int, count: int,
           server_pid: int | None) -> dict[str, Any]:
    start_at = time.perf_counter() + 0.02
    s0 = proc_cpu_seconds(server_pid) if server_pid else 0.0
    replies = pool.ask(clients, ("run", system, op, block, batch, count, start_at))
    s1 = proc_cpu_seconds(server_pid) if server_pid else 0.0
    t0 = min(r[0] for r in replies)
    t1 = max(r[1] for r in replies)
    return {"secs": t1 - t0, "lat": [x for r in replies for x in r[2]],
            "client_cpu": sum(r[3] for r in replies), "server_cpu": s1 - s0}


def _summary(rounds: list[dict[str, Any]], nbytes: int, batch: int) -> dict[str, Any]:
    gbps = [nbytes / r["secs"] / 1e9 for r in rounds]
    lat = [x for r in rounds for x in r["lat"]]
    gb = nbytes / 1e9 * len(rounds)
    return {
        "gbps": round(statistics.median(gbps), 4),
        "gbps_rounds": [round(g, 4) for g in gbps],
        "p50_ms_call": round(_pct(lat, 0.50) * 1e3, 3),
        "p99_ms_call": round(_pct(lat, 0.99) * 1e3, 3),
        "p50_ms_block": round(_pct(lat, 0.50) * 1e3 / batch, 4),
        "p99_ms_block": round(_pct(lat, 0.99) * 1e3 / batch, 4),
        "calls": len(lat),
        "cpu_s_per_gb": {
            "server": round(sum(r["server_cpu"] for r in rounds) / gb, 4),
            "client": round(sum(r["client_cpu"] for r in rounds) / gb, 4),
        },
    }


def _count(block: int, clients: int, batch: int, per_round: int, max_calls: int) -> int:
    """Blocks per client per round: a whole number of batches, at least one,
    at most ``max_calls`` calls (small blocks: a latency cell, not a flood)."""
    n = min(max(1, per_round // (block * clients)), max_calls * batch)
    return max(batch, (n + batch - 1) // batch * batch)


# --------------------------------------------------------------------------- ratios


def _ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["system"], r["op"], r["block_bytes"], r["clients"], r["batch_blocks"]): r
          for r in results}
    out = []
    for (system, op, block, clients, batch), r in sorted(by.items()):
        if system not in TRANSPORT_PEERS:
            continue
        same_redis, raw = TRANSPORT_PEERS[system]
        row: dict[str, Any] = {"system": system, "op": op, "block_bytes": block,
                               "clients": clients, "per_call": batch, "gbps": r["gbps"]}

        def ratio(other: str | None, r: dict[str, Any] = r, op: str = op, block: int = block,
                  clients: int = clients, batch: int = batch) -> float | None:
            o = by.get((other, op, block, clients, batch)) if other else None
            return round(r["gbps"] / o["gbps"], 3) if o and o["gbps"] > 0 else None

        redis_best = max((by[(s, op, block, clients, batch)] for s in REDIS_SYSTEMS
                          if (s, op, block, clients, batch) in by), key=lambda x: x["gbps"],
                         default=None)
        row["vs_redis_same_transport"] = ratio(same_redis)
        row["vs_best_redis"] = ratio(redis_best["system"]) if redis_best else None
        row["best_redis"] = redis_best["system"] if redis_best else None
        row["vs_raw"] = ratio(raw)
        if ("mooncake-tcp", op, block, clients, batch) in by:
            row["vs_mooncake_tcp"] = ratio("mooncake-tcp")
        row["raw_baseline"] = raw
        if system in ("kvstore-shm", "kvstore-shm-2rpc", "kvstore-dp-shm",
                      "kvstore-dp-shm-nopoll"):
            peers = [by[(s, op, block, clients, batch)] for s in
                     ("kvstore-tcp", "kvstore-unix", "kvstore-dp-tcp", "kvstore-dp-unix",
                      *REDIS_SYSTEMS)
                     if (s, op, block, clients, batch) in by]
            best = max(peers, key=lambda x: x["gbps"], default=None)
            row["best_socket_path"] = best["system"] if best else None
            row["vs_best_socket_path"] = ratio(best["system"]) if best else None
        out.append(row)
    return out


def _cpu_total(cell: dict[str, Any]) -> float:
    cpu = cell["cpu_s_per_gb"]
    return round(cpu["server"] + cpu["client"], 4)


def _targets(results: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-call targets (issue 14): ratios to the peer on the same kind of
    socket, 1 client, at 1 and 8 blocks per call, and 4 KiB Get latency."""
    rat = {(r["system"], r["op"], r["block_bytes"], r["clients"], r["per_call"]): r
           for r in ratios}
    res = {(r["system"], r["op"], r["block_bytes"], r["clients"], r["batch_blocks"]): r
           for r in results}
    out = []

    def ratio_target(system: str, op: str, block: int, per_call: int, key: str,
                     floor: float, peer: str) -> None:
        r = rat.get((system, op, block, 1, per_call))
        if r is None:
            return
        v = r.get(key)
        what = f"Redis ({peer})" if "redis" in peer.lower() else peer
        out.append({"target": f"{system} {op} {_fmt_size(block)}, {per_call}/call, 1 client "
                              f">= {floor}x {what}",
                    "value": v, "ok": None if v is None else v >= floor})

    # The SDK's default path (the data plane) first, then the gRPC path.
    for tcp, unix, shm in (("kvstore-dp-tcp", "kvstore-dp-unix", "kvstore-dp-shm"),
                           ("kvstore-tcp", "kvstore-unix", "kvstore-shm")):
        for op, floor in (("get", 2.0), ("put", 1.5)):
            ratio_target(shm, op, MiB, 1, "vs_redis_same_transport", floor, "redis-unix")
        for op in ("get", "put"):
            ratio_target(tcp, op, MiB, 1, "vs_redis_same_transport", 1.2, "redis-tcp")
        ratio_target(shm, "get", 4 * MiB, 8, "vs_best_redis", 3.0, "the best redis")
        ratio_target(tcp, "get", MiB, 8, "vs_redis_same_transport", 1.2, "redis-tcp")
        ratio_target(tcp, "get", MiB, 8, "vs_raw", 0.7, "raw-tcp")
        for system, peer in ((tcp, "redis-tcp"), (unix, "redis-unix"), (shm, "redis-unix")):
            mine = res.get((system, "get", 4 * KiB, 1, 1))
            theirs = res.get((peer, "get", 4 * KiB, 1, 1))
            if mine is None or theirs is None:
                continue
            for q in ("p50", "p99"):
                a, b = mine[f"{q}_ms_call"], theirs[f"{q}_ms_call"]
                out.append({"target": f"{system} get 4 KiB, 1/call: {q} latency <= {peer}'s "
                                      f"({b} ms)", "value": a, "ok": a <= b})
        for per_call in (1, 8):
            mine = res.get((tcp, "get", MiB, 1, per_call))
            raw = res.get(("raw-tcp", "get", MiB, 1, per_call))
            if mine is None or raw is None:
                continue
            a, b = _cpu_total(mine), _cpu_total(raw)
            value = round(a / b, 3) if b > 0 else None
            out.append({"target": f"{tcp} get 1 MiB, {per_call}/call: CPU s/GB (server + "
                                  f"client) <= 1.5x raw-tcp's ({a} vs {b})",
                        "value": value, "ok": None if value is None else value <= 1.5})
    return out


# --------------------------------------------------------------------------- chart


def write_png(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    systems = [s for s in ALL_SYSTEMS if any(r["system"] == s for r in results)]
    groups = sorted({(r["block_bytes"], r["clients"], r["batch_blocks"]) for r in results})
    colors = {"kvstore-dp-tcp": "#9467bd", "kvstore-dp-unix": "#c5b0d5",
              "kvstore-dp-shm": "#5b2c83", "kvstore-tcp": "#1f77b4", "kvstore-unix": "#4a9fe0",
              "kvstore-shm": "#0b3d91",
              "redis-tcp": "#d62728", "redis-unix": "#ff7f7f", "raw-tcp": "#7f7f7f",
              "raw-unix": "#bdbdbd", "memcpy": "#2ca02c", "kvstore-tcp-syncput": "#9ecae1",
              "kvstore-shm-2rpc": "#6baed6"}
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), sharey=True)
    by = {(r["system"], r["op"], r["block_bytes"], r["clients"], r["batch_blocks"]): r["gbps"]
          for r in results}
    width = 0.8 / max(1, len(systems))
    for ax, op in zip(axes, ("put", "get"), strict=True):
        for i, s in enumerate(systems):
            xs = [g + (i - (len(systems) - 1) / 2) * width for g in range(len(groups))]
            ys = [by.get((s, op, b, c, n), 0.0) for b, c, n in groups]
            bars = ax.bar(xs, ys, width, label=s, color=colors.get(s))
            for bar, y in zip(bars, ys, strict=True):
                if y:
                    ax.annotate(f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y),
                                ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{_fmt_size(b)}\n{c} client{'s' if c > 1 else ''}\n{n}/call"
                            for b, c, n in groups])
        ax.set_title(f"{op.capitalize()}")
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0].set_ylabel("GB/s (1e9 B/s), median of rounds, log scale")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"kvstore vs Redis {doc['meta'].get('redis', {}).get('version', '(skipped)')} "
                 f"vs raw sockets — {doc['meta']['cpus']} CPUs, {doc['meta']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main run


def _tiers_at_end(server: Any) -> dict[str, Any]:
    """Blocks, bytes and evictions per tier of a bench server, from its Stats."""
    from kvstore import Client

    with Client(server.tcp) as c:
        return {t.tier.name: {"blocks": t.blocks, "bytes": t.bytes, "evictions": t.evictions}
                for t in c.stats().tiers}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from bench._peers.raw import raw_server_main
    from bench._peers.redis_proc import (
        RedisServer,
        ensure_redis_py,
        ensure_redis_server,
        redis_version,
    )
    from bench._server import BenchServer

    progress = Progress()
    notes: list[str] = []
    t_start = time.perf_counter()
    systems = [s for s in args.systems]
    if args.arena == "private":
        shm_systems = [s for s in systems if "shm" in s]
        systems = [s for s in systems if s not in shm_systems]
        if shm_systems:
            notes.append(f"--arena private: {', '.join(shm_systems)} skipped (no shared "
                         "memory on a server whose L1 arena is anonymous)")
    tmp = tempfile.TemporaryDirectory(prefix="kvstore-peers-")
    work = Path(tmp.name)

    redis_srv: RedisServer | None = None
    redis_meta: dict[str, Any] = {}
    if any(s in REDIS_SYSTEMS for s in systems):
        path, note = ensure_redis_server(not args.no_install)
        notes.append(note)
        ok_py, note_py = ensure_redis_py(not args.no_install)
        notes.append(note_py)
        if path and ok_py:
            redis_srv = RedisServer(path, work / "redis", maxmemory=args.redis_maxmemory)
            redis_srv.start()
            redis_meta = {"version": redis_version(path), "command": " ".join(
                a if a else '""' for a in redis_srv.command), "client": note_py,
                "socket_read_size": args.redis_read_size}
            notes.append(f"Redis {redis_meta['version']} started on 127.0.0.1:{redis_srv.port} "
                         f"and {redis_srv.unix}")
        else:
            systems = [s for s in systems if s not in REDIS_SYSTEMS]
            notes.append("Redis cells skipped")
    mooncake = None
    if any(s in MOONCAKE_SYSTEMS for s in systems):
        from bench._peers.mooncake_proc import MooncakeCluster, find_mooncake

        site, note = find_mooncake(args.mooncake_venv)
        notes.append(note)
        if site:
            mooncake = MooncakeCluster(args.mooncake_venv, site, work / "mooncake",
                                       segment_bytes=2 * 1024**3)
            mooncake.start()
            notes.append(f"Mooncake master {mooncake.master_addr}, holder pid {mooncake.pid}")
        else:
            systems = [s for s in systems if s not in MOONCAKE_SYSTEMS]
    for n in notes:
        progress.line(f"peers: {n}")

    # A shared-memory file (the shm systems need it; L1 bytes are checked on
    # every Get, l1.verify_reads) or, with --arena private, anonymous memory
    # (a TCP/unix-only server, as one serving engines on other hosts runs).
    # --arena split runs both: the shm systems on the shared one, the rest on
    # the anonymous one (each kind of client against the server it would use).
    wants_shm = args.arena == "shared" or (args.arena == "split"
                                           and any("shm" in s for s in systems))
    shm_path = (f"/dev/shm/kvstore-peers-{os.getpid()}-{secrets.token_hex(4)}"
                if wants_shm else "")
    extra = list(args.server_flag or [])
    shm_flags = ["--l1-shm-path", shm_path, *extra] if shm_path else extra
    server = BenchServer(*(extra if args.arena == "split" else shm_flags),
                         l1_capacity=args.l1_capacity, l2=True, unix=True,
                         data_dir=str(work / "kvstore"))
    (work / "kvstore").mkdir()
    shm_server: BenchServer | None = None
    if args.arena == "split" and shm_path:
        shm_server = BenchServer(*shm_flags, l1_capacity=args.l1_capacity, l2=True, unix=True,
                                 data_dir=str(work / "kvstore-shm"))
        (work / "kvstore-shm").mkdir()
    ctx = mp.get_context("spawn")
    raw_parent, raw_child = ctx.Pipe()
    raw_proc = ctx.Process(target=raw_server_main,
                           args=(raw_child, str(work / "raw.sock"), max(args.sizes)), daemon=True)
    results: list[dict[str, Any]] = []
    pool: Pool | None = None
    l2_stats: dict[str, Any] = {}
    shm_l2_stats: dict[str, Any] = {}
    server_rss = shm_server_rss = 0
    try:
        raw_proc.start()
        raw_child.close()
        raw_port, raw_unix = raw_parent.recv()
        progress.status(f"peers: starting kvstore (L1 {args.l1_capacity} in "
                        f"{shm_path if args.arena == 'shared' else 'anonymous memory'}, "
                        "pre-faulted; L2 on) ...")
        server.start()
        assert server.proc is not None
        if shm_server is not None:
            progress.status(f"peers: starting the shm systems' kvstore (L1 {args.l1_capacity} "
                            f"in {shm_path}) ...")
            shm_server.start()
        cfg = {"kv_tcp": server.tcp, "kv_unix": server.unix_target,
               "kv_shm_unix": (shm_server or server).unix_target,
               "redis_port": redis_srv.port if redis_srv else 0,
               "redis_unix": redis_srv.unix if redis_srv else "",
               "redis_read_size": args.redis_read_size,
               "raw_port": raw_port, "raw_unix": raw_unix,
               "mooncake_site": mooncake.site if mooncake else "",
               "mooncake_master": mooncake.master_addr if mooncake else "",
               "malloc_tuning": os.environ.get("KVSTORE_MALLOC_TUNING", "1") != "0"}
        progress.status(f"peers: starting {max(args.clients)} client processes ...")
        pool = Pool(max(args.clients), cfg)
        where = placement(args.pin)
        if where is not None:
            server_cpus, client_cpus = where
            for pid in (server.proc.pid, shm_server.proc.pid if shm_server and shm_server.proc
                        else None, redis_srv.pid if redis_srv else None, raw_proc.pid,
                        mooncake.pid if mooncake else None):
                if pid:
                    pin_process(pid, server_cpus)
            for proc in pool.procs:
                pin_process(proc.pid, client_cpus)
            progress.line(f"peers: pinned servers to CPU {sorted(server_cpus)}, clients to "
                          f"CPU {sorted(client_cpus)}")
        kv_pid = {s: (shm_server.proc.pid if shm_server and shm_server.proc and "shm" in s
                      else server.proc.pid) for s in systems}
        pids = {s: (kv_pid[s] if s.startswith("kvstore") else
                    redis_srv.pid if s.startswith("redis") and redis_srv else
                    raw_proc.pid if s.startswith("raw") else
                    mooncake.pid if s.startswith("mooncake") and mooncake else None)
                for s in systems}
        groups = [(b, c, n) for n in args.per_call for b in args.sizes for c in args.clients]
        ncells = len(groups) * 2
        cell_no = 0
        for block, clients, batch in groups:
            count = _count(block, clients, batch, args.bytes_per_round, args.max_calls)
            nbytes = count * clients * block
            for op in ("put", "get"):
                cell_no += 1
                rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
                label = f"[{cell_no}/{ncells}] {op} {_fmt_size(block)} x{clients} {batch}/call"
                for rnd in range(args.rounds + 1):
                    for system in systems:
                        what = "warm-up" if rnd == 0 else f"round {rnd}/{args.rounds}"
                        if progress.tty or system == systems[0]:
                            progress.status(f"peers: {label} {what}" +
                                            (f" {system}" if progress.tty else
                                             f" ({len(systems)} systems)"))
                        r = _round(pool, system, op, block, batch, clients, count,
                                   pids[system])
                        if rnd:
                            rounds[system].append(r)
                for system in systems:
                    cell = {"system": system, "op": op, "block_bytes": block,
                            **({"server": "shm_systems_server"
                                if shm_server is not None and "shm" in system
                                else "kvstore_server"} if system.startswith("kvstore") else {}),
                            "clients": clients, "batch_blocks": batch,
                            "blocks_per_round": count * clients, "bytes_per_round": nbytes,
                            "api": API[system][op],
                            **_summary(rounds[system], nbytes, batch)}
                    results.append(cell)
                progress.line(_cell_line(label, [r for r in results
                                                 if (r["op"], r["block_bytes"], r["clients"],
                                                     r["batch_blocks"])
                                                 == (op, block, clients, batch)]))
            pool.ask(clients, ("cleanup", systems, block, count))
        l2_stats = _tiers_at_end(server)
        server_rss = server.rss_bytes()
        if shm_server is not None:
            shm_l2_stats = _tiers_at_end(shm_server)
            shm_server_rss = shm_server.rss_bytes()
    finally:
        progress.status("peers: stopping ...")
        if pool is not None:
            pool.close()
        server.stop()
        if shm_server is not None:
            shm_server.stop()
        if mooncake is not None:
            mooncake.stop()
        raw_parent.close()
        raw_proc.join(10)
        if raw_proc.is_alive():
            raw_proc.terminate()
        if redis_srv is not None:
            redis_srv.stop()
        if shm_path and os.path.exists(shm_path):
            os.unlink(shm_path)
            notes.append(f"removed leftover {shm_path}")
        tmp.cleanup()
        progress.line("")
    ratios = _ratios(results)
    import grpc

    return {
        "bench": "peers",
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "pin": args.pin,
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "quick": args.quick,
            "rounds": args.rounds,
            "warmup_rounds": 1,
            "batch_blocks": args.batch,
            "bytes_per_round_target": args.bytes_per_round,
            "seconds": round(time.perf_counter() - t_start, 1),
            "kvstore_server": {
                "command": " ".join(server.command),
                "shm_path": shm_path if shm_server is None else "",
                "arena": args.arena,
                "l1": (f"{args.l1_capacity} arena in the shared-memory file {shm_path} "
                       "(pre-faulted at start; removed at exit; L1 bytes checked on every Get)"
                       if args.arena == "shared" else f"{args.l1_capacity} anonymous arena "
                       "(pre-faulted at start; only the server writes it: L1 bytes not checked "
                       "again on Gets, l1.verify_reads)" + (
                           "; the shm systems on a second server (shm_systems_server)"
                           if shm_server is not None else "")),
                "shm_systems_server": None if shm_server is None else {
                    "command": " ".join(shm_server.command),
                    "shm_path": shm_path,
                    "l1": f"{args.l1_capacity} arena in the shared-memory file {shm_path} "
                          "(pre-faulted at start; removed at exit; L1 bytes checked on every "
                          "Get)",
                    "tiers_at_end": shm_l2_stats,
                    "rss_bytes_at_end": shm_server_rss},
                "l2": "enabled (LMDB in a temp dir), default write-back (write_mode evict): "
                      "Puts that fit in L1 do not touch disk",
                "tiers_at_end": l2_stats,
                "rss_bytes_at_end": server_rss,
            },
            "redis": redis_meta,
            "per_call": args.per_call,
            "batching": f"{' and '.join(map(str, args.per_call))} blocks per call for every "
                        "system: kvstore one Put (stream, or ShmReserve+ShmCommit) / one Get "
                        "(GetSmall when the batch fits one message, else a stream; "
                        "ShmAcquire) per batch; Redis one MSET / MGET per batch; raw one "
                        "request per batch",
            "apis": {s: API[s] for s in systems},
            "buffers": "each client puts from a pool of distinct pre-faulted 64 MiB of "
                       "source blocks and gets into one batch of pre-faulted buffers reused "
                       "by every call",
            "units": "gbps = 1e9 bytes/s over a round (all clients, first start to last "
                     "finish), median of rounds; latency per call and per block (call / "
                     "blocks per call) over all rounds; cpu_s_per_gb = CPU seconds "
                     "per 1e9 bytes moved, server process (/proc/PID/task/*/schedstat, "
                     "all threads, ns) and client processes (getrusage RUSAGE_SELF, all "
                     "threads) summed",
            "malloc_tuning": os.environ.get("KVSTORE_MALLOC_TUNING", "1") != "0",
            "busy_poll_us": _busy_poll_us(),
        },
        "notes": notes,
        "results": results,
        "ratios": ratios,
        "targets": _targets(results, ratios),
    }


def _cell_line(label: str, cells: list[dict[str, Any]]) -> str:
    parts = [f"{c['system']} {c['gbps']:.2f}" for c in cells]
    return f"{label}: GB/s " + ", ".join(parts)


def print_table(doc: dict[str, Any]) -> None:
    rows = doc["results"]
    print(f"\n{'op':>4} {'block':>6} {'cl':>2} {'/call':>5} {'system':>20} {'GB/s':>7} "
          f"{'p50 ms/blk':>10} {'p99 ms/blk':>10} {'srv s/GB':>8} {'cli s/GB':>8}",
          file=sys.stderr)
    for r in rows:
        print(f"{r['op']:>4} {_fmt_size(r['block_bytes']):>6} {r['clients']:>2} "
              f"{r['batch_blocks']:>5} {r['system']:>20} {r['gbps']:7.2f} "
              f"{r['p50_ms_block']:10.3f} "
              f"{r['p99_ms_block']:10.3f} {r['cpu_s_per_gb']['server']:8.3f} "
              f"{r['cpu_s_per_gb']['client']:8.3f}", file=sys.stderr)
    print("\ntargets:", file=sys.stderr)
    for t in doc["targets"]:
        mark = {True: "PASS", False: "MISS", None: "n/a "}[t["ok"]]
        print(f"  {mark} {t['target']}: {t['value']}", file=sys.stderr)


def positive_int(text: str) -> int:
    """An argparse type: a count of at least 1 (0 or less divided by zero, or
    timed no round, further on); a bad one is argparse's one error line, exit 2."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of at least 1")
    return n


def positive_size(text: str) -> int:
    """An argparse type: a size of at least one byte (``kvstore.config.parse_size``:
    4096, 64KiB, 1MB, 2GiB)."""
    from kvstore.config import parse_size
    from kvstore.errors import InvalidConfig

    try:
        n = parse_size(text)
    except InvalidConfig as e:  # not a ValueError: argparse would let it through
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size of at least 1 byte")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer bytes and rounds (~1 min)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test size: 1 MiB blocks, 1 client, 1 round, small L1")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--png", help="write a bar chart (PNG) here")
    p.add_argument("--sizes", nargs="+", type=positive_size, default=None,
                   help="block sizes [default: 1MiB 4MiB]")
    p.add_argument("--clients", nargs="+", type=positive_int, default=None,
                   help="client process counts [default: 1 4]")
    p.add_argument("--systems", nargs="+", choices=ALL_SYSTEMS, default=None,
                   help="which systems [default: all but the previous client paths "
                        f"{', '.join(OLD_SYSTEMS)}]")
    p.add_argument("--batch", type=positive_int, default=8,
                   help="blocks per call when --per-call is not given [default: 8]")
    p.add_argument("--per-call", nargs="+", type=positive_int, default=None,
                   help="blocks per call, a dimension of the run (e.g. 1 8) "
                        "[default: --batch]")
    p.add_argument("--max-calls", type=positive_int, default=2000,
                   help="calls per client per round at most (small blocks) [default: 2000]")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="timed rounds per cell [default: 5, --quick 3, --tiny 1]")
    p.add_argument("--bytes-per-round", type=positive_size, default=None,
                   help="bytes per round, all clients [default: 256MiB, --quick 96MiB]")
    p.add_argument("--l1-capacity", default=None, help="kvstore L1 [default: 2GiB]")
    p.add_argument("--redis-maxmemory", default="4gb")
    p.add_argument("--redis-read-size", type=positive_size, default=MiB,
                   help="redis-py socket_read_size [default: 1MiB; redis-py's own is 32KiB]")
    p.add_argument("--mooncake-venv", default="",
                   help="a venv with mooncake-transfer-engine-non-cuda: adds the "
                        "mooncake-tcp peer when named in --systems")
    p.add_argument("--no-install", action="store_true",
                   help="never apt-get/pip install Redis or redis-py (skip Redis instead)")
    p.add_argument("--pin", choices=("none", "same", "apart"), default="none",
                   help="CPU placement: every server and client process on one CPU (same), "
                        "servers on one and clients on another (apart), or the scheduler's "
                        "choice (none) [default: none]; see placement()")
    p.add_argument("--arena", choices=("shared", "private", "split"), default="shared",
                   help="kvstore's L1 arena: a shared-memory file (the shm systems run; L1 "
                        "bytes are checked on every Get), anonymous memory (a TCP/unix-only "
                        "server, `kvstore serve`'s default, as for engines on other hosts; the "
                        "shm systems are skipped), or split: two servers, the shm systems on a "
                        "shared arena and the others on an anonymous one (each pre-faults "
                        "--l1-capacity: twice the memory) [default: shared]")
    p.add_argument("--server-flag", action="append", metavar="FLAG",
                   help="extra flag for kvstore serve (repeat)")
    args = p.parse_args(argv)

    def default(name: str, value: Any) -> None:
        # Only what was not given (`x or value` took a given 0 for "not given").
        if getattr(args, name) is None:
            setattr(args, name, value)

    if args.tiny:
        default("sizes", [MiB])
        default("clients", [1])
        default("rounds", 1)
        default("bytes_per_round", 16 * MiB)
        default("l1_capacity", "256MiB")
        args.redis_maxmemory = "512mb"
    default("sizes", [MiB, 4 * MiB])
    default("clients", [1, 4])
    default("rounds", 3 if args.quick else 5)
    default("bytes_per_round", 96 * MiB if args.quick else 256 * MiB)
    default("l1_capacity", "2GiB")
    default("systems", list(DEFAULT_SYSTEMS))
    default("per_call", [args.batch])
    doc = run_bench(args)
    print_table(doc)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.png:
        write_png(doc, args.png)
        print(f"chart: {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
