"""Put/Get throughput and per-block latency of kvstore, next to raw loopback TCP.

    .venv/bin/python -m bench.throughput [--quick] [--out FILE]

Starts a kvstore server subprocess (L1 only unless --l2) and a raw socket
server process, then for each block size (64 KiB, 1 MiB, 4 MiB) and client
count (1, 4; each client its own process, multiprocessing spawn) times:

* kvstore Put: one ``Client.put`` of one block per call (ack memory);
* kvstore Get: one ``Client.get`` of one block per call (a new ``bytes``);
* kvstore get_into: one ``Client.get_into`` of one block into a reused buffer;
* raw put: the same bytes over a plain TCP connection, acked by one byte
  once the server holds all of them; raw get: the server sends the bytes
  (the client receives into a reused buffer; get_into is compared with it too,
  a raw get measured again in the get_into cell).

Each cell moves the same bytes for kvstore and raw, in several rounds after
one warm-up each, kvstore and raw rounds alternated (ABBA); after each kvstore
Get round, outside its timing, its last call's bytes are compared with those
Put. Reported: the median GB/s (1e9 bytes/s) over rounds, p50/p99 of
the per-block call latency over all rounds, and kvstore/raw ratios. JSON goes
to stdout (and --out); a table goes to stderr.

``--metrics on`` serves Prometheus metrics from the server (scraped every
``--scrape-interval`` s meanwhile); ``--metrics ab`` is the cost of metrics in
one run: two servers, metrics on and off, the same kvstore cells timed
alternately (ABBA rounds), reported as the on/off ratio of median GB/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from bench._peers.raw import recv_exact_into
from bench.peers import positive_int, positive_size

KiB = 1024
MiB = 1024 * KiB

_HDR = struct.Struct("<cQ")  # op (b"P" put, b"G" get, b"Q" quit), length


# --------------------------------------------------------------------------- raw server


def _raw_conn(sock: socket.socket, max_bytes: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(max_bytes)
    view = memoryview(buf)
    payload = memoryview(os.urandom(max_bytes))
    hdr = bytearray(_HDR.size)
    try:
        while True:
            recv_exact_into(sock, memoryview(hdr))
            op, n = _HDR.unpack(hdr)
            if op == b"P":
                recv_exact_into(sock, view[:n])
                sock.sendall(b"\x01")
            elif op == b"G":
                sock.sendall(payload[:n])
            else:
                return
    except (ConnectionError, OSError):
        return
    finally:
        sock.close()


def raw_server_main(conn: Connection, max_bytes: int) -> None:
    """A process: accept connections, one thread each, until the pipe closes."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    conn.send(lsock.getsockname()[1])

    def accept_loop() -> None:
        while True:
            try:
                s, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=_raw_conn, args=(s, max_bytes), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    try:
        conn.recv()  # returns or raises once the parent is done
    except EOFError:
        pass
    lsock.close()


