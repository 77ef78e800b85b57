"""An L2 put back from a backup, or copied from another node, while the server
was stopped: it opened as cleanly as the one it replaced and served what it
held as current, the old bytes of keys overwritten since and blocks deleted
or flushed since. Now the data dir records which L2 it last ran with
(``l2.state``): such an L2 is refused at start in one line, and
``l2.recover`` moves it aside. An L2 removed or emptied starts empty with a
warning. (Real server processes, real LMDB.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serverproc import ServerFailed, ServerProcess

from kvstore import Client

KiB = 1024


def value(key: bytes, generation: int) -> bytes:
    return (key + b":%d:" % generation) * (4 * KiB // (len(key) + 3))


def l2(server: ServerProcess) -> Path:
    return server.data_dir / "l2"


def put_back(server: ServerProcess, copy: Path) -> None:
    shutil.rmtree(l2(server))
    shutil.copytree(copy, l2(server))
    server.log_path.write_bytes(b"")


def refused_in_one_line(server: ServerProcess) -> str:
    with pytest.raises(ServerFailed, match="exited with 1"):
        server.start()
    lines = server.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert str(l2(server)) in lines[0] and "--l2-recover true" in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("after_copy", ["delete", "flush", "overwrite and stop"])
def test_an_older_copy_of_l2_put_back_is_refused_and_moved_aside_when_asked(
        server_factory, tmp_path: Path, after_copy: str) -> None:  # type: ignore[no-untyped-def]
    """Before the fix the server started on the copy and served the deleted,
    flushed or overwritten blocks as they were when it was taken."""
    server = server_factory(l1_capacity="4MiB").start()
    with Client(server.tcp, namespace="a") as kv:
        kv.put({b"over": value(b"over", 1), b"gone": value(b"gone", 1)}, ack="local")
        kv.put({b"t%d" % i: value(b"t", i) for i in range(8)}, namespace="tenant", ack="local")
    assert server.terminate() == 0
    shutil.copytree(l2(server), tmp_path / "backup")  # the operator's backup

    server.start()
    with Client(server.tcp, namespace="a") as kv:
        kv.put({b"over": value(b"over", 2)}, ack="local")
        if after_copy == "delete":
            assert kv.delete([b"gone"]) == 1
        elif after_copy == "flush":
            assert kv.flush("tenant") == 8
    if after_copy == "overwrite and stop":
        assert server.terminate() == 0  # a clean stop records how far L2 went
    else:
        server.kill()  # the answered Delete or Flush is recorded, a kill or not

    put_back(server, tmp_path / "backup")
    line = refused_in_one_line(server)
    assert "older copy" in line, line

    server.flags += ["--l2-recover", "true"]
    server.start()
    with Client(server.tcp, namespace="a") as kv:
        got = kv.get([b"over", b"gone"])
        assert got[0] in (None, value(b"over", 2)) and got[1] is None, "a stale block served"
        assert kv.get([b"t%d" % i for i in range(8)], namespace="tenant") == [None] * 8
        kv.put({b"new": value(b"new", 1)}, ack="local")
    assert "moved it aside" in server.log()
    assert [p for p in server.data_dir.iterdir() if p.name.startswith("l2.damaged-")]
    assert server.terminate() == 0
    server.flags = server.flags[:-2]
    server.start()  # the recovered L2 is the one recorded now
    with Client(server.tcp, namespace="a") as kv:
        assert kv.get([b"new"]) == [value(b"new", 1)]


def test_another_nodes_l2_put_in_place_is_refused(server_factory) -> None:  # type: ignore[no-untyped-def]
    one = server_factory(l1_capacity="4MiB").start()
    other = server_factory(l1_capacity="4MiB").start()
    for server, generation in ((one, 1), (other, 2)):
        with Client(server.tcp, namespace="a") as kv:
            kv.put({b"k": value(b"k", generation)}, ack="local")
        assert server.terminate() == 0
    put_back(one, l2(other))
    line = refused_in_one_line(one)
    assert "copied from elsewhere" in line, line


@pytest.mark.parametrize("how", ["directory removed", "data file emptied"])
def test_a_removed_or_emptied_l2_starts_empty_and_says_so(
        server_factory, how: str) -> None:  # type: ignore[no-untyped-def]
    """Before: the server started empty without a word."""
    server = server_factory(l1_capacity="4MiB").start()
    with Client(server.tcp, namespace="a") as kv:
        kv.put({b"k": value(b"k", 1)}, ack="local")
    assert server.terminate() == 0
    if how == "directory removed":
        shutil.rmtree(l2(server))
    else:
        (l2(server) / "data.mdb").write_bytes(b"")
    server.log_path.write_bytes(b"")
    server.start()
    warnings = [line for line in server.log().splitlines()
                if "WARNING" in line and "new and empty" in line]
    assert len(warnings) == 1 and "removed or emptied" in warnings[0], server.log()
    with Client(server.tcp, namespace="a") as kv:
        assert kv.get([b"k"]) == [None]
    assert server.terminate() == 0
    server.log_path.write_bytes(b"")
    server.start()  # the new one is recorded: said once
    assert "new and empty" not in server.log()


def test_restarts_and_kills_of_one_l2_are_never_refused(server_factory) -> None:  # type: ignore[no-untyped-def]
    """The record never runs ahead of the disk: a kill -9 after Deletes, a
    clean stop, a kill right after the start, all start again."""
    server = server_factory(l1_capacity="4MiB").start()
    for round_ in range(3):
        with Client(server.tcp, namespace="a") as kv:
            kv.put({b"k%d" % i: value(b"k", round_) for i in range(16)}, ack="local")
            kv.delete([b"k0", b"k1"])
            kv.put({b"m": value(b"m", round_)})
        if round_ == 1:
            assert server.terminate() == 0
        else:
            server.kill()
        server.start()
        with Client(server.tcp, namespace="a") as kv:
            assert kv.get([b"k0", b"k1", b"k2"]) == [None, None, value(b"k", round_)]
    server.kill()
    server.start()
    assert "not the one" not in server.log()


def test_an_older_copy_written_over_l2_while_the_server_runs_is_refused_at_the_next_start(
        server_factory) -> None:  # type: ignore[no-untyped-def]
    """Found by a review: data.mdb written over in place (same inode) by an
    older copy of itself while the server ran, then ordinary traffic: LMDB
    numbers its commits on from its lock file, so the next start found the
    file past the recorded transaction, started, and served the blocks
    deleted before the copy was put back (and lost those acknowledged
    since). Each commit now counts itself in the environment."""
    server = server_factory("--l2-sync", "true", l1_capacity="4MiB").start()
    data = l2(server) / "data.mdb"
    keys = [b"k%d" % i for i in range(6)]
    with Client(server.tcp, namespace="a") as kv:
        kv.put({k: value(k, 1) for k in keys}, ack="local")
        older = data.read_bytes()
        assert kv.delete(keys[:3]) == 3
        with open(data, "r+b") as fh:  # the older copy, written over the open file
            fh.write(older)
            fh.truncate(len(older))
        for i in range(20):  # ordinary traffic after it
            kv.put({b"later%d" % i: value(b"later", i)}, ack="local")
        assert kv.get(keys[:3]) == [None] * 3  # (the index still knows they are gone)
    assert "was written over while this server ran on it" in server.log()
    assert server.terminate() == 0
    server.log_path.write_bytes(b"")
    assert "written over while a server ran on it" in refused_in_one_line(server)
    server.flags += ["--l2-recover", "true"]
    server.start()
    with Client(server.tcp, namespace="a") as kv:
        assert kv.get(keys[:3]) == [None] * 3
