"""kvstore for an engine on another host, simulated on one machine (issue 14,
item 4): throughput and p50 latency over a link with 0, 0.2 and 1 ms of
added round-trip time, at 1 and 8 blocks per call, and whether striping one
large Get over several connections helps.

The servers (kvstore, redis-server, a raw TCP socket server) run in one
network namespace, the client in another; ``bench._netns`` joins them (a
veth pair with ``tc netem``, or a TUN delay line where the kernel has no
netem) and sets the delay. The client process reuses ``bench.peers``'
per-system client code (``bench/_peers/worker.py``), so any system it knows
can join (``--systems``; a data-plane system added there runs here too, with
its server flags given by ``--server-flag``). Every cell of one delay runs in
one client process, the systems' rounds interleaved; figures are medians.

    python -m bench.cross_host                      # full run (~10 min)
    python -m bench.cross_host --quick              # ~3 min
    python -m bench.cross_host --systems kvstore-tcp raw-tcp --delays 1

Needs root (network namespaces). docs/cross-host.md has the method and the
figures. ``python -m bench.cross_host serve-raw`` and ``client`` are the
internal parts run inside the namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
REDIS_PORT = 6390  # fixed: the server namespace is private to this run
RAW_PORT = 7070
DEFAULT_SYSTEMS = ["kvstore-tcp", "redis-tcp", "raw-tcp"]
# Systems whose clients this bench builds itself for striping: one TCP
# connection per stripe (grpc shares one connection between channels to the
# same target unless told not to).
_OWN_CONNECTION_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


# -- servers in the server namespace ---------------------------------------------------


def _wait(what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes],
          timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout} s")
        time.sleep(0.05)  # polling with a deadline


class Servers:
    """The servers the chosen systems need, started in the server namespace."""

    def __init__(self, pair: Any, systems: Sequence[str], workdir: Path,
                 server_flags: Sequence[str], max_block: int) -> None:
        self.pair = pair
        self.systems = systems
        self.workdir = workdir
        self.server_flags = list(server_flags)
        self.max_block = max_block
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cfg: dict[str, Any] = {}
        self.notes: list[str] = []

    def _start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        env = {**os.environ, "KVSTORE_LOG_LEVEL": os.environ.get("KVSTORE_LOG_LEVEL", "WARNING")}
        proc = subprocess.Popen(self.pair.argv(self.pair.server_ns, command), stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        log.close()
        self.procs.append(proc)
        return proc

    def start(self) -> Servers:
        from bench._netns import SERVER_IP

        self.cfg = {"peer_host": SERVER_IP, "redis_read_size": MiB}
        if any(s.startswith("kvstore") for s in self.systems):
            ready = self.workdir / "kvstore-ready.json"
            data = self.workdir / "kvstore-data"
            data.mkdir()
            proc = self._start("kvstore", [
                sys.executable, "-m", "kvstore", "serve", "--server-listen", f"{SERVER_IP}:0",
                "--ready-file", str(ready), "--data-dir", str(data), "--l1-capacity", "1GiB",
                "--l2-enabled", "false", *self.server_flags])
            _wait("kvstore server", ready.exists, proc)
            info = json.loads(ready.read_text())
            self.cfg["kv_tcp"] = info["tcp"]
            self.notes.append(f"kvstore {info['tcp']} (gRPC over TCP: kvstore-tcp; the data "
                              "plane's TCP listener: kvstore-dp-tcp)")
        if any(s.startswith("redis") for s in self.systems):
            from bench._peers.redis_proc import ensure_redis_server, redis_version

            path, note = ensure_redis_server(allow_install=False)
            if path is None:
                raise RuntimeError(note)
            proc = self._start("redis", [
                path, "--port", str(REDIS_PORT), "--bind", SERVER_IP, "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--maxmemory", "4gb",
                "--maxmemory-policy", "noeviction", "--dir", str(self.workdir),
                "--daemonize", "no"])
            ping = self.pair.argv(self.pair.server_ns, [
                "redis-cli", "-h", SERVER_IP, "-p", str(REDIS_PORT), "ping"])
            _wait("redis-server", lambda: subprocess.run(
                ping, capture_output=True, text=True).stdout.strip() == "PONG", proc)
            self.cfg["redis_port"] = REDIS_PORT
            self.notes.append(f"redis-server {redis_version(path)} {SERVER_IP}:{REDIS_PORT}")
        if any(s.startswith("raw") for s in self.systems):
            ready = self.workdir / "raw-ready"
            proc = self._start("raw", [
                sys.executable, "-m", "bench.cross_host", "serve-raw", "--bind", SERVER_IP,
                "--port", str(RAW_PORT), "--max-bytes", str(self.max_block),
                "--ready", str(ready)])
            _wait("raw socket server", ready.exists, proc)
            self.cfg["raw_port"] = RAW_PORT
            self.notes.append(f"raw TCP socket server {SERVER_IP}:{RAW_PORT}")
        return self

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def serve_raw(bind: str, port: int, max_bytes: int, ready: str) -> None:
    """The raw baseline of ``bench._peers.raw`` on ``bind:port``."""
    from bench._peers.raw import _serve_conn

    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((bind, port))
    lsock.listen(64)
    Path(ready).write_text("ok")
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_serve_conn, args=(conn, max_bytes), daemon=True).start()


# -- the client, in the client namespace ----------------------------------------------


def _rtt_ms(host: str, port: int, samples: int = 21) -> float:
    """Median time of a TCP connect (SYN, SYN-ACK: one round trip)."""
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        with socket.create_connection((host, port), timeout=10):
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def _ping_ms(host: str, port: int, samples: int = 51) -> float:
    """Median time of a 1-byte request and answer on the raw socket server."""
    from bench._peers.raw import RawClient

    client = RawClient((host, port))
    buf = [memoryview(bytearray(1))]
    times = []
    try:
        for _ in range(samples):
            started = time.perf_counter()
            client.get_into(1, buf)
            times.append(time.perf_counter() - started)
    finally:
        client.close()
    return statistics.median(times) * 1000.0


def _stripe_workers(system: str, stripes: int, cfg: dict[str, Any]) -> list[Any]:
    from bench._peers.worker import Worker

    workers = [Worker(k, cfg) for k in range(stripes)]
    if system == "kvstore-tcp":
        from kvstore import Client

        for w in workers:
            # gRPC, as the name says (without data_plane=False the SDK took the
            # data plane the server offers: a review found kvstore-tcp's rows
            # were the data plane's, compared with kvstore-dp-tcp's)
            w.clients[system] = Client(cfg["kv_tcp"], namespace="bench", timeout=300,
                                       options=_OWN_CONNECTION_OPTIONS, data_plane=False)
    return workers


def _cell(workers: list[Any], system: str, op: str, block: int, per_call: int,
          keys: list[bytes]) -> tuple[float, list[float]]:
    """One round: every key once, ``per_call`` blocks per call, each call
    striped over the workers (each its own connection). Returns the round's
    GB/s and its per-call latencies (s)."""
    stripes = len(workers)
    share = per_call // stripes
    fns = [w.call(system, op, block) for w in workers]
    srcs = workers[0].sources(block) if op == "put" else []
    dsts = [w.dests(block, share) for w in workers]
    if op == "get":  # (as Worker.run: what a round left would pass the check below)
        for dst in dsts:
            for d in dst:
                workers[0].np.frombuffer(d, dtype=workers[0].np.uint8).fill(0)
    pool = ThreadPoolExecutor(stripes) if stripes > 1 else None
    lat: list[float] = []
    try:
        started = time.perf_counter()
        for base in range(0, len(keys), per_call):
            call_keys = keys[base : base + per_call]
            t = time.perf_counter()
            if pool is None:
                fns[0](call_keys, [srcs[(base + j) % len(srcs)] for j in range(len(call_keys))]
                       if srcs else [], dsts[0][: len(call_keys)], base)
            else:
                futures = []
                for k in range(stripes):
                    part = call_keys[k * share : (k + 1) * share]
                    first = base + k * share
                    futures.append(pool.submit(
                        fns[k], part, [srcs[(first + j) % len(srcs)] for j in range(len(part))]
                        if srcs else [], dsts[k][: len(part)], first))
                for f in futures:
                    f.result()
            lat.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
    finally:
        if pool is not None:
            pool.shutdown()
    if op == "get" and keys:
        # Outside the timing: the last call's blocks are the bytes Put under
        # their keys (key i was put from worker 0's source i; see Worker.check_get).
        put_from = workers[0].sources(block)
        base = (len(keys) - 1) // per_call * per_call
        call_keys = keys[base : base + per_call]
        for k, w in enumerate(workers):
            part = call_keys[k * share : (k + 1) * share] if stripes > 1 else call_keys
            first = base + k * share if stripes > 1 else base
            w.check_get(system, part, [put_from[(first + j) % len(put_from)]
                                       for j in range(len(part))], dsts[k][: len(part)])
    return len(keys) * block / elapsed / 1e9, lat


def run_client(spec: dict[str, Any]) -> dict[str, Any]:
    """Every cell of one delay (run inside the client namespace)."""
    from bench._peers.worker import Worker

    cfg = spec["cfg"]
    host = cfg["peer_host"]
    port = int(cfg["kv_tcp"].rsplit(":", 1)[1]) if "kv_tcp" in cfg else cfg.get(
        "raw_port", cfg.get("redis_port"))
    out: dict[str, Any] = {"rtt_ms": _rtt_ms(host, port), "cells": []}
    if "raw_port" in cfg:
        out["ping_ms"] = _ping_ms(host, cfg["raw_port"])
    per_calls = spec["per_call"]
    for block in spec["sizes"]:
        count = max(per_calls) * max(1, min(spec["max_calls"],
                                            spec["bytes_per_round"] // block // max(per_calls)))
        # One worker set per (system, stripes); worker 0 of stripes=1 loads the keys.
        plans: list[tuple[str, str, int, list[Any]]] = []
        keyset: dict[str, list[bytes]] = {}
        for system in spec["systems"]:
            keyset[system] = [f"xh/{system}/{block}/{i}".encode() for i in range(count)]
            single = (_stripe_workers(system, 1, cfg) if system == "kvstore-tcp"
                      else [Worker(0, cfg)])
            for op in ("put", "get"):
                for pc in per_calls:
                    plans.append((system, op, pc, single))
            for stripes in spec["stripes"]:
                if stripes > 1 and max(per_calls) % stripes == 0:
                    plans.append((system, "get", max(per_calls),
                                  _stripe_workers(system, stripes, cfg)))
        results: dict[tuple[str, str, int, int], tuple[list[float], list[float]]] = {}
        for system in spec["systems"]:  # load, and warm every connection
            single = next(p[3] for p in plans if p[0] == system)
            _cell(single, system, "put", block, max(per_calls), keyset[system])
        for plan in plans:
            system, op, pc, workers = plan
            _cell(workers, system, op, block, pc, keyset[system][: pc * 2])
        for _ in range(spec["rounds"]):
            for system, op, pc, workers in plans:
                gbps, lat = _cell(workers, system, op, block, pc, keyset[system])
                rates, lats = results.setdefault((system, op, pc, len(workers)), ([], []))
                rates.append(gbps)
                lats.extend(lat)
        for (system, op, pc, stripes), (rates, lats) in results.items():
            out["cells"].append({
                "system": system, "op": op, "block_bytes": block, "per_call": pc,
                "stripes": stripes, "gbps": round(statistics.median(rates), 4),
                "gbps_rounds": [round(r, 4) for r in rates],
                "p50_ms_call": round(statistics.median(lats) * 1000.0, 3),
                "calls": len(lats)})
        for w in {id(w): w for plan in plans for w in plan[3]}.values():
            w.close()
    return out


# -- orchestration ---------------------------------------------------------------------


def _fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n // 1024} KiB"


def tables(runs: list[dict[str, Any]]) -> str:
    """One markdown table per delay: GB/s (p50 ms per call) per cell."""
    lines: list[str] = []
    for run in runs:
        cells = run["cells"]
        sizes = sorted({c["block_bytes"] for c in cells})
        ping = f", 1-byte ping {run['ping_ms']:.3f} ms" if "ping_ms" in run else ""
        lines.append(f"\n**Added RTT {run['delay_ms']:g} ms** (measured: TCP connect "
                     f"{run['rtt_ms']:.3f} ms{ping}; {run['method']})\n")
        lines.append("| system | op | blocks/call | connections | "
                     + " | ".join(f"{_fmt_size(s)}: GB/s (p50 ms)" for s in sizes) + " |")
        lines.append("|---|---|---:|---:|" + "---:|" * len(sizes))
        rows = sorted({(c["system"], c["op"], c["per_call"], c["stripes"]) for c in cells},
                      key=lambda r: (r[1] != "get", r[2], r[3], r[0]))
        for system, op, pc, stripes in rows:
            row = []
            for size in sizes:
                c = next((c for c in cells if (c["system"], c["op"], c["per_call"], c["stripes"],
                                               c["block_bytes"]) == (system, op, pc, stripes,
                                                                     size)), None)
                row.append("-" if c is None else f"{c['gbps']:.2f} ({c['p50_ms_call']:.2f})")
            lines.append(f"| {system} | {op} | {pc} | {stripes} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from kvstore.config import parse_size

    p = argparse.ArgumentParser(prog="python -m bench.cross_host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="run", choices=["run", "client", "serve-raw"],
                   help=argparse.SUPPRESS)
    p.add_argument("--delays", nargs="+", type=float, default=[0.0, 0.2, 1.0],
                   help="added round-trip times, ms [default: 0 0.2 1]")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[MiB, 4 * MiB],
                   help="block sizes [default: 1MiB 4MiB]")
    p.add_argument("--per-call", nargs="+", type=int, default=[1, 8],
                   help="blocks per call [default: 1 8]")
    p.add_argument("--stripes", nargs="+", type=int, default=[1, 2, 4],
                   help="connections one Get of the largest --per-call is striped over "
                        "[default: 1 2 4]")
    p.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS),
                   help="systems of bench/_peers/worker.py whose server is one of kvstore "
                        "(kvstore-*), redis-server (redis-*) or the raw socket server (raw-*) "
                        f"[default: {' '.join(DEFAULT_SYSTEMS)}]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bytes-per-round", type=parse_size, default=64 * MiB)
    p.add_argument("--max-calls", type=int, default=64,
                   help="calls of the largest --per-call per round at most [default: 64]")
    p.add_argument("--quick", action="store_true", help="1 round of 16 MiB per cell")
    p.add_argument("--method", choices=["auto", "netem", "tun"], default="auto",
                   help="how the delay is made (bench/_netns.py) [default: netem if the "
                        "kernel has it]")
    p.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                   help="extra kvstore serve flag (repeat), e.g. for a data-plane listener")
    p.add_argument("--out", help="also write the JSON here")
    # serve-raw (internal)
    p.add_argument("--bind", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode == "serve-raw":
        serve_raw(args.bind, args.port, args.max_bytes, args.ready)
        return 0
    if args.mode == "client":
        json.dump(run_client(json.load(sys.stdin)), sys.stdout)
        return 0
    if args.quick:
        args.rounds, args.bytes_per_round = 1, 16 * MiB

    from bench._netns import NetnsPair, netns_unavailable

    why = netns_unavailable()
    if why:
        print(f"cross_host: {why}; this bench needs root (network namespaces)", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvstore-xh-") as tmp, NetnsPair(args.method) as pair:
        servers = Servers(pair, args.systems, Path(tmp), args.server_flag, max(args.sizes))
        try:
            servers.start()
            for note in servers.notes:
                print(f"cross_host: {note}", file=sys.stderr)
            spec = {"cfg": servers.cfg, "systems": args.systems, "sizes": args.sizes,
                    "per_call": args.per_call, "stripes": args.stripes, "rounds": args.rounds,
                    "bytes_per_round": args.bytes_per_round, "max_calls": args.max_calls}
            for delay in args.delays:
                pair.set_delay(delay)
                print(f"cross_host: added RTT {delay:g} ms ({pair.describe()}) ...",
                      file=sys.stderr, flush=True)
                done = subprocess.run(
                    pair.argv(pair.client_ns, [sys.executable, "-m", "bench.cross_host",
                                               "client"]),
                    input=json.dumps(spec), capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    raise RuntimeError(f"client failed:\n{done.stderr[-4000:]}")
                run = json.loads(done.stdout)
                run.update(delay_ms=delay, method=pair.describe())
                runs.append(run)
        finally:
            servers.stop()
    result = {"bench": "cross_host", "argv": list(argv if argv is not None else sys.argv[1:]),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "cpus": os.cpu_count(), "runs": runs}
    print(tables(runs))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
