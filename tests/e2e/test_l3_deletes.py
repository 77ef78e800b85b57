"""Deletes and overwrites of blocks with a copy in the shared L3, made while L3
is down or slow, and Deletes answered just before a kill: none may bring the
old bytes back, on this node (now, or after a restart) or on another one
(real servers; a real S3 server, rclone serve s3 on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from kvstore import Client

try:
    from s3server import S3Server, rclone_binary
except ImportError:  # pragma: no cover
    rclone_binary = lambda: None  # noqa: E731

KiB = 1024


def node(factory, s3: S3Server, data_dir: Path, *flags: str):  # type: ignore[no-untyped-def]
    env = {"KVSTORE_L3_ACCESS_KEY_ID": s3.access_key,
           "KVSTORE_L3_SECRET_ACCESS_KEY": s3.secret_key}
    return factory("--l3-url", s3.url("fleet"), "--l3-endpoint", s3.endpoint,
                   "--l3-timeout-s", "1", "--l3-retries", "0", "--l3-breaker-failures", "1",
                   "--l3-breaker-reset-s", "0.2", *flags, data_dir=data_dir,
                   l1_capacity="16MiB", env=env)


def objects(s3: S3Server) -> list[str]:
    for _ in range(100):
        try:
            return sorted(str(p.relative_to(s3.data_dir))
                          for p in s3.data_dir.rglob("*") if p.is_file())
        except FileNotFoundError:
            continue  # (the S3 server removed a folder as it emptied, mid-walk: walk again)
    raise AssertionError("the bucket's folders kept changing under 100 walks")


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.05)  # bounded poll on what a user sees


async def wait_until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    """wait_for inside an event loop (in-process stores)."""
    import asyncio

    for _ in range(1500):
        if check():
            return
        await asyncio.sleep(0.02)  # bounded poll
    raise AssertionError(f"{what} not met in 30 s")


def kill9(server) -> None:  # type: ignore[no-untyped-def]
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


def test_a_delete_while_l3_is_down_is_done_once_it_is_back(server_factory, s3: S3Server,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    with node(server_factory, s3, tmp_path / "a") as a, Client(a.tcp, namespace="d") as c:
        c.put({b"k": b"old" * 1000}, ack="remote")
        assert objects(s3)
        s3.stop()
        assert c.delete([b"k"]) == 1
        assert c.get([b"k"]) == [None]
        s3.start()
        # The delete is retried: the object goes, and this node never serves it again.
        wait_for(lambda: not objects(s3), what="the L3 object deleted")
        assert c.get([b"k"]) == [None]
        assert c.lookup([b"k"]).tiers == [None]


def test_a_delete_made_while_l3_is_down_survives_a_kill(server_factory, s3: S3Server,  # type: ignore[no-untyped-def]
                                                       tmp_path: Path) -> None:
    a = node(server_factory, s3, tmp_path / "a").start()
    try:
        with Client(a.tcp, namespace="d") as c:
            # One at a time: rclone's local backend may answer 500 to two
            # uploads racing to create the same new directory.
            c.put({b"gone": b"old" * 1000}, ack="remote")
            c.put({b"kept": b"keep" * 1000}, ack="remote")
            s3.stop()
            assert c.delete([b"gone"]) == 1
        kill9(a)
        s3.start()
        a.start()
        with Client(a.tcp, namespace="d") as c:
            wait_for(lambda: c.get([b"kept"]) == [b"keep" * 1000], what="the kept block")
            assert c.get([b"gone"]) == [None]
            wait_for(lambda: len(objects(s3)) == 1, what="the deleted object removed")
            assert c.get([b"gone"]) == [None]
        # A node that never saw the delete finds nothing either.
        with node(server_factory, s3, tmp_path / "b") as b, Client(b.tcp, namespace="d") as c:
            assert c.get([b"gone"]) == [None]
            assert c.get([b"kept"]) == [b"keep" * 1000]
    finally:
        a.kill()


@pytest.mark.parametrize("ack", ["memory", "local"])
def test_an_overwrite_while_l3_is_down_never_brings_the_old_bytes_back(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, tmp_path: Path, ack: str) -> None:
    old, new = b"O" * (64 * KiB), b"N" * (64 * KiB)  # the same size, as a re-put chunk
    a = node(server_factory, s3, tmp_path / "a").start()
    try:
        with Client(a.tcp, namespace="o") as c:
            c.put({b"k": old}, ack="remote")
            s3.stop()
            c.put({b"k": new}, ack=ack)
            assert c.get([b"k"]) == [new]
        kill9(a)
        s3.start()
        a.start()
        with Client(a.tcp, namespace="o") as c:
            # ack=memory may be lost with the process; the old value never comes back.
            assert c.get([b"k"]) == ([None] if ack == "memory" else [new])
            wait_for(lambda: not objects(s3), what="the old object deleted")
            assert c.get([b"k"]) == ([None] if ack == "memory" else [new])
    finally:
        a.kill()


def test_a_delete_answered_is_not_undone_by_a_kill(server_factory, tmp_path: Path) -> None:
    """The L2 writer is kept busy (synced commits, every block written at
    once, a burst of Puts ahead of the Delete): the Delete is answered only
    once its L2 deletes have committed, so a kill right after it keeps them."""
    keys = [f"k{i}".encode() for i in range(200)]
    server = server_factory("--l2-write-mode", "always", "--l2-sync", "true",
                            data_dir=tmp_path / "n", l1_capacity="256MiB").start()
    try:
        with Client(server.tcp, namespace="del") as c:
            c.put({k: os.urandom(16 * KiB) for k in keys}, ack="local")
            filler = os.urandom(KiB * KiB)
            for i in range(48):
                c.put({f"other{i}".encode(): filler}, ack="memory")
            assert c.delete(keys[:100]) == 100
            assert c.flush("del") >= 100
        kill9(server)
        server.start()
        with Client(server.tcp, namespace="del") as c:
            assert c.get(keys) == [None] * len(keys)
            assert all(t.blocks == 0 for t in c.stats(namespace="del").tiers)
    finally:
        server.kill()


def _store_env(tmp_path: Path, s3: S3Server | None) -> dict[str, str]:
    env = {"KVSTORE_DATA_DIR": str(tmp_path / "data"), "KVSTORE_L1_CAPACITY": "8MiB",
           "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0",
           "KVSTORE_L3_TIMEOUT_S": "1", "KVSTORE_L3_RETRIES": "0",
           "KVSTORE_L3_CONCURRENCY": "16"}
    if s3 is None:  # an object store nobody listens on: every request fails at once
        env |= {"KVSTORE_L3_URL": "s3://nowhere/p", "KVSTORE_L3_ENDPOINT": "http://127.0.0.1:9",
                "KVSTORE_L3_ACCESS_KEY_ID": "k", "KVSTORE_L3_SECRET_ACCESS_KEY": "s" * 20}
    else:
        env |= {"KVSTORE_L3_URL": s3.url("fleet"), "KVSTORE_L3_ENDPOINT": s3.endpoint,
                "KVSTORE_L3_ACCESS_KEY_ID": s3.access_key,
                "KVSTORE_L3_SECRET_ACCESS_KEY": s3.secret_key}
    return env


def test_a_delete_of_many_unknown_keys_is_paced(s3: S3Server, tmp_path: Path) -> None:
    """A Delete naming 2,000 keys this node does not hold asks L3 for each
    (another node may have put them), a few at a time: it used to send them
    all at once, filling every L3 request slot (other tenants' ack=remote
    Puts timed out) and opening the circuit breaker with the requests that
    timed out waiting for a slot."""
    import asyncio

    from kvstore.config import load
    from kvstore.store import TieredStore
    from kvstore.types import AckLevel

    async def go() -> None:
        store = TieredStore(load(env=_store_env(tmp_path, s3)))
        await store.start()
        assert store.l3 is not None
        real_delete, in_flight, most = store.l3.tier.delete, 0, 0

        async def counted(block):  # type: ignore[no-untyped-def]
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                return await real_delete(block)
            finally:
                in_flight -= 1

        store.l3.tier.delete = counted  # type: ignore[method-assign]
        await store.put_bytes("ns", b"other-node", b"x" * 100, AckLevel.REMOTE)
        store.index.forget(("ns", b"other-node"), store.index.entry(("ns", b"other-node")))
        keys = [f"nobody-{i}".encode() for i in range(2000)] + [b"other-node"]
        assert await store.delete("ns", keys) == 1  # the one that existed, in L3
        assert 1 <= most <= 4, most  # l3.concurrency 16: a quarter of the slots
        assert store.l3.healthy
        await store.put_bytes("ns", b"after", b"y" * 100, AckLevel.REMOTE)
        await store.close()

    asyncio.run(go())


def test_deletes_of_blocks_never_in_l3_cost_nothing_while_it_is_down(tmp_path: Path) -> None:
    """With L3 down, a Delete of blocks this node never put there tries once
    (the object, if any, is another node's) and keeps no record: before,
    each one was a tombstone in L2 and an entry in memory, retried forever,
    so a tenant putting and deleting blocks grew both without bound."""
    import asyncio

    from kvstore.config import load
    from kvstore.store import TieredStore

    async def go() -> None:
        store = TieredStore(load(env=_store_env(tmp_path, None)))
        await store.start()
        assert store.l3 is not None and store.l2 is not None
        for round_ in range(10):
            keys = [f"r{round_}-{i}".encode() for i in range(300)]
            for k in keys:
                await store.put_bytes("ns", k, b"z" * 64)
            assert await store.delete("ns", keys) == len(keys)
        for _ in range(500):  # the attempts end at once (nothing listens)
            if not store.l3._deleting:
                break
            await asyncio.sleep(0.01)
        assert not store.l3._deleting and not store.l3._redo
        assert store.l2.tombstones_sync() == []
        await store.close()

    asyncio.run(go())


def test_a_delete_done_leaves_no_record_to_redo_at_a_restart(s3: S3Server,
                                                             tmp_path: Path) -> None:
    """The record of a delete goes once the delete is done: one left behind
    would, at the next start, delete whatever object the key has by then."""
    import asyncio

    from kvstore.config import load
    from kvstore.store import TieredStore
    from kvstore.types import AckLevel

    env = _store_env(tmp_path, s3) | {"KVSTORE_L3_BREAKER_RESET_S": "0.2",
                                      "KVSTORE_L3_LIST_ON_START": "false"}

    async def go() -> None:
        store = TieredStore(load(env=env))
        await store.start()
        assert store.l3 is not None and store.l2 is not None
        await store.put_bytes("ns", b"k", b"old" * 100, AckLevel.REMOTE)
        s3.stop()
        assert await store.delete("ns", [b"k"]) == 1
        assert [b for b, _ in store.l2.tombstones_sync()] == [("ns", b"k")]
        s3.start()
        await wait_until(lambda: not store.l3._deleting, "the delete done")
        await asyncio.get_running_loop().run_in_executor(None, store.l2.flush_sync)
        assert store.l2.tombstones_sync() == []
        await store.put_bytes("ns", b"k", b"new" * 100, AckLevel.REMOTE)
        await store.close()
        again = TieredStore(load(env=env))
        await again.start()
        assert again.l3 is not None
        await wait_until(lambda: not again.l3._deleting, "nothing left to delete")
        assert objects(s3), "the new object was deleted by a record left behind"
        assert await again.get_bytes("ns", b"k") == b"new" * 100
        await again.close()

    asyncio.run(go())


def test_a_delete_recorded_before_a_restart_keeps_an_object_written_since(
        s3: S3Server, tmp_path: Path) -> None:
    """A delete recorded while L3 was down, finished at the next start, removes
    the object it was for, not one another writer put under the key while
    this node was stopped (another node; or an older release run on this data
    dir, which did not read the records): that one was acknowledged at
    ack=remote, and a node without it found nothing."""
    import asyncio

    from kvstore.config import load
    from kvstore.store import TieredStore
    from kvstore.types import AckLevel

    env = _store_env(tmp_path, s3) | {"KVSTORE_L3_BREAKER_RESET_S": "0.2",
                                      "KVSTORE_L3_LIST_ON_START": "false"}
    other = env | {"KVSTORE_DATA_DIR": str(tmp_path / "other")}
    fresh = env | {"KVSTORE_DATA_DIR": str(tmp_path / "fresh")}

    async def go() -> None:
        store = TieredStore(load(env=env))
        await store.start()
        assert store.l2 is not None
        await store.put_bytes("ns", b"k", b"old" * 100, AckLevel.REMOTE)
        s3.stop()
        assert await store.delete("ns", [b"k"]) == 1
        await store.close()  # the delete is still to be done: recorded in L2
        s3.start()
        writer = TieredStore(load(env=other))
        await writer.start()
        await writer.put_bytes("ns", b"k", b"new" * 100, AckLevel.REMOTE)
        await writer.close()
        again = TieredStore(load(env=env))
        await again.start()
        assert again.l3 is not None and again.l2 is not None
        await wait_until(lambda: not again.l3._deleting, "the recorded delete finished")
        await asyncio.get_running_loop().run_in_executor(None, again.l2.flush_sync)
        assert again.l2.tombstones_sync() == []  # settled: nothing left to redo
        assert await again.get_bytes("ns", b"k") == b"new" * 100
        await again.close()
        reader = TieredStore(load(env=fresh))
        await reader.start()
        assert await reader.get_bytes("ns", b"k") == b"new" * 100
        await reader.close()

    asyncio.run(go())
