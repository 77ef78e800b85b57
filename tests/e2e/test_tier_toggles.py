"""A tier turned off for a run and on again (found by an operator's review):
the Deletes and overwrites that run answered reached nothing of that tier,
whose old copies came back when it was on again. Now a run without L2 marks
the L2 it leaves, which the next run with L2 clears; a run without the L3 an
earlier run had records its deletes in L2, done when L3 is back."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvstore import Client
from kvstore.types import TierName

KEYS = [b"k%d" % i for i in range(6)]
mib = 1024 * 1024
#: A directory whose sitecustomize.py moves a server's wall clock (CLOCKSHIFT_S).
CLOCKSHIFT = Path(__file__).parent.parent / "clockshift"


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.05)  # polling with a deadline


def only_in_l3(server_factory, tmp_path: Path, blocks: dict[bytes, bytes]  # type: ignore[no-untyped-def]
               ) -> tuple[Path, Path, tuple[str, ...], tuple[str, ...]]:
    """A node (data dir) with a file:// bucket whose run leaves ``blocks`` of
    namespace "ns" in L3 only; returns the data dir, the bucket, and the
    flags of L3 and of the small L2 its runs use."""
    node = tmp_path / "node"
    bucket = tmp_path / "bucket"
    l3 = ("--l3-url", f"file://{bucket}")
    small = ("--l2-capacity", "4MiB")
    with server_factory(*l3, *small, data_dir=node, l1_capacity="8MiB") as first, \
            Client(first.tcp, namespace="ns") as c:
        c.put(blocks, ack="remote")
        for i in range(14):  # 14 MiB through L1 8 MiB and L2 4 MiB: the blocks in L3 only
            c.put({b"f%d" % i: bytes([i]) * mib}, ack="remote")
        wait_for(lambda: c.lookup(list(blocks)).tiers == [TierName.L3] * len(blocks),
                 "the blocks in L3 only")
    return node, bucket, l3, small


def test_a_run_without_l2_leaves_no_stale_block_for_the_next_run_with_it(  # type: ignore[no-untyped-def]
        server_factory, tmp_path: Path) -> None:
    node = tmp_path / "node"
    with server_factory(data_dir=node) as first, Client(first.tcp, namespace="ns") as c:
        assert c.put({k: b"old" * 100 for k in KEYS}, ack="local").stored == len(KEYS)
    with server_factory("--l2-enabled", "false", data_dir=node) as without, \
            Client(without.tcp, namespace="ns") as c:
        c.delete(KEYS[:3])
        assert c.put({k: b"new" * 100 for k in KEYS[3:]}).stored == 3
        assert c.get(KEYS) == [None] * 3 + [b"new" * 100] * 3
    assert "cleared when a server next starts on this data dir with L2" in without.log()
    with server_factory(data_dir=node) as again, Client(again.tcp, namespace="ns") as c:
        # Neither a deleted block nor an overwritten one's old bytes: the
        # L2 of the first run is gone (its blocks lost, as the warning said).
        assert c.get(KEYS) == [None] * len(KEYS)
        assert c.put({b"after": b"a"}, ack="local").stored == 1
    assert "its blocks cleared (its L3 delete records kept): a server ran" in again.log()
    with server_factory(data_dir=node) as later, Client(later.tcp, namespace="ns") as c:
        assert c.get([b"after"]) == [b"a"]  # cleared once, not at every start
    # (the runs on one data dir share its log)
    assert later.log_path.read_text().count("its blocks cleared") == 1


def test_clearing_an_l2_grown_past_its_initial_map(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A fix review: an L2 grown past l2.initial_map_size opens with its map
    full, and clearing what a run without L2 left needs pages for the free
    list: every start failed with a traceback (with the default 1 GiB map,
    any L2 past 1 GiB)."""
    node = tmp_path / "node"
    small = ("--l2-initial-map-size", "1MiB")
    with server_factory(*small, data_dir=node, l1_capacity="4MiB") as first, \
            Client(first.tcp, namespace="ns") as c:
        for i in range(16):
            c.put({b"b%d-%d" % (i, j): os.urandom(4096) for j in range(128)}, ack="local")
    with server_factory("--l2-enabled", "false", data_dir=node) as without:
        assert without.alive()
    with server_factory(*small, data_dir=node) as again, Client(again.tcp, namespace="ns") as c:
        assert c.get([b"b0-0", b"b15-127"]) == [None, None]
        assert c.put({b"after": b"a"}, ack="local").stored == 1
    assert "its blocks cleared" in again.log()


