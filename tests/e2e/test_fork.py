"""Engines fork workers: a Client made before fork() keeps working in the child, over
the data plane and over gRPC (a child's Put over gRPC crashed or hung: grpc.aio does
not survive a fork once used)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import os, signal, sys
    from kvstore import Client
    signal.alarm(40)  # a hang fails the test instead of blocking it
    target, data_plane = sys.argv[1], sys.argv[2] == "dp"
    c = Client(target, namespace="fork", data_plane=data_plane, timeout=10)
    c.put({b"parent": b"p" * 5000})
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # (alarms are not inherited)
        try:
            for attempt in range(2):  # (the child's first call may find the parent's socket)
                try:
                    c.put({b"child": b"c" * 5000})
                    break
                except Exception:
                    if attempt:
                        raise
            ok = c.get([b"parent", b"child"]) == [b"p" * 5000, b"c" * 5000]
            os._exit(0 if ok else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert c.get([b"child"]) == [b"c" * 5000]
    c.put({b"after": b"a"})
    sys.exit(os.waitstatus_to_exitcode(status))
""")


@pytest.mark.parametrize("path", ["grpc", "dp"])
def test_a_client_made_before_fork_works_in_the_child(shared_server, path: str) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run([sys.executable, "-c", CHILD, shared_server.tcp, path],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])



SHM_CHILD = textwrap.dedent("""
    import os, signal, sys
    from kvstore.client.shm import ShmClient
    signal.alarm(40)
    c = ShmClient(sys.argv[1], namespace="forkshm", timeout=10)
    value = b"s" * 300_000
    c.put({b"k": value})
    assert c.get([b"k"]) == [value]  # leaves its lease for the next acquire to end
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        for attempt in range(2):  # (the child's first call may find the parent's socket)
            try:
                ok = c.get([b"k"]) == [value]
                break
            except Exception:
                if attempt:
                    os._exit(4)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert c.get([b"k"]) == [value]  # its own lease was not ended by the child
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def run_with_arena(server_factory, tmp_path, script: str, tag: str, *args: str) -> None:  # type: ignore[no-untyped-def]
    """``script`` in a fresh interpreter against a server with a /dev/shm
    arena (its unix target, then ``args``): it must exit 0."""
    import os

    shm = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-{tag}"
    with server_factory("--l1-shm-path", shm, l1_capacity="16MiB") as server:
        done = subprocess.run([sys.executable, "-c", script, server.unix_target, *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_a_shared_memory_client_made_before_fork_keeps_its_leases(  # type: ignore[no-untyped-def]
        server_factory, tmp_path) -> None:
    """The leases a Get leaves for the next acquire to end are the parent's: the child
    does not end them (the parent's next Get failed "never issued")."""
    run_with_arena(server_factory, tmp_path, SHM_CHILD, "fork")


SHM_STOCK_CHILD = textwrap.dedent("""
    import os, signal, sys
    from kvstore.client.shm import ShmClient
    signal.alarm(40)
    c = ShmClient(sys.argv[1], namespace="forkstock", timeout=10,
                  data_plane=sys.argv[2] == "dp")
    one = b"a" * 300_000
    c.put({b"a": one})  # stocks anonymous slots for the next Puts
    assert c.stocked_slots() > 0
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        for attempt in range(2):  # (the child's first call may find the parent's socket)
            try:
                c.put({b"child": b"c" * 300_000})
                break
            except Exception:
                if attempt:
                    os._exit(4)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    c.put({b"parent": b"p" * 300_000})  # must not write into the child's slot
    got = c.get([b"child", b"parent", b"a"])
    sys.exit(0 if got == [b"c" * 300_000, b"p" * 300_000, one] else 3)
""")


@pytest.mark.parametrize("path", ["grpc", "dp"])
def test_a_forked_shared_memory_client_never_shares_its_slot_stock(  # type: ignore[no-untyped-def]
        server_factory, tmp_path, path: str) -> None:
    """Slots reserved ahead for the next Puts are the parent's: a child that
    Put into one committed its block there, and the parent's next Put wrote
    over it (the child's acknowledged block then failed its checksum: lost)."""
    run_with_arena(server_factory, tmp_path, SHM_STOCK_CHILD, "stock", path)


CLOSE_IN_CHILD = textwrap.dedent("""
    import os, signal, sys
    from kvstore import Client
    from kvstore.client.shm import ShmClient
    signal.alarm(40)
    target, kind = sys.argv[1], sys.argv[2]
    if kind == "shm":
        c = ShmClient(target, namespace="forkclose", timeout=10)
    else:  # Puts over gRPC: the Put loop's grpc.aio channel
        c = Client(target, namespace="forkclose", timeout=10, data_plane=False)
    one = b"a" * 300_000
    c.put({b"a": one})
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # a hang fails the test (the child hung, or died of SIGSEGV)
        c.close()
        sys.exit(0)  # (the interpreter's exit and collection too)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    c.put({b"b": b"b" * 300_000})  # the parent's stocked slots are still its own
    got = c.get([b"a", b"b"])
    sys.exit(0 if got == [one, b"b" * 300_000] else 3)
""")


@pytest.mark.parametrize("kind", ["shm", "grpc-put"])
def test_a_child_closing_a_client_made_before_fork_leaves_the_parents_alone(  # type: ignore[no-untyped-def]
        server_factory, tmp_path, kind: str) -> None:
    """A fork review: a child's ShmClient.close() gave the parent's stocked
    slots back on the parent's data-plane sessions (the parent's next Put:
    "slot id … is not reserved", after writing into room the server had
    given another client); a child's close() of a Client whose Puts went over
    gRPC hung or died of SIGSEGV (the parent's grpc.aio channel torn down)."""
    run_with_arena(server_factory, tmp_path, CLOSE_IN_CHILD, "close", kind)


AIO_CHILD = textwrap.dedent("""
    import asyncio, os, signal, sys
    from kvstore import AsyncClient, Client
    from kvstore.errors import InvalidArgument
    signal.alarm(40)
    target = sys.argv[1]
    a = AsyncClient(target, namespace="forkaio", timeout=5)
    asyncio.run(a.put({b"k": b"v" * 5000}))  # its grpc.aio channel stays open
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # the child's calls hung past their timeout, or crashed
        try:
            asyncio.run(a.get([b"k"]))
            os._exit(3)
        except InvalidArgument as exc:
            if "forked while an AsyncClient" not in str(exc):
                os._exit(4)
        with Client(target, namespace="forkaio", timeout=5) as c:  # the way out it names
            os._exit(0 if c.get([b"k"]) == [b"v" * 5000] else 5)
    _, status = os.waitpid(pid, 0)
    assert asyncio.run(a.get([b"k"])) == [b"v" * 5000]  # the parent's goes on
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def test_an_async_client_in_a_child_forked_with_a_channel_open_says_so(shared_server) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run([sys.executable, "-c", AIO_CHILD, shared_server.tcp],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
