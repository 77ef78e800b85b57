"""`bench.throughput --metrics ab` stays runnable: a tiny same-run A/B of a
server with metrics on (and scraped) against one with them off. Not a
performance check: the numbers of a tiny run mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client", reason="prometheus-client is the kvstore[metrics] extra")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_metrics_ab_tiny(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--metrics", "ab", "--quick",
         "--sizes", "64KiB", "--clients", "1", "--rounds", "2", "--batch", "2",
         "--l1-capacity", "64MiB", "--server-flag=--l1-prefault=false",
         "--scrape-interval", "0.2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert json.loads(proc.stdout) == doc
    assert doc["bench"] == "throughput-metrics-ab"
    assert {c["op"] for c in doc["results"]} == {"put", "get", "get_into"}
    for cell in doc["results"]:
        assert cell["metrics_on"]["gbps"] > 0 and cell["metrics_off"]["gbps"] > 0
        assert cell["ratio_gbps"] == pytest.approx(
            cell["metrics_on"]["gbps"] / cell["metrics_off"]["gbps"], rel=1e-3)
    assert doc["meta"]["scrapes"] >= 1 and doc["meta"]["scrape_bytes"] > 1000
    assert doc["median_ratio_gbps"] > 0