def test_a_run_without_l3_records_its_deletes_for_when_l3_is_back(  # type: ignore[no-untyped-def]
        server_factory, tmp_path: Path) -> None:
    node = tmp_path / "node"
    bucket = tmp_path / "bucket"
    l3 = ("--l3-url", f"file://{bucket}")
    with server_factory(*l3, data_dir=node) as first, Client(first.tcp, namespace="ns") as c:
        assert c.put({k: b"old" * 100 for k in KEYS}, ack="remote").stored == len(KEYS)
    objects = {p.name for p in bucket.rglob("*") if p.is_file()}
    assert len(objects) == len(KEYS)
    with server_factory(data_dir=node) as without, Client(without.tcp, namespace="ns") as c:
        assert c.delete(KEYS[:3]) == 3
        assert c.put({k: b"new" * 100 for k in KEYS[3:]}, ack="local").stored == 3
    assert "recorded in L2 and done in that bucket" in without.log()
    with server_factory(*l3, data_dir=node) as back, Client(back.tcp, namespace="ns") as c:
        # The deleted blocks' objects go first (the listing skips them), and
        # the overwritten ones' old objects too: nothing old is served.
        wait_for(lambda: sum(p.is_file() for p in bucket.rglob("*")) == 0,
                 "the recorded deletes")
        assert c.get(KEYS) == [None] * 3 + [b"new" * 100] * 3


def test_a_delete_without_l3_holds_after_the_clock_was_stepped_back(  # type: ignore[no-untyped-def]
        server_factory, tmp_path: Path) -> None:
    """Found by a review: a block uploaded while the host's clock ran an
    hour fast, then Deleted in a run without L3 after NTP set the clock
    right, came back from the bucket when L3 was on again: the block looked
    created after the run without L3 began, so no L3 delete was recorded.
    Creation times now never go below the newest one found in L2."""
    node = tmp_path / "node"
    bucket = tmp_path / "bucket"
    l3 = ("--l3-url", f"file://{bucket}")
    fast = {"PYTHONPATH": str(CLOCKSHIFT), "CLOCKSHIFT_S": "3600"}
    with server_factory(*l3, data_dir=node, env=fast) as first, \
            Client(first.tcp, namespace="ns") as c:
        assert c.put({k: b"old" * 100 for k in KEYS}, ack="remote").stored == len(KEYS)
    assert sum(p.is_file() for p in bucket.rglob("*")) == len(KEYS)
    with server_factory(data_dir=node) as without, Client(without.tcp, namespace="ns") as c:
        assert c.delete(KEYS[:3]) == 3
    assert "the clock was stepped back" in without.log()
    with server_factory(*l3, data_dir=node) as back, Client(back.tcp, namespace="ns") as c:
        wait_for(lambda: sum(p.is_file() for p in bucket.rglob("*")) == 3,
                 "the recorded deletes")
        assert c.get(KEYS) == [None] * 3 + [b"old" * 100] * 3


