"""Smoke test of bench.peers' data-plane systems (issue 14): a tiny run, the
JSON shape, and proof that the kvstore-dp-* cells measured the data plane
(the worker refuses to run them on a client that fell back to gRPC)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_peers_tiny_with_the_data_plane(tmp_path: Path) -> None:
    systems = ["kvstore-dp-tcp", "kvstore-dp-unix", "kvstore-dp-shm", "kvstore-tcp", "raw-tcp",
               "memcpy", "kvstore-dp-shm-nopoll"]
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, "-m", "bench.peers", "--tiny", "--no-install",
                           "--bytes-per-round", "8MiB", "--sizes", "4KiB", "1MiB",
                           "--per-call", "1", "8", "--systems", *systems, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110,
                          env={k: v for k, v in os.environ.items()
                               if k != "KVSTORE_BUSY_POLL_US"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    cells = {(r["system"], r["op"], r["block_bytes"], r["batch_blocks"]) for r in doc["results"]}
    assert cells == {(s, op, size, n) for s in systems for op in ("put", "get")
                     for size in (4096, 1024**2) for n in (1, 8)}
    for r in doc["results"]:
        assert r["gbps"] > 0 and set(r["cpu_s_per_gb"]) == {"server", "client"}
    assert "data_plane=False" in doc["meta"]["apis"]["kvstore-tcp"]["get"]
    # The busy poll the data-plane systems ran with; the -nopoll one without.
    assert doc["meta"]["busy_poll_us"] == 50
    assert "busy_poll_us=0" in doc["meta"]["apis"]["kvstore-dp-shm-nopoll"]["get"]
    ratios = {(r["system"], r["op"], r["per_call"]): r for r in doc["ratios"]}
    assert ratios[("kvstore-dp-tcp", "get", 8)]["raw_baseline"] == "raw-tcp"
    assert ratios[("kvstore-dp-shm", "get", 1)]["raw_baseline"] == "memcpy"
    assert ratios[("kvstore-dp-shm-nopoll", "get", 1)]["raw_baseline"] == "memcpy"
    targets = [t["target"] for t in doc["targets"]]
    assert any(t.startswith("kvstore-dp-tcp get 1 MiB, 8/call: CPU s/GB") for t in targets)
    assert any(t.startswith("kvstore-dp-tcp get 1 MiB, 8/call, 1 client >= 0.7x raw-tcp")
               for t in targets)


def _tiny_run_on_arena(tmp_path: Path, arena: str) -> dict[str, Any]:
    """A tiny run of kvstore-dp-tcp, kvstore-dp-shm and raw-tcp with ``--arena``; its JSON."""
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, "-m", "bench.peers", "--tiny", "--no-install",
                           "--bytes-per-round", "4MiB", "--sizes", "1MiB", "--per-call", "1",
                           "--systems", "kvstore-dp-tcp", "kvstore-dp-shm", "raw-tcp",
                           "--arena", arena, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


@pytest.mark.timeout(120)
def test_peers_private_arena_runs_without_shared_memory(tmp_path: Path) -> None:
    """``--arena private``: a server without a shared-memory file (its L1
    reads are not checked again); the shm systems are skipped, with a note."""
    doc = _tiny_run_on_arena(tmp_path, "private")
    assert {r["system"] for r in doc["results"]} == {"kvstore-dp-tcp", "raw-tcp"}
    server = doc["meta"]["kvstore_server"]
    assert server["arena"] == "private" and server["shm_path"] == ""
    assert "--l1-shm-path" not in server["command"]
    assert any("kvstore-dp-shm skipped" in n for n in doc["notes"])


@pytest.mark.timeout(120)
def test_peers_split_arena_runs_each_client_on_its_own_server(tmp_path: Path) -> None:
    """``--arena split``: the socket systems against a server with an anonymous
    arena (``kvstore serve``'s default), the shm systems against a second one
    whose arena is a shared-memory file (a ShmClient cannot run on the first)."""
    doc = _tiny_run_on_arena(tmp_path, "split")
    assert {r["system"] for r in doc["results"]} == {"kvstore-dp-tcp", "kvstore-dp-shm",
                                                     "raw-tcp"}
    assert all(r["gbps"] > 0 for r in doc["results"])
    server = doc["meta"]["kvstore_server"]
    assert server["arena"] == "split"
    assert "--l1-shm-path" not in server["command"] and server["shm_path"] == ""
    shm_server = server["shm_systems_server"]
    assert f"--l1-shm-path {shm_server['shm_path']}" in shm_server["command"]
    assert shm_server["rss_bytes_at_end"] > 0 and "L1" in shm_server["tiers_at_end"]
    assert not os.path.exists(shm_server["shm_path"])
    servers = {r["system"]: r.get("server") for r in doc["results"]}
    assert servers == {"kvstore-dp-tcp": "kvstore_server",
                       "kvstore-dp-shm": "shm_systems_server", "raw-tcp": None}
