"""bench/aio_client.py stays runnable: a tiny run, every system and op measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_aio_client_bench_tiny() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.aio_client", "--sizes", "4KiB",
                           "--rounds", "1", "--calls", "5", "--concurrency", "2", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["rows"]
    assert {(r["system"], r["op"]) for r in rows} == {
        (s, op) for s in ("grpc-tcp", "dp-tcp", "grpc-unix", "dp-unix")
        for op in ("put", "get", "get_into")}
    assert all(r["calls"] == 5 and r["p50_us"] > 0 for r in rows)
