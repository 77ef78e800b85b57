"""Same-host shared memory: reservations and leases on the L1 arena.

The arena lives in a shared-memory file (``l1.shm_path``) that a trusted
client on the same host maps. Bulk bytes then never cross the socket:

* Put: ``reserve`` carves slots (L1 extents, evicting as needed) and hands out
  random slot ids; the client writes the blocks into its mapping; ``commit``
  checks every offset and size the client names against the reservation and
  verifies each block's checksum (CRC-32C) before the block becomes visible.
  A reservation not committed within ``reserve_ms`` is taken back.
* Get: ``acquire`` pins each block in L1 (promoting it from L2 if needed) and
  returns a lease: a random id, the slot's offset, size, checksum and
  generation. The client copies out and ``release``-s. Eviction waits for
  leases; a lease not released within its time expires (a crashed client),
  and a release reports leases that had expired, since only then could the
  slot have been reused: a copy made under a lease that was still valid at
  release time is never stale. A client whose copy ended within the lease's
  time (counted from before it sent the acquire) knows that already, and may
  instead name the lease in its next ``acquire`` (``release=``), which ends
  it, checked exactly as ``release`` checks it, before leasing anything.
* One round trip per Put (issue 14): a slot may be reserved without a key
  (an *anonymous* slot, key ``b""``), and ``commit`` binds it to the key its
  ``CommitSpec`` names. :meth:`restock` reserves such slots for a client's
  next Puts, best effort, after a commit (``ShmCommitRequest.reserve_next``):
  a Put whose sizes the client has in stock is a copy and one ShmCommit. An
  anonymous slot is a reservation like any other (same L1 room, same
  namespace and owner binding, same expiry and quarantine).

The server trusts the client's process no further than that: ids are random
64-bit numbers, not offsets; a client never names memory the server did not
hand it. Every reservation and lease belongs to the namespace and the owner
token (a per-attach secret, ``ShmAttachResponse.owner``) that took it: only
a call naming both may commit, abandon or release it (PERMISSION_DENIED
otherwise, and nothing changes).

Extents handed to a writer are never reused while it may still write:

* a reservation cannot expire while the ShmReserve call that made it is open
  (its clock starts when the call returns), so one call never gets
  overlapping slots;
* an expired reservation's extent is quarantined, not freed: a slow writer
  may still be copying into it. It returns to the arena after
  ``server.shm_quarantine_ms`` (the client refuses to write past its
  reservation's deadline, so only a writer stalled that long could still
  touch it).

Shared memory is for one trust domain: every attached client maps the whole
arena. ``server.shm_namespaces`` limits which namespaces may use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import struct
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvstore.checksum import checksum
from kvstore.errors import (
    CapacityExhausted,
    CorruptBlock,
    InvalidArgument,
    KVStoreError,
    PermissionDenied,
    TierNotConfigured,
)
from kvstore.ratelimit import RateLimitedWarning
from kvstore.store.index import Entry
from kvstore.store.reads import BlockReader
from kvstore.store.tiered import TieredStore, all_durable
from kvstore.tiers.memory import MemoryTier
from kvstore.types import (
    MAX_KEYS_PER_REQUEST,
    AckLevel,
    BlockFormat,
    BlockId,
    TierName,
    validate_key,
    validate_keys,
)

log = logging.getLogger("kvstore.store")

# Expired lease ids remembered, to tell "expired" from "never issued".
_EXPIRED_MEMORY = 65_536
#: Leases held at once, all clients together: each costs the server ~1 KB and
#: pins its block, and a client may keep one for up to server.max_lease_ms.
MAX_LEASES = 65_536
#: Of them, one tenant's at most (its identity under auth.tokens_file, else
#: the namespace): one tenant leasing the same 16 blocks over and over held
#: them all, and every other tenant's acquire (the engine integrations' path)
#: failed; counted per namespace, a tenant granted two held them all again.
#: Half: one acquire may still lease a 1M-token context in 32-token blocks.
MAX_LEASES_PER_TENANT = MAX_LEASES // 2
# restock (anonymous slots for a client's next Puts): at most this many slots,
# and this share of L1, per call; and how long it may wait for L1 room (s)
# before giving up (a restock must not hold back the commit it rides on).
RESTOCK_MAX_SLOTS = 16
RESTOCK_MAX_L1_SHARE = 8
RESTOCK_TOTAL_L1_SHARE = 4  # (every owner's stocked slots together)
RESTOCK_WAIT_SECONDS = 0.05
# A commit of at most this many bytes is verified on the event loop, and
# may be answered from the socket's readable callback; larger ones on the
# store's executor, by the connection's task. Why 4 MiB: the hop to a thread
# and the task cost more than the check itself up to there (1 MiB Puts:
# 0.30 ms, 1 MiB + 4 KiB: 0.72 ms through the executor; 2 MiB 0.97 -> 0.47
# ms, 4 MiB 1.39 -> 1.01 ms checked here, measured on 2 vCPUs), while the
# loop's longest stall stays under that of a data-plane GET it answers on the
# spot (8 MiB of L1 blocks checked, ~0.75 ms from memory): ~0.4 ms.
VERIFY_INLINE_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class Reservation:
    block: BlockId  # key b"": an anonymous slot, bound to a key at commit
    offset: int
    size: int
    generation: int
    session: str | None
    expires: float  # inf while the ShmReserve call that made it is open
    owner: str
    #: made anonymous (a stocked slot), whatever key a commit binds it to
    #: since: its size is in ShmStore._anonymous_bytes until it goes
    anonymous: bool = False


@dataclass(slots=True)
class Slot:
    slot_id: int
    offset: int
    size: int
    generation: int


@dataclass(frozen=True, slots=True)
class Unleased:
    """A block ShmAcquire found (in ``tier``) but could not lease: it is held
    outside L1 and there was no L1 room to bring it in (every page leased or
    reserved). Not a miss: the client reads it the way that holds no lease."""
    tier: TierName


@dataclass(slots=True)
class Lease:
    lease_id: int
    offset: int
    size: int
    checksum: int
    generation: int
    tier: TierName
    expires: float
    reader: BlockReader
    namespace: str = ""
    owner: str = ""
    #: whose share of the leases it counts in (:meth:`SharedMemoryBroker._tenant`)
    tenant: str = ""


@dataclass(slots=True)
class CommitSpec:
    slot_id: int
    offset: int
    size: int
    checksum: int
    format: BlockFormat = BlockFormat.RAW
    #: The key an anonymous slot is stored under (b"" for a keyed reservation,
    #: or its own key).
    key: bytes = b""


class RandomIds:
    """Unguessable ids in 1..2**63-1 (another client cannot name a lease or a
    slot it was not given), drawn from ``os.urandom`` a batch at a time: one
    system call per id was a tenth of the server's work for a shared-memory
    Get (``secrets.randbits``, 1.3 µs)."""

    __slots__ = ("_pool",)
    BATCH = 512  # ids per os.urandom call

    def __init__(self) -> None:
        self._pool: list[int] = []

    def take(self) -> int:
        if not self._pool:
            raw = os.urandom(8 * self.BATCH)
            self._pool = [(v >> 1) or 1 for v in struct.unpack(f"<{self.BATCH}Q", raw)]
        return self._pool.pop()


class SharedMemoryBroker:
    """``clock``: monotonic seconds for reservation and lease deadlines (a
    test passes a fake one). The quarantine time and the namespaces allowed
    come from ``store.config.server`` unless given."""

    def __init__(self, store: TieredStore, reserve_ms: int, lease_ms: int,
                 max_lease_ms: int, *, clock: Callable[[], float] = time.monotonic,
                 quarantine_ms: int | None = None,
                 namespaces: Sequence[str] | None = None) -> None:
        self.store = store
        self.placement = store.placement
        # A client that vouches falsely can fail a commit per request.
        self._vouched_log = RateLimitedWarning(
            log, "an answered shared-memory commit failed its check", 10.0)
        self.reserve_ms = reserve_ms
        # (capped as every lease is: ShmAttach answered 30 s while leases
        # were granted 5 s under a lower server.max_lease_ms)
        self.default_lease_ms = min(lease_ms, max_lease_ms)
        self.max_lease_ms = max_lease_ms
        server = store.config.server
        self.quarantine_ms = server.shm_quarantine_ms if quarantine_ms is None else quarantine_ms
        self.namespaces = frozenset(server.shm_namespaces if namespaces is None else namespaces)
        self.clock = clock
        self.path = store.config.l1.shm_path
        self.instance = secrets.token_hex(8)
        self._reservations: dict[int, Reservation] = {}
        #: bytes of the anonymous reservations (restocked slots), every owner's
        self._anonymous_bytes = 0
        self._leases: dict[int, Lease] = {}
        #: leases held per tenant (MAX_LEASES_PER_TENANT)
        self._leases_of: Counter[str] = Counter()
        # Leases an acquire under way may still take, per tenant and in all:
        # counted from its check on (it waits for blocks between its leases:
        # concurrent acquires each checked against the count before the
        # others' leases, and one tenant held 123,072 leases, past its share
        # and the server's bound).
        self._pending_of: Counter[str] = Counter()
        self._pending = 0
        # Expired lease ids (with the namespace and owner that took them), to
        # tell "expired" from "never issued" and from "someone else's".
        self._expired: OrderedDict[int, tuple[str, str]] = OrderedDict()
        # Extents of expired reservations: (free after, offset, size), in order.
        self._quarantine: deque[tuple[float, int, int]] = deque()
        self._random_ids = RandomIds()
        self._reaper: asyncio.Task[None] | None = None
        self._generation = 0

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def _require(self) -> None:
        if not self.enabled:
            raise TierNotConfigured(
                "shared memory is off: start the server with l1.shm_path "
                "(e.g. --l1-shm-path /dev/shm/kvstore/l1.arena) to use the Shm* calls")

    def check_namespace(self, namespace: str) -> None:
        """Shared memory on, and ``namespace`` one that may use it."""
        self._require()
        if self.namespaces and namespace not in self.namespaces:
            raise PermissionDenied(
                f"namespace {namespace!r} may not use shared memory here (server.shm_namespaces"
                " lists those that may: every attached client can read the whole arena)")

    def marker(self) -> int:
        """Write this instance id into the arena file's page past the blocks
        and return where (0: no file), for a client to check that the file it
        opened is this server's. Written at every attach (the only time a
        client reads it): any process that may open the file (every attached
        client) may write over it, which would refuse every later attach."""
        return self.store.l1.arena.write_marker(self.instance) if self.path else 0

    def new_owner(self) -> str:
        """A per-attach secret: reservations and leases are bound to it."""
        return secrets.token_hex(16)

    def start(self) -> None:
        if self.enabled:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for lease in self._leases.values():
            lease.reader.close()
        self._leases.clear()
        self._leases_of.clear()
        self._pending_of.clear()
        self._pending = 0
        for r in self._reservations.values():
            self.placement.release(r.offset, r.size)
        self._reservations.clear()
        self._anonymous_bytes = 0
        while self._quarantine:
            _, offset, size = self._quarantine.popleft()
            self.placement.release(offset, size)

    def _new_id(self, taken: dict[int, object]) -> int:
        while True:
            ident = self._random_ids.take()
            if ident not in taken and ident not in self._expired:
                return ident

    # -- Put ---------------------------------------------------------------------------

    async def reserve(self, namespace: str, specs: Sequence[tuple[bytes, int]],
                      session: str | None, owner: str = "") -> tuple[list[Slot], int]:
        """Slots for ``specs`` and how long (ms, rounded down) the call was
        open before their reservations' clock started. A spec whose key is
        ``b""`` reserves an anonymous slot (its key is named at commit)."""
        self._check_reserve(namespace, specs)
        started = self.clock()
        slots: list[Slot] = []
        try:
            for key, size in specs:
                offset = await self.placement.reserve(size, namespace=namespace)
                # No deadline while this call is open (it may wait for room):
                # a slot granted earlier in it must not expire and be reused.
                slots.append(self._grant((namespace, key), offset, size, session, owner))
        except BaseException:
            for slot in slots:
                self._drop_reservation(slot.slot_id)
            raise
        now = self.clock()
        expires = now + self.reserve_ms / 1000.0
        for slot in slots:
            self._reservations[slot.slot_id].expires = expires
        return slots, int((now - started) * 1000.0)

    def reserve_now(self, namespace: str, specs: Sequence[tuple[bytes, int]],
                    session: str | None, owner: str = "") -> list[Slot] | None:
        """:meth:`reserve` on the spot: the slots, or None, having reserved
        nothing, where it would wait for room. Errors are :meth:`reserve`'s,
        raised before anything is reserved."""
        self._check_reserve(namespace, specs)
        expires = self.clock() + self.reserve_ms / 1000.0
        slots: list[Slot] = []
        for key, size in specs:
            offset = self.placement.reserve_now(size, namespace)
            if offset < 0:
                for slot in slots:
                    self._drop_reservation(slot.slot_id)
                return None
            slots.append(self._grant((namespace, key), offset, size, session, owner, expires))
        return slots

    def _check_reserve(self, namespace: str, specs: Sequence[tuple[bytes, int]]) -> None:
        """A reservation's checks: namespace, keys, sizes, L1's capacity."""
        self.check_namespace(namespace)
        if len(specs) > MAX_KEYS_PER_REQUEST:
            raise InvalidArgument(f"a ShmReserve names {len(specs)} blocks; at most "
                                  f"{MAX_KEYS_PER_REQUEST} (split it)")
        extent = self.store.l1.extent
        total = 0
        for i, (key, size) in enumerate(specs):
            if key:
                validate_key(key, i)
            try:
                self.placement.check_block_size(size)
            except InvalidArgument as exc:
                raise exc.about(f"block #{i}") from None
            total += extent(size)
        capacity = self.store.l1.capacity
        if total > capacity:
            raise CapacityExhausted(
                f"one ShmReserve for {len(specs)} blocks needs {total} bytes of L1, more than "
                f"its capacity of {capacity} bytes (l1.capacity): reserve fewer at a time")

    def _grant(self, block: BlockId, offset: int, size: int, session: str | None,
               owner: str, expires: float = math.inf) -> Slot:
        """A reservation of the extent at ``offset`` (reserved in placement)."""
        self._generation += 1
        slot_id = self._new_id(self._reservations)  # type: ignore[arg-type]
        anonymous = not block[1]
        self._reservations[slot_id] = Reservation(block, offset, size, self._generation,
                                                  session, expires, owner, anonymous)
        if anonymous:
            self._anonymous_bytes += size
        return Slot(slot_id, offset, size, self._generation)

    def _forget_reservation(self, slot_id: int) -> Reservation | None:
        """Remove a reservation from the table (its extent is the caller's)."""
        r = self._reservations.pop(slot_id, None)
        if r is not None and r.anonymous:
            # (by the flag: a commit binds the key before the reservation
            # goes, and the bytes stayed counted, switching the stock off)
            self._anonymous_bytes -= r.size
        return r

    def _drop_reservation(self, slot_id: int) -> None:
        r = self._forget_reservation(slot_id)
        if r is not None:
            self.placement.release(r.offset, r.size)

    def reserved_by(self, slot_ids: Sequence[int], owner: str) -> list[int]:
        """Those of ``slot_ids`` that are reserved now, by ``owner``."""
        reservations = self._reservations
        return [i for i in slot_ids
                if (r := reservations.get(i)) is not None and r.owner == owner]

    def _check_owner(self, slot_ids: Sequence[int], namespace: str, owner: str) -> None:
        foreign = [i for i in slot_ids if (r := self._reservations.get(i)) is not None
                   and (r.block[0] != namespace or r.owner != owner)]
        if foreign:
            raise PermissionDenied(
                f"{len(foreign)} slot id(s) were reserved by another client or namespace "
                f"(first: {foreign[0]}); nothing was committed or abandoned")

    async def commit(self, namespace: str, ack: AckLevel, specs: Sequence[CommitSpec],
                     abandon: Sequence[int], owner: str = "", *,
                     session: str | None = None,
                     check_open: Callable[[], None] | None = None) -> tuple[int, int]:
        """Store the blocks written into reserved slots. ``session``: the
        session of the anonymous slots committed (a keyed reservation keeps
        the one it was reserved with). ``check_open``: raises once the
        client is gone; called before each block is made visible (the commit
        may wait, and a client that died meanwhile must not overwrite what
        others put after it: its blocks left are given up, as they are when
        the L2 write queue stays full)."""
        taken = self._take(namespace, ack, specs, abandon, owner, session)
        # Verify every block's checksum before any is visible. A small commit
        # right here (tens of µs: less than the hop to a thread and back),
        # its block-format checks too (the bytes are in cache by then); a
        # larger one off the event loop, one executor task per block (the
        # native CRC releases the GIL, so blocks are verified in parallel).
        try:
            for i, (_, r) in enumerate(taken):
                self.store.check_durable_size(ack, r.size, i)
            if sum(r.size for _, r in taken) <= VERIFY_INLINE_BYTES:
                self._verify_now(taken)
            else:
                self._check_sums(taken, await self._sums_off_loop(
                    [(r.offset, r.size) for _, r in taken]))
                for i, (spec, r) in enumerate(taken):
                    if spec.format == BlockFormat.KV_V1:
                        await self.placement.verify_block(r.offset, r.size, i)
        except BaseException:
            self._release_taken(taken)
            raise
        durable = []
        nbytes = 0
        done = 0
        try:
            for spec, r in taken:
                written_next = await self.store.room_for_write(ack, r.size)
                if check_open is not None:
                    check_open()
                entry = self.placement.commit(r.block, r.size, spec.checksum, r.offset,
                                              r.session, written_next)
                done += 1
                fut = await self.store.make_durable(r.block, entry, ack)
                if fut is not None:
                    durable.append(fut)
                nbytes += r.size
        except BaseException:
            self._release_taken(taken[done:])  # (the L2 queue stayed full; the client went)
            raise
        if durable:
            await all_durable(durable)
        return len(taken), nbytes

    async def commit_unchecked(self, namespace: str, ack: AckLevel, specs: Sequence[CommitSpec],
                               abandon: Sequence[int], owner: str = "", *,
                               session: str | None = None,
                               check_open: Callable[[], None] | None = None
                               ) -> tuple[int, int, list[tuple[BlockId, Entry, CommitSpec]]]:
        """:meth:`commit` for a vouched commit too large to check on the loop
        (more than VERIFY_INLINE_BYTES): its blocks are stored at once, pinned,
        and the check is left for after the answer (:meth:`check_answered`,
        which the caller must run whatever happens: it unpins). Safe because a shared
        arena's bytes are checked on every way out (a Get, an L2 write, an L3
        upload; a shared-memory reader checks its copy): until the check, a
        bad block can be found, never served. Where that does not hold for
        the answer (acknowledged beyond ``memory``, or every write to L2
        first), and for block-format blocks (reads check their checksum, not
        their format), the commit is checked first, as :meth:`commit`; so is
        one small enough to check on the loop. The list of checks left is
        then empty."""
        if ack != AckLevel.MEMORY or not self.store.acked_now() or \
                sum(spec.size for spec in specs) <= VERIFY_INLINE_BYTES or \
                any(spec.format != BlockFormat.RAW for spec in specs):
            return (*await self.commit(namespace, ack, specs, abandon, owner, session=session,
                                       check_open=check_open), [])
        taken = self._take(namespace, ack, specs, abandon, owner, session)
        left: list[tuple[BlockId, Entry, CommitSpec]] = []
        nbytes = 0
        pin = self.store.index.pin_reader
        try:
            for spec, r in taken:
                if check_open is not None and left:  # (after an await: as commit's)
                    check_open()
                entry = self.placement.commit(r.block, r.size, spec.checksum, r.offset, r.session)
                pin(entry)  # its extent stays this block's until checked
                left.append((r.block, entry, spec))
                nbytes += r.size
                await self.store.make_durable(r.block, entry, ack)
        except BaseException:
            for _, entry, _ in left:  # stored, unchecked: reads check them
                self.store.index.unpin_reader(entry)
            self._release_taken(taken[len(left):])
            raise
        return len(taken), nbytes, left

    async def check_answered(self, left: Sequence[tuple[BlockId, Entry, CommitSpec]]) -> None:
        """The checks :meth:`commit_unchecked` left: each block's checksum,
        off the loop. A block that fails is dropped as a corrupt L1 copy
        (counted and logged, as one a read finds). Cancelled or failing, it
        only unpins: the blocks stay, and reads check them."""
        index = self.store.index
        try:
            sums = await self._sums_off_loop([(entry.l1_offset, entry.size)
                                              for _, entry, _ in left])
            bad = [(block, entry, f"client said {spec.checksum:#010x}, slot holds {got:#010x}")
                   for (block, entry, spec), got in zip(left, sums, strict=True)
                   if got != spec.checksum]
        finally:
            for _, entry, _ in left:
                index.unpin_reader(entry)
        for block, entry, why in bad:
            if entry.dead or index.blocks.get(block) is not entry:
                continue  # deleted or replaced meanwhile: nothing of it is left to drop
            self.store.reads.check.drop_corrupt(block, entry,
                                                f"the check of an answered commit: {why}")

    async def _sums_off_loop(self, extents: Sequence[tuple[int, int]]) -> list[int]:
        """The CRC-32C of each L1 extent (offset, size), one executor task
        each (the native CRC releases the GIL: they run in parallel)."""
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(
            loop.run_in_executor(self.store.executor, _checksum_of, self.store.l1, offset, size)
            for offset, size in extents)))

    def commit_now(self, namespace: str, ack: AckLevel, specs: Sequence[CommitSpec],
                   abandon: Sequence[int], owner: str = "", *,
                   session: str | None = None) -> tuple[int, int] | None:
        """:meth:`commit` on the spot, for a commit that needs no waiting: at
        most VERIFY_INLINE_BYTES in all (checked here, as :meth:`commit` checks
        it), acknowledged at ``memory``, no overwrite that waits for its old
        L2 copy's delete, no write-back that waits for the writer. Otherwise
        None, having changed nothing. Errors are :meth:`commit`'s, with the
        same effects."""
        taken = self.take_now(namespace, ack, specs, abandon, owner, session=session)
        return None if taken is None else self.store_taken(taken)

    def take_now(self, namespace: str, ack: AckLevel, specs: Sequence[CommitSpec],
                 abandon: Sequence[int], owner: str = "", *,
                 session: str | None = None) -> list[tuple[CommitSpec, Reservation]] | None:
        """The first half of :meth:`commit_now`: its conditions and
        :meth:`commit`'s checks of the slots named (errors as there); the
        reservations taken, or None having changed nothing. The caller
        finishes with :meth:`store_taken`, or, for a commit it answered
        first, :meth:`store_vouched`, before anything else runs on the loop."""
        if ack != AckLevel.MEMORY or not self.store.acked_now() or \
                sum(spec.size for spec in specs) > VERIFY_INLINE_BYTES:
            return None
        reservations = self._reservations
        for spec in specs:
            r = reservations.get(spec.slot_id)
            if r is not None and self.placement.replace_waits(
                    r.block if r.block[1] else (r.block[0], spec.key)):
                return None
        return self._take(namespace, ack, specs, abandon, owner, session)

    def store_taken(self, taken: Sequence[tuple[CommitSpec, Reservation]]) -> tuple[int, int]:
        """Check the blocks :meth:`take_now` took and make them visible:
        (stored, bytes). A block failing its checksum or format: nothing of
        the commit is stored, its slots are released, and the error raised."""
        try:
            self._verify_now(taken)
        except BaseException:
            self._release_taken(taken)
            raise
        nbytes = 0
        for spec, r in taken:
            self.placement.commit(r.block, r.size, spec.checksum, r.offset, r.session)
            nbytes += r.size
        # After every block is in: the write-back it may start could
        # otherwise take the old copy of a key committed later in the same
        # call, whose overwrite take_now found needed no L2 delete.
        self.store.make_durable_now()
        return len(taken), nbytes

    def answers_vouched(self) -> bool:
        """Whether a vouched commit may be answered before its check: not
        with an L3 tier, where a key this node does not index may have older
        bytes, which a commit failing its check could not remove on the spot."""
        return self.store.l3 is None

    def store_vouched(self, taken: Sequence[tuple[CommitSpec, Reservation]]) -> bool:
        """:meth:`store_taken` for a commit already answered as stored (its
        client vouched for its checksums, header flag SHM_VOUCHED). A commit
        that fails its checks stores nothing, and each key it named loses its
        earlier block too: the client was told those were replaced, so the
        next Get misses instead of serving the old bytes. Counted as corrupt
        L1 copies and logged; whether it was stored."""
        try:
            self.store_taken(taken)
            return True
        except KVStoreError as exc:
            for _, r in taken:
                self.placement.drop_replaced(r.block)
            self.placement.stats.counters[TierName.L1].corrupt += len(taken)
            self._vouched_log.note(
                f"{len(taken)} block(s), first key {taken[0][1].block[0]}/"
                f"{taken[0][1].block[1].hex()[:16]}: not stored, and no earlier bytes of "
                f"their keys served ({exc.message})")
            return False

    def _take(self, namespace: str, ack: AckLevel, specs: Sequence[CommitSpec],
              abandon: Sequence[int], owner: str, session: str | None
              ) -> list[tuple[CommitSpec, Reservation]]:
        """A commit's checks; the reservations it takes (no longer open), the
        slots in ``abandon`` given up. A client naming memory it was not given
        loses what it named."""
        self.check_namespace(namespace)
        self.store.check_ack(ack)
        for what, ids in (("blocks", specs), ("slots to abandon", abandon)):
            if len(ids) > MAX_KEYS_PER_REQUEST:
                raise InvalidArgument(f"a ShmCommit names {len(ids)} {what}; at most "
                                      f"{MAX_KEYS_PER_REQUEST} (split it)")
        named = [spec.slot_id for spec in specs] + list(abandon)
        # Someone else's slots: refused before anything changes (theirs stay valid).
        self._check_owner(named, namespace, owner)
        if len(set(named)) != len(named):
            seen: set[int] = set()
            twice = next(i for i in named if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            for slot_id in set(named):
                self._drop_reservation(slot_id)
            raise InvalidArgument(
                f"slot id {twice} is named twice in one ShmCommit (blocks and abandon): "
                "nothing was committed and the slots named were given up")
        for slot_id in abandon:
            self._drop_reservation(slot_id)
        taken: list[tuple[CommitSpec, Reservation]] = []
        try:
            for i, spec in enumerate(specs):
                r = self._reservations.get(spec.slot_id)
                if r is None:
                    raise InvalidArgument(
                        f"block #{i}: slot id {spec.slot_id} is not reserved: unknown, "
                        f"expired (reservations live {self.reserve_ms} ms), or given up "
                        "(abandoned, or named by a commit that failed: a failed commit gives "
                        "up every slot it names; reserve again)")
                if spec.offset != r.offset or spec.size != r.size:
                    raise InvalidArgument(
                        f"block #{i}: offset {spec.offset} and size {spec.size} do not match "
                        f"slot {spec.slot_id} (offset {r.offset}, size {r.size})")
                _bind_key(r, spec, i, session)
                taken.append((spec, r))
        except InvalidArgument:
            for spec in specs:
                self._drop_reservation(spec.slot_id)
            raise
        for spec, _ in taken:
            self._forget_reservation(spec.slot_id)
        return taken

    def _verify_now(self, taken: Sequence[tuple[CommitSpec, Reservation]]) -> None:
        """A small commit's checks, on this thread: every block's checksum,
        then the format of its block-format blocks."""
        self._check_sums(taken, [_checksum_of(self.store.l1, r.offset, r.size)
                                 for _, r in taken])
        for i, (spec, r) in enumerate(taken):
            if spec.format == BlockFormat.KV_V1:
                self.placement.verify_block_now(r.offset, r.size, i)

    def _check_sums(self, taken: Sequence[tuple[CommitSpec, Reservation]],
                    sums: Sequence[int]) -> None:
        bad = [i for i, ((spec, _), got) in enumerate(zip(taken, sums, strict=True))
               if got != spec.checksum]
        if bad:
            spec0 = taken[bad[0]][0]
            raise CorruptBlock(
                f"{len(bad)} block(s) failed their CRC-32C check (first: block #{bad[0]}, slot "
                f"{spec0.slot_id}: client said {spec0.checksum:#010x}, slot holds "
                f"{sums[bad[0]]:#010x}); nothing of this commit was stored")

    def _release_taken(self, taken: Sequence[tuple[CommitSpec, Reservation]]) -> None:
        for _, r in taken:
            self.placement.release(r.offset, r.size)

    async def restock(self, namespace: str, sizes: Sequence[int], owner: str = ""
                      ) -> tuple[list[Slot], int]:
        """Anonymous slots of ``sizes`` for the owner's next Puts, and how
        long (ms) their reservation was open (as :meth:`reserve`). Best effort:
        at most RESTOCK_MAX_SLOTS slots and 1/RESTOCK_MAX_L1_SHARE of L1 (a
        leading part of ``sizes``), and none when L1 has no room within
        RESTOCK_WAIT_SECONDS. Call :meth:`check_restock` first."""
        granted = self._restock_sizes(sizes)
        if not granted:
            return [], 0
        try:
            async with asyncio.timeout(RESTOCK_WAIT_SECONDS):
                return await self.reserve(namespace, [(b"", n) for n in granted], None, owner)
        except (TimeoutError, CapacityExhausted):
            return [], 0

    def restock_now(self, namespace: str, sizes: Sequence[int], owner: str = "") -> list[Slot]:
        """:meth:`restock` without waiting: the slots L1 has room for now
        (evicting what can leave at once), a leading part of those asked."""
        slots: list[Slot] = []
        expires = self.clock() + self.reserve_ms / 1000.0
        for size in self._restock_sizes(sizes):
            offset = self.placement.reserve_now(size, namespace)
            if offset < 0:
                break
            slots.append(self._grant((namespace, b""), offset, size, None, owner, expires))
        return slots

    def _restock_sizes(self, sizes: Sequence[int]) -> list[int]:
        """The leading part of ``sizes`` a restock grants at most: within
        1/RESTOCK_MAX_L1_SHARE of L1, and the anonymous slots of every owner
        together within 1/RESTOCK_TOTAL_L1_SHARE (each restock's share alone
        let one client's stock of ten sizes fill an 8 MiB L1, and twelve
        clients' a 64 MiB one: every Put of every client then waited 30 s
        and failed)."""
        capacity = self.store.l1.capacity
        budget = min(capacity // RESTOCK_MAX_L1_SHARE,
                     capacity // RESTOCK_TOTAL_L1_SHARE - self._anonymous_bytes)
        granted: list[int] = []
        for size in sizes[:RESTOCK_MAX_SLOTS]:
            if size > budget:
                break
            budget -= size
            granted.append(size)
        return granted

    def check_restock(self, sizes: Sequence[int]) -> None:
        """Each of ``sizes`` a valid block size (before a commit that restocks)."""
        for i, size in enumerate(sizes):
            try:
                self.placement.check_block_size(size)
            except InvalidArgument as exc:
                raise exc.about(f"reserve_next #{i}") from None

    # -- Get ---------------------------------------------------------------------------

    @staticmethod
    def _tenant(namespace: str, identity: str) -> str:
        """Whose share a lease counts in: the caller's identity under
        auth.tokens_file, else the namespace (no name of one is the other's:
        the prefixes differ)."""
        return f"identity {identity!r}" if identity else f"namespace {namespace!r}"

    def _check_acquire(self, namespace: str, keys: Sequence[bytes],
                       release: Sequence[int], tenant: str) -> None:
        """What :meth:`acquire` and :meth:`acquire_now` check before anything
        changes: the namespace, the keys, and room for their leases."""
        self.check_namespace(namespace)
        validate_keys(keys)
        leases = self._leases
        wanted = len(keys)
        if self._leases_of[tenant] + self._pending_of[tenant] + wanted <= \
                MAX_LEASES_PER_TENANT and len(leases) + self._pending + wanted <= MAX_LEASES:
            return  # within both bounds before any release counts
        # Only the ids held now count as room given back: the release skips
        # unknown ones (a client could otherwise name never-issued ids to
        # pass the bound).
        given_back = {i for i in release if i in leases} if release else set()
        mine = self._leases_of[tenant] + self._pending_of[tenant] - \
            sum(1 for i in given_back if leases[i].tenant == tenant)
        if mine + len(keys) > MAX_LEASES_PER_TENANT:
            per = "identity" if tenant.startswith("identity") else "namespace"
            raise CapacityExhausted(
                f"{tenant} holds {mine} shared-memory leases (acquires under way included), "
                f"{len(keys)} more asked for: "
                f"at most {MAX_LEASES_PER_TENANT} per {per}; release leases (ShmRelease) "
                "or read by Get")
        if len(leases) + self._pending - len(given_back) + len(keys) > MAX_LEASES:
            raise CapacityExhausted(
                f"the server's shared-memory leases are all held ({len(keys)} more asked for; "
                f"at most {MAX_LEASES} at once, all clients together): release leases "
                "(ShmRelease) or read by Get")

    async def acquire(self, namespace: str, keys: Sequence[bytes], session: str | None,
                      lease_ms: int, release: Sequence[int] = (), owner: str = "",
                      identity: str = ""
                      ) -> tuple[list[Lease | Unleased | None], int, list[int]]:
        """Lease ``keys``; first end the leases in ``release`` (checked as
        :meth:`release` checks them: a bad id fails the call before anything is
        released or acquired). Returns the leases (None for a miss, Unleased
        for a block found where no lease can reach it now) and what
        :meth:`release` returns for ``release``. ``identity``: the caller's
        under auth.tokens_file (its share of the leases; else the namespace's)."""
        tenant = self._tenant(namespace, identity)
        self._check_acquire(namespace, keys, release, tenant)
        released = 0
        expired: list[int] = []
        if release:
            released, expired = self.release(
                release, namespace, owner,
                what="ShmAcquire.release: nothing was released or acquired",
                skip_unknown=True)
        ms = self.lease_ms(lease_ms)
        out: list[Lease | Unleased | None] = []
        held = 0  # L1 bytes (whole pages) this call's leases pin
        limit = self.store.l1.capacity
        extent = self.store.l1.extent
        no_room = False  # a block of this call found no L1 room: the later ones neither
        pending = len(keys)  # (counted while the call waits: see _pending)
        self._pending_of[tenant] += pending
        self._pending += pending
        try:
            for key in keys:
                try:
                    entry_now = self.store.index.entry((namespace, key))
                    if entry_now is not None and entry_now.l1_offset < 0 and \
                            (entry_now.l2 or entry_now.l3) and \
                            (no_room or held + extent(entry_now.size) > limit):
                        # No L1 room for it: it would wait (a second) for room this
                        # call's own leases hold, or could never fit beside them.
                        # Found and not leased: the client reads it the way that
                        # holds no lease. (One ShmClient.get of 20 x 4 MiB with 64
                        # MiB of L1 was refused, then waited out its timeout.)
                        no_room = True
                        out.append(Unleased(TierName.L2 if entry_now.l2 else TierName.L3))
                        continue
                    reader = await self.store.open_read((namespace, key), session)
                    if reader is None:
                        out.append(None)
                        continue
                    entry = reader.entry
                    if entry is None or entry.l1_offset < 0:
                        # Served from a copy outside the arena (no L1 room): not
                        # shareable, but there (a miss made engines recompute it).
                        out.append(Unleased(reader.tier))
                        reader.close()
                        # (the client's Get of it counts the read: it was counted twice)
                        self.store.reads.uncount(reader)
                        no_room = True
                        continue
                    lease_id = self._new_id(self._leases)  # type: ignore[arg-type]
                    # Not reaped while the call still waits for later keys: the
                    # lease runs from when the client gets it (set below).
                    lease = Lease(lease_id, entry.l1_offset, entry.size, entry.checksum,
                                  entry.generation, reader.tier, math.inf,
                                  reader, namespace, owner, tenant)
                    self._leases[lease_id] = lease
                    self._leases_of[tenant] += 1
                    held += extent(entry.size)
                    out.append(lease)
                finally:
                    # (its lease, if any, counts as held now)
                    pending -= 1
                    self._pending_of[tenant] -= 1
                    self._pending -= 1
        except BaseException:
            for taken in out:
                if isinstance(taken, Lease):
                    self._end_lease(taken.lease_id)
            raise
        finally:
            self._pending -= pending
            left = self._pending_of[tenant] - pending
            if left:
                self._pending_of[tenant] = left
            else:
                del self._pending_of[tenant]
        expires = self.clock() + ms / 1000.0
        for taken in out:
            if isinstance(taken, Lease):
                taken.expires = expires
        return out, released, expired

    def acquire_now(self, namespace: str, keys: Sequence[bytes], session: str | None,
                    lease_ms: int, release: Sequence[int] = (), owner: str = "",
                    identity: str = "") -> tuple[list[Lease], int, list[int]] | None:
        """:meth:`acquire` without waiting (the data plane's answer from the
        readable callback): when every key is an L1 hit with no load of it in
        flight, the same leases (ids, expiry, pins), the same counters and
        policy calls as :meth:`acquire`, and the same release of ``release``
        first. None otherwise, having changed nothing (the caller then takes
        :meth:`acquire`). Raises what :meth:`acquire` raises for a bad
        namespace, key or release id, also before anything changes."""
        tenant = self._tenant(namespace, identity)
        self._check_acquire(namespace, keys, release, tenant)
        store = self.store
        index = store.index
        hot = index.blocks.get  # an L1 copy is always in the full index
        loading = index.loading
        entries = []
        for key in keys:
            entry = hot((namespace, key))
            if entry is None or entry.l1_offset < 0 or (loading and (namespace, key) in loading):
                return None
            entries.append(entry)
        released = 0
        expired: list[int] = []
        if release:
            # Checks every id before it ends any (raises with nothing changed).
            released, expired = self.release(
                release, namespace, owner,
                what="ShmAcquire.release: nothing was released or acquired",
                skip_unknown=True)
        # Ending those leases unpinned blocks but evicted none (eviction is a
        # placement's, on the loop): the entries found above are still in L1.
        expires = self.clock() + self.lease_ms(lease_ms) / 1000.0
        count_hit = store.reads.count_l1_hit
        drop_corrupt = store.reads.drop_read_corrupt
        pin, unpin = index.pin_reader, index.unpin_reader
        arena = store.l1
        leases = self._leases
        out: list[Lease] = []
        for key, entry in zip(keys, entries, strict=True):
            block = (namespace, key)
            # As open_read's L1 hit: counted, told to the policy, pinned.
            count_hit(block, session)
            pin(entry)
            reader = BlockReader(arena.slice(entry.l1_offset, entry.size), TierName.L1,
                                 functools.partial(unpin, entry), entry, block,
                                 functools.partial(drop_corrupt, block, entry, TierName.L1))
            lease_id = self._new_id(leases)  # type: ignore[arg-type]
            lease = Lease(lease_id, entry.l1_offset, entry.size, entry.checksum,
                          entry.generation, TierName.L1, expires, reader, namespace, owner,
                          tenant)
            leases[lease_id] = lease
            out.append(lease)
        self._leases_of[tenant] += len(out)
        return out, released, expired

    def lease_ms(self, requested: int) -> int:
        """The lease time granted for a request of ``requested`` ms (0: the default)."""
        return min(requested or self.default_lease_ms, self.max_lease_ms)

    def _end_lease(self, lease_id: int) -> Lease | None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            lease.reader.close()
            left = self._leases_of[lease.tenant] - 1
            if left:
                self._leases_of[lease.tenant] = left
            else:
                del self._leases_of[lease.tenant]
        return lease

    def _holder(self, lease_id: int) -> tuple[str, str] | None:
        lease = self._leases.get(lease_id)
        if lease is not None:
            return lease.namespace, lease.owner
        return self._expired.get(lease_id)

    def release(self, lease_ids: Sequence[int], namespace: str = "", owner: str = "", *,
                what: str = "nothing was released",
                skip_unknown: bool = False) -> tuple[int, list[int]]:
        """End leases (ShmRelease, or ShmAcquire's ``release``): all ids are
        checked first, and one that this server never issued, or already
        released, fails the whole call with nothing released; so does one
        taken by another namespace or owner (PERMISSION_DENIED).

        ``skip_unknown`` (ShmAcquire's ``release``: leases whose copies the
        client already found good, handed on to the next acquire): ids not
        held are skipped instead. Such an id may have been released by an
        earlier acquire whose answer never came (a timeout), or with its
        data-plane session; failing the client's next Get for it helps no
        one. Foreign ids still fail the call."""
        self._require()
        done = self._release_own(lease_ids, namespace, owner)
        if done is not None:
            return done
        if skip_unknown:
            lease_ids = list(dict.fromkeys(i for i in lease_ids if self._holder(i) is not None))
        holders = [self._holder(i) for i in lease_ids]
        unknown = [i for i, h in zip(lease_ids, holders, strict=True) if h is None]
        if not unknown and len(set(lease_ids)) != len(lease_ids):
            seen: set[int] = set()
            for i in lease_ids:
                if i in seen:
                    unknown.append(i)  # named twice: the second would be a release of a
                    break              # lease already released
                seen.add(i)
        if unknown:
            raise InvalidArgument(
                f"{len(unknown)} lease id(s) were never issued by this server or were "
                f"already released (first: {unknown[0]}); {what}")
        foreign = [i for i, h in zip(lease_ids, holders, strict=True)
                   if h != (namespace, owner)]
        if foreign:
            raise PermissionDenied(
                f"{len(foreign)} lease id(s) were taken by another client or namespace "
                f"(first: {foreign[0]}); {what}")
        released = 0
        expired: list[int] = []
        now = self.clock()
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id)
            if lease is None or lease.expires < now:
                self._expire(lease_id, namespace, owner)
                expired.append(lease_id)
            else:
                self._end_lease(lease_id)
                released += 1
        return released, expired

    def _release_own(self, lease_ids: Sequence[int], namespace: str,
                     owner: str) -> tuple[int, list[int]] | None:
        """:meth:`release` when every id is a distinct lease this caller
        holds and that has not run out (a Get's leases handed on to the next
        acquire: every shared-memory Get's case), with the checks it needs
        only; None otherwise, having changed nothing (the general path then
        says what is wrong, or skips, or records the expired)."""
        leases = self._leases
        now = self.clock()
        for lease_id in lease_ids:
            lease = leases.get(lease_id)
            if lease is None or lease.expires < now or lease.owner != owner or \
                    lease.namespace != namespace:
                return None
        if len(lease_ids) > 1 and len(set(lease_ids)) != len(lease_ids):
            return None
        for lease_id in lease_ids:
            self._end_lease(lease_id)
        return len(lease_ids), []

    def end_session(self, slot_ids: Sequence[int], lease_ids: Sequence[int],
                    owner: str) -> tuple[int, int]:
        """A data-plane session closed (issue 14): give up its reservations
        still open (quarantined, as expired ones are: its writer may still be
        copying) and release its leases still held. Ids already committed,
        released, expired or held by another owner are skipped. Returns
        (reservations given up, leases released)."""
        now = self.clock()
        dropped = released = 0
        for slot_id in slot_ids:
            r = self._reservations.get(slot_id)
            if r is not None and r.owner == owner:
                self._forget_reservation(slot_id)
                self._quarantine.append((now + self.quarantine_ms / 1000.0, r.offset, r.size))
                dropped += 1
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id)
            if lease is not None and lease.owner == owner:
                # Recorded as expired: a copy still being made under it may be
                # stale now, which its release (over gRPC or another session)
                # then says (StaleLease in the SDK), rather than "unknown id".
                self._expire(lease_id, lease.namespace, owner)
                released += 1
        return dropped, released

    # -- expiry ------------------------------------------------------------------------

    def _expire(self, lease_id: int, namespace: str, owner: str) -> None:
        self._end_lease(lease_id)
        self._expired[lease_id] = (namespace, owner)
        while len(self._expired) > _EXPIRED_MEMORY:
            self._expired.popitem(last=False)

    def reap(self) -> None:
        now = self.clock()
        for lease_id, lease in [(i, lease) for i, lease in self._leases.items()
                                if lease.expires < now]:
            self._expire(lease_id, lease.namespace, lease.owner)
        for slot_id in [i for i, r in self._reservations.items() if r.expires < now]:
            # Its writer may still be copying (slow, not gone): the extent
            # waits in quarantine before anything else may use it.
            r = self._reservations[slot_id]
            self._forget_reservation(slot_id)
            self._quarantine.append((now + self.quarantine_ms / 1000.0, r.offset, r.size))
        while self._quarantine and self._quarantine[0][0] <= now:
            _, offset, size = self._quarantine.popleft()
            self.placement.release(offset, size)

    async def _reap_forever(self) -> None:
        period = max(0.01, min(self.reserve_ms, self.default_lease_ms) / 4000.0)
        while True:
            await asyncio.sleep(period)  # a periodic sweep, not synchronisation
            self.reap()

    @property
    def leases(self) -> int:
        return len(self._leases)

    @property
    def reservations(self) -> int:
        return len(self._reservations)

    @property
    def quarantined(self) -> int:
        """Extents of expired reservations not yet back in the arena."""
        return len(self._quarantine)


def _bind_key(r: Reservation, spec: CommitSpec, index: int, session: str | None) -> None:
    """Bind an anonymous slot to the key (and session) its commit names; a
    keyed reservation may only be named with its own key."""
    namespace, key = r.block
    if not key:
        if not spec.key:
            raise InvalidArgument(
                f"block #{index}: slot {spec.slot_id} was reserved without a key, so its "
                "ShmCommitBlock must name one (key)")
        validate_key(spec.key, index)
        r.block = (namespace, spec.key)
        r.session = session
    elif spec.key and spec.key != key:
        raise InvalidArgument(
            f"block #{index}: slot {spec.slot_id} was reserved for another key than the "
            "one its ShmCommitBlock names")


def _checksum_of(arena: MemoryTier, offset: int, size: int) -> int:
    view = arena.slice(offset, size)
    try:
        return checksum(view)
    finally:
        view.release()
