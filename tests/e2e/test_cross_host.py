"""kvstore for an engine on another host, simulated (issue 14, item 4): a real
server in one network namespace, the SDK in another, joined by a link with
added round-trip time (``bench/_netns.py``: tc netem, or a TUN delay line
where the kernel has no netem). Whatever path the SDK takes (gRPC, or a data
plane once it offers one), bytes must round-trip, the delay must really be
on the path, and a Get of 8 blocks in one call must cost fewer round trips
than 8 Gets of one block.

Needs root (network namespaces); skipped with the reason otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from bench._netns import NetnsPair, netns_unavailable
from bench.cross_host import ROOT, Servers

# Runs inside the client namespace: argv = target; prints one JSON line.
CLIENT = textwrap.dedent("""
    import hashlib, json, socket, statistics, sys, time
    from kvstore import Client

    target = sys.argv[1]
    host, port = target.rsplit(":", 1)
    connects = []
    for _ in range(11):
        started = time.perf_counter()
        socket.create_connection((host, int(port)), timeout=10).close()
        connects.append(time.perf_counter() - started)
    blocks = {f"b{i}".encode(): (hashlib.sha256(bytes([i])).digest() * 2048)[: 64 * 1024 + i]
              for i in range(8)}
    keys = list(blocks)
    with Client(target, namespace="xh", timeout=60) as c:
        c.put(blocks)
        intact = c.get(keys) == list(blocks.values())
        intact = intact and c.get([b"b3", b"absent"]) == [blocks[b"b3"], None]
        singles, batched = [], []
        for _ in range(5):
            started = time.perf_counter()
            for k in keys:
                c.get([k])
            singles.append(time.perf_counter() - started)
            started = time.perf_counter()
            c.get(keys)
            batched.append(time.perf_counter() - started)
    print(json.dumps({"intact": intact, "rtt_ms": statistics.median(connects) * 1e3,
                      "singles_ms": statistics.median(singles) * 1e3,
                      "batched_ms": statistics.median(batched) * 1e3}))
""")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NetnsPair, str]]:
    why = netns_unavailable()
    if why:
        pytest.skip(f"cross-host test needs network namespaces: {why}")
    pair = NetnsPair()
    servers = Servers(pair, ["kvstore-tcp"], tmp_path_factory.mktemp("cross-host"), [], 0)
    try:
        pair.start()
        servers.start()
        yield pair, servers.cfg["kv_tcp"]
    finally:
        servers.stop()
        pair.close()  # the namespaces go, with the link and the delay line


def run_client(pair: NetnsPair, target: str) -> dict[str, Any]:
    done = subprocess.run(pair.argv(pair.client_ns, [sys.executable, "-c", CLIENT, target]),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_namespaces_are_made_and_removed() -> None:
    why = netns_unavailable()
    if why:
        pytest.skip(f"cross-host test needs network namespaces: {why}")
    with NetnsPair() as pair:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert pair.server_ns in names and pair.client_ns in names
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert pair.server_ns not in names and pair.client_ns not in names


@pytest.mark.parametrize("delay_ms", [0.2, 1.0])
def test_blocks_cross_a_delayed_link_and_batching_amortises_the_round_trip(
        hosts: tuple[NetnsPair, str], delay_ms: float) -> None:
    pair, target = hosts
    assert target.startswith("10.200.0.1:")  # the server namespace's address, not loopback
    pair.set_delay(delay_ms)
    got = run_client(pair, target)
    assert got["intact"], got
    # The delay is on the path: a TCP connect (one round trip) takes at least it.
    assert got["rtt_ms"] >= delay_ms, got
    # Every Get of one block pays at least one round trip ...
    assert got["singles_ms"] >= 8 * delay_ms, got
    # ... while 8 blocks in one call pay far fewer: at least half of the 7
    # round trips a batch saves show in the time saved. (Not a ratio of the
    # two times: the bytes take their time in both, and where they cross
    # slowly the ratio says little. Measured: 5.5-7.6 of 7 saved here; a
    # `.ci/run` at 0.2 ms read 9.7 ms against 6.2, a ratio of 0.64 that the 0.6
    # this test had failed, and 8.0 round trips saved.)
    saved = (got["singles_ms"] - got["batched_ms"]) / got["rtt_ms"]
    assert saved >= 3.5, f"{saved:.1f} round trips saved by one call for 8 blocks: {got}"
    if delay_ms >= 1.0:
        assert got["batched_ms"] < 8 * got["rtt_ms"], got


def test_the_link_delay_can_be_changed_and_removed(hosts: tuple[NetnsPair, str]) -> None:
    pair, target = hosts
    pair.set_delay(1.0)
    slow = run_client(pair, target)
    pair.set_delay(0.0)
    fast = run_client(pair, target)
    assert fast["intact"] and slow["intact"]
    assert slow["rtt_ms"] >= 1.0 and fast["rtt_ms"] < slow["rtt_ms"], (slow, fast)

