"""The compact index (blocks only in L2, kvstore/coldindex.py) through a real
server: after a restart every block is there, found by Lookup without a full
entry, read, leased, overwritten and deleted like any other; L2 stays within
its capacity by evicting the least recently used of them; and with the
compact index off the server behaves the same."""

from __future__ import annotations

import os
import time

import pytest

from kvstore import Client
from kvstore.types import TierName

KiB = 1024


def _stats(c: Client, tier: TierName):  # type: ignore[no-untyped-def]
    return next(t for t in c.stats().tiers if t.tier == tier)


@pytest.mark.parametrize("compact", ["true", "false"])
def test_blocks_indexed_from_l2_serve_every_call(server_factory, compact: str) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--l2-compact-index", compact, l1_capacity="8MiB").start()
    blobs = {i.to_bytes(32, "big"): os.urandom(16 * KiB + i) for i in range(300)}
    blobs[b"short-key"] = os.urandom(5000)  # not 32 bytes: stored as its digest
    with Client(server.tcp, namespace="c") as c:
        items = list(blobs.items())
        for i in range(0, len(items), 50):
            c.put(dict(items[i : i + 50]), ack="local")
    assert server.terminate() == 0
    server.start()
    keys = list(blobs)
    with Client(server.unix_target, namespace="c") as c:
        assert _stats(c, TierName.L2).blocks == len(blobs)
        found = c.lookup(keys)
        assert found.found == len(keys) and found.tiers == [TierName.L2] * len(keys)
        assert c.lookup(keys, namespace="other").found == 0  # namespaces stay apart
        # Reads promote into L1; the rest stay where they were.
        assert c.get([*keys[:10], b"short-key"]) == [
            *(blobs[k] for k in keys[:10]), blobs[b"short-key"]]
        tiers = c.lookup(keys[:12]).tiers
        assert tiers[:10] == [TierName.L1] * 10 and tiers[10:] == [TierName.L2] * 2
        # Overwrite and delete blocks that only L2 holds.
        c.put({keys[20]: b"new" * 100})
        assert c.get([keys[20]]) == [b"new" * 100]
        assert c.delete([keys[21], keys[22]]) == 2
        assert c.get([keys[21]]) == [None]
        assert c.lookup(keys[21:24]).tiers == [None, None, TierName.L2]
        # A lease on an L2-only block (needs its full entry) is honoured.
        assert c.lookup(keys[30:32], lease_ms=60_000).found == 2
        everything = [k for k in keys if k not in (keys[21], keys[22])]
        expected = [b"new" * 100 if k == keys[20] else blobs[k] for k in everything]
        assert c.get(everything) == expected
        # Two deleted; the overwritten one's new bytes are in L1 only so far
        # (write-back), its old L2 copy gone.
        assert _stats(c, TierName.L2).blocks == len(blobs) - 3


def test_l2_evicts_the_least_recently_used_indexed_blocks(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--l2-capacity", "4MiB", l1_capacity="2MiB").start()
    old = {f"old-{i:03}".encode(): os.urandom(32 * KiB) for i in range(100)}  # 3.2 MiB
    with Client(server.tcp, namespace="e") as c:
        c.put(old, ack="local")
    assert server.terminate() == 0
    server.start()
    with Client(server.tcp, namespace="e") as c:
        assert c.lookup(list(old)).found == len(old)
        recent = list(old)[-10:]
        assert c.get(recent) == [old[k] for k in recent]  # used now: kept longer
        fresh = {f"new-{i:03}".encode(): os.urandom(32 * KiB) for i in range(100)}
        for k, v in fresh.items():
            c.put({k: v}, ack="local")
        l2 = _stats(c, TierName.L2)
        assert l2.bytes <= 4 * 1024 * KiB and l2.evictions > 0
        # Every block still indexed reads back intact; the fresh ones and the
        # recently read old ones are all there.
        kept = c.lookup(list(fresh) + recent)
        assert None not in kept.tiers
        assert c.get(list(fresh)) == list(fresh.values())
        held = [k for k, t in zip(old, c.lookup(list(old)).tiers, strict=True) if t is not None]
        assert c.get(held) == [old[k] for k in held]
        assert len(held) < len(old)


def test_restart_with_a_smaller_l2_evicts_in_batches_and_keeps_serving(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(l1_capacity="4MiB").start()
    blobs = {i.to_bytes(32, "big"): os.urandom(4 * KiB) for i in range(3000)}  # ~12 MiB
    with Client(server.tcp, namespace="s") as c:
        items = list(blobs.items())
        for i in range(0, len(items), 500):
            c.put(dict(items[i : i + 500]), ack="local")
    assert server.terminate() == 0
    server.flags += ["--l2-capacity", "1MiB"]
    server.start()
    with Client(server.tcp, namespace="s") as c:
        c.put({b"trigger": b"t"}, ack="local")  # (trimmed from the start; Puts go on)
        deadline = time.monotonic() + 30
        while _stats(c, TierName.L2).bytes > 1024 * KiB:  # calls answered meanwhile
            assert time.monotonic() < deadline, "L2 not trimmed within 30 s"
        l2 = _stats(c, TierName.L2)
        assert l2.evictions >= 2500
        held = [k for k, t in zip(blobs, c.lookup(list(blobs)).tiers, strict=True) if t]
        assert 0 < len(held) <= 256
        assert c.get(held) == [blobs[k] for k in held]
