"""Smoke test of the side-by-side benches: run them tiny, check the JSON shape.

Not a performance check (the numbers of a tiny run mean nothing); it keeps
``bench.peers`` and ``bench.index_scale`` runnable. Redis cells are skipped
when redis-server or redis-py is absent (the test never installs anything).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAVE_REDIS = bool(shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()) and \
    importlib.util.find_spec("redis") is not None


def _run(args: list[str], out: Path, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert json.loads(proc.stdout) == doc  # the same JSON on stdout
    return doc


@pytest.mark.timeout(60)
def test_peers_tiny(tmp_path: Path) -> None:
    systems = ["kvstore-tcp", "kvstore-unix", "kvstore-shm", "raw-tcp", "raw-unix", "memcpy"]
    if HAVE_REDIS:
        systems += ["redis-tcp"]
    png = tmp_path / "peers.png"
    doc = _run(["bench.peers", "--tiny", "--no-install", "--bytes-per-round", "8MiB",
                "--systems", *systems, "--png", str(png)], tmp_path / "peers.json", 60)
    assert doc["bench"] == "peers"
    assert doc["meta"]["batch_blocks"] == 8 and doc["meta"]["apis"]
    assert "write-back" in doc["meta"]["kvstore_server"]["l2"]
    cells = {(r["system"], r["op"]) for r in doc["results"]}
    assert cells == {(s, op) for s in systems for op in ("put", "get")}
    for r in doc["results"]:
        assert r["gbps"] > 0 and r["block_bytes"] == 1024 * 1024 and r["clients"] == 1
        assert r["p50_ms_block"] <= r["p99_ms_block"]
        assert set(r["cpu_s_per_gb"]) == {"server", "client"}
        assert r["api"]
    ratios = {(r["system"], r["op"]): r for r in doc["ratios"]}
    assert ratios[("kvstore-tcp", "put")]["vs_raw"] is not None
    assert ratios[("kvstore-shm", "get")]["raw_baseline"] == "memcpy"
    if HAVE_REDIS:
        assert ratios[("kvstore-tcp", "get")]["vs_redis_same_transport"] is not None
        assert any("1.2x Redis" in t["target"] for t in doc["targets"])
    assert png.stat().st_size > 10_000
    assert not Path(doc["meta"]["kvstore_server"]["shm_path"]).exists()  # cleaned up


@pytest.mark.timeout(60)
def test_index_scale_tiny(tmp_path: Path) -> None:
    doc = _run(["bench.index_scale", "--tiny", "--sizes", "1k", "3k"], tmp_path / "idx.json", 60)
    assert doc["bench"] == "index_scale"
    assert [r["blocks"] for r in doc["results"]] == [1000, 3000]
    for r in doc["results"]:
        assert r["in_process"]["rss_bytes_per_block"] is not None
        assert r["in_process"]["tracemalloc_bytes_per_block"] > 0
        assert r["in_process"]["lookup"]["p50_ms"] > 0
        assert r["server"]["lookup"]["p50_ms"] > 0 and r["server"]["put_4k"]["p50_ms"] > 0
        assert r["server"]["start_seconds"] > 0
    assert set(doc["growth"]) == {"in_process", "in_process_full", "server"}
    assert any("unix socket" in t["target"] for t in doc["targets"])


@pytest.mark.parametrize("suite", ["agent", "mooncake"])
def test_replay_without_the_traces_says_where_it_looked(tmp_path: Path, suite: str) -> None:
    """A docs review: in a checkout without ../shared/traces the replay died
    with an IndexError (agent) or a FileNotFoundError from a worker."""
    env = {**os.environ, "KVSTORE_TRACES": str(tmp_path / "none")}
    proc = subprocess.run([sys.executable, "-m", "bench.replay", "--suite", suite,
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"the replay reads the shared traces from {tmp_path / 'none'}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(120)
def test_handover_runs_a_round() -> None:
    """docs/performance.md's `python -m bench.handover` failed at its start
    (it patched a function that had moved modules; a docs review)."""
    proc = subprocess.run([sys.executable, "-m", "bench.handover", "--rounds", "1",
                           "--calls-scale", "0.05"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split()[0] for line in proc.stdout.splitlines()[1:]]
    assert rows == ["Get", "Lookup,", "Delete,", "Get", "Get"], proc.stdout
