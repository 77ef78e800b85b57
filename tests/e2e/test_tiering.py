"""L1 overflow demotes to L2, L2 hits are promoted, leases hold blocks, a
corrupt L2 copy is never served."""

from __future__ import annotations

import os

import lmdb

from kvstore import Client
from kvstore.tiers.lmdb_tier import encode_key
from kvstore.types import TierName

MiB = 1024**2


def tier_stats(c: Client, tier: TierName):  # type: ignore[no-untyped-def]
    return next(t for t in c.stats().tiers if t.tier == tier)


def test_l1_overflow_demotes_to_l2_and_every_block_reads_back(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory(l1_capacity="16MiB") as server, Client(server.tcp, namespace="o") as c:
        blobs = {f"b{i:03}".encode(): os.urandom(MiB) for i in range(48)}  # 3x L1
        for k, v in blobs.items():
            c.put({k: v})
        l1 = tier_stats(c, TierName.L1)
        assert l1.bytes <= 16 * MiB and l1.evictions >= 32 and l1.demotions >= 32
        assert c.get(list(blobs)) == list(blobs.values())
        # The oldest blocks were served from L2 and promoted back into L1.
        assert tier_stats(c, TierName.L2).hits >= 32
        assert tier_stats(c, TierName.L1).promotions >= 32


def test_lookup_reports_tiers_and_lease_keeps_blocks_in_l1(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory(l1_capacity="8MiB") as server, Client(server.tcp, namespace="l") as c:
        c.put({b"hot0": os.urandom(MiB), b"hot1": os.urandom(MiB)}, ack="local")
        assert c.lookup([b"hot0", b"hot1"], lease_ms=60_000).tiers == [TierName.L1] * 2
        for i in range(16):  # 2x L1 worth of other blocks
            c.put({f"f{i}".encode(): os.urandom(MiB)}, ack="local")
        tiers = c.lookup([b"hot0", b"hot1", b"f0", b"f15"]).tiers
        assert tiers[:2] == [TierName.L1, TierName.L1]  # leased: never evicted
        assert tiers[2] == TierName.L2  # the LRU victim lives on in L2
        assert tiers[3] == TierName.L1


def test_corrupt_l2_copy_is_a_counted_miss_never_served(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory(l1_capacity="4MiB") as server, Client(server.tcp, namespace="c") as c:
        victim = os.urandom(MiB)
        c.put({b"victim": victim}, ack="local")
        for i in range(8):  # push it out of L1
            c.put({f"p{i}".encode(): os.urandom(MiB)}, ack="local")
        assert c.lookup([b"victim"]).tiers == [TierName.L2]
        # Flip one payload byte inside LMDB, from outside the server.
        env = lmdb.open(str(server.data_dir / "l2"), max_dbs=4, subdir=True, map_size=1 << 30)
        data_db = env.open_db(b"data")
        with env.begin(write=True) as txn:
            key = encode_key(("c", b"victim"))
            value = bytearray(txn.get(key, db=data_db))
            value[12345] ^= 0x01
            txn.put(key, bytes(value), db=data_db)
        env.close()
        assert c.get([b"victim"]) == [None]
        assert tier_stats(c, TierName.L2).corrupt == 1
        assert c.lookup([b"victim"]).found == 0  # dropped, not served later either
        # Everything else still served.
        assert all(v is not None for v in c.get([f"p{i}".encode() for i in range(8)]))
