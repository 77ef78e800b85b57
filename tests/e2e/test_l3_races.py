"""Races between the shared L3 and Puts, Deletes and Gets of the same key on
one node: an overwrite made while an ``ack=remote`` upload is in flight, a
Delete answered while a Get is reading the object, a shared arena's remote
Put overtaken by an overwrite. None may bring replaced or deleted bytes back,
nor report a Put corrupt that was only overtaken. Real servers, a real S3
server (rclone serve s3) behind a delay proxy that makes the race window
wide and the test deterministic (found by an outside-style review)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from delayproxy import DelayProxy
from faultproxy import FaultProxy
from test_l3 import scrape_counters

from kvstore import Client
from kvstore.errors import KVStoreError
from kvstore.types import TierName

try:
    from s3server import S3Server, rclone_binary
except ImportError:  # pragma: no cover
    rclone_binary = lambda: None  # noqa: E731

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture
def gate(s3: S3Server) -> Iterator[FaultProxy]:
    """A proxy in front of the S3 server that holds chosen requests back
    (they reach the store late, after their client gave up)."""
    held = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    try:
        yield held
    finally:
        held.release.set()
        held.close()


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[DelayProxy]:
    slow = DelayProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    try:
        yield slow
    finally:
        slow.close()


def node(factory, s3: S3Server, endpoint: str, data_dir: Path, *flags: str,  # type: ignore[no-untyped-def]
         l1: str = "16MiB"):
    env = {"KVSTORE_L3_ACCESS_KEY_ID": s3.access_key,
           "KVSTORE_L3_SECRET_ACCESS_KEY": s3.secret_key, "KVSTORE_LOG_LEVEL": "INFO"}
    return factory("--l3-url", s3.url("races"), "--l3-endpoint", endpoint,
                   "--l3-timeout-s", "20", "--l3-list-on-start", "false", *flags,
                   data_dir=data_dir, l1_capacity=l1, env=env)


def put_from_another_node(factory, s3: S3Server, tmp_path: Path,  # type: ignore[no-untyped-def]
                          blocks: dict[bytes, bytes]) -> None:
    """``blocks`` put at ack=remote through a writer node of their own: the
    bucket holds them, a node started afterwards has no entry for them."""
    with node(factory, s3, s3.endpoint, tmp_path / "writer") as writer, \
            Client(writer.tcp, namespace="r") as w:
        assert w.put(blocks, ack="remote").stored == len(blocks)


def objects(s3: S3Server) -> list[Path]:
    # os.walk, not rglob: rclone removes a directory emptied by a delete
    # while it is walked (rglob raised FileNotFoundError for it, os.walk skips it).
    return [Path(root) / name for root, _, names in os.walk(s3.data_dir) for name in names]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.02)  # bounded poll on what a user (or the bucket) shows


def test_an_overwrite_during_a_remote_upload_leaves_no_old_object(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, proxy: DelayProxy, tmp_path: Path) -> None:
    old, new = os.urandom(MiB), b"n" * (4 * KiB)
    data = tmp_path / "a"
    a = node(server_factory, s3, f"http://127.0.0.1:{proxy.port}", data).start()
    try:
        with Client(a.tcp, namespace="r", data_plane=False) as first, \
                Client(a.tcp, namespace="r", data_plane=False) as second:
            proxy.up_delay_s = 0.05  # the 1 MiB upload: about a second
            done: list[object] = []
            uploader = threading.Thread(
                target=lambda: done.append(first.put({b"k": old}, ack="remote").stored))
            uploader.start()
            wait_for(lambda: proxy.up_bytes > 0, what="the old block's upload begun")
            # Overwritten (durably) while its upload is on the way.
            assert second.put({b"k": new}, ack="local").stored == 1
            uploader.join(60)
            assert done == [1]
            assert second.get([b"k"]) == [new]
            proxy.up_delay_s = 0.0
            # The upload landed after the overwrite: its object is deleted
            # behind it, not left for a restart or another node to serve.
            wait_for(lambda: not objects(s3), what="the replaced object deleted from L3")
        a.kill()  # SIGKILL
        a = node(server_factory, s3, s3.endpoint, data, "--l3-list-on-start", "true").start()
        with Client(a.tcp, namespace="r") as c:
            assert c.get([b"k"]) == [new]
    finally:
        a.kill()


def test_a_get_reading_l3_does_not_bring_back_a_key_deleted_meanwhile(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, proxy: DelayProxy, tmp_path: Path) -> None:
    value = os.urandom(256 * KiB)
    put_from_another_node(server_factory, s3, tmp_path, {b"k": value})
    # Another node, with no entry for the key: its Get reads the object, slowly.
    with node(server_factory, s3, f"http://127.0.0.1:{proxy.port}",
              tmp_path / "reader") as reader, \
            Client(reader.tcp, namespace="r", data_plane=False) as getter, \
            Client(reader.tcp, namespace="r", data_plane=False) as deleter:
        proxy.down_delay_s = 0.3
        got: list[object] = []
        read = threading.Thread(target=lambda: got.append(getter.get([b"k"])))
        read.start()
        wait_for(lambda: proxy.up_bytes > 0, what="the Get's L3 read sent")
        assert deleter.delete([b"k"]) == 1
        read.join(60)
        assert got in ([[value]], [[None]])  # it began before the Delete: either
        proxy.down_delay_s = 0.0
        # Every call made after the Delete was answered misses.
        assert deleter.get([b"k"]) == [None]
        assert deleter.lookup([b"k"]).tiers == [None]
        assert not objects(s3)


def test_a_remote_put_overtaken_by_an_overwrite_is_not_corrupt(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, tmp_path: Path) -> None:
    """With a shared arena every upload checks its L1 bytes. An ``ack=remote``
    Put whose block is overwritten before its upload starts (while its L2
    write runs) was read from an extent no longer its own and failed as
    CorruptBlock, counted as a corrupt L1 copy: it is a Put overtaken, not a
    corrupt one."""
    shm = f"/dev/shm/kvstore-test-races-{os.getpid()}-{tmp_path.name}"
    with node(server_factory, s3, s3.endpoint, tmp_path / "a", "--l1-shm-path", shm,
              l1="64MiB") as a, \
            Client(a.tcp, namespace="r") as remote, Client(a.tcp, namespace="r") as local:
        errors: list[BaseException] = []
        stop = threading.Event()

        def overwrite() -> None:
            i = 0
            while not stop.is_set():
                try:
                    local.put({b"k": i.to_bytes(4, "little") * 1024}, ack="local")
                except BaseException as exc:  # reported below
                    errors.append(exc)
                    return
                i += 1

        writer = threading.Thread(target=overwrite)
        writer.start()
        try:
            for _ in range(150):
                remote.put({b"k": os.urandom(64 * KiB)}, ack="remote")
        finally:
            stop.set()
            writer.join(30)
        assert not errors
        l1 = next(t for t in remote.stats().tiers if t.tier == TierName.L1)
        assert l1.corrupt == 0


def test_the_listing_at_start_keeps_this_nodes_copy_unless_the_object_is_newer(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, tmp_path: Path) -> None:
    """After a restart a block only in L2 is in the compact index. The
    bucket's object of the key, of another size, used to replace it in the
    index whatever it was (an orphan's older bytes were served). An older
    object is deleted and this node serves its copy; another node's newer
    one (written after this node's block) is served instead of this node's
    copy, which is dropped: kept, its demotion later uploaded the older
    bytes over the newer object (found by a review, session 29)."""
    mine, theirs = b"m" * (8 * KiB), b"t" * (12 * KiB)
    data = tmp_path / "a"
    with node(server_factory, s3, s3.endpoint, tmp_path / "b") as b, \
            Client(b.tcp, namespace="r") as c:
        assert c.put({b"old": theirs}, ack="remote").stored == 1  # before A's: older
    with node(server_factory, s3, s3.endpoint, data) as a, Client(a.tcp, namespace="r") as c:
        assert c.put({b"old": mine, b"new": mine}, ack="local").stored == 2
        assert a.terminate() == 0
    with node(server_factory, s3, s3.endpoint, tmp_path / "b") as b, \
            Client(b.tcp, namespace="r") as c:
        assert c.put({b"new": theirs}, ack="remote").stored == 1  # after A's: newer
    with node(server_factory, s3, s3.endpoint, data, "--l3-list-on-start", "true") as a, \
            Client(a.tcp, namespace="r") as c:
        wait_for(lambda: "L3 listing:" in a.log(), what="the listing at start")
        assert c.lookup([b"old", b"new"]).tiers == [TierName.L2, TierName.L3]
        assert c.get([b"old", b"new"]) == [mine, theirs]


def test_a_get_started_during_a_delete_of_unknown_keys_misses_after_it(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, proxy: DelayProxy, tmp_path: Path) -> None:
    """A Delete of keys this node has no entry for deletes their objects a
    few at a time; a Get of one of them that began meanwhile indexed the
    object (still there) and served it after the Delete's answer."""
    keys = [b"k%02d" % i for i in range(12)]
    values = {k: os.urandom(64 * KiB) for k in keys}
    put_from_another_node(server_factory, s3, tmp_path, values)
    with node(server_factory, s3, f"http://127.0.0.1:{proxy.port}",
              tmp_path / "reader") as reader, \
            Client(reader.tcp, namespace="r", data_plane=False) as deleter, \
            Client(reader.tcp, namespace="r", data_plane=False) as getter:
        proxy.up_delay_s = 0.3
        answered: list[int] = []
        delete = threading.Thread(target=lambda: answered.append(deleter.delete(keys)))
        delete.start()
        wait_for(lambda: proxy.up_bytes > 0, what="the Delete's first L3 delete sent")
        assert getter.get([keys[-1]]) in ([values[keys[-1]]], [None])  # during: either
        delete.join(60)
        assert answered == [len(keys)]
        proxy.up_delay_s = 0.0
        assert getter.get([keys[-1]]) == [None]
        assert getter.lookup([keys[-1]]).tiers == [None]
        assert not objects(s3)


def test_a_remote_put_cut_short_by_its_client_leaves_no_old_object(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, proxy: DelayProxy, tmp_path: Path) -> None:
    """An ``ack=remote`` Put whose client gives up (its deadline) while the
    upload waits for the object store's answer: the upload lands anyway. An
    overwrite after that left the old object in the bucket, served by any
    node that reads the key from L3."""
    old, new = os.urandom(64 * KiB), b"n" * (4 * KiB)
    with node(server_factory, s3, f"http://127.0.0.1:{proxy.port}", tmp_path / "a") as a, \
            Client(a.tcp, namespace="r", data_plane=False, timeout=1.0) as hasty, \
            Client(a.tcp, namespace="r", data_plane=False) as c:
        proxy.down_delay_s = 3.0  # the store's answer to the PUT comes late
        with pytest.raises(KVStoreError):
            hasty.put({b"k": old}, ack="remote")
        wait_for(lambda: bool(objects(s3)), what="the old object landed")
        assert c.put({b"k": new}, ack="local").stored == 1
        proxy.down_delay_s = 0.0
        wait_for(lambda: not objects(s3), what="the replaced object deleted from L3")
        assert c.get([b"k"]) == [new]


def test_a_lookup_never_marks_a_block_put_meanwhile_as_in_l3(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, proxy: DelayProxy, tmp_path: Path) -> None:
    """A Lookup of a key unknown here asks the bucket (HEAD). A Put of other
    bytes here meanwhile was then marked as in L3 (the HEAD found another
    node's object), so L2 dropped its only copy as "in L3": the acknowledged
    block lost."""
    theirs, mine = b"t" * (12 * KiB), b"m" * (8 * KiB)
    with node(server_factory, s3, s3.endpoint, tmp_path / "b") as b, \
            Client(b.tcp, namespace="r") as other:
        assert other.put({b"k": theirs}, ack="remote").stored == 1
    with node(server_factory, s3, f"http://127.0.0.1:{proxy.port}", tmp_path / "a") as a, \
            Client(a.tcp, namespace="r", data_plane=False) as looker, \
            Client(a.tcp, namespace="r", data_plane=False) as c:
        proxy.down_delay_s = 0.5
        looked: list[object] = []
        lookup = threading.Thread(target=lambda: looked.append(looker.lookup([b"k"]).tiers))
        lookup.start()
        wait_for(lambda: proxy.up_bytes > 0, what="the Lookup's HEAD sent")
        assert c.put({b"k": mine}, ack="local").stored == 1
        lookup.join(30)
        proxy.down_delay_s = 0.0
        l3 = next(t for t in c.stats("r").tiers if t.tier == TierName.L3)
        assert l3.blocks == 0  # the block here is not the bucket's
        assert c.get([b"k"]) == [mine]


def test_a_failed_remote_upload_never_deletes_the_newer_block_behind_it(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, proxy: DelayProxy, tmp_path: Path) -> None:
    """An ``ack=remote`` upload that fails (here: its answer comes after the
    L3 timeout) has its object, if it landed, deleted behind it -- unless the
    block was overwritten meanwhile: the overwrite queued that delete already,
    and one queued at the failure came after the newer block's upload and
    deleted it (acknowledged at ``remote``, gone from the bucket)."""
    old, new = b"o" * (8 * KiB), b"n" * (4 * KiB)
    with node(server_factory, s3, f"http://127.0.0.1:{proxy.port}", tmp_path / "a",
              "--l3-timeout-s", "2", "--l3-retries", "0") as a, \
            Client(a.tcp, namespace="r", data_plane=False) as first, \
            Client(a.tcp, namespace="r", data_plane=False) as second:
        proxy.down_delay_s = 3.0  # the first PUT's answer: after its 2 s timeout
        failed: list[BaseException] = []

        def put_old() -> None:
            try:
                first.put({b"k": old}, ack="remote")
            except KVStoreError as exc:
                failed.append(exc)

        uploader = threading.Thread(target=put_old)
        uploader.start()
        wait_for(lambda: proxy.down_chunks_read > 0, what="the first PUT's answer held back")
        proxy.down_delay_s = 0.0
        assert second.put({b"k": new}, ack="remote").stored == 1  # queued behind it
        uploader.join(30)
        assert len(failed) == 1
        # (an object is a small header, then the block's bytes)
        wait_for(lambda: len(objects(s3)) == 1 and objects(s3)[0].read_bytes().endswith(new),
                 what="the newer object in the bucket")
    with node(server_factory, s3, s3.endpoint, tmp_path / "b") as b, \
            Client(b.tcp, namespace="r") as other:
        assert other.get([b"k"]) == [new]


def test_a_delete_during_another_deletes_paced_removals_still_deletes(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, proxy: DelayProxy, tmp_path: Path) -> None:
    """While a Delete of keys unknown here removes their objects (paced),
    those keys count as absent. A second Delete of one of them, Put here
    meanwhile (and again by another node into the bucket), must still delete
    the bucket's object: it was skipped as "a delete already under way"."""
    keys = [b"k"] + [b"z%02d" % i for i in range(10)]
    with node(server_factory, s3, s3.endpoint, tmp_path / "b") as b, \
            node(server_factory, s3, f"http://127.0.0.1:{proxy.port}", tmp_path / "a",
                 "--l3-concurrency", "4") as a, \
            Client(b.tcp, namespace="r", data_plane=False) as other, \
            Client(a.tcp, namespace="r", data_plane=False) as first, \
            Client(a.tcp, namespace="r", data_plane=False) as second:
        assert other.put({k: b"t" * (4 * KiB) for k in keys}, ack="remote").stored == len(keys)
        proxy.up_delay_s = 0.4
        answered: list[int] = []
        slow = threading.Thread(target=lambda: answered.append(first.delete(keys)))
        slow.start()
        wait_for(lambda: len(objects(s3)) < len(keys), what="the slow Delete's first removal")
        k_object = [p for p in objects(s3) if p.name.endswith("6b")]  # (b"k".hex())
        if k_object:  # (k not removed first: wait for it)
            wait_for(lambda: not k_object[0].exists(), what="k's object removed")
        assert other.put({b"k": b"T" * (4 * KiB)}, ack="remote").stored == 1
        assert second.put({b"k": b"m" * (4 * KiB)}, ack="local").stored == 1
        assert second.delete([b"k"]) == 1
        slow.join(60)
        proxy.up_delay_s = 0.0
        wait_for(lambda: not objects(s3), what="every object deleted, k's new one too")
        assert second.get([b"k"]) == [None]


def overwrite_past_a_late_delete(c: Client, gate: Any, s3: S3Server, hold_s: float,
                                 answer: bytes | None = None) -> None:
    """Put ``k`` at remote, then overwrite it at remote while the gate holds the
    old object's delete (S3 DeleteObjects: a POST naming the key) for
    ``hold_s`` and carries it out then (answering ``answer`` at once when
    given, as a gateway that gave up): the acknowledged new object must still
    be in the bucket after the late delete."""
    key = b"k"
    assert c.put({key: b"o" * (8 * KiB)}, ack="remote").stored == 1
    gate.hold_max_s = hold_s
    if answer is not None:
        gate.held_answer = answer
    gate.hold = lambda method, target, body: (
        method == "POST" and key.hex().encode() in body and not gate.held)
    new = b"n" * (4 * KiB)
    assert c.put({key: new}, ack="remote").stored == 1
    assert gate.held, "the overwrite did not delete the old object"
    wait_for(lambda: bool(gate.late), what="the late delete carried out")
    found = [p for p in objects(s3) if p.name == key.hex()]
    assert found and found[0].read_bytes().endswith(new), \
        f"the acknowledged object is gone ({gate.late[0][2]} to the late delete)"


def test_a_delete_that_timed_out_never_lands_after_the_overwrite_it_preceded(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, tmp_path: Path, gate: FaultProxy) -> None:
    """An overwrite deletes the old object, then uploads the new one under the
    same name. A delete given up on (its 1 s timeout) may still be carried
    out by the store later: it reached a slow server, and giving up on it
    does not unsend it. It was sent again at once and the new object
    uploaded: the late one then deleted the object of a Put acknowledged at
    ``remote`` (1 and 4 of 200 in the kill test, under load, no error said).
    The upload now waits until the old object is seen gone."""
    with node(server_factory, s3, f"http://127.0.0.1:{gate.port}", tmp_path / "a",
              "--l3-timeout-s", "1", "--server-metrics-listen", "127.0.0.1:0") as a, \
            Client(a.tcp, namespace="r", data_plane=False) as c:
        # The old object's delete reaches the store 2 s late, past its timeout.
        overwrite_past_a_late_delete(c, gate, s3, hold_s=2.0)
        assert "waits for L3" in a.log()  # (the delete did time out)
        # Operators see it: the doubt is counted on /metrics.
        assert scrape_counters(a)["kvstore_l3_deletes_in_doubt_total"] >= 1


def test_a_delete_a_gateway_gave_up_on_never_lands_after_the_overwrite(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, tmp_path: Path, gate: FaultProxy) -> None:
    """The same late delete behind a gateway (a load balancer or reverse
    proxy in front of the object store) that gave up on a slow upstream: the
    client gets a 504 at once, the upstream carries the delete out later. An
    HTTP status was taken as the store's answer (no doubt left), so the
    delete was retried at once, the new object uploaded, and the late delete
    deleted it. A 502 or 504 is a gateway's, not the store's: in doubt."""
    with node(server_factory, s3, f"http://127.0.0.1:{gate.port}", tmp_path / "a",
              "--l3-timeout-s", "3") as a, \
            Client(a.tcp, namespace="r", data_plane=False) as c:
        overwrite_past_a_late_delete(c, gate, s3, hold_s=1.0, answer=b"504 Gateway Timeout")


def test_a_delete_whose_client_gave_up_never_lands_after_a_later_put(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, tmp_path: Path, gate: FaultProxy) -> None:
    """A Delete of a key another node put (its object deleted within the
    call) whose client gives up (its deadline) while the object's delete is
    at a slow store: the call is cancelled, the delete request is out all
    the same, and the store carries it out later. The cancelled delete left
    no doubt (only a failed one did), so a Put of the key at ``remote`` right
    after uploaded at once, and the late delete deleted the acknowledged
    object. Now the upload waits until the old object is seen gone."""
    from kvstore.errors import DeadlineExceeded

    key = b"k"
    put_from_another_node(server_factory, s3, tmp_path, {key: b"o" * (8 * KiB)})
    with node(server_factory, s3, f"http://127.0.0.1:{gate.port}", tmp_path / "a") as a, \
            Client(a.tcp, namespace="r", data_plane=False) as c, \
            Client(a.tcp, namespace="r", data_plane=False, timeout=2.0) as hasty:
        gate.hold_max_s = 5.0  # (past the client's deadline; the node's is 20 s)
        gate.hold = lambda method, target, body: (
            method == "POST" and key.hex().encode() in body and not gate.held)
        with pytest.raises(DeadlineExceeded):
            hasty.delete([key])
        assert gate.held, "the Delete did not delete the object"
        new = b"n" * (4 * KiB)
        assert c.put({key: new}, ack="remote").stored == 1
        wait_for(lambda: bool(gate.late), what="the late delete carried out")
        found = [p for p in objects(s3) if p.name == key.hex()]
        assert found and found[0].read_bytes().endswith(new), \
            f"the acknowledged object is gone ({gate.late[0][2]} to the late delete)"


@pytest.mark.parametrize("purge", ["delete", "flush"])
def test_a_remote_put_made_during_a_delete_of_another_nodes_object_stays(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, tmp_path: Path, gate: FaultProxy, purge: str) -> None:
    """A Delete (or a Flush) removes an object another node put, which this
    node has no entry for; a Put of the same key at ``remote`` made here
    while that delete is at a slow store is answered once its object is in
    the bucket. The delete of the other node's object ran outside the
    block's write order: the Put's upload landed first, the delete after
    it, and the acknowledged object was gone. Now the upload waits for it."""
    key = b"k"
    put_from_another_node(server_factory, s3, tmp_path, {key: b"o" * (8 * KiB)})
    with node(server_factory, s3, f"http://127.0.0.1:{gate.port}", tmp_path / "a") as a, \
            Client(a.tcp, namespace="r", data_plane=False) as purger, \
            Client(a.tcp, namespace="r", data_plane=False) as c:
        gate.hold_max_s = 2.0  # (within the node's 20 s: the delete is simply slow)
        gate.hold = lambda method, target, body: (
            method in ("POST", "DELETE") and key.hex().encode() in body + target.encode()
            and not gate.held)
        answered: list[int] = []
        slow = threading.Thread(target=lambda: answered.append(
            purger.delete([key]) if purge == "delete" else purger.flush("r")))
        slow.start()
        wait_for(lambda: bool(gate.held), what="the other node's object's delete sent")
        new = b"n" * (4 * KiB)
        assert c.put({key: new}, ack="remote").stored == 1
        slow.join(30)
        assert answered == [1]
        assert gate.late, "the delete was not held"
        found = [p for p in objects(s3) if p.name == key.hex()]
        assert found and found[0].read_bytes().endswith(new), \
            "the object of a Put acknowledged at remote is gone from the bucket"
        assert c.get([key]) == [new]


def test_a_remote_put_a_flush_lists_goes_whole(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, tmp_path: Path, gate: FaultProxy) -> None:
    """A Put here at ``remote`` whose object a running Flush's listing finds:
    the Flush deleted the object as another node's, and the node went on
    serving the block from its entry, which counted on the object (a block
    served here and gone from the bucket). Now it goes as the blocks known
    at the start do: entry and object (a Put made while a Flush runs may go
    or stay, never half)."""
    from faultproxy import is_listing

    key = b"late"
    with node(server_factory, s3, f"http://127.0.0.1:{gate.port}", tmp_path / "a") as a, \
            Client(a.tcp, namespace="r", data_plane=False) as purger, \
            Client(a.tcp, namespace="r", data_plane=False) as c:
        gate.hold_max_s = 2.0  # the listing reaches the store after the Put's upload
        gate.hold = lambda method, target, body: is_listing(method, target) \
            and not gate.held
        answered: list[int] = []
        flush = threading.Thread(target=lambda: answered.append(purger.flush("r")))
        flush.start()
        wait_for(lambda: bool(gate.held), what="the Flush's listing sent")
        assert c.put({key: b"n" * (4 * KiB)}, ack="remote").stored == 1
        flush.join(30)
        assert answered == [1]
        in_bucket = any(p.name == key.hex() for p in objects(s3))
        assert c.get([key]) == [None] and not in_bucket, \
            f"served here: {c.get([key]) != [None]}, in the bucket: {in_bucket}"
