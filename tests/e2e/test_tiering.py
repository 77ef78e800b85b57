"""L1 overflow demotes to L2, L2 hits are promoted, leases hold blocks, a
corrupt L2 copy is never served."""

from __future__ import annotations

import os
from pathlib import Path

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


def flip_size_bits_on_disk(l2: Path, keys: list[bytes]) -> None:
    """Set bit 40 of the size field of each key's metadata record in the file
    itself, as a disk fault would: no LMDB transaction, so no page is freed
    that a later commit could reuse."""
    env = lmdb.open(str(l2), max_dbs=8, subdir=True, readonly=True, lock=False)
    meta_db = env.open_db(b"meta", create=False)
    with env.begin() as txn:
        records = [bytes(txn.get(encode_key(("d", key)), db=meta_db)) for key in keys]
    env.close()
    with open(l2 / "data.mdb", "r+b") as f:
        raw = f.read()
        for record in records:
            # (24 bytes with a CRC-32C in them: the live record, and copies in
            # pages freed by later commits)
            at = raw.find(record)
            assert at >= 0
            while at >= 0:
                f.seek(at + 5)
                f.write(bytes([record[5] ^ 0x01]))
                at = raw.find(record, at + 1)


def test_damaged_l2_records_cost_their_own_blocks_only_across_a_restart(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Found by a review: one size field with bit 40 set made the restart
    count L2 "1 TB over capacity" and trim every intact block away; a
    metadata value cut short failed every start with a traceback (l2.recover
    did not help). Each damaged record is one dropped block now."""
    server = server_factory(l1_capacity="4MiB").start()
    values = {f"g{i:03}".encode(): os.urandom(4096) for i in range(600)}
    with Client(server.tcp, namespace="d") as c:
        c.put(values, ack="local")
    assert server.terminate() == 0
    env = lmdb.open(str(server.data_dir / "l2"), max_dbs=8, subdir=True, map_size=1 << 30)
    data_db, meta_db = env.open_db(b"data"), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(encode_key(("d", b"g007")), b"short", db=meta_db)
        txn.delete(encode_key(("d", b"g300")), db=data_db)  # metadata without a payload
        txn.put(encode_key(("d", b"orphan")), b"x" * 100, db=data_db)  # and the reverse
    env.close()
    flip_size_bits_on_disk(server.data_dir / "l2", [b"g599"])
    damaged = {b"g599", b"g007", b"g300"}
    with server.start(), Client(server.tcp, namespace="d") as c:
        keys = sorted(values)
        got = c.get(keys)
        assert {k for k, g in zip(keys, got, strict=True) if g is None} == damaged
        assert all(g == values[k] for k, g in zip(keys, got, strict=True) if k not in damaged)
        assert c.get([b"orphan"]) == [None]
        assert tier_stats(c, TierName.L2).corrupt == 4
        assert "4 damaged records" in server.log()
        assert server.terminate() == 0
    with server.start(), Client(server.tcp, namespace="d") as c:  # and they stay dropped
        assert sum(g is not None for g in c.get(sorted(values))) == len(values) - len(damaged)


def test_damaged_records_are_dropped_from_an_l2_whose_map_is_full(server_factory) -> None:  # type: ignore[no-untyped-def]
    """An L2 grown past l2.initial_map_size opens with its map exactly full,
    and dropping damaged records needs pages (a fix review: 4 flipped size
    fields failed the start, and l2.recover moved all of L2 aside)."""
    server = server_factory("--l2-initial-map-size", "1MiB", l1_capacity="4MiB").start()
    values = {f"g{i:03}".encode(): os.urandom(4096) for i in range(600)}
    with Client(server.tcp, namespace="d") as c:
        c.put(values, ack="local")
    assert server.terminate() == 0
    damaged = [b"g007", b"g150", b"g300", b"g450", b"g599"]
    flip_size_bits_on_disk(server.data_dir / "l2", damaged)
    with server.start(), Client(server.tcp, namespace="d") as c:
        keys = sorted(values)
        got = c.get(keys)
        assert {k for k, g in zip(keys, got, strict=True) if g is None} == set(damaged)
        assert all(g == values[k] for k, g in zip(keys, got, strict=True) if k not in damaged)