class RawClient:
    def __init__(self, port: int, max_bytes: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = memoryview(bytearray(max_bytes))
        self.ack = memoryview(bytearray(1))

    def put(self, data: bytes, times: int = 1) -> None:
        """Send ``times`` copies of ``data`` as one request, then wait for the ack."""
        self.sock.sendall(_HDR.pack(b"P", len(data) * times))
        for _ in range(times):
            self.sock.sendall(data)
        recv_exact_into(self.sock, self.ack)

    def get(self, n: int) -> None:
        self.sock.sendall(_HDR.pack(b"G", n))
        recv_exact_into(self.sock, self.buf[:n])

    def close(self) -> None:
        try:
            self.sock.sendall(_HDR.pack(b"Q", 0))
        finally:
            self.sock.close()


# --------------------------------------------------------------------------- workers


def worker_main(conn: Connection, wid: int, target: str, raw_port: int, max_bytes: int,
                chunk_bytes: int, batch: int = 1) -> None:
    """A client process: runs the rounds it is sent, replies with timings."""
    from kvstore import Client

    client = Client(target, namespace="bench", chunk_bytes=chunk_bytes, timeout=120)
    raw = RawClient(raw_port, max_bytes)
    data_cache: dict[int, bytes] = {}
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            kind, op, block, count, start_at = msg
            data = data_cache.get(block)
            if data is None:
                data_cache.clear()
                data = data_cache[block] = os.urandom(block)
            keys = [f"w{wid}-{block}-{i}".encode() for i in range(count)]
            if kind == "cleanup":
                client.delete(keys)
                conn.send(None)
                continue
            lat = []
            while time.perf_counter() < start_at:
                pass
            groups = [keys[i : i + batch] for i in range(0, len(keys), batch)]
            t0 = time.perf_counter()
            if kind == "kv" and op == "put":
                for group in groups:
                    s = time.perf_counter()
                    client.put([(k, data) for k in group])
                    lat.append(time.perf_counter() - s)
            elif kind == "kv" and op == "get":
                for group in groups:
                    s = time.perf_counter()
                    got = client.get(group)
                    lat.append(time.perf_counter() - s)
                    if any(g is None or len(g) != block for g in got):
                        raise RuntimeError(f"get of {group!r} missed")
            elif kind == "kv" and op == "get_into":
                outs = [bytearray(block) for _ in range(batch)]  # reused: pre-faulted
                for group in groups:
                    s = time.perf_counter()
                    sizes = client.get_into(group, outs[: len(group)])
                    lat.append(time.perf_counter() - s)
                    if any(n != block for n in sizes):
                        raise RuntimeError(f"get_into of {group!r} returned {sizes}")
            elif kind == "raw" and op == "put":
                for group in groups:
                    s = time.perf_counter()
                    raw.put(data, len(group))
                    lat.append(time.perf_counter() - s)
            elif kind == "raw" and op in ("get", "get_into"):  # get_into's baseline: a get
                for group in groups:
                    s = time.perf_counter()
                    raw.get(block * len(group))
                    lat.append(time.perf_counter() - s)
            t1 = time.perf_counter()
            if kind == "kv" and op == "get":
                _check_get(groups[-1], got, data)
            elif kind == "kv" and op == "get_into":
                _check_get(groups[-1], outs[: len(groups[-1])], data)
            conn.send((t0, t1, lat))
    finally:
        raw.close()
        client.close()


def _check_get(keys: list[bytes], got: Sequence[Any], data: bytes) -> None:
    """After a round's timing: the last call's values (or buffers) hold the
    bytes Put under its keys (sizes alone let a Get that writes nothing pass
    as a fast one). Every key of a worker is put from the same block here, so
    a Get serving another of its keys would pass; another worker's would not."""
    import numpy as np

    want = np.frombuffer(data, dtype=np.uint8)
    for key, value in zip(keys, got, strict=True):
        if value is None or not np.array_equal(np.frombuffer(value, dtype=np.uint8), want):
            raise RuntimeError(f"kvstore: a Get of {key.decode()} returned bytes other than "
                               "those Put under it")


class Pool:
    def __init__(self, n: int, target: str, raw_port: int, max_bytes: int,
                 chunk_bytes: int, batch: int = 1) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for wid in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main,
                            args=(child, wid, target, raw_port, max_bytes, chunk_bytes, batch),
                            daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, kind: str, op: str, block: int, clients: int, count: int) -> tuple[float, list]:
        """One round on ``clients`` workers; (seconds, latencies)."""
        start_at = time.perf_counter() + 0.05
        for c in self.conns[:clients]:
            c.send((kind, op, block, count, start_at))
        try:
            replies = [c.recv() for c in self.conns[:clients]]
        except EOFError:
            raise RuntimeError("a client process died (its traceback is above)") from None
        if kind == "cleanup":
            return 0.0, []
        t0 = min(r[0] for r in replies)
        t1 = max(r[1] for r in replies)
        lat = [x for r in replies for x in r[2]]
        return t1 - t0, lat

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()


# --------------------------------------------------------------------------- measurement


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


def _summary(rounds: list[tuple[float, list]], nbytes: int) -> dict[str, Any]:
    gbps = [nbytes / secs / 1e9 for secs, _ in rounds]
    lat = [x for _, lats in rounds for x in lats]
    return {
        "gbps": round(statistics.median(gbps), 4),
        "gbps_rounds": [round(g, 4) for g in gbps],
        "p50_ms": round(_pct(lat, 0.50) * 1e3, 4),
        "p99_ms": round(_pct(lat, 0.99) * 1e3, 4),
        "calls": len(lat),
    }


