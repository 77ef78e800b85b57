"""The compact index (kvstore/coldindex.py) against a dict model: random
adds, replacements, removals and lookups in several namespaces, with keys of
32 bytes and of other lengths, through table rebuilds and tombstones."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from kvstore import _impl
from kvstore.store.coldindex import ColdBlock, ColdIndex


def _key(rng: random.Random) -> bytes:
    if rng.random() < 0.8:
        return rng.randbytes(32)
    return rng.randbytes(rng.choice([1, 5, 31, 33, 64]))


def contains_both_ways(cold: ColdIndex, namespace: str, keys: list[bytes]) -> bytes:
    """contains_many with the numpy probe (the specification) and, where it
    is built, the native one: they must agree."""
    cold.native = False
    spec = cold.contains_many(namespace, keys)
    cold.native = True
    if _impl.cold_contains is not None:
        assert cold.contains_many(namespace, keys) == spec
    return spec


def test_matches_a_dict_model_through_churn() -> None:
    rng = random.Random(3)
    cold = ColdIndex(seed=1)
    model: dict[tuple[str, bytes], ColdBlock] = {}
    namespaces = ["a", "b", "team/c"]
    known: list[tuple[str, bytes]] = []
    for step in range(6000):
        op = rng.random()
        if op < 0.5 or not known:
            ns = rng.choice(namespaces)
            key = _key(rng) if rng.random() < 0.9 or not known else rng.choice(known)[1]
            record = ColdBlock(ns, key, rng.randrange(1, 2**40), rng.randrange(2**32),
                               rng.random() * 1e9, rng.random() < 0.3)
            cold.add(ns, key, record.size, record.checksum, record.created, float(step),
                     record.l3)
            model[(ns, key)] = record
            known.append((ns, key))
        elif op < 0.8:
            block = rng.choice(known)
            assert cold.take(*block) == model.pop(block, None)
        elif op < 0.9:
            block = rng.choice(known)
            assert cold.get(*block) == model.get(block)
            assert (block in cold) == (block in model)
        else:
            block = rng.choice(known)
            present = rng.random() < 0.5
            assert cold.set_l3(block[0], block[1], present) == (block in model)
            if block in model:
                model[block] = model[block]._replace(l3=present)
        assert len(cold) == len(model)
        if step % 500 == 0:
            for ns in namespaces:
                keys = [*[k for n, k in known if n == ns][-300:], os.urandom(32)]
                expected = bytes(int((ns, k) in model) for k in keys)
                assert contains_both_ways(cold, ns, keys) == expected
    assert sorted(cold.records()) == sorted(model.values())
    # The table's bookkeeping: one cell per block, tombstones counted.
    assert int((cold._table >= 0).sum()) == len(model)
    assert cold._gone == int((cold._table == -2).sum())
    assert cold.contains_many("never-seen", [b"k" * 32]) == b"\x00"


def test_bulk_load_then_lookups_and_removals() -> None:
    n = 50_000
    keys = [i.to_bytes(32, "little") for i in range(n)]
    cold = ColdIndex()
    cold.add_many(["ns"] * n, keys, np.full(n, 4096, np.uint64),
                  np.arange(n, dtype=np.uint32), np.arange(n, dtype=np.float64),
                  np.arange(n, dtype=np.float64))
    assert len(cold) == n
    assert contains_both_ways(cold, "ns", [*keys[:1000], b"x" * 32]) == \
        b"\x01" * 1000 + b"\x00"
    assert contains_both_ways(cold, "other", keys[:3]) == b"\x00" * 3
    assert cold.get("ns", keys[123]) == ColdBlock("ns", keys[123], 4096, 123, 123.0, False)
    for key in keys[::2]:
        assert cold.take("ns", key) is not None
    assert contains_both_ways(cold, "ns", keys[:6]) == b"\x00\x01\x00\x01\x00\x01"
    # Removed rows are reused, and the table stays within its load.
    cold.add("ns", b"new" * 11 + b"!", 7, 1, 2.0, 3.0)
    assert len(cold) == n // 2 + 1
    assert cold.nbytes() / len(cold) < 250  # columns and table, per block held


def test_victims_are_the_least_recently_used_of_a_sample() -> None:
    cold = ColdIndex(seed=5)
    for i in range(2000):
        cold.add("ns", i.to_bytes(32, "little"), 10, 0, 0.0, used=float(i))
    ranks = []
    for _ in range(200):
        victim = cold.victim()
        assert victim is not None
        ranks.append(int.from_bytes(victim.key, "little"))
    # The least recent of 16 random rows: the median pick is among the oldest 5%.
    assert sorted(ranks)[len(ranks) // 2] < 100
    while (victim := cold.victim()) is not None:
        cold.take(victim.namespace, victim.key)
    assert len(cold) == 0 and cold.victim() is None


def test_rejects_empty_blocks() -> None:
    cold = ColdIndex()
    with pytest.raises(ValueError, match="at least 1 byte"):
        cold.add("ns", b"k" * 32, 0, 0, 0.0, 0.0)


@pytest.mark.skipif(_impl.cold_contains is None, reason="native extension not in use")
def test_native_probe_rejects_inconsistent_arrays() -> None:
    cold = ColdIndex()
    cold.add("ns", b"k" * 32, 10, 0, 0.0, 0.0)
    args = (cold._key, cold._hash, cold._table, cold._shift, cold._mult, cold._ns_salt[0])
    assert _impl.cold_contains(*args, b"k" * 32) == b"\x01"
    with pytest.raises(ValueError, match="32 bytes each"):
        _impl.cold_contains(*args, b"k" * 31)
    with pytest.raises(ValueError, match="2\\*\\*\\(64 - shift\\)"):
        _impl.cold_contains(cold._key, cold._hash, cold._table, cold._shift + 1, cold._mult,
                            cold._ns_salt[0], b"k" * 32)


def test_more_namespaces_than_a_uint16_counts() -> None:
    """A namespace id was a uint16: an L2 holding blocks of more than 65,535
    namespaces (one tiny block each was enough) served while it ran, then
    every restart's rebuild failed (OverflowError), l2.recover included."""
    n = 70_000
    cold = ColdIndex()
    names = [f"t{i}" for i in range(n)]
    keys = [i.to_bytes(32, "little") for i in range(n)]
    cold.add_many(names, keys, np.full(n, 16, np.uint64), np.zeros(n, np.uint32),
                  np.zeros(n, np.float64), np.zeros(n, np.float64))
    assert len(cold) == n
    last = cold.get("t69999", keys[-1])
    assert last is not None and last.namespace == "t69999" and last.size == 16
    assert cold.namespace_keys("t65536") == [keys[65536]]


