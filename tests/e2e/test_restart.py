"""Restart on the same data dir: every block acknowledged at level local reads
back byte-identical, after SIGTERM and after SIGKILL."""

from __future__ import annotations

import hashlib
import os

import pytest

from kvstore import Client
from kvstore.types import TierName

MiB = 1024**2


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_local_acked_blocks_survive_restart(server_factory, how: str) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(l1_capacity="16MiB").start()
    blobs = {hashlib.sha256(str(i).encode()).digest(): os.urandom(64 * 1024 + i * 4099)
             for i in range(60)}
    blobs[b"big"] = os.urandom(12 * MiB)
    with Client(server.tcp, namespace="r") as c:
        items = list(blobs.items())
        for i in range(0, len(items), 10):
            c.put(dict(items[i : i + 10]), ack="local")
    if how == "sigterm":
        assert server.terminate() == 0
    else:
        server.kill()
    server.start()
    with Client(server.unix_target, namespace="r") as c:
        assert c.lookup(list(blobs)).found == len(blobs)
        assert c.lookup(list(blobs)).tiers == [TierName.L2] * len(blobs)
        assert c.get(list(blobs)) == list(blobs.values())


def test_sigterm_flushes_memory_acked_blocks(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(l1_capacity="64MiB").start()
    blobs = {f"m{i}".encode(): os.urandom(256 * 1024) for i in range(40)}
    with Client(server.tcp, namespace="m") as c:
        c.put(blobs)  # ack memory: the write to L2 happens behind
    assert server.terminate() == 0
    server.start()
    with Client(server.tcp, namespace="m") as c:
        assert c.get(list(blobs)) == list(blobs.values())


def test_overwritten_block_never_comes_back_old_after_a_kill(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(l1_capacity="64MiB").start()
    with Client(server.tcp, namespace="ow") as c:
        c.put({b"k": b"old" * 1000}, ack="local")
        c.put({b"k": b"new" * 1000})  # memory-level: not yet in L2
        assert c.get([b"k"]) == [b"new" * 1000]
    server.kill()
    server.start()
    with Client(server.tcp, namespace="ow") as c:
        assert c.get([b"k"])[0] in (None, b"new" * 1000)
