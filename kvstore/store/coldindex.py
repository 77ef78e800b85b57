"""The compact part of the block index: blocks held only by L2.

At scale almost every block the index knows is only on disk (L2) — after a
restart, all of them. A full index entry (:class:`kvstore.store.Entry`, its
``(namespace, key)`` tuple, its place in the policy's order, a dict slot)
costs ~450-600 bytes; these blocks need far less: whether they exist
(Lookup), what it takes to read them (size, checksum) or to write them
elsewhere (creation time, whether L3 has a copy). So they live here, in
about 100 bytes each, with no Python object per block:

* numpy columns, one row per block: the key's hash, the key (32 bytes; keys
  of another length are stored as their BLAKE2b-256 digest, with the
  original kept aside in a dict), size, checksum, creation time, last use,
  namespace id and an L3 flag;
* an open-addressing hash table (linear probing, load at most 1/2) from a
  hash of the key's 32 bytes and the namespace to the row, probed for a
  whole Lookup at once with vectorised numpy steps (a window of cells per
  key);
* freed rows and tombstoned table cells are reused; the table is rebuilt
  (vectorised) when tombstones pile up.

The hash is multiply-shift over the key's four 64-bit words (random odd
multipliers drawn per process, a random salt per namespace, the table cell
from the top bits): computed for a batch of keys in a few vectorised
operations, and keyed per process, so crafted keys cannot aim at one chain
of cells. The table is good for this process only, which is all it needs:
the index is rebuilt from L2 at start. A match needs the hash and all 32 key
bytes equal (equal hashes and keys imply the same namespace, as salts
differ).

L2 evicts these blocks before any block the policy tracks, least recently
used first by sampling (as Redis approximates LRU): of ``SAMPLE`` random
rows, the one used longest ago. The store takes a block out of here (into a
full entry) the moment it is used: read, leased, pinned, overwritten or
deleted, and puts it back once it has left L1 again.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import secrets
import struct
from array import array
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from kvstore import _impl

# Rows sampled per eviction: the approximation of LRU gets closer with more
# (Redis' maxmemory-samples defaults to 5); 16 costs a few µs.
SAMPLE = 16
KEY_BYTES = 32
_EMPTY = -1  # table cell never used
_GONE = -2  # table cell whose block was removed (probing goes on past it)
_MIN_TABLE = 1024
_MIN_ROWS = 512
_WORDS = KEY_BYTES // 8
_M64 = 2**64 - 1
# Cells looked at past the home cell in one vectorised step (load <= 1/2
# leaves runs longer than this rare); keys still undecided go one by one.
# 8 bools in a row are read as one uint64.
_WINDOW = 8
_ALL_FOUR = np.frombuffer(b"\x01" * 4, np.uint32)[0]


class ColdBlock(NamedTuple):
    namespace: str
    key: bytes
    size: int
    checksum: int
    created: float
    l3: bool


#: Keys of another length than 32 bytes are stored as a digest keyed with
#: this process's own secret (the index is rebuilt from L2 at every start):
#: with a plain digest, a client could name a 32-byte key equal to another
#: key's digest, and the two shared one record (a review: the listing showed
#: one with the other's size, and a Delete of one removed both).
_DIGEST_KEY = secrets.token_bytes(32)


def _key_id(key: bytes) -> bytes:
    """The 32 bytes stored for a key: itself, or its keyed digest."""
    return key if len(key) == KEY_BYTES else \
        hashlib.blake2b(key, digest_size=KEY_BYTES, key=_DIGEST_KEY).digest()


class ColdIndex:
    def __init__(self, seed: int = 0) -> None:
        self._ns_names: list[str] = []
        self._ns_ids: dict[str, int] = {}
        self._ns_salt: list[int] = []
        self._salts_used: set[int] = set()  # (a list's ``in`` made 70,000 namespaces 25 s)
        # Rows held per namespace id; an id whose last row goes is given back
        # and reused (a review: every namespace ever cooled here kept ~230
        # bytes for good; 50,000 new namespaces a round, each emptied, grew
        # the server ~10 MB a round, with nothing held).
        self._ns_rows: list[int] = []
        self._ns_free: list[int] = []
        self._salt_rng = random.Random(seed)
        self._rng = np.random.default_rng(seed)
        self._mult_ints = [self._salt_rng.getrandbits(64) | 1 for _ in range(_WORDS)]
        self._mult = np.array(self._mult_ints, dtype=np.uint64)
        self._top = 0  # rows at or above it were never used
        self._free = array("q")  # freed rows below _top
        self._count = 0
        # Row columns. size 0 marks a free row (blocks are at least 1 byte).
        self._hash = np.zeros(0, np.uint64)
        self._key = np.zeros((0, _WORDS), np.uint64)
        self._long_keys: dict[int, bytes] = {}  # row -> key, for keys not 32 bytes long
        self._size = np.zeros(0, np.uint64)
        self._checksum = np.zeros(0, np.uint32)
        self._created = np.zeros(0, np.float64)
        # Last use in seconds after _epoch (float32: ~0.1 s resolution over
        # weeks, plenty to tell old from recent).
        self._used = np.zeros(0, np.float32)
        self._epoch: float | None = None
        self._ns = np.zeros(0, np.uint32)
        self._l3 = np.zeros(0, np.bool_)
        # The hash table: cell -> row, or _EMPTY / _GONE.
        #: Probe batches with the native loop when it is built (see _impl).
        self.native = True
        self._table = np.full(_MIN_TABLE, _EMPTY, np.int32)
        self._shift = 64 - (_MIN_TABLE.bit_length() - 1)  # cell = hash >> shift
        self._gone = 0

    def __len__(self) -> int:
        return self._count

    def nbytes(self) -> int:
        """Bytes held by the columns and the table."""
        return sum(a.nbytes for a in (self._hash, self._key, self._size, self._checksum,
                                      self._created, self._used, self._ns, self._l3,
                                      self._table))

    # -- keys and hashes -----------------------------------------------------------------

    def _ns_id(self, namespace: str, create: bool = True) -> int | None:
        ns = self._ns_ids.get(namespace)
        if ns is None and create:
            salt = self._salt_rng.getrandbits(64)
            while salt in self._salts_used:  # distinct salts keep namespaces apart
                salt = self._salt_rng.getrandbits(64)
            if self._ns_free:
                ns = self._ns_free.pop()
                self._ns_names[ns] = namespace
                self._ns_salt[ns] = salt
            else:
                ns = len(self._ns_names)
                if ns > np.iinfo(np.uint32).max:
                    raise OverflowError("more than 2**32 - 1 namespaces in the compact index")
                self._ns_names.append(namespace)
                self._ns_salt.append(salt)
                self._ns_rows.append(0)
            self._ns_ids[namespace] = ns
            self._salts_used.add(salt)
        return ns

    def _ns_emptied(self, ns: int) -> None:
        """The namespace's last row went: its id (and salt) are free again."""
        del self._ns_ids[self._ns_names[ns]]
        self._ns_names[ns] = ""
        self._salts_used.discard(self._ns_salt[ns])
        self._ns_free.append(ns)

    def _hash_of(self, ns: int, key: bytes) -> int:
        words = struct.unpack("=4Q", _key_id(key))  # native order, as numpy reads them
        m = self._mult_ints
        return (words[0] * m[0] + words[1] * m[1] + words[2] * m[2] + words[3] * m[3]
                + self._ns_salt[ns]) & _M64

    def _hash_words(self, words: np.ndarray, salts: np.ndarray | np.uint64) -> np.ndarray:
        """_hash_of for rows of key words (uint64 arithmetic wraps, as & _M64)."""
        m = self._mult
        return words[:, 0] * m[0] + words[:, 1] * m[1] + words[:, 2] * m[2] + \
            words[:, 3] * m[3] + salts

    @staticmethod
    def _key_words(key: bytes) -> np.ndarray:
        return np.frombuffer(_key_id(key), np.uint64)

    # -- lookups -------------------------------------------------------------------------

    def _find(self, ns: int, key: bytes) -> tuple[int, int]:
        """(cell, row) of the block, or (-1, -1)."""
        h = self._hash_of(ns, key)
        table = self._table
        mask = len(table) - 1
        cell = h >> self._shift
        hashes = self._hash
        while True:
            row = int(table[cell])
            if row == _EMPTY:
                return -1, -1
            # Equal hashes and keys imply the same namespace (salts differ).
            if row >= 0 and hashes[row] == h and self._key[row].tobytes() == _key_id(key):
                return cell, row
            cell = (cell + 1) & mask

    def contains_many(self, namespace: str, keys: Sequence[bytes],
                      lengths: set[int] | None = None) -> bytes:
        """One byte per key: 1 if the block is here, else 0 (vectorised: one
        probe step for all keys at a time). ``lengths``: the set of the keys'
        lengths, when the caller knows it."""
        n = len(keys)
        ns = self._ns_id(namespace, create=False)
        if ns is None or not self._count or not n:
            return bytes(n)
        if lengths is None:
            lengths = set(map(len, keys))
        joined = b"".join(keys) if lengths == {KEY_BYTES} else b"".join(map(_key_id, keys))
        if self.native and _impl.cold_contains is not None:
            # The same probe in C (kvstore/_impl.py chooses; numpy below is the spec).
            found_bytes: bytes = _impl.cold_contains(
                self._key, self._hash, self._table, self._shift, self._mult,
                self._ns_salt[ns], joined)
            return found_bytes
        words = np.frombuffer(joined, np.uint64).reshape(n, _WORDS)
        hashes = self._hash_words(words, np.uint64(self._ns_salt[ns]))
        table = self._table
        mask = len(table) - 1
        home = (hashes >> np.uint64(self._shift)).astype(np.int64)
        # Step 1, every key: its home cell (most keys end here, found or not).
        rows = table[home]
        safe = np.maximum(rows, 0)
        found = ((rows >= 0) & (self._hash[safe] == hashes)).view(np.uint8)
        hits = np.flatnonzero(found)
        if len(hits):
            # All 4 words equal: the 4 bools of a row read as one uint32.
            found[hits] = (self._key[safe[hits]] == words[hits]).view(np.uint32)[:, 0] \
                == _ALL_FOUR
        # Step 2, the keys whose home cell held another block: the next
        # _WINDOW cells at once (bools of a row read as one uint64 for "any").
        more = np.flatnonzero((found == 0) & (rows != _EMPTY))
        if len(more):
            cells = (home[more, None] + np.arange(1, _WINDOW + 1)) & mask
            rows = table[cells]
            same = (rows >= 0) & (self._hash[np.maximum(rows, 0)] == hashes[more, None])
            key_i, cell_j = np.nonzero(same)
            if len(key_i):
                equal = (self._key[rows[key_i, cell_j]] == words[more[key_i]]).view(
                    np.uint32)[:, 0] == _ALL_FOUR
                same[key_i[~equal], cell_j[~equal]] = False
            hit = same.view(np.uint64)[:, 0] != 0
            found[more[hit]] = 1
            # A block is never past an empty cell of its run (removals leave
            # tombstones): no hit and an empty cell means absent; neither
            # means a longer run, followed one key at a time.
            empty = (rows == _EMPTY).view(np.uint64)[:, 0] != 0
            for i in more[~hit & ~empty].tolist():
                found[i] = self._find(ns, keys[i])[1] >= 0
        return found.tobytes()

    def __contains__(self, block: tuple[str, bytes]) -> bool:
        ns = self._ns_id(block[0], create=False)
        return ns is not None and self._find(ns, block[1])[1] >= 0

    def get(self, namespace: str, key: bytes) -> ColdBlock | None:
        ns = self._ns_id(namespace, create=False)
        if ns is None:
            return None
        row = self._find(ns, key)[1]
        return None if row < 0 else self._record(row)

    def _record(self, row: int) -> ColdBlock:
        key = self._long_keys.get(row)
        if key is None:
            key = self._key[row].tobytes()
        return ColdBlock(self._ns_names[int(self._ns[row])], key, int(self._size[row]),
                         int(self._checksum[row]), float(self._created[row]),
                         bool(self._l3[row]))

    def records(self) -> list[ColdBlock]:
        """Every block held (a scan: for checks and tests, not hot paths)."""
        return [self._record(int(row)) for row in np.flatnonzero(self._size[:self._top])]

    # -- changes -------------------------------------------------------------------------

    def reserve(self, blocks: int) -> None:
        """Make room for this many blocks in all (a hint before a bulk load)."""
        self._reserve_rows(max(0, blocks - self._count))
        self._fit_table(max(0, blocks - self._count))

    def _reserve_rows(self, extra: int) -> None:
        """Room for ``extra`` more rows above _top (grown by half, or exactly
        as much as a bulk load asks for)."""
        need = self._top + extra
        old = len(self._size)
        if need <= old:
            return
        new = max(need, old + old // 2, _MIN_ROWS)
        for name in ("_hash", "_key", "_size", "_checksum", "_created", "_used", "_ns", "_l3"):
            column = getattr(self, name)
            grown = np.zeros((new, *column.shape[1:]), column.dtype)
            grown[:old] = column
            setattr(self, name, grown)

    def _new_row(self) -> int:
        if self._free:
            return self._free.pop()
        self._reserve_rows(1)
        self._top += 1
        return self._top - 1

    def _since_epoch(self, when: float | np.ndarray) -> float | np.ndarray:
        if self._epoch is None:
            self._epoch = float(np.min(when)) if isinstance(when, np.ndarray) else when
        return when - self._epoch

    def _fit_table(self, extra: int) -> None:
        """Keep the load (blocks + tombstones) at most 1/2 after adding
        ``extra`` blocks; rebuild the table when it would not be."""
        if (self._count + self._gone + extra) * 2 <= len(self._table):
            return
        size = _MIN_TABLE
        while size < (self._count + extra) * 5 // 2:  # load <= 0.4: room to grow
            size *= 2
        self._table = np.full(size, _EMPTY, np.int32)
        self._shift = 64 - (size.bit_length() - 1)
        self._gone = 0
        rows = np.flatnonzero(self._size[:self._top])
        self._place(rows)

    def _place(self, rows: np.ndarray) -> None:
        """Put new rows in the table: linear probing done for all rows at
        once, a step at a time (the first row to reach a free cell wins it)."""
        table = self._table
        mask = len(table) - 1
        cells = (self._hash[rows] >> np.uint64(self._shift)).astype(np.int64)
        todo = np.arange(len(rows))
        while len(todo):
            at = cells[todo]
            free = np.flatnonzero(table[at] == _EMPTY)
            # Rows aiming at the same free cell: one of the writes lands (no
            # sort needed); the rows whose write did not land probe on.
            table[at[free]] = rows[todo[free]]
            lost = np.ones(len(todo), np.bool_)
            lost[free] = table[at[free]] != rows[todo[free]]
            todo = todo[lost]
            cells[todo] = (cells[todo] + 1) & mask

    def add(self, namespace: str, key: bytes, size: int, checksum: int, created: float,
            used: float, l3: bool = False) -> None:
        """Index a block that is only in L2 (replacing an earlier record)."""
        if size <= 0:
            raise ValueError("blocks are at least 1 byte")
        ns = self._ns_id(namespace)
        assert ns is not None
        cell, row = self._find(ns, key)
        if row < 0:
            self._fit_table(1)
            row = self._new_row()
            h = self._hash_of(ns, key)
            table = self._table
            mask = len(table) - 1
            cell = h >> self._shift
            while table[cell] >= 0:  # the first empty or tombstoned cell
                cell = (cell + 1) & mask
            if table[cell] == _GONE:
                self._gone -= 1
            table[cell] = row
            self._hash[row] = h
            self._key[row] = self._key_words(key)
            if len(key) != KEY_BYTES:
                self._long_keys[row] = key
            self._count += 1
            self._ns_rows[ns] += 1
        self._size[row] = size
        self._checksum[row] = checksum
        self._created[row] = created
        self._used[row] = self._since_epoch(used)
        self._ns[row] = ns
        self._l3[row] = l3

    def add_many(self, namespaces: Sequence[str], keys: Sequence[bytes], sizes: np.ndarray,
                 checksums: np.ndarray, created: np.ndarray, used: np.ndarray) -> None:
        """Index many blocks at once (the rebuild from L2 at start). The
        blocks must be new to the index and at least 1 byte each."""
        n = len(keys)
        if n == 0:
            return
        if np.any(sizes == 0):
            raise ValueError("blocks are at least 1 byte")
        self._reserve_rows(n)
        first = self._top
        part = slice(first, first + n)
        names = sorted(set(namespaces))
        ids: dict[str, int] = {}
        for name in names:
            ns = self._ns_id(name)
            assert ns is not None
            ids[name] = ns
        if len(names) == 1:
            ns_column = np.full(n, ids[names[0]], np.uint32)
            self._ns_rows[ids[names[0]]] += n
        else:
            ns_column = np.fromiter((ids[name] for name in namespaces), np.uint32, n)
            for ns, rows in enumerate(np.bincount(ns_column).tolist()):
                self._ns_rows[ns] += rows
        salts = np.asarray(self._ns_salt, dtype=np.uint64)[ns_column]
        words = np.frombuffer(b"".join(map(_key_id, keys)), np.uint64).reshape(n, _WORDS)
        self._key[part] = words
        self._hash[part] = self._hash_words(words, salts)
        for i, key in enumerate(keys):
            if len(key) != KEY_BYTES:
                self._long_keys[first + i] = key
        self._size[part] = sizes
        self._checksum[part] = checksums
        self._created[part] = created
        self._used[part] = self._since_epoch(np.asarray(used, dtype=np.float64))
        self._ns[part] = ns_column
        self._l3[part] = False
        self._top += n
        self._count += n
        if (self._count + self._gone) * 2 > len(self._table):
            self._fit_table(0)  # places every row, these included
        else:
            self._place(np.arange(first, first + n))

    def set_l3(self, namespace: str, key: bytes, present: bool) -> bool:
        """Record whether L3 holds the block; False when it is not here."""
        ns = self._ns_id(namespace, create=False)
        row = -1 if ns is None else self._find(ns, key)[1]
        if row < 0:
            return False
        self._l3[row] = present
        return True

    def take(self, namespace: str, key: bytes) -> ColdBlock | None:
        """Remove the block and return its record (None when not here)."""
        ns = self._ns_id(namespace, create=False)
        if ns is None:
            return None
        cell, row = self._find(ns, key)
        if row < 0:
            return None
        record = self._record(row)
        table = self._table
        mask = len(table) - 1
        if table[(cell + 1) & mask] == _EMPTY:
            # No probe run continues past here: the cell, and the tombstones
            # just before it, can be empty again (fewer table rebuilds).
            table[cell] = _EMPTY
            cell = (cell - 1) & mask
            while table[cell] == _GONE:
                table[cell] = _EMPTY
                self._gone -= 1
                cell = (cell - 1) & mask
        else:
            table[cell] = _GONE
            self._gone += 1
        self._size[row] = 0
        self._long_keys.pop(row, None)
        self._free.append(row)
        self._count -= 1
        self._ns_rows[ns] -= 1
        if not self._ns_rows[ns]:
            self._ns_emptied(ns)
        return record

    def victim(self) -> ColdBlock | None:
        """The block to evict: the least recently used of a random sample of
        held rows. None when empty."""
        if not self._count:
            return None
        size = self._size
        for _ in range(4):
            sample = self._rng.integers(0, self._top, SAMPLE)
            sample = sample[size[sample] != 0]
            if len(sample):
                break
        else:
            # Sparse (most rows freed): sample among the held ones.
            sample = np.flatnonzero(size[:self._top])
            if len(sample) > SAMPLE:
                sample = self._rng.choice(sample, SAMPLE, replace=False)
        row = int(sample[int(np.argmin(self._used[sample]))])
        return self._record(row)

    def victim_of(self, namespaces: Iterable[str]) -> ColdBlock | None:
        """:meth:`victim` among the blocks of ``namespaces`` (L2 quotas: the
        namespaces over theirs go first). None when they have none here."""
        ids = [ns for ns in (self._ns_id(n, create=False) for n in namespaces)
               if ns is not None]
        if not self._count or not ids:
            return None
        wanted = np.zeros(len(self._ns_names), np.bool_)
        wanted[ids] = True
        size, ns_column = self._size, self._ns
        # A namespace over its quota usually holds much of L2: a few wide
        # random samples find its rows without a scan.
        for _ in range(4):
            sample = self._rng.integers(0, self._top, SAMPLE * 4)
            sample = sample[(size[sample] != 0) & wanted[ns_column[sample]]]
            if len(sample):
                break
        else:
            # A small share of L2 (a tight quota): look at its rows (vectorised).
            top = self._top
            sample = np.flatnonzero((size[:top] != 0) & wanted[ns_column[:top]])
            if not len(sample):
                return None
            if len(sample) > SAMPLE:
                sample = self._rng.choice(sample, SAMPLE, replace=False)
        sample = sample[:SAMPLE]
        row = int(sample[int(np.argmin(self._used[sample]))])
        return self._record(row)

    # -- one namespace (ops commands: kvstore ls, stats --namespace, flush) -------------

    def _namespace_rows(self, namespace: str) -> np.ndarray:
        ns = self._ns_id(namespace, create=False)
        if ns is None or not self._count:
            return np.zeros(0, np.int64)
        top = self._top
        return np.flatnonzero((self._size[:top] != 0) & (self._ns[:top] == ns))

    def namespace_usage(self, namespace: str) -> tuple[int, int, int, int]:
        """(blocks, bytes, blocks also in L3, their bytes) of the namespace."""
        rows = self._namespace_rows(namespace)
        sizes = self._size[rows]
        l3 = self._l3[rows]
        return len(rows), int(sizes.sum()), int(l3.sum()), int(sizes[l3].sum())

    def _split_rows(self, namespace: str, prefix: bytes) -> tuple[np.ndarray, list[int]]:
        """The namespace's rows whose key starts with ``prefix``: those with
        a 32-byte key (an array) and those with another (a list)."""
        rows = self._namespace_rows(namespace)
        long_rows: list[int] = []
        if self._long_keys:
            is_long = np.isin(rows, np.fromiter(self._long_keys, np.int64, len(self._long_keys)))
            long_rows = [r for r in rows[is_long].tolist()
                         if self._long_keys[r].startswith(prefix)]
            rows = rows[~is_long]
        if prefix:
            if len(prefix) > KEY_BYTES:
                rows = rows[:0]
            else:
                keys = self._key[rows].view(np.uint8).reshape(len(rows), KEY_BYTES)
                rows = rows[(keys[:, :len(prefix)] == np.frombuffer(prefix, np.uint8)).all(axis=1)]
        return rows, long_rows

    def _in_key_order(self, rows: np.ndarray, limit: int | None) -> np.ndarray:
        """The first ``limit`` of ``rows`` in key order (bytewise)."""
        # Bytewise order is the order of the key's words read big-endian.
        def big_endian(words: np.ndarray) -> np.ndarray:
            return words.byteswap() if np.little_endian else words

        if limit is not None and limit < len(rows):
            # Only rows whose first word is among the `limit` smallest can
            # be first: sort those alone (O(n), not a sort of the namespace).
            first = big_endian(self._key[rows, 0])
            cut = np.partition(first, limit - 1)[limit - 1]
            rows = rows[first <= cut]
        words = big_endian(self._key[rows])
        order = np.lexsort(words.T[::-1])
        return rows[order[:limit] if limit is not None else order]

    def _records(self, rows: np.ndarray) -> list[ColdBlock]:
        """_record for many rows, a column at a time."""
        raw = self._key[rows].tobytes()
        long_keys = self._long_keys
        names = self._ns_names
        return [ColdBlock(names[ns], long_keys.get(row) or raw[i * KEY_BYTES:(i + 1) * KEY_BYTES],
                          size, checksum, created, l3)
                for i, (row, ns, size, checksum, created, l3) in enumerate(zip(
                    rows.tolist(), self._ns[rows].tolist(), self._size[rows].tolist(),
                    self._checksum[rows].tolist(), self._created[rows].tolist(),
                    self._l3[rows].tolist(), strict=True))]

    def namespace_blocks(self, namespace: str, prefix: bytes = b"",
                         limit: int | None = None) -> tuple[list[ColdBlock], int]:
        """The namespace's blocks whose key starts with ``prefix``, in key
        order, at most ``limit`` of them, and how many matched in all
        (vectorised over the columns: no object per unlisted block)."""
        rows, long_rows = self._split_rows(namespace, prefix)
        total = len(rows) + len(long_rows)
        found = self._records(self._in_key_order(rows, limit))
        if long_rows:
            if limit is not None and limit < len(long_rows):
                # (a record for each and a sort of them all took seconds for a
                # million 36-byte keys: only the first `limit` can be listed)
                long_rows = heapq.nsmallest(limit, long_rows, key=self._long_keys.__getitem__)
            found.extend(self._records(np.array(long_rows, np.int64)))
            found.sort(key=lambda b: b.key)
            if limit is not None:
                del found[limit:]
        return found, total

    def namespace_keys(self, namespace: str) -> list[bytes]:
        """Every key of the namespace (in no particular order)."""
        rows, long_rows = self._split_rows(namespace, b"")
        raw = self._key[rows].tobytes()
        keys = [raw[i:i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]
        keys.extend(self._long_keys[r] for r in long_rows)
        return keys
