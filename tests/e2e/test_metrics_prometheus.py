"""A real Prometheus server scrapes a real kvstore server and answers queries
about it through its HTTP API.

Needs the ``prometheus`` binary at /usr/bin/prometheus (Debian/Ubuntu:
``apt-get install -y --no-install-recommends prometheus``); skipped without it.
Both servers listen on 127.0.0.1 with ephemeral ports; every wait is a
bounded poll.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore import Client

PROMETHEUS = Path("/usr/bin/prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PROMETHEUS.exists(), reason=(
        "no /usr/bin/prometheus: apt-get install -y --no-install-recommends prometheus")),
]
pytest.importorskip("prometheus_client", reason="prometheus-client is the kvstore[metrics] extra")

WAIT_S = 60.0
_LISTENING_RE = re.compile(r'msg="Listening on" address=(\S+)')


def wait_for(what: str, check: Callable[[], Any], log: Callable[[], str]) -> Any:
    """Poll ``check`` until it returns something truthy, at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {WAIT_S} s\n{log()[-3000:]}")
        time.sleep(0.2)  # polling with a deadline, not synchronisation by sleep


@pytest.fixture
def prometheus(tmp_path: Path, server_factory: type) -> Iterator[tuple[str, str, Any]]:
    """(Prometheus API address, kvstore target, kvstore server)."""
    srv = server_factory("--server-metrics-listen", "127.0.0.1:0").start()
    ready = max(srv.data_dir.glob("ready-*.json"), key=lambda p: p.stat().st_mtime)
    metrics = json.loads(ready.read_text())["metrics"]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: kvstore\n"
        "    static_configs:\n"
        f"      - targets: ['{metrics}']\n")
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             "--web.listen-address=127.0.0.1:0"],
            stdout=log, stderr=subprocess.STDOUT)

    def read_log() -> str:
        return log_path.read_text(errors="replace")

    try:
        def listening() -> str | None:
            assert proc.poll() is None, read_log()
            m = _LISTENING_RE.search(read_log())
            return m.group(1) if m else None

        api = wait_for("prometheus listening", listening, read_log)
        yield api, srv.tcp, read_log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(api: str, promql: str) -> list[dict[str, Any]]:
    url = f"http://{api}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as reply:
        doc = json.loads(reply.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def scalar(api: str, promql: str) -> float | None:
    result = query(api, promql)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_series(prometheus: tuple[str, str, Any]) -> None:
    api, target, read_log = prometheus
    # data_plane=False: the gRPC request series below count these calls.
    with Client(target, namespace="prom", data_plane=False) as c:
        c.put({f"k{i}".encode(): bytes(4096) for i in range(5)})
        assert c.get([b"k0", b"k1", b"nope"])[:2] == [bytes(4096)] * 2

    wait_for("target up", lambda: scalar(api, 'up{job="kvstore"}') == 1, read_log)
    wait_for("puts scraped", lambda: scalar(api, "kvstore_block_puts_total") == 5, read_log)
    assert scalar(api, 'kvstore_tier_bytes{tier="L1"}') == 5 * 4096
    assert scalar(api, 'kvstore_tier_hits_total{tier="L1"}') == 2
    assert scalar(api, 'kvstore_grpc_requests_total{method="Put",code="OK"}') == 1
    # The histogram works with PromQL's histogram functions.
    p99 = scalar(api, 'histogram_quantile(0.99, sum by (le) '
                      '(kvstore_grpc_request_duration_seconds_bucket{method="GetSmall"}))')
    assert p99 is not None and 0 < p99 <= 10
    # The whole exposition was ingested, process_* series included.
    meta = query(api, 'scrape_samples_scraped{job="kvstore"}')
    assert meta and float(meta[0]["value"][1]) > 30