def _cell_count(block: int, clients: int, bytes_per_round: int) -> int:
    return max(4, bytes_per_round // (block * clients))


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from bench._server import BenchServer

    sizes = [int(s) for s in args.sizes]
    clients_list = [int(c) for c in args.clients]
    max_block = max(sizes)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    raw_proc = ctx.Process(target=raw_server_main, args=(child, max_block * args.batch),
                           daemon=True)
    raw_proc.start()
    child.close()
    raw_port = parent.recv()

    flags = list(args.server_flag or [])
    if args.metrics == "on":
        flags += METRICS_FLAGS
    server = BenchServer(*flags, l1_capacity=args.l1_capacity, l2=args.l2, unix=args.unix)
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    scraper: Scraper | None = None
    try:
        server.start()
        if args.metrics == "on":
            scraper = Scraper(_metrics_address(server), args.scrape_interval)
        target = server.unix_target if args.unix else server.tcp
        pool = Pool(max(clients_list), target, raw_port, max_block * args.batch,
                    args.chunk_bytes, args.batch)
        try:
            for block in sizes:
                for clients in clients_list:
                    per_round = args.bytes_per_round[block] if isinstance(
                        args.bytes_per_round, dict) else args.bytes_per_round
                    count = _cell_count(block, clients, per_round)
                    nbytes = count * clients * block
                    for op in ("put", "get", "get_into"):
                        cell: dict[str, Any] = {"op": op, "block_bytes": block,
                                                "clients": clients,
                                                "blocks_per_round": count * clients,
                                                "bytes_per_round": nbytes}
                        # (get_into's raw baseline is a raw get, measured again
                        # in this cell's own interleaving)
                        rounds: dict[str, list[tuple[float, list]]] = {"kv": [], "raw": []}
                        for kind in ("kv", "raw"):
                            # warm-up round (also writes the keys Get reads)
                            pool.run(kind, op, block, clients, count if op == "put" and
                                     kind == "kv" else min(count, 16))
                        for r in range(args.rounds):
                            # kv and raw alternated (ABBA), so load changes on this
                            # shared machine hit both alike
                            for kind in ("kv", "raw") if r % 2 == 0 else ("raw", "kv"):
                                rounds[kind].append(pool.run(kind, op, block, clients, count))
                        cell["kvstore"] = _summary(rounds["kv"], nbytes)
                        cell["raw"] = _summary(rounds["raw"], nbytes)
                        kv, raw = cell["kvstore"], cell["raw"]
                        cell["ratio_gbps"] = round(kv["gbps"] / raw["gbps"], 4)
                        cell["ratio_p50"] = round(kv["p50_ms"] / raw["p50_ms"], 4)
                        results.append(cell)
                        _print_row(cell)
                    pool.run("cleanup", "put", block, clients, count)
            server_rss = server.rss_bytes()
        finally:
            pool.close()
    finally:
        if scraper is not None:
            scraper.stop()
        server.stop()
        parent.close()
        raw_proc.join(10)
        if raw_proc.is_alive():
            raw_proc.terminate()
    import grpc

    return {
        "bench": "throughput",
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "transport": "unix socket" if args.unix else "tcp 127.0.0.1",
            "raw_transport": "tcp 127.0.0.1",
            "server_command": " ".join(server.command),
            "server_rss_bytes": server_rss,
            "client_chunk_bytes": args.chunk_bytes,
            "malloc_tuning": os.environ.get("KVSTORE_MALLOC_TUNING", "1") != "0",
            "rounds": args.rounds,
            "quick": args.quick,
            "seconds": round(time.perf_counter() - t_start, 1),
            "units": "gbps = 1e9 bytes/s over the round (all clients); latency = one call "
                     f"of {args.batch} block(s) (--batch)",
            "batch": args.batch,
            "metrics": args.metrics,
            "scrapes": scraper.scrapes if scraper is not None else 0,
        },
        "results": results,
    }


# --------------------------------------------------------------------------- metrics A/B

