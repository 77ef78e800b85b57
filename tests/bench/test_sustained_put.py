"""Smoke test of bench.sustained_put: a small L1 filled twice over, both
phases reported, no refused Put."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sustained_put_tiny(tmp_path: Path) -> None:
    out = tmp_path / "sustained.json"
    proc = subprocess.run([sys.executable, "-m", "bench.sustained_put", "--l1", "4MiB",
                           "--block", "16KiB", "--per-call", "1", "8", "--times", "2",
                           "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [c["per_call"] for c in doc["cells"]] == [1, 8]
    for cell in doc["cells"]:
        assert cell["failed_calls"] == 0
        for phase in ("filling", "full"):
            assert cell[phase]["gbps"] > 0
            assert 0 < cell[phase]["p50_ms"] <= cell[phase]["max_ms"]
