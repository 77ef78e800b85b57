"""Smoke test of bench.per_call: every size and path reported, both servers
of a --before-tree run (here this checkout twice)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_per_call_tiny(tmp_path: Path) -> None:
    out = tmp_path / "per_call.json"
    proc = subprocess.run([sys.executable, "-m", "bench.per_call", "--sizes", "64KiB", "2MiB",
                           "--rounds", "1", "--before-tree", str(ROOT), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [(c["block_bytes"], c["path"]) for c in doc["cells"]] == [
        (64 * 1024, "shm"), (64 * 1024, "tcp"), (2 << 20, "shm"), (2 << 20, "tcp")]
    for cell in doc["cells"]:
        for server in ("this", "before"):
            assert cell[server]["put_p50_us"] > 0 and cell[server]["get_gbps"] > 0
