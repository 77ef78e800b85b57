"""The Prometheus endpoint (server.metrics_listen) of a real server, scraped
with urllib: series exist, move with traffic, and the endpoint binds only the
configured address. docs/metrics.md lists the series."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from pki import make_ca, make_leaf

from kvstore import Client
from kvstore.errors import UnknownNamespace

parser = pytest.importorskip("prometheus_client.parser",
                             reason="prometheus-client is the kvstore[metrics] extra")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_address(server: object) -> str:
    """The bound metrics address from the server's latest ready file."""
    data_dir: Path = server.data_dir  # type: ignore[attr-defined]
    ready = max(data_dir.glob("ready-*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(ready.read_text())["metrics"]


def scrape(address: str) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples: Samples = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_series_move_with_puts_gets_and_errors(server_factory: type) -> None:
    srv = server_factory("--server-metrics-listen", "127.0.0.1:0",
                         "--server-namespaces", "metrics").start()
    address = metrics_address(srv)
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    text, before = scrape(address)
    for name in ("kvstore_tier_bytes", "kvstore_tier_hits_total", "kvstore_block_puts_total",
                 "process_resident_memory_bytes", "kvstore_info"):
        assert name in text, name
    assert value(before, "kvstore_tier_capacity_bytes", tier="L1") == 128 * 1024**2
    assert value(before, "kvstore_block_puts_total") == 0

    put = {"service": "kvstore.v1.KVStore", "method": "Put"}
    # Small Gets are one unary GetSmall call (per-call cost, issue 14).
    get = {"service": "kvstore.v1.KVStore", "method": "GetSmall"}
    # data_plane=False: the calls this test counts are gRPC calls.
    with Client(srv.tcp, namespace="metrics", data_plane=False) as c:
        c.put({b"a": b"x" * 1000, b"b": b"y" * 3000})
        assert c.get([b"a", b"missing"]) == [b"x" * 1000, None]
        with pytest.raises(UnknownNamespace):  # refused by the server
            c.get([b"a"], namespace="other")
    # A refused call's status reaches the client before the server's
    # interceptor has recorded it (microseconds later): scrape until the last
    # call is counted, within a bound.
    deadline = time.monotonic() + 10
    while True:
        _, after = scrape(address)
        if (value(after, "kvstore_grpc_request_duration_seconds_count", **get) >= 2
                or time.monotonic() > deadline):
            break
        time.sleep(0.02)  # polling a bounded wait, not synchronisation

    assert value(after, "kvstore_block_puts_total") == 2
    assert value(after, "kvstore_block_gets_total") == 2
    assert value(after, "kvstore_block_get_hits_total") == 1
    assert value(after, "kvstore_tier_blocks", tier="L1") == 2
    assert value(after, "kvstore_tier_bytes", tier="L1") == 4000
    assert value(after, "kvstore_tier_used_bytes", tier="L1") == 2 * 4096  # whole pages
    assert value(after, "kvstore_tier_hits_total", tier="L1") == 1
    assert value(after, "kvstore_tier_misses_total", tier="L1") >= 1
    assert value(after, "kvstore_grpc_requests_total", code="OK", **put) == 1
    assert value(after, "kvstore_grpc_requests_total", code="OK", **get) == 1
    assert value(after, "kvstore_grpc_requests_total", code="NOT_FOUND", **get) == 1
    # One histogram observation per call, whatever its status.
    assert value(after, "kvstore_grpc_request_duration_seconds_count", **get) == 2
    assert value(after, "kvstore_grpc_request_duration_seconds_bucket", le="+Inf", **get) == 2
    assert 0 < value(after, "kvstore_grpc_request_duration_seconds_sum", **put) < 10
    assert value(after, "kvstore_tier_available", tier="L1") == 1


def test_a_get_split_between_getsmall_and_the_stream_counts_each_block_once(
        server_factory: type) -> None:
    """A gRPC Get of more than one response holds goes as GetSmall (the
    leading blocks) then the Get stream (the rest): the first block past
    GetSmall's budget was read there, counted (a get, a hit) and dropped,
    then read and counted again by the stream (21 for 20 blocks)."""
    srv = server_factory("--server-metrics-listen", "127.0.0.1:0").start()
    address = metrics_address(srv)
    keys = [b"k%02d" % i for i in range(20)]
    with Client(srv.tcp, namespace="split", data_plane=False) as c:
        for k in keys:
            c.put({k: k * (1024**2 // 3)})
        _, before = scrape(address)
        assert c.get(keys) == [k * (1024**2 // 3) for k in keys]
        _, after = scrape(address)
    for name, labels in (("kvstore_block_gets_total", {}),
                         ("kvstore_block_get_hits_total", {}),
                         ("kvstore_tier_hits_total", {"tier": "L1"})):
        assert value(after, name, **labels) - value(before, name, **labels) == 20, name


def test_metrics_endpoint_binds_only_the_configured_address(server_factory: type) -> None:
    srv = server_factory("--server-metrics-listen", "127.0.0.1:0").start()
    port = metrics_address(srv).rsplit(":", 1)[1]
    # 127.0.0.2 is loopback too: a listener on 0.0.0.0 would answer there.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5)
    scrape(f"127.0.0.1:{port}")  # the configured one answers


def test_shared_memory_gauges_appear_when_shm_is_on(server_factory: type) -> None:
    shm = f"/dev/shm/kvstore-test-{uuid.uuid4().hex[:12]}"
    srv = server_factory("--server-metrics-listen", "127.0.0.1:0", "--l1-shm-path", shm).start()
    _, samples = scrape(metrics_address(srv))
    assert value(samples, "kvstore_shm_reservations") == 0
    assert ("kvstore_shm_leases", frozenset()) in samples
    srv.terminate()


def test_metrics_are_off_by_default(shared_server: object) -> None:
    ready = max(shared_server.data_dir.glob("ready-*.json"),  # type: ignore[attr-defined]
                key=lambda p: p.stat().st_mtime)
    assert "metrics" not in json.loads(ready.read_text())


@pytest.mark.parametrize("command", ["serve", "config"])
def test_missing_prometheus_client_is_one_clear_error(tmp_path: Path, command: str) -> None:
    """Without the extra, asking for metrics fails at once with one line naming
    the package at the pin of kvstore's metrics extra (pyproject.toml), not
    ``kvstore[metrics]``, which on PyPI is another project's; ``kvstore config
    --effective`` refuses it as serve does."""
    code = ("import sys; sys.modules['prometheus_client'] = None; "
            "from kvstore.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "KVSTORE_LOG_LEVEL": "WARNING"}
    flags = ["serve", "--data-dir", str(tmp_path)] if command == "serve" else \
        ["config", "--effective"]
    out = subprocess.run(
        [sys.executable, "-c", code, *flags,
         "--server-listen", "127.0.0.1:0", "--l1-capacity", "16MiB", "--l1-prefault", "false",
         "--server-metrics-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml")
                              .read_text())
    [pin] = pyproject["project"]["optional-dependencies"]["metrics"]
    assert f"prometheus-client is not installed: pip install '{pin}' (kvstore's metrics " \
        "extra)" in lines[0]
    assert "kvstore[" not in lines[0]


def test_a_taken_metrics_port_is_a_clear_error(server_factory: type, tmp_path: Path) -> None:
    first = server_factory("--server-metrics-listen", "127.0.0.1:0").start()
    taken = metrics_address(first)
    out = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve", "--data-dir", str(tmp_path / "second"),
         "--server-listen", "127.0.0.1:0", "--l1-capacity", "16MiB", "--l1-prefault", "false",
         "--server-metrics-listen", taken],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "KVSTORE_LOG_LEVEL": "WARNING"})
    assert out.returncode == 2, out.stderr
    assert "server.metrics_listen" in out.stderr and taken in out.stderr


def documented_series() -> set[str]:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", doc, re.M))


def test_docs_list_exactly_the_exported_series(server_factory: type, tmp_path: Path) -> None:
    """With every optional part on (L2, L3, shared memory, TLS), the families
    the server exports are the ones docs/metrics.md lists."""
    shm = f"/dev/shm/kvstore-test-{uuid.uuid4().hex[:12]}"
    documented = documented_series()
    tls: list[str] = []
    if shutil.which("openssl") is not None:
        make_ca(tmp_path, "ca")
        cert, key = make_leaf(tmp_path, "ca", "server", "IP:127.0.0.1")
        tls = ["--server-tls-cert", str(cert), "--server-tls-key", str(key)]
    else:  # the TLS series are left out of the comparison
        documented = {name for name in documented if not name.startswith("kvstore_tls_")}
    srv = server_factory("--server-metrics-listen", "127.0.0.1:0", "--l1-shm-path", shm,
                         "--l3-url", f"file://{tmp_path}/l3", *tls).start()
    with Client(srv.unix_target, namespace="docs") as c:
        c.put({b"k": b"v" * 100})
    text, _ = scrape(metrics_address(srv))
    exported = {f.name + ("_total" if f.type == "counter" else "")
                for f in parser.text_string_to_metric_families(text)}
    assert exported == documented
    srv.terminate()


def test_a_put_the_client_cancels_is_counted_cancelled(server_factory: type) -> None:
    """A Put stream cut by its client inside a block: CANCELLED in the
    metrics, as a cancelled Get is (it was INVALID_ARGUMENT, "stream ended
    inside block", so every engine timeout looked like a client bug)."""
    import threading

    import grpc

    from kvstore.wire.pb import kvstore_pb2 as pb
    from kvstore.wire.pb import kvstore_pb2_grpc as pb_grpc

    srv = server_factory("--server-metrics-listen", "127.0.0.1:0").start()
    address = metrics_address(srv)
    put = {"service": "kvstore.v1.KVStore", "method": "Put"}
    with grpc.insecure_channel(srv.tcp) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        for i in range(3):
            sent = threading.Event()
            hold = threading.Event()

            def chunks(i: int = i, sent: threading.Event = sent,
                       hold: threading.Event = hold) -> object:
                yield pb.PutChunk(namespace="cx", key=b"k%d" % i, block_size=1 << 20,
                                  data=b"x" * 4096)
                sent.set()
                hold.wait(30)  # the rest of the block never comes

            call = stub.Put.future(chunks(), timeout=60)
            assert sent.wait(30)
            scrape(address)  # (a round trip: the first chunk has reached the server)
            call.cancel()
            hold.set()
            with pytest.raises(grpc.FutureCancelledError):
                call.result()
    deadline = time.monotonic() + 10
    while True:
        _, after = scrape(address)
        if value(after, "kvstore_grpc_requests_total", code="CANCELLED", **put) >= 3 \
                or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # polling a bounded wait, not synchronisation
    assert value(after, "kvstore_grpc_requests_total", code="CANCELLED", **put) == 3
    assert value(after, "kvstore_grpc_requests_total", code="INVALID_ARGUMENT", **put) == 0


def test_how_full_l1_is_counts_whole_pages(server_factory: type) -> None:
    """Found by a review: with 100-byte blocks L1 was full and evicting while
    Stats, the metrics' documented `bytes / capacity` and `kvstore stats`
    said 2.4 %: L1 gives each block whole pages. `used` is what L1's
    capacity counts, server-wide and per namespace."""
    from kvstore.cli import format_namespace_stats, format_stats
    from kvstore.types import TierName

    with server_factory("--l2-enabled", "false", l1_capacity="16MiB") as srv, \
            Client(srv.tcp, namespace="small") as c:
        for start in range(0, 6000, 500):
            c.put({b"k%05d" % i: b"v" * 100 for i in range(start, start + 500)})
        l1 = next(t for t in c.stats().tiers if t.tier == TierName.L1)
        assert l1.evictions > 0  # full: 4,096 pages of 4 KiB
        assert l1.bytes == 100 * l1.blocks and l1.used == 4096 * l1.blocks
        assert l1.used > 0.99 * l1.capacity
        assert f"{100.0 * l1.used / l1.capacity:.1f}%" in format_stats(c.stats())
        mine = next(t for t in c.stats("small").tiers if t.tier == TierName.L1)
        assert (mine.blocks, mine.used) == (l1.blocks, l1.used)
        assert "16.0 MiB" in format_namespace_stats(c.stats("small"))