METRICS_FLAGS = ["--server-metrics-listen", "127.0.0.1:0"]


def _metrics_address(server: Any) -> str:
    """The bound metrics address, from the server's ready file."""
    with open(os.path.join(server.data_dir, "ready.json")) as fh:
        return str(json.load(fh)["metrics"])


class Scraper:
    """Scrapes /metrics every ``interval`` s on a thread, like Prometheus would."""

    def __init__(self, address: str, interval: float) -> None:
        self.url = f"http://{address}/metrics"
        self.interval = interval
        self.scrapes = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import urllib.request

        while not self._stop.wait(self.interval):
            with urllib.request.urlopen(self.url, timeout=10) as reply:
                self.bytes = len(reply.read())
            self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def run_metrics_ab(args: argparse.Namespace) -> dict[str, Any]:
    """The same kvstore cells on a server with metrics on and one with them
    off, rounds interleaved ABBA; the on/off ratio of median GB/s per cell."""
    from bench._server import BenchServer

    sizes = [int(s) for s in args.sizes]
    clients_list = [int(c) for c in args.clients]
    max_bytes = max(sizes) * args.batch
    flags = list(args.server_flag or [])
    servers = {
        "on": BenchServer(*flags, *METRICS_FLAGS, l1_capacity=args.l1_capacity, l2=args.l2,
                          unix=args.unix),
        "off": BenchServer(*flags, l1_capacity=args.l1_capacity, l2=args.l2, unix=args.unix),
    }
    pools: dict[str, Pool] = {}
    scraper: Scraper | None = None
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    # Workers connect to a raw server too; the raw baseline is not timed here.
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    raw_proc = ctx.Process(target=raw_server_main, args=(child, max_bytes), daemon=True)
    raw_proc.start()
    child.close()
    raw_port = parent.recv()
    try:
        for name, server in servers.items():
            server.start()
            target = server.unix_target if args.unix else server.tcp
            pools[name] = Pool(max(clients_list), target, raw_port, max_bytes,
                               args.chunk_bytes, args.batch)
        scraper = Scraper(_metrics_address(servers["on"]), args.scrape_interval)
        for block in sizes:
            for clients in clients_list:
                per_round = args.bytes_per_round[block]
                count = _cell_count(block, clients, per_round)
                nbytes = count * clients * block
                for op in ("put", "get", "get_into"):
                    rounds: dict[str, list[tuple[float, list]]] = {"on": [], "off": []}
                    for name in ("on", "off"):  # warm-up (Put also writes what Get reads)
                        pools[name].run("kv", op, block, clients,
                                        count if op == "put" else min(count, 16))
                    for r in range(args.rounds):
                        order = ("on", "off") if r % 2 == 0 else ("off", "on")
                        for name in order:
                            rounds[name].append(pools[name].run("kv", op, block, clients, count))
                    on, off = _summary(rounds["on"], nbytes), _summary(rounds["off"], nbytes)
                    cell = {"op": op, "block_bytes": block, "clients": clients,
                            "bytes_per_round": nbytes, "metrics_on": on, "metrics_off": off,
                            "ratio_gbps": round(on["gbps"] / off["gbps"], 4),
                            "ratio_p50": round(on["p50_ms"] / off["p50_ms"], 4)}
                    results.append(cell)
                    print(f"{op:>8} {block // KiB:>5} KiB x{clients}  metrics on "
                          f"{on['gbps']:7.3f} GB/s p50 {on['p50_ms']:8.3f} ms | off "
                          f"{off['gbps']:7.3f} GB/s p50 {off['p50_ms']:8.3f} ms | on/off "
                          f"{cell['ratio_gbps']:.3f}", file=sys.stderr, flush=True)
                for pool in pools.values():
                    pool.run("cleanup", "put", block, clients, count)
    finally:
        if scraper is not None:
            scraper.stop()
        for pool in pools.values():
            pool.close()
        for server in servers.values():
            server.stop()
        parent.close()
        raw_proc.join(10)
        if raw_proc.is_alive():
            raw_proc.terminate()
    ratios = [c["ratio_gbps"] for c in results]
    return {
        "bench": "throughput-metrics-ab",
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "transport": "unix socket" if args.unix else "tcp 127.0.0.1",
            "rounds": args.rounds,
            "batch": args.batch,
            "scrape_interval_s": args.scrape_interval,
            "scrapes": scraper.scrapes if scraper is not None else 0,
            "scrape_bytes": scraper.bytes if scraper is not None else 0,
            "seconds": round(time.perf_counter() - t_start, 1),
            "units": "gbps: median over rounds; ratio_gbps = metrics on / metrics off",
        },
        "median_ratio_gbps": round(statistics.median(ratios), 4),
        "geomean_ratio_gbps": round(statistics.geometric_mean(ratios), 4),
        "results": results,
    }