def test_a_32_byte_key_equal_to_another_keys_digest_is_another_block() -> None:
    """Found by a review: keys of another length were stored as their plain
    BLAKE2b digest, so a client could name a 32-byte key equal to another
    key's digest, and the two shared one record: the listing showed one with
    the other's size, and a Delete of one removed both."""
    import hashlib

    long_key = b"a long key of this namespace, " * 3
    crafted = hashlib.blake2b(long_key, digest_size=32).digest()
    cold = ColdIndex()
    cold.add("ns", long_key, 2000, 1, 1.0, 1.0)
    cold.add("ns", crafted, 1000, 2, 2.0, 2.0)
    assert len(cold) == 2
    assert contains_both_ways(cold, "ns", [long_key, crafted]) == b"\x01\x01"
    long_record, crafted_record = cold.get("ns", long_key), cold.get("ns", crafted)
    assert long_record is not None and long_record.size == 2000
    assert crafted_record is not None and crafted_record.size == 1000
    assert cold.take("ns", crafted) == crafted_record
    assert cold.get("ns", long_key) == long_record
    assert sorted(cold.namespace_keys("ns")) == [long_key]


def test_a_namespace_emptied_is_forgotten_and_its_id_reused() -> None:
    """Found by a review: every namespace the index ever held kept its name,
    id and salt (~230 bytes) for good: 50,000 new namespaces a round, each
    emptied, grew the server ~10 MB a round with nothing held. The blocks of
    a namespace that stays are found throughout; no other namespace's are,
    whatever id it reuses."""
    cold = ColdIndex(seed=4)
    kept = [bytes([7]) * 31 + bytes([i]) for i in range(50)]
    for key in kept:
        cold.add("kept", key, 10, 0, 0.0, 0.0)
    rng = random.Random(6)
    for rnd in range(4):
        names = [f"r{rnd}-{i}" for i in range(3000)]
        keys = [_key(rng) for _ in names]
        if rnd % 2:
            for name, key in zip(names, keys, strict=True):
                cold.add(name, key, 10, 0, 0.0, 0.0)
        else:
            n = len(names)
            cold.add_many(names, keys, np.full(n, 10, np.uint64), np.zeros(n, np.uint32),
                          np.zeros(n, np.float64), np.zeros(n, np.float64))
        assert contains_both_ways(cold, names[5], [keys[5], keys[6]]) == b"\x01\x00"
        assert contains_both_ways(cold, "kept", kept) == b"\x01" * len(kept)
        for name, key in zip(names, keys, strict=True):
            assert cold.take(name, key) is not None
        assert contains_both_ways(cold, names[5], [keys[5]]) == b"\x00"
        assert len(cold) == len(kept)
    assert set(cold._ns_ids) == {"kept"}
    assert len(cold._ns_names) <= 3001  # reused, not one more per namespace ever seen
