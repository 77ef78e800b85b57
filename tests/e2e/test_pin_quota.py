"""Pins against what another tenant needs: an Unpin lets the blocks go for
the policy too, concurrent Pins stay within the pin quota, and a pin of a
block deleted and Put again no longer counts (found by a review of what one
tenant can do to another through the hint machinery)."""

from __future__ import annotations

import threading

import pytest

from kvstore import Client, KVStoreError
from kvstore.errors import CapacityExhausted

MiB = 1024**2


@pytest.mark.parametrize("policy", ["session", "lru"])
def test_unpinned_blocks_are_evictable_again(server_factory, policy: str) -> None:  # type: ignore[no-untyped-def]
    """A tenant pinning 4 MiB (its quota of a 16 MiB L1), unpinning, and so
    on four times, held all of L1 under the session policy (its own pins were
    kept until their TTL): another tenant's Puts failed "L1 is full"."""
    with server_factory("--l2-enabled", "false", "--policy-name", policy,
                        l1_capacity="16MiB") as node, \
            Client(node.tcp, namespace="a") as a, Client(node.tcp, namespace="b") as b:
        for r in range(4):
            keys = [b"a%d-%d" % (r, i) for i in range(4)]
            a.put({k: b"\x01" * MiB for k in keys})
            assert a.pin(keys).blocks == 4
            assert a.unpin(keys).blocks == 4
        for i in range(8):
            b.put({b"b%d" % i: b"\x02" * MiB})  # room from a's unpinned blocks
        assert b.lookup([b"b%d" % i for i in range(8)]).tiers == [1] * 8


def test_concurrent_pins_stay_within_the_quota(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Four Pins at once of blocks only in L2, each the whole quota (4 MiB of
    a 16 MiB L1): one is granted, the others refused "pin quota" (all four
    passed the check before any was recorded, pinning 16 MiB)."""
    with server_factory("--policy-name", "lru", l1_capacity="16MiB") as node:
        cold = [b"cold%02d" % i for i in range(16)]
        with Client(node.tcp, namespace="a") as a:
            a.put({k: b"\x01" * MiB for k in cold}, ack="local")
            for i in range(24):  # the cold blocks leave L1 (they stay in L2)
                a.put({b"fill%02d" % i: b"\x03" * MiB}, ack="local")
            assert 1 not in a.lookup(cold).tiers
        granted: list[int] = []
        refused: list[str] = []
        start = threading.Barrier(4)

        def pin(i: int) -> None:
            with Client(node.tcp, namespace="a") as c:
                start.wait(10)
                try:
                    granted.append(c.pin(cold[4 * i:4 * i + 4], ttl_ms=60_000).bytes)
                except CapacityExhausted as exc:
                    refused.append(str(exc))

        threads = [threading.Thread(target=pin, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sum(granted) <= 4 * MiB, f"{sum(granted) / MiB:.0f} MiB pinned, quota 4 MiB"
        assert refused and all("pin quota" in m for m in refused)
        with Client(node.tcp, namespace="b") as b:
            b.put({b"b0": b"\x02" * MiB})  # L1 has room for another tenant


def test_a_pin_of_a_block_deleted_and_put_again_no_longer_counts(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Pinned keys deleted and Put again hold new, unpinned blocks: the
    namespace's quota is free again (it stayed full until those left L1)."""
    with server_factory("--l2-enabled", "false", l1_capacity="16MiB") as node, \
            Client(node.tcp, namespace="a") as c:
        keys = [b"k%d" % i for i in range(4)]
        c.put({k: b"\x01" * MiB for k in keys})
        assert c.pin(keys).blocks == 4  # the whole quota
        assert c.delete(keys) == 4
        c.put({k: b"\x02" * MiB for k in keys})
        c.put({b"other": b"\x03" * MiB})
        try:
            assert c.pin([b"other"]).blocks == 1
        except KVStoreError as exc:
            pytest.fail(f"the deleted blocks' pins still count: {exc}")
