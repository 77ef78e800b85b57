"""The roles a storage tier plays for the TieredStore, and their contracts.

Three roles, one per tier, each exactly the calls the store (and its shared-
memory broker and L3 mover) makes on that tier:

- :class:`BlockArena` (L1, host memory): extents the store reserves, fills in
  place and releases; the store's index knows which block lives where.
- :class:`KeyValueTier` (L2, local disk): a queue of ordered writes with a
  completion callback, blocking reads straight into a caller's buffer, and a
  metadata scan to rebuild the index at start.
- :class:`ObjectStore` (L3, shared object store): whole-block puts, gets,
  HEADs, deletes and a listing, under a deadline and a circuit breaker.

Tiers are mechanism: they never decide what to keep (the TieredStore asks the
policy and tells the tier) and treat payloads as opaque bytes (the store
verifies checksums). Every failure a tier reports is a
:class:`kvstore.errors.KVStoreError`; a storage library's own exceptions never
leave a tier. The conformance suite (``tests/tiers/test_conformance.py``) runs
one set of tests per role against every backend of that role.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from kvstore.types import BlockId, Buffer


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What the index needs to know about a block without reading it."""

    size: int  # payload bytes
    checksum: int  # kvstore.checksum of the payload (verified on every read from L2/L3)
    created: float  # wall-clock seconds when first stored

    _STRUCT = struct.Struct("<QQd")
    #: bytes of a packed record
    SIZE = _STRUCT.size

    def pack(self) -> bytes:
        return self._STRUCT.pack(self.size, self.checksum, self.created)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> BlockMeta:
        size, checksum, created = cls._STRUCT.unpack(bytes(raw[: cls._STRUCT.size]))
        return cls(size, checksum, created)


@dataclass(frozen=True, slots=True)
class TierUsage:
    blocks: int
    bytes: int
    capacity: int


class BlockArena(Protocol):
    """L1: a fixed region of host memory carved into extents.

    Not thread-safe: every method is called from the event loop thread. The
    bytes behind a view from :meth:`slice` may be read and written from any
    thread (the store copies into them on executors) while the extent stays
    reserved.
    """

    @property
    def capacity(self) -> int:
        """Usable bytes (the configured capacity rounded down to whole pages)."""
        ...

    @property
    def used_bytes(self) -> int:
        """Bytes in reserved extents, each rounded up to whole pages."""
        ...

    def reserve(self, nbytes: int) -> int:
        """The byte offset of a free extent of at least ``nbytes`` bytes, now
        reserved, or -1 when no free extent is large enough (a full arena is
        not an error: the store evicts and asks again). Reserved extents never
        overlap. The extent's previous contents are unspecified."""
        ...

    def release(self, offset: int, nbytes: int) -> None:
        """Give back an extent: ``offset`` and ``nbytes`` are exactly what was
        passed to and returned by one :meth:`reserve`, released once."""
        ...

    def slice(self, offset: int, nbytes: int) -> memoryview:
        """A writable view of ``nbytes`` bytes at ``offset``. Writes through it
        are seen by every other view of the same bytes (and, for an arena in a
        shared-memory file, by every process mapping that file)."""
        ...

    async def close(self) -> None:
        """Release the memory (and remove the shared-memory file, if any).
        Idempotent. Views still held keep the mapping alive until dropped."""
        ...


WriteDone = Callable[[BaseException | None, bool], None]
"""``done(error, existed)``: a queued write finished. ``error`` is None when it
committed, else a KVStoreError; ``existed`` tells whether the block was stored
before the write."""