def test_a_run_without_l3_overwrites_blocks_only_in_l3(  # type: ignore[no-untyped-def]
        server_factory, tmp_path: Path) -> None:
    """A block whose L2 copy left for L3 is in no index after a restart
    (the listing finds it): a run without L3 took its overwrite for a first
    Put, and when L3 was back the listing took the old object for the new
    block's copy; once its L2 copy went, the overwrite was lost (the old
    object "corrupt"). (Its Delete in such a run reaches nothing: the docs
    say so.)"""
    node, _, l3, small = only_in_l3(server_factory, tmp_path,
                                      {b"K": b"A" * mib, b"D": b"C" * mib})
    with server_factory(*small, data_dir=node, l1_capacity="8MiB") as without, \
            Client(without.tcp, namespace="ns") as c:
        assert c.put({b"K": b"B" * mib}, ack="local").stored == 1
    with server_factory(*l3, *small, data_dir=node, l1_capacity="8MiB") as back, \
            Client(back.tcp, namespace="ns") as c:
        for i in range(14):  # K's local copies go: it is read from L3
            c.put({b"g%d" % i: bytes([i]) * mib}, ack="remote")
        wait_for(lambda: c.lookup([b"K"]).tiers == [TierName.L3], "K in L3 only")
        assert c.get([b"K"]) == [b"B" * mib]


def test_clearing_the_l2_a_run_without_it_left_keeps_its_l3_delete_records(  # type: ignore[no-untyped-def]
        server_factory, tmp_path: Path) -> None:
    """The first version of the clearing removed L2's files, and with them
    the record of a Delete whose L3 object could not be deleted yet: the
    deleted block came back from L3."""
    node = tmp_path / "node"
    bucket = tmp_path / "bucket"
    l3 = ("--l3-url", f"file://{bucket}", "--l3-timeout-s", "1", "--l3-retries", "0")
    with server_factory(*l3, data_dir=node) as first, Client(first.tcp, namespace="ns") as c:
        assert c.put({b"K": b"old" * 1000}, ack="remote").stored == 1
        away = tmp_path / "bucket.away"
        bucket.rename(away)
        bucket.write_text("not a directory: L3 fails")
        assert c.delete([b"K"]) == 1  # recorded in L2, to be done when L3 is back
    bucket.unlink()
    away.rename(bucket)
    assert any(p.is_file() for p in bucket.rglob("*"))  # the object is still there
    with server_factory("--l2-enabled", "false", data_dir=node):
        pass
    with server_factory(*l3, data_dir=node) as back, Client(back.tcp, namespace="ns") as c:
        wait_for(lambda: not any(p.is_file() for p in bucket.rglob("*")), "the recorded delete")
        assert c.get([b"K"]) == [None]


@pytest.mark.parametrize("how", ["evict", "delete", "flush"])
def test_a_block_a_run_without_l3_wrote_leaves_no_older_object_to_serve(  # type: ignore[no-untyped-def]
        server_factory, tmp_path: Path, how: str) -> None:
    """K is A, only in L3; a run without L3 overwrites it with B, and B then
    goes (evicted from L2 with nowhere to go, deleted, or flushed). The next
    run with L3 listed A and served it: bytes an acknowledged Put had
    replaced (a model-checking review). The run records a delete of
    whatever is under K, done before that listing."""
    node, bucket, l3, small = only_in_l3(server_factory, tmp_path, {b"K": b"A" * mib})
    with server_factory(*small, data_dir=node, l1_capacity="8MiB") as without, \
            Client(without.tcp, namespace="ns") as c:
        assert c.put({b"K": b"B" * mib}, ack="local").stored == 1
        if how == "evict":
            for i in range(14):  # B leaves L1 and L2 (no L3: dropped)
                c.put({b"g%d" % i: bytes([i]) * mib}, ack="local")
            wait_for(lambda: c.lookup([b"K"]).found == 0, "K evicted")
        elif how == "delete":
            assert c.delete([b"K"]) == 1
        else:
            assert c.flush("ns") >= 1
        assert c.get([b"K"]) == [None]
    with server_factory(*l3, *small, data_dir=node, l1_capacity="8MiB") as back, \
            Client(back.tcp, namespace="ns") as c:
        wait_for(lambda: not (bucket / "ns" / b"K".hex()).exists(),
                 "the older object of K deleted")
        assert c.get([b"K"]) == [None]
