"""A tier turned off for a run and on again (found by an operator's review):
the Deletes and overwrites that run answered reached nothing of that tier,
whose old copies came back when it was on again. Now a run without L2 marks
the L2 it leaves, which the next run with L2 clears; a run without the L3 an
earlier run had records its deletes in L2, done when L3 is back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from kvstore import Client

KEYS = [b"k%d" % i for i in range(6)]


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.05)  # polling with a deadline


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