class KeyValueTier(Protocol):
    """L2: blocks with their metadata under ``(namespace, key)`` on local disk.

    Writes are queued and committed in order by one writer; reads are blocking
    calls the store runs on its executor threads. Every method may be called
    from any thread unless it says otherwise.
    """

    def submit(self, block: BlockId, data: Buffer | None, meta: BlockMeta | None,
               done: WriteDone) -> None:
        """Queue a write of ``data`` with ``meta`` (replacing any stored copy)
        or, with ``data`` and ``meta`` None, a delete; never blocks.

        Ordering: writes commit in the order they were submitted, so a delete
        submitted after a put of the same block removes it. ``done`` is called
        exactly once, from the writer thread, after the write has committed or
        failed: a committed write survives a crash of the process (and of the
        machine once :meth:`flush` or :meth:`close` has returned, or always
        when the tier syncs every commit). A failed write raises nothing here;
        ``done`` gets a :class:`~kvstore.errors.StorageError`. On a closed
        tier ``done`` is called at once, in the caller's thread, with one.
        ``data`` must stay valid and unchanged until ``done`` is called."""
        ...

    def read_into_sync(self, block: BlockId,
                       dest: memoryview | None) -> tuple[BlockMeta, Any] | None:
        """The block's metadata and payload, or None when it is not stored.
        Blocking (run it on an executor). Sees every write whose ``done`` has
        been called. With ``dest`` at least the payload's size, the payload is
        copied into ``dest`` and returned as a view of it; otherwise it is
        returned as bytes. Raises :class:`~kvstore.errors.StorageError` when
        the storage fails."""
        ...

    def scan(self) -> AsyncIterator[tuple[BlockId, BlockMeta]]:
        """Every stored block with its metadata, without reading payloads (to
        rebuild the index at start). Raises StorageError when storage fails."""
        ...

    def submit_tombstone(self, block: BlockId, present: bool, done: WriteDone,
                         checksum: int | None = None) -> None:
        """Queue, in order with the block writes, a record (``present``) or
        its removal that the block's object in the shared L3 is still to be
        deleted: a delete or overwrite made while L3 is down or slow survives a
        restart and is retried. ``checksum``: that of the object to delete
        (after a restart only that object is deleted: the key may hold
        another's since). ``done`` as for :meth:`submit`."""
        ...

    def after_queued(self, done: WriteDone, durable: bool = False) -> None:
        """Call ``done`` once every write submitted before has committed (or
        failed); with ``durable``, once they are synced to disk too, whatever
        the tier's own sync setting: what a Delete waits for."""
        ...

    def tombstones_sync(self) -> list[tuple[BlockId, int | None]]:
        """The blocks recorded by :meth:`submit_tombstone`, each with the
        checksum recorded (None: a record without one) (blocking)."""
        ...

    @property
    def unlisted_since(self) -> float | None:
        """When (Unix time) a run of this L2 first began to serve before L3
        had been listed to the end, if no listing has ended since: blocks
        written from then on may have an older object under their key that
        this node did not know of (see :meth:`set_unlisted_since`). Read at
        open."""
        ...

    def set_unlisted_since(self, value: float | None, done: WriteDone) -> None:
        """Record :attr:`unlisted_since` (None: a listing ended, remove it);
        ordered with the block writes (a write queued after it commits with
        it or later). ``done`` as for :meth:`submit`."""
        ...

    @property
    def l3_url(self) -> str | None:
        """The ``l3.url`` of the last run that had L3 (None: none recorded).
        Read at open."""
        ...

    def set_l3_url(self, url: str, done: WriteDone) -> None:
        """Record :attr:`l3_url`, ordered with the block writes."""
        ...

    @property
    def l3_off_since(self) -> float | None:
        """When (Unix time) the first of the runs without the recorded L3
        since it was last on began (None: none). Read at open."""
        ...

    def set_l3_off_since(self, value: float | None, done: WriteDone) -> None:
        """Record :attr:`l3_off_since` (None: L3 is on again, remove it)."""
        ...

    def usage(self) -> TierUsage:
        """Blocks and payload bytes committed, and the configured capacity
        (which the store enforces, not the tier)."""
        ...

    def flush_sync(self) -> None:
        """A barrier: return once every write submitted before the call has
        committed (its ``done`` called) and the data is on disk. Blocking; a
        no-op on a closed tier."""
        ...

    async def flush(self) -> None:
        """:meth:`flush_sync` without blocking the event loop."""
        ...

    async def close(self) -> None:
        """Commit every queued write, sync to disk and release the storage.
        Idempotent."""
        ...


class ObjectStore(Protocol):
    """L3: blocks as objects in a store shared by many nodes.

    Called from the event loop. Every call runs under one deadline (retries
    included) and a circuit breaker; a call that cannot be served — the store
    is unreachable, too slow, refuses, the breaker is open or the tier is
    closed — raises :class:`~kvstore.errors.TierUnavailable`. A genuine miss
    is None / False, never an exception, so the store can tell "not there"
    from "cannot tell". Calls on one block are not ordered against each other
    (the L3 mover orders the writes of a block itself).
    """

    @property
    def healthy(self) -> bool:
        """False while the circuit breaker is not closed or after close."""
        ...

    async def check(self) -> bool:
        """Probe the store with one cheap request through the breaker; True
        when it answered. Never raises TierUnavailable."""
        ...

    async def put(self, block: BlockId, data: Buffer, meta: BlockMeta) -> None:
        """Store the payload with ``meta``'s checksum and creation time,
        replacing any stored copy; when it returns, every node can read it."""
        ...

    async def get_with_meta(self, block: BlockId, prefetch: bool = False
                            ) -> tuple[BlockMeta, memoryview] | None:
        """The payload with the metadata stored with it, or None. Raises
        :class:`~kvstore.errors.CorruptBlock` when the object is not a valid
        block (the payload's checksum is the caller's to verify).
        ``prefetch``: a hint's read, which may wait behind demand reads."""
        ...

    async def head_size(self, block: BlockId) -> int | None:
        """The payload size of a stored block (no payload read), or None."""
        ...

    async def head_meta(self, block: BlockId) -> BlockMeta | None:
        """What the block's object's header says (size, checksum, creation
        time; its first bytes only), or None when there is no such object."""
        ...

    async def delete(self, block: BlockId, *,
                     still: Callable[[], bool] | None = None) -> bool | None:
        """Remove the block; True when it was there. ``still``: asked once the
        store was reached; False: nothing is deleted, None returned."""
        ...

    def list_blocks(self, namespaces: Iterable[str] = ()) -> AsyncIterator[tuple[BlockId, int]]:
        """Every block stored (by any node) with its payload size, from the
        listing alone (no request per object); only those of ``namespaces``
        when any are given.
        Objects that are not blocks are skipped."""
        ...

    async def close(self) -> None:
        """Refuse further calls (they raise TierUnavailable). Idempotent."""
        ...