def _print_row(c: dict[str, Any]) -> None:
    kv, raw = c["kvstore"], c["raw"]
    size = f"{c['block_bytes'] // KiB} KiB" if c["block_bytes"] < MiB else \
        f"{c['block_bytes'] // MiB} MiB"
    print(f"{c['op']:>8} {size:>6} x{c['clients']}  kvstore {kv['gbps']:7.3f} GB/s "
          f"p50 {kv['p50_ms']:8.3f} ms p99 {kv['p99_ms']:8.3f} ms | raw {raw['gbps']:7.3f} GB/s "
          f"p50 {raw['p50_ms']:8.3f} ms p99 {raw['p99_ms']:8.3f} ms | ratio {c['ratio_gbps']:.3f}",
          file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer bytes and rounds (≤ ~40 s)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--sizes", nargs="+", type=positive_size, default=[64 * KiB, MiB, 4 * MiB],
                   help="block sizes [default: 64KiB 1MiB 4MiB]")
    p.add_argument("--clients", nargs="+", type=positive_int, default=[1, 4],
                   help="client process counts [default: 1 4]")
    p.add_argument("--rounds", type=positive_int, default=None, help="timed rounds per cell "
                   "[default: 5, --quick 3]")
    p.add_argument("--batch", type=positive_int, default=8,
                   help="blocks per call (one Put stream / one Get stream; the raw baseline "
                        "sends the same bytes per request) [default: 8; 1 = latency of one "
                        "block per call]")
    p.add_argument("--chunk-bytes", type=positive_size, default=MiB,
                   help="client chunk_bytes (Put chunks, and Get chunks asked for) [default: 1MiB]")
    p.add_argument("--l1-capacity", default="1GiB", help="server L1 size [default: 1GiB]")
    p.add_argument("--l2", action="store_true", help="keep the server's L2 (LMDB) on: Puts "
                   "are then also written behind to disk [default: L1 only]")
    p.add_argument("--unix", action="store_true", help="talk to kvstore over its unix socket "
                   "(the raw baseline stays TCP)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="turn off kvstore's glibc malloc tuning in server and clients "
                        "(KVSTORE_MALLOC_TUNING=0; see kvstore/_malloc.py), for comparison")
    p.add_argument("--metrics", choices=("off", "on", "ab"), default="off",
                   help="Prometheus metrics on the server: off, on (scraped meanwhile), or ab "
                        "(servers with and without, rounds interleaved; the on/off ratio) "
                        "[default: off]")
    p.add_argument("--scrape-interval", type=float, default=1.0,
                   help="with --metrics on/ab: seconds between scrapes [default: 1]")
    p.add_argument("--server-flag", action="append", metavar="FLAG",
                   help="extra flag for kvstore serve (repeat; "
                        "e.g. --server-flag=--l1-prefault=false)")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.quick:
        args.bytes_per_round = {64 * KiB: 12 * MiB, MiB: 48 * MiB, 4 * MiB: 64 * MiB}
    else:
        args.bytes_per_round = {64 * KiB: 48 * MiB, MiB: 192 * MiB, 4 * MiB: 256 * MiB}
    for s in args.sizes:
        if isinstance(args.bytes_per_round, dict) and s not in args.bytes_per_round:
            args.bytes_per_round[s] = max(s * 16, args.bytes_per_round.get(MiB, 64 * MiB))
    if args.no_malloc_tuning:
        os.environ["KVSTORE_MALLOC_TUNING"] = "0"
    doc = run_metrics_ab(args) if args.metrics == "ab" else run_bench(args)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
