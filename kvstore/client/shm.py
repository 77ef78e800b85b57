"""Same-host client: block bytes through the server's shared-memory arena.

``ShmClient`` is a :class:`kvstore.Client` whose ``put``, ``get`` and
``get_into`` move bytes through the L1 arena the server keeps in a
shared-memory file, so they never cross the socket; their control messages
go as data-plane frames on the server's unix socket when it offers the data
plane (below), else as gRPC calls, and every other call as :class:`Client`
makes it. It needs a server started with ``l1.shm_path`` on the same host, and
the permission to open that file (the service's own user).

Put: reserve slots, copy each block into its slot while computing its
CRC-32C in the same pass, commit (the server checks offsets and sizes and
verifies each checksum before the block becomes visible). Get: acquire leases,
copy out while checksumming, compare with the lease's checksum, release; a
lease that expired before its release means the copy may be stale, and the
call raises :class:`StaleLease` rather than return it.

One round trip per Get: when the copy ends less than the lease's time after
the ShmAcquire was sent, the lease cannot have expired during it (the server
starts the lease's clock only after the request arrived), so ``get``,
``get_into`` and ``get_kv_into`` do not call ShmRelease: they hand the lease
ids to the next ShmAcquire, which ends them before acquiring
(``ShmAcquireRequest.release``). A copy that took longer is released at once,
as before, and checked for expiry. Leases still held this way are released
by :meth:`ShmClient.close` (or :meth:`ShmClient.flush_releases`), and expire
on the server if the client dies. Until then they keep that one batch of
blocks in L1. ``release_on_acquire=False``, or a server older than this
protocol field, gives the two-RPC path.

One round trip per Put (issue 14): against a server that offers anonymous
slots (``ShmAttachResponse.anonymous_slots``), ``put`` and ``put_kv`` keep a
small stock of slots reserved without a key (:mod:`kvstore.client._shmstock`),
refilled by each ShmCommit (``reserve_next``). A Put whose sizes the stock
covers is a copy and one ShmCommit; the first Put of a size reserves as
before. ``slot_stock=False``, or an older server, gives ShmReserve +
ShmCommit every time. ``close`` abandons the slots still in stock.

Over the data plane (the default when the server offers it), ``put``,
``get``, ``get_into`` and the leases take a lean path
(:class:`kvstore.client.shm_dataplane.ShmFrames`): frames built straight
from the arguments, and the same one round trip per Put with the stock kept
per data-plane session (the extended SHM_COMMIT, docs/dataplane.md; a server
without it gets SHM_RESERVE + SHM_COMMIT). ``get_into`` into buffers of at
most ``inline_get_bytes`` (64 KiB) reads the blocks inline as GET frames
instead (for small blocks one GET costs less than lease + copy + release;
the server verifies them before sending), and ``get`` does the same when the
previous ``get``'s largest block was that small. Leases a Get left for the
next acquire stay held until then (or ``close``), or expire on the server.

For packing straight into shared memory (no intermediate buffer), use
``reserve``/``commit`` and ``acquire``/``release`` directly.

Reservations and leases are bound to the namespace and to this client's
attach (the owner secret from ShmAttach): no other client can commit, abandon
or release them. A reserved slot is the client's to write only until its
reservation's deadline (``ReservedSlot.deadline``); past it the client refuses
to write or commit it (:class:`~kvstore.errors.ReservationExpired`), since the
server may have taken the slot back.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

import grpc

from kvstore._impl import checksum, copy_and_checksum, pack
from kvstore.client import kv
from kvstore.client._base import check_block_format
from kvstore.client._calldriver import CallJob
from kvstore.client._common import (
    DEFAULT_TARGET,
    BlockBuffers,
    Blocks,
    KeyLike,
    PutResult,
    block_view,
    check_integer,
    check_lease_ms,
    check_session_id,
    normalize_blocks,
    normalize_buffers,
    normalize_key,
    normalize_keys,
    parse_ack,
    resolve_namespace,
)
from kvstore.client._errors import closed_in_flight, error_from_rpc
from kvstore.client._shmstock import SlotStock
from kvstore.client.shm_dataplane import ShmFrames, route_shm_calls
from kvstore.client.sync import Client, SyncClientSettings
from kvstore.dataplane import frames
from kvstore.errors import (
    BufferTooSmall,
    CapacityExhausted,
    ConnectionFailed,
    CorruptBlock,
    InvalidArgument,
    KVStoreError,
    ReservationExpired,
    StaleLease,
)
from kvstore.types import ARENA_MARKER_PREFIX, MAX_KEYS_PER_REQUEST, BlockFormat, TierName
from kvstore.wire.pb import kvstore_pb2 as pb

if TYPE_CHECKING:
    from typing_extensions import Unpack

_SERVICE = "/kvstore.v1.KVStore/"
# Bytes per ShmCommit when a Put is pipelined.
_COMMIT_GROUP = 16 * 1024 * 1024
# A Put or Get moving at least this many bytes in all copies its blocks with
# streaming (non-temporal) stores: the batch is larger than what the cache
# would keep for the reader anyway, and skipping the read of the destination
# lines makes the copy 15-20 % faster (measured on the development machine:
# 32 MiB batches of 4 MiB blocks, Get copies into reused buffers 16.4 -> 19.5
# GB/s; ShmClient.put 6.0 -> 7.2 GB/s, Get 8.6 -> 11.4 GB/s end to end).
_STREAM_BATCH_BYTES = 8 * 1024 * 1024
# A Get copying at least this many bytes out of shared memory uses streaming
# stores, from one block up: the destination is the caller's buffer (bound for
# a GPU, or for the next layer), rarely read back by this CPU at once, and the
# copy no longer reads each destination line before writing it. Measured one
# 1 MiB block per call over 64 destination buffers, alternating rounds in one
# process: p50 356 -> 224 us and 433 -> 296 us; 256 KiB 115 -> 103 us; a
# single reused (cache-hot) destination 128 -> 120 us; 4 MiB 589 -> 498 us.
_STREAM_GET_BYTES = 256 * 1024
# A Put copying at least this many bytes into shared memory uses streaming
# stores too. The server reads the slot right after (its CRC check), so the
# bytes it reads come from memory instead of this core's cache; on the first
# development machine the two choices measured the same (1 MiB: 339 vs 343
# us), on the second (memcpy 6-9 GB/s) streaming won, alternating rounds in
# one process, 8 each: 1 MiB 2.46 -> 2.72 GB/s, 4 MiB 2.89 -> 3.42, 256 KiB
# 1.25 both (docs/performance.md).
_STREAM_PUT_BYTES = 256 * 1024
# A lease's release is left to the next ShmAcquire only if the copy under it
# ended this long (s) before the lease's time, counted from before the
# ShmAcquire was sent, ran out.
_LEASE_MARGIN = 0.005
#: The leases a client's Gets leave for its next ShmAcquire pin at most
#: 1/_DEFERRED_SHARE of L1; past that a Get releases its own at once.
_DEFERRED_SHARE = 8
# A slot is written or committed only if this much (s) of its reservation's
# time, counted from before the ShmReserve was sent, is left.
_RESERVE_MARGIN = 0.005
# get_into reads blocks inline over the data plane (GET frames) when every
# buffer is at most this large (ShmClient.inline_get_bytes; measured in
# docs/dataplane.md, "Shared memory or inline").
INLINE_GET_BYTES = 64 * 1024
_TIERS = {1: TierName.L1, 2: TierName.L2, 3: TierName.L3}
# Statuses of a call the server did not answer.
_NO_ANSWER = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})


@dataclass(slots=True)
class ReservedSlot:
    """A reserved slot: write the block into ``view``, then commit."""

    key: bytes
    slot_id: int
    offset: int
    size: int
    view: memoryview
    #: time.monotonic() after which the slot may be the server's again: the
    #: client neither writes nor commits it then.
    deadline: float = float("inf")
    #: Reserved without a key (from the stock): its commit names ``key``.
    anonymous: bool = False

    def check_writable(self) -> None:
        """Raise ReservationExpired if the reservation's time is (nearly) up."""
        if time.monotonic() >= self.deadline:
            raise ReservationExpired(
                f"the reservation of slot {self.slot_id} (key {self.key.hex()[:16]}) ran out "
                "before its block was written and committed: the server may reuse the slot, "
                "so it is not written; reserve again")


@dataclass(slots=True)
class LeasedBlock:
    """A leased block: ``view`` is valid until the lease is released. A
    ``lease_id`` of 0 is no lease: ``view`` is then a private copy, read by a
    plain Get, of a block the server holds outside L1 and had no L1 room to
    bring in for a lease (every page leased or reserved); releasing it ends
    nothing on the server."""

    key: bytes
    lease_id: int
    size: int
    crc32c: int
    tier: TierName | None
    view: memoryview
    namespace: str = ""


class _Unleased(NamedTuple):
    """A key ShmAcquire found (in ``tier``) but could not lease."""
    pos: int
    key: bytes
    tier: TierName | None


def _check_arena_marker(fd: int, info: Any, target: str) -> None:
    """ConnectionFailed unless the file open at ``fd`` holds the instance id the
    server answered at ``info.marker_offset`` (servers before 0.21.0 write
    none: nothing to check). A client that reached a server on another host
    through a forward would otherwise map whatever file has the same path
    here, another server's arena, and write into its blocks."""
    if not info.marker_offset:
        return
    expected = ARENA_MARKER_PREFIX + info.instance.encode()
    found = os.pread(fd, len(expected), info.marker_offset)
    if found != expected:
        raise ConnectionFailed(
            f"{info.path} on this host is not the shared-memory arena of the server at "
            f"{target} (another server's, or a stale file): ShmClient works only on the "
            "server's own host; use Client from other hosts")


_Method = TypeVar("_Method", bound="Callable[..., Any]")


def _closable(method: _Method) -> _Method:
    """A ShmClient call that ``close()`` may overtake in another thread: the
    arena's mapping goes, and what the call was doing with it fails as
    ConnectionFailed (it raised a bare ValueError, "operation forbidden on
    released memoryview object"); a call begun after ``close()`` raises
    ValueError("the client is closed"), as every client's does."""

    @functools.wraps(method)
    def call(self: ShmClient, *args: Any, **kwargs: Any) -> Any:
        if self._shm_closed:
            raise ValueError("the client is closed")
        try:
            return method(self, *args, **kwargs)
        except (ValueError, BufferError) as exc:
            if self._shm_closed and not isinstance(exc, KVStoreError):
                raise closed_in_flight(self.target) from None
            raise

    return cast(_Method, call)


def _summed(results: Iterable[PutResult]) -> PutResult:
    stored = nbytes = 0
    for r in results:
        stored += r.stored
        nbytes += r.bytes
    return PutResult(stored, nbytes)


#: The largest arena a ShmClient maps with its page tables made at attach.
POPULATE_MAX = 4 * 1024**3


class ShmClient(Client):
    """See the module's docstring. ``release_on_acquire`` (default on) lets
    the Gets hand their leases to the next ShmAcquire instead of calling
    ShmRelease, when the server supports it. When the server offers the
    data plane (and ``data_plane`` is not False), the control calls are
    frames on its unix socket (kvstore/client/shm_dataplane.py). Either way
    ``slot_stock`` (default on) keeps anonymous slots for the next Puts (one
    round trip per Put), when the server supports them."""

    def __init__(self, target: str = DEFAULT_TARGET, *, release_on_acquire: bool = True,
                 slot_stock: bool = True, **settings: Unpack[SyncClientSettings]) -> None:
        self._want_release_on_acquire = release_on_acquire
        self._want_slot_stock = slot_stock
        super().__init__(target, **settings)

    _shm_closed = False  # close() began: the arena's mapping is going or gone

    def _connect(self) -> None:
        super()._connect()
        # Lease ids whose release waits for the next ShmAcquire, with the
        # monotonic time after which the server will have expired them anyway
        # and their namespace (an acquire ends only its own namespace's).
        self._deferred: list[tuple[int, float, str, int]] = []  # (+ the block's size)
        self._deferred_lock = threading.Lock()
        self._deferred_pid = os.getpid()  # the process whose leases those are
        ch = self._channel

        def rpc(name: str, req: Any, resp: Any) -> Any:
            return ch.unary_unary(_SERVICE + name, request_serializer=req.SerializeToString,
                                  response_deserializer=resp.FromString)

        self._attach = rpc("ShmAttach", pb.ShmAttachRequest, pb.ShmAttachResponse)
        self._reserve = rpc("ShmReserve", pb.ShmReserveRequest, pb.ShmReserveResponse)
        self._commit = rpc("ShmCommit", pb.ShmCommitRequest, pb.ShmCommitResponse)
        self._acquire_rpc = rpc("ShmAcquire", pb.ShmAcquireRequest, pb.ShmAcquireResponse)
        self._release = rpc("ShmRelease", pb.ShmReleaseRequest, pb.ShmReleaseResponse)
        info = self._call(self._attach, pb.ShmAttachRequest(namespace=self.namespace or ""))
        self.shm_path: str = info.path
        self.instance: str = info.instance
        # This attach's secret: every reservation and lease is bound to it.
        self._owner: str = info.owner
        self._reserve_s: float = info.reserve_ms / 1000.0 if info.reserve_ms else float("inf")
        self.release_on_acquire: bool = self._want_release_on_acquire and info.release_on_acquire
        if self._data_plane is not None:  # the four calls as data-plane frames, when offered
            self._reserve, self._commit, self._acquire_rpc, self._release = route_shm_calls(
                self._data_plane, self._owner, self._reserve, self._commit, self._acquire_rpc,
                self._release)
        #: Anonymous slots for the next Puts (None: each Put reserves).
        self.slot_stock: SlotStock | None = \
            SlotStock() if self._want_slot_stock and info.anonymous_slots else None
        self._stock_pid = os.getpid()
        #: Batches moving at least this many bytes are copied with streaming
        #: stores (None: never).
        self.stream_batch_bytes: int | None = _STREAM_BATCH_BYTES
        #: Gets copying at least this many bytes out of shared memory use
        #: streaming stores (None: the ``stream_batch_bytes`` rule).
        self.stream_get_bytes: int | None = _STREAM_GET_BYTES
        #: Puts copying at least this many bytes into shared memory use
        #: streaming stores (None: the ``stream_batch_bytes`` rule).
        self.stream_put_bytes: int | None = _STREAM_PUT_BYTES
        try:
            fd = os.open(info.path, os.O_RDWR)
        except OSError as exc:
            raise ConnectionFailed(
                f"cannot open the shared-memory arena {info.path} of the server at "
                f"{self.target} ({exc.strerror or exc}): ShmClient works only on the server's "
                "own host; use Client from other hosts") from None
        #: The marker page past the blocks, read-only (None: an older server
        #: writes none), and what it held at attach: a server restarted on
        #: the same file after a kill -9 writes its own instance id there.
        self._marker: mmap.mmap | None = None
        self._marker_at = 0
        self._marker_seen = ARENA_MARKER_PREFIX + info.instance.encode()
        try:
            _check_arena_marker(fd, info, self.target)
            # The page tables made up front save a fault per page on first
            # copies, at ~140 ms per GiB of arena at attach: for the whole of
            # a large arena (a 64 GiB one took ~9 s per engine process) its
            # pages fault in as they are first used instead.
            populate = getattr(mmap, "MAP_POPULATE", 0) if info.size <= POPULATE_MAX else 0
            flags = mmap.MAP_SHARED | populate
            self._map = mmap.mmap(fd, info.size, flags=flags)
            if info.marker_offset:
                lead = info.marker_offset % mmap.ALLOCATIONGRANULARITY  # (0: page-aligned)
                self._marker_at = lead
                self._marker = mmap.mmap(fd, lead + len(self._marker_seen), mmap.MAP_SHARED,
                                         mmap.PROT_READ, offset=info.marker_offset - lead)
            st = os.fstat(fd)
            #: The arena file mapped (a restarted server makes a new one).
            self._arena_file = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)
        self._arena = memoryview(self._map)
        #: The lean data-plane path of put, get and the leases (None: gRPC).
        self._frames: ShmFrames | None = None
        if self._data_plane is not None:
            self._frames = ShmFrames(self._data_plane, self._arena, self._reserve_s,
                                     self._want_slot_stock and info.anonymous_slots,
                                     _RESERVE_MARGIN)
        #: get_into into buffers all at most this large reads the blocks inline
        #: over the data plane's socket (GET frames) instead of lease + copy +
        #: release: for small blocks one GET costs less than an SHM_ACQUIRE
        #: (docs/dataplane.md, "Shared memory or inline"). 0: never.
        self.inline_get_bytes: int = INLINE_GET_BYTES
        self._get_hint = 0  # get's largest block last time (0: none yet)
        # Namespaces an acquire has succeeded in: only those are read inline
        # (a namespace that may not use shared memory still says so, as ever).
        self._shm_namespaces: set[str] = set()

    def _streaming(self, nbytes: int) -> bool | None:
        limit = self.stream_batch_bytes
        return True if limit is not None and nbytes >= limit else None

    def _streaming_get(self, nbytes: int) -> bool | None:
        return self._streaming_from(self.stream_get_bytes, nbytes)

    def _streaming_put(self, nbytes: int) -> bool | None:
        return self._streaming_from(self.stream_put_bytes, nbytes)

    def _streaming_from(self, limit: int | None, nbytes: int) -> bool | None:
        if limit is None:
            return self._streaming(nbytes)
        return True if nbytes >= limit else None

    def _call(self, rpc: Any, request: Any, orphan: Callable[[Any], None] | None = None) -> Any:
        metadata = self._metadata()
        try:
            # (the main thread's calls go through the driver: see _calldriver;
            # an interrupted commit goes on, and the next write waits for it;
            # an interrupted call's ``orphan`` gets its answer: see _give_back)
            return self._driver.call(lambda: rpc(request, timeout=self.timeout,
                                                 metadata=metadata), rpc is self._commit, orphan)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target, self.tls) from err

    def _settle_puts(self) -> None:
        super()._settle_puts()
        self._give_back_orphans()

    def _give_back_orphans(self) -> None:
        """Give back the slots of reserves (and of a Put's restocking commit)
        the main thread was interrupted in, once they have been answered:
        else they stayed reserved until ``server.shm_reserve_ms`` ran out,
        and interrupted Puts could fill L1 with them."""
        # (one at a time: a second interrupt while one is given back leaves
        # the others for the next look)
        while (give_back := self._driver.next_orphan()) is not None:
            with contextlib.suppress(Exception):  # they expire on the server anyway
                give_back()

    def _orphan_slots(self, namespace: str, field: str) -> Callable[[Any], None]:
        """An ``orphan`` for a call answered with slots in ``field`` (a
        reserve's ``slots``, a restocking commit's ``next_slots``): abandon them."""
        return lambda resp: self._abandon_ids(namespace, [s.slot_id for s in getattr(resp, field)])

    def _abandon_slots(self, namespace: str | None, slots: Sequence[ReservedSlot]) -> None:
        """:meth:`_abandon_ids` for slots in hand (their views let go)."""
        for s in slots:
            s.view.release()
        self._abandon_ids(resolve_namespace(namespace, self.namespace),
                          [s.slot_id for s in slots])

    def _abandon_ids(self, namespace: str, ids: list[int]) -> None:
        """Give slots back (by id) that no Put will fill. Best effort, and
        quiet: called while an interrupt goes on, whose place an error of
        this call must not take (the slots expire on the server anyway)."""
        if ids:
            with contextlib.suppress(Exception):
                self._call(self._commit, pb.ShmCommitRequest(
                    namespace=namespace, owner=self._owner, abandon=ids))

    def close(self) -> None:
        if self._shm_closed:
            return
        try:
            self.flush_releases()
        except Exception:  # the leases expire on the server anyway
            pass
        if self._frames is not None:
            self._frames.drain()
        self._driver.keep_orphans()
        self._give_back_orphans()
        stock = self._own_stock()
        if stock is not None:
            for ns, ids in stock.drain().items():
                with contextlib.suppress(Exception):  # they expire on the server anyway
                    self._call(self._commit, pb.ShmCommitRequest(
                        namespace=ns, owner=self._owner, abandon=ids))
        self._shm_closed = True  # (from here on: the calls in flight fail ConnectionFailed)
        try:
            self._arena.release()
            self._map.close()
        except (BufferError, AttributeError):
            pass
        if getattr(self, "_marker", None) is not None:
            self._marker.close()  # type: ignore[union-attr]
        super().close()

    # -- Put -------------------------------------------------------------------------

    @_closable
    def reserve(self, sizes: Sequence[tuple[bytes, int]], *, namespace: str | None = None,
                session_id: str | None = None) -> list[ReservedSlot]:
        return self._reserve_slots(sizes, namespace, session_id)

    def _reserve_slots(self, sizes: Sequence[tuple[bytes, int]], namespace: str | None,
                       session_id: str | None) -> list[ReservedSlot]:
        self._check_arena()
        ns = resolve_namespace(namespace, self.namespace)
        # Checked here: protobuf raised a bare TypeError or ValueError for a
        # str key or a negative size, and an empty key reserved an anonymous
        # slot (the stock's kind) that no commit of this key could fill.
        sizes = [(normalize_key(k, i), _check_size(n, i)) for i, (k, n) in enumerate(sizes)]
        req = pb.ShmReserveRequest(
            namespace=ns, session_id=check_session_id(session_id), owner=self._owner,
            blocks=[pb.ShmBlockSpec(key=k, size=n) for k, n in sizes])
        # The server starts the reservations' clock open_ms after the request
        # arrived (when it had them all), so never before this deadline.
        self._give_back_orphans()
        sent = time.monotonic()
        resp = self._call(self._reserve, req, self._orphan_slots(ns, "slots"))
        try:
            deadline = sent + resp.open_ms / 1000.0 + self._reserve_s - _RESERVE_MARGIN
            return [ReservedSlot(k, s.slot_id, s.offset, s.size,
                                 self._arena[s.offset : s.offset + s.size], deadline)
                    for (k, _), s in zip(sizes, resp.slots, strict=True)]
        except BaseException:  # (interrupted: the slots would be nobody's)
            self._abandon_ids(ns, [s.slot_id for s in resp.slots])
            raise

    @_closable
    def commit(self, slots: Sequence[ReservedSlot], crcs: Sequence[int] | None = None, *,
               namespace: str | None = None, ack: str | int = "memory",
               abandon: Sequence[ReservedSlot] = (),
               block_format: BlockFormat = BlockFormat.RAW) -> PutResult:
        """Make filled slots visible. ``crcs`` are their CRC-32Cs (computed
        here, in one extra pass, when not given)."""
        req = self._commit_request(slots, crcs, namespace, ack, abandon, block_format)
        resp = self._call(self._commit, req)
        return PutResult(resp.stored, resp.bytes)

    def _commit_request(self, slots: Sequence[ReservedSlot], crcs: Sequence[int] | None,
                        namespace: str | None, ack: str | int, abandon: Sequence[ReservedSlot],
                        block_format: BlockFormat) -> pb.ShmCommitRequest:
        ns = resolve_namespace(namespace, self.namespace)
        if crcs is not None and len(crcs) != len(slots):
            raise InvalidArgument(f"commit got {len(slots)} slots but {len(crcs)} crcs")
        for s in slots:
            s.check_writable()
        if crcs is None:
            crcs = [checksum(s.view) for s in slots]
        req = pb.ShmCommitRequest(
            namespace=ns, ack=int(parse_ack(ack)), owner=self._owner,  # type: ignore[arg-type]
            blocks=[pb.ShmCommitBlock(slot_id=s.slot_id, offset=s.offset, size=s.size,
                                      crc32c=c, format=int(block_format),  # type: ignore[arg-type]
                                      key=s.key if s.anonymous else b"")
                    for s, c in zip(slots, crcs, strict=True)],
            abandon=[s.slot_id for s in abandon])
        for s in (*slots, *abandon):
            s.view.release()
        return req

    @_closable
    def put(self, blocks: Blocks, *, namespace: str | None = None, ack: str | Any = "memory",
            session_id: str | None = None,
            block_format: BlockFormat = BlockFormat.RAW) -> PutResult:
        items = normalize_blocks(blocks)
        if not items:
            return PutResult(0, 0)
        # (before any slot is taken, as Client.put checks them)
        block_format = check_block_format(block_format)
        ack = parse_ack(ack)
        if len(items) > MAX_KEYS_PER_REQUEST:  # the most one ShmReserve / commit names
            return _summed(self.put(items[i:i + MAX_KEYS_PER_REQUEST], namespace=namespace,
                                    ack=ack, session_id=session_id, block_format=block_format)
                           for i in range(0, len(items), MAX_KEYS_PER_REQUEST))
        self._check_arena()
        self._settle_puts()
        lean = self._frames
        if lean is not None and lean.dp.available:
            ns = resolve_namespace(namespace, self.namespace)
            counted = lean.put(ns, int(parse_ack(ack)), check_session_id(session_id), items,
                            int(block_format),
                            self._streaming_put(sum(len(v) for _, v in items)))
            if counted is not None:
                return PutResult(*counted)
        return self._fill_and_commit(
            items, self._put_slots([(k, len(v)) for k, v in items], namespace, session_id),
            namespace, ack, session_id, block_format)

    def _fill_and_commit(self, items: Sequence[tuple[bytes, memoryview]],
                         slots: list[ReservedSlot], namespace: str | None, ack: Any,
                         session_id: str | None, block_format: BlockFormat) -> PutResult:
        """Copy ``items`` into their reserved ``slots`` and commit them over
        gRPC. Pipelined: while the server verifies and commits one group, this
        thread copies the next (the two run on different cores). The main
        thread's commits are queued on the call driver (_calldriver): an
        interrupt lands in this thread's copy or wait, never in grpc's code
        (grpc futures are waited for through its Python-level locks); it
        reads no more of the caller's buffers, the commits sent go on and
        the next write waits for them, the slots not yet sent are abandoned.
        Other threads' commits are grpc futures."""
        pending: list[Any] = []
        last: Any = None
        done = 0  # slots whose commit is on its way (not abandoned below)

        def on_its_way(count: int) -> None:
            nonlocal done
            done += count

        try:
            queued = self._driver.hands_over()
            streaming = self._streaming_put(sum(s.size for s in slots))
            while done < len(slots):
                group: list[ReservedSlot] = []
                nbytes = 0
                while done + len(group) < len(slots) and (not group or nbytes < _COMMIT_GROUP):
                    group.append(slots[done + len(group)])
                    nbytes += group[-1].size
                crcs = []
                for i, s in enumerate(group):
                    s.check_writable()  # never write a slot the server may have taken back
                    crcs.append(copy_and_checksum(s.view, 0, items[done + i][1], 0, streaming))
                req = self._commit_request(group, crcs, namespace, ack, (), block_format)
                if done + len(group) < len(slots):
                    # (an interrupt between the two: the group is also
                    # abandoned below, behind its commit on the same thread:
                    # an abandon of committed slots changes nothing)
                    if queued:
                        pending.append(self._submit_commit(req))
                    else:
                        pending.append(self._commit.future(req, timeout=self.timeout,
                                                           metadata=self._metadata()))
                    done += len(group)
                else:
                    # The last (often the only) group: a blocking call (a
                    # future starts a thread to drive it), behind the others.
                    last = self._commit_restocking(req, slots, session_id,
                                                   functools.partial(on_its_way, len(group)))
            stored, nbytes = last.stored, last.bytes
            for sent in pending:
                resp = self._driver.outcome(sent, self.timeout) if queued else sent.result()
                stored += resp.stored
                nbytes += resp.bytes
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target, self.tls) from err
        except BaseException:
            if done < len(slots):
                self._abandon_slots(namespace, slots[done:])
            raise
        return PutResult(stored, nbytes)

    def _submit_commit(self, req: pb.ShmCommitRequest) -> CallJob:
        """Queue ``req``'s ShmCommit on the call driver (read it with
        ``self._driver.outcome``): recorded as a write under way at once. A
        commit that restocks gives its new slots back if interrupted."""
        metadata = self._metadata()
        return self._driver.submit(CallJob(
            lambda job: self._commit(req, timeout=self.timeout, metadata=metadata),
            self._orphan_slots(req.namespace, "next_slots") if req.reserve_next else None))

    @_closable
    def put_kv(self, keys: Sequence[bytes], k_pages: kv.PageArrays, v_pages: kv.PageArrays | None,
               page_lists: Sequence[Sequence[int]], *, dtype: Any = None,
               block_tokens: int | None = None, namespace: str | None = None,
               ack: str | Any = "memory", session_id: str | None = None) -> PutResult:
        """Pack straight into reserved shared-memory slots (no intermediate
        buffer, nothing through the socket), then commit."""
        kv.check_lists(keys, page_lists)
        keys = normalize_keys(keys)  # (as Client.put's; they go to the arena's frames as given)
        if not keys:
            return PutResult(0, 0)
        if len(keys) > MAX_KEYS_PER_REQUEST:  # the most one ShmReserve / commit names
            step = MAX_KEYS_PER_REQUEST
            return _summed(self.put_kv(keys[i:i + step], k_pages, v_pages,
                                       page_lists[i:i + step], dtype=dtype,
                                       block_tokens=block_tokens, namespace=namespace, ack=ack,
                                       session_id=session_id)
                           for i in range(0, len(keys), step))
        first = kv.pack_blocks(k_pages, v_pages, page_lists[:1], dtype=dtype,
                               block_tokens=block_tokens)[0]
        size = len(first)  # every block of one engine cache has the same size
        self._settle_puts()
        lean = self._frames
        if lean is not None and lean.dp.available:
            arena = self._arena

            def write(index: int, offset: int) -> int:
                out = arena[offset : offset + size]
                try:
                    if index == 0:
                        out[:] = first
                    else:
                        pack(k_pages, v_pages, page_lists[index], tokens=block_tokens,
                             dtype=dtype, out=out)
                    return checksum(out)
                finally:
                    out.release()

            counted = lean.put_with(resolve_namespace(namespace, self.namespace),
                                    int(parse_ack(ack)), check_session_id(session_id),
                                    keys, [size] * len(keys), write,
                                    int(BlockFormat.KV_V1))
            if counted is not None:
                return PutResult(*counted)
        slots = self._put_slots([(k, size) for k in keys], namespace, session_id)
        try:
            slots[0].check_writable()
            slots[0].view[:] = first
            for slot, ids in zip(slots[1:], page_lists[1:], strict=True):
                slot.check_writable()
                pack(k_pages, v_pages, ids, tokens=block_tokens, dtype=dtype, out=slot.view)
            crcs = [checksum(s.view) for s in slots]
        except BaseException:
            self._abandon_slots(namespace, slots)
            raise
        committing: list[bool] = []  # (not empty once the commit is on its way)
        try:
            req = self._commit_request(slots, crcs, namespace, ack, (), BlockFormat.KV_V1)
            resp = self._commit_restocking(req, slots, session_id,
                                           lambda: committing.append(True))
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target, self.tls) from err
        except BaseException:
            if not committing:
                self._abandon_slots(namespace, slots)
            raise
        return PutResult(resp.stored, resp.bytes)

    # -- the stock of anonymous slots (one round trip per Put) ----------------------

    def stocked_slots(self) -> int:
        """Anonymous slots this client holds for its next Puts (the gRPC
        stock and the data plane sessions' together)."""
        held = self.slot_stock.held() if self.slot_stock is not None else 0
        return held + (self._frames.stocked() if self._frames is not None else 0)

    def _stock(self) -> SlotStock | None:
        """The gRPC path's stock, when Puts use it: not while the data plane
        carries the shm calls (its sessions keep their own, ShmFrames)."""
        if self.slot_stock is None or self.data_plane_active():
            return None
        stock = self._own_stock()
        return None if stock is None else self._stock_of_this_server(stock)

    def _stock_of_this_server(self, stock: SlotStock) -> SlotStock:
        """``stock``, emptied when the server was restarted on the same arena
        file since its slots were reserved (its marker names another
        instance): they were the old server's, and the new one gives their
        memory to other blocks (a Put into one, after a kill -9 and a
        restart, overwrote another client's stored block before its commit
        was refused). One read of the mapped marker page, no round trip."""
        marker = self._marker
        if marker is not None:
            at = self._marker_at
            now = marker[at:at + len(self._marker_seen)]
            if now != self._marker_seen:
                stock.drain()  # not abandoned: the server they came from is gone
                self._marker_seen = now
        return stock

    def _own_stock(self) -> SlotStock | None:
        """The gRPC path's stock, emptied in a forked child: its slots are the
        parent's (a child writing into them overwrote blocks the parent
        stored there next; one abandoning them took them from the parent)."""
        if self._stock_pid != os.getpid() and self.slot_stock is not None:
            self.slot_stock.drain()
            self._stock_pid = os.getpid()
        return self.slot_stock

    def _put_slots(self, sizes: Sequence[tuple[bytes, int]], namespace: str | None,
                   session_id: str | None) -> list[ReservedSlot]:
        """Slots for a Put: from the stock where it has them, the rest by
        one ShmReserve."""
        stock = self._stock()
        if stock is None:
            return self._reserve_slots(sizes, namespace, session_id)
        ns = resolve_namespace(namespace, self.namespace)
        check_session_id(session_id)  # before any slot is taken: a bad one leaks none
        stocked = stock.take(ns, [n for _, n in sizes], time.monotonic())
        missing = [spec for spec, s in zip(sizes, stocked, strict=True) if s is None]
        fresh: list[ReservedSlot] = []
        try:
            if missing:
                fresh = self._reserve_slots(missing, ns, session_id)
            reserved = iter(fresh)
            return [next(reserved) if s is None else
                    ReservedSlot(key, s.slot_id, s.offset, s.size,
                                 self._arena[s.offset : s.offset + s.size], s.deadline, True)
                    for (key, _), s in zip(sizes, stocked, strict=True)]
        except BaseException:
            stock.put_back(ns, [s for s in stocked if s is not None])
            self._abandon_slots(ns, fresh)
            raise

    def _commit_call(self, req: pb.ShmCommitRequest, on_sent: Callable[[], None]) -> Any:
        """A Put's ShmCommit; ``on_sent()`` once it is on its way (the caller
        gives the slots up if interrupted before). The main thread's is
        queued on the call driver (behind the Put's other groups) and goes
        on when interrupted, even before it began: the Put's slots are never
        left uncommitted."""
        if self._driver.hands_over():
            job = self._submit_commit(req)
            on_sent()
            return self._driver.outcome(job, self.timeout)
        on_sent()
        return self._commit(req, timeout=self.timeout, metadata=self._metadata())

    def _commit_restocking(self, req: pb.ShmCommitRequest, slots: Sequence[ReservedSlot],
                           session_id: str | None, on_sent: Callable[[], None]) -> Any:
        """Send a Put's (last) ShmCommit, asking it to restock what the Put
        used and to abandon stale stock; keep the slots it reserved."""
        stock = self._stock()
        if stock is None:
            return self._commit_call(req, on_sent)
        ns = req.namespace
        req.reserve_next.extend(stock.wanted(ns, [s.size for s in slots]))
        req.abandon.extend(stock.to_abandon(ns))
        req.session_id = check_session_id(session_id)
        sent = time.monotonic()
        resp = self._commit_call(req, on_sent)
        if resp.next_slots:
            # As ShmReserve's: their clock started next_open_ms after arrival.
            deadline = sent + resp.next_open_ms / 1000.0 + self._reserve_s - _RESERVE_MARGIN
            stock.add(ns, ((s.slot_id, s.offset, s.size) for s in resp.next_slots), deadline)
        return resp

    @_closable
    def get_kv_into(self, keys: Sequence[bytes], k_pages: kv.PageArrays,
                    v_pages: kv.PageArrays | None, page_lists: Sequence[Sequence[int]], *,
                    dtype: Any = None, namespace: str | None = None,
                    session_id: str | None = None) -> int:
        """Unpack straight from leased shared memory into the engine's pages
        (each block verified). Returns the number of leading blocks restored."""
        kv.check_lists(keys, page_lists, distinct=True)
        kv.check_page_ids(k_pages, v_pages, page_lists)
        try:
            with self._reading(keys, namespace, session_id) as leases:
                return kv.unpack_prefix([lease.view if lease is not None else None
                                         for lease in leases], k_pages, v_pages, page_lists,
                                        dtype=dtype)
        except CorruptBlock:
            # A block that failed its check under valid leases (_reading ended
            # them at once): read again as get does, a bad L1 copy dropped.
            return super().get_kv_into(keys, k_pages, v_pages, page_lists, dtype=dtype,
                                       namespace=namespace, session_id=session_id)

    # -- Get -------------------------------------------------------------------------

    @_closable
    def acquire(self, keys: Iterable[KeyLike], *, namespace: str | None = None,
                session_id: str | None = None, lease_ms: int = 0) -> list[LeasedBlock | None]:
        """Lease ``keys`` (None for a miss); release the leases with
        :meth:`release`. A block the server holds outside L1 with no L1 room
        to bring it in now (every page leased or reserved) comes as a private
        copy read by a plain Get (``lease_id`` 0). Leases a Get left for later
        are ended by the same call."""
        ns = resolve_namespace(namespace, self.namespace)
        leases, _, unleased = self._acquire(keys, ns, session_id, check_lease_ms(lease_ms))
        if unleased:
            self._copy_unleased(leases, unleased, ns, session_id)
        return leases

    def _acquire(self, keys: Iterable[KeyLike], namespace: str | None, session_id: str | None,
                 lease_ms: int, checked: bool = False
                 ) -> tuple[list[LeasedBlock | None], float, list[_Unleased]]:
        """The leases, how long (s) they last on the server (0.0 when the
        server does not say: then none may be left for the next acquire), and
        the keys found but not leased (None in the leases: no L1 room for
        them now; a plain Get reads them). ``checked``: ``keys`` is a list
        already normalised and ``namespace`` already resolved (a Get's own
        path)."""
        if checked and namespace is not None and isinstance(keys, list):
            ns = namespace
            key_list = keys
            session = check_session_id(session_id) if session_id else ""
        else:
            ns = resolve_namespace(namespace, self.namespace)
            key_list = normalize_keys(keys)
            session = check_session_id(session_id)
        release: list[int] = []
        if self._deferred:
            with self._deferred_lock:
                if self._deferred_pid != os.getpid():
                    # A forked child: those are the parent's leases, to end there.
                    self._deferred, self._deferred_pid = [], os.getpid()
                taken = [d for d in self._deferred if d[2] == ns]
                self._deferred = [d for d in self._deferred if d[2] != ns]
            # Those past their time have expired on the server (or are about
            # to): naming them could find them forgotten, so they are dropped.
            now = time.monotonic()
            release = [i for i, until, _, _ in taken if until > now]
            if release:
                self._check_arena()  # (ids from an earlier server mean nothing to a new one)
        try:
            try:
                got = self._acquire_call(ns, key_list, session, lease_ms, release)
            except InvalidArgument as exc:
                if not release or type(exc) is not InvalidArgument:  # (not a bad key)
                    raise
                # A server before ShmAcquire's release skipped ids no longer
                # held refuses the call for one (ended by a lost answer's
                # acquire, or with its session): the Get goes on without
                # them (those still held expire).
                got = self._acquire_call(ns, key_list, session, lease_ms, [])
        except KVStoreError as exc:
            if release and getattr(exc, "grpc_code", "") in _NO_ANSWER:
                # No answer: the server may or may not have ended them. They
                # go with the next acquire again (one that names a lease no
                # longer held skips it), else they were held until expiry.
                with self._deferred_lock:
                    if self._deferred_pid == os.getpid():
                        self._deferred += [d for d in taken if d[0] in release]
            elif release:
                # The server refused the call (e.g. a bad namespace) and may not
                # have ended those leases: end them on their own. (If they were
                # what it refused, this fails the same way, and they expire.)
                with contextlib.suppress(KVStoreError):
                    self._release_ids(release, ns)
            raise
        if len(self._shm_namespaces) < 64:
            self._shm_namespaces.add(ns)
        self._check_arena()  # (after the answer: the leases are into the mapped file)
        out: list[LeasedBlock | None] = []
        unleased: list[_Unleased] = []
        arena = self._arena
        for i, (key, lease) in enumerate(zip(key_list, got.leases, strict=True)):
            if not isinstance(lease, frames.ShmLease):
                if lease is not None:
                    unleased.append(_Unleased(i, key, _TIERS.get(lease.tier)))
                out.append(None)
                continue
            tier = _TIERS.get(lease.tier)
            out.append(LeasedBlock(key, lease.lease_id, lease.size, lease.crc32c, tier,
                                   arena[lease.offset : lease.offset + lease.size], ns))
        return out, got.lease_ms / 1000.0, unleased

    def _copy_unleased(self, leases: list[LeasedBlock | None], unleased: list[_Unleased],
                       ns: str, session_id: str | None) -> None:
        """Fill the places of blocks found but not leased with private copies
        read by a plain Get (a miss if deleted since)."""
        read = super().get([u.key for u in unleased], namespace=ns, session_id=session_id)
        for u, data in zip(unleased, read, strict=True):
            if data is not None:
                leases[u.pos] = LeasedBlock(u.key, 0, len(data), checksum(data), u.tier,
                                              memoryview(data), ns)

    def _check_arena(self) -> None:
        """ConnectionFailed unless the server's arena is still the file mapped here:
        a server that restarted gracefully made a new one, and offsets it gives
        point into that, not into this mapping (stale bytes, or another block's)."""
        try:
            st = os.stat(self.shm_path)
            same = (st.st_dev, st.st_ino) == self._arena_file
        except OSError:
            same = False
        if not same:
            raise ConnectionFailed(
                f"the server's shared-memory arena {self.shm_path} is no longer the file "
                "this ShmClient mapped (the server restarted): create a new ShmClient")

    @_closable
    def release(self, leases: Iterable[LeasedBlock | None]) -> list[int]:
        """End leases; returns the ids of those that had expired."""
        held = [lease for lease in leases if lease is not None]
        for lease in held:
            lease.view.release()
        held = [lease for lease in held if lease.lease_id]  # (0: a private copy)
        if not held:
            return []
        expired: list[int] = []
        for ns in dict.fromkeys(lease.namespace for lease in held):
            expired += self._release_ids([lease.lease_id for lease in held
                                          if lease.namespace == ns], ns)
        return expired

    def _release_ids(self, ids: list[int], namespace: str) -> list[int]:
        lean = self._frames
        if lean is not None and lean.dp.available:
            expired = lean.release(namespace, ids)
            if expired is not None:
                return expired
        resp = self._call(self._release, pb.ShmReleaseRequest(
            lease_ids=ids, namespace=namespace, owner=self._owner))
        return list(resp.expired)

    def _acquire_call(self, ns: str, keys: list[bytes], session: str, lease_ms: int,
                      release: list[int]) -> frames.ShmAcquireResult:
        lean = self._frames
        if lean is not None and lean.dp.available:
            got = lean.acquire(ns, keys, session, lease_ms, release)
            if got is not None:
                return got
        resp = self._call(self._acquire_rpc, pb.ShmAcquireRequest(
            namespace=ns, keys=keys, lease_ms=lease_ms, session_id=session,
            owner=self._owner, release=release))
        return frames.ShmAcquireResult(resp.lease_ms, 0, [], [
            frames.ShmLease(x.lease_id, x.offset, x.size, x.crc32c, x.generation, x.tier)
            if x.hit else frames.ShmUnleased(x.tier) if x.tier else None
            for x in resp.leases])

    def flush_releases(self) -> None:
        """Release now the leases that Gets left for the next ShmAcquire (so
        that their blocks may leave L1 while this client is idle)."""
        with self._deferred_lock:
            taken, self._deferred = self._deferred, []
            if self._deferred_pid != os.getpid():  # (a forked child: the parent's)
                taken, self._deferred_pid = [], os.getpid()
        now = time.monotonic()
        by_namespace: dict[str, list[int]] = {}
        for i, until, ns, _ in taken:
            if until > now:
                by_namespace.setdefault(ns, []).append(i)
        for ns, ids in by_namespace.items():
            # As the next Get would have: an acquire of no keys whose
            # ``release`` skips ids no longer held (a plain release refuses
            # the batch for one of them, and the others stay held).
            self._acquire_call(ns, [], "", 0, ids)

    @contextmanager
    def leased(self, keys: Iterable[KeyLike], **kwargs: Any) -> Iterator[list[LeasedBlock | None]]:
        """Zero-copy read: the blocks' views in shared memory, released at exit.
        Raises StaleLease at exit if a lease expired meanwhile."""
        leases = self.acquire(keys, **kwargs)
        try:
            yield leases
        finally:
            expired = self.release(leases)
        if expired:
            raise StaleLease(f"{len(expired)} lease(s) expired before release; read again")

    @contextmanager
    def _reading(self, keys: Iterable[KeyLike], namespace: str | None,
                 session_id: str | None) -> Iterator[list[LeasedBlock | None]]:
        """``leased`` for a copy made inside the block: if the copy ended
        within the lease's time, the release goes with the next ShmAcquire."""
        sent = time.monotonic()
        ns = resolve_namespace(namespace, self.namespace)
        leases, lease_s, unleased = self._acquire(keys, ns, session_id, 0)
        bad: CorruptBlock | None = None
        try:
            if unleased:
                self._copy_unleased(leases, unleased, ns, session_id)
            yield leases
        except CorruptBlock as exc:
            bad = exc  # (raised below, unless a lease had expired)
        finally:
            expired = self._done_reading(leases, sent, lease_s, ns, defer=bad is None)
        if expired:  # (as _check_copies)
            raise StaleLease(f"{len(expired)} lease(s) expired before release; read again") \
                from bad
        if bad is not None:
            raise bad

    def _done_reading(self, leases: list[LeasedBlock | None], sent: float, lease_s: float,
                      ns: str, defer: bool = True) -> list[int]:
        """End a read's leases (see :meth:`_reading`): the ids of those that
        had expired (only when released now; ``defer`` False: always now)."""
        ids = []
        sizes = []
        for lease in leases:
            if lease is not None:
                lease.view.release()
                if lease.lease_id:  # (0: a private copy)
                    ids.append(lease.lease_id)
                    sizes.append(lease.size)
        if not ids:
            return []
        # The server started each lease after ``sent``: before ``until``
        # none can have expired, so a copy finished by then is good.
        until = sent + lease_s - _LEASE_MARGIN
        if defer and self.release_on_acquire and lease_s > 0 and time.monotonic() < until:
            with self._deferred_lock:
                # At most a share of L1 waits for the next acquire: more kept
                # this client's own next Put from finding room (a Get of 14
                # MiB of a 16 MiB L1, then a Put: 30 s, then "every block
                # that could leave is leased").
                if sum(d[3] for d in self._deferred) + sum(sizes) <= \
                        len(self._arena) // _DEFERRED_SHARE:
                    self._deferred.extend((i, until, ns, n)
                                          for i, n in zip(ids, sizes, strict=True))
                    return []
        return self._release_ids(ids, ns)

    def _inline(self, namespace: str | None) -> bool:
        """Whether a small Get may come inline (GET frames) instead."""
        lean = self._frames
        return lean is not None and lean.dp.available and \
            resolve_namespace(namespace, self.namespace) in self._shm_namespaces

    @_closable
    def get_into(self, keys: Iterable[KeyLike], buffers: BlockBuffers, *,
                 namespace: str | None = None) -> list[int | None]:
        if type(keys) is list and len(keys) == 1 and isinstance(buffers, (list, tuple)) \
                and len(buffers) == 1:
            # One small chunk per call (how engines ask): inline, by the
            # sync client's one-key path, which checks the key and buffer.
            view = block_view(buffers[0], 0, writable=True)
            if len(view) <= self.inline_get_bytes and self._inline(namespace):
                return super().get_into(keys, [view], namespace=namespace)
            key_list = normalize_keys(keys)
            views = [view]
        else:
            key_list = normalize_keys(keys)
            views = normalize_buffers(buffers, len(key_list))
            if views and max(len(v) for v in views) <= self.inline_get_bytes and \
                    self._inline(namespace):
                # Small blocks: inline GET frames cost less than lease + copy.
                return super().get_into(key_list, views, namespace=namespace)
        # _reading, unrolled (no generator per call): the keys are checked
        # and the namespace resolved once.
        sent = time.monotonic()
        ns = resolve_namespace(namespace, self.namespace)
        try:
            leases, lease_s, unleased = self._acquire(key_list, ns, None, 0, checked=True)
        except CapacityExhausted:
            # More at once than L1 can lease (or the server's lease limit):
            # read them the way that holds none.
            return super().get_into(key_list, views, namespace=ns)
        sizes: list[int | None] = []
        bad: list[int] = []  # copies that failed their lease's CRC-32C
        try:
            plain: dict[int, int | None] = {}
            if unleased:
                # Found where no lease reaches (no L1 room now): a plain Get.
                plain = dict(zip((u.pos for u in unleased), super().get_into(
                    [u.key for u in unleased], [views[u.pos] for u in unleased],
                    namespace=ns), strict=True))
            streaming = self._streaming_get(
                sum(lease.size for lease in leases if lease is not None))
            for i, (lease, dest) in enumerate(zip(leases, views, strict=True)):
                if lease is None:
                    sizes.append(plain.get(i))
                    continue
                if lease.size > len(dest):
                    raise BufferTooSmall(
                        f"buffer #{i} is {len(dest)} bytes but key #{i} holds a block of "
                        f"{lease.size} bytes")
                if copy_and_checksum(dest, 0, lease.view, 0, streaming) != lease.crc32c:
                    bad.append(i)
                sizes.append(lease.size)
        finally:
            expired = self._done_reading(leases, sent, lease_s, ns, defer=not bad)
        _check_copies(expired, bad)
        if bad:
            # (the leases ended above: the server may drop the bad copy)
            again = super().get_into([key_list[i] for i in bad], [views[i] for i in bad],
                                     namespace=ns)
            for i, size in zip(bad, again, strict=True):
                sizes[i] = size
        return sizes

    @_closable
    def get(self, keys: Iterable[KeyLike], *, namespace: str | None = None,
            session_id: str | None = None) -> list[bytes | None]:
        # The sizes are known only once the blocks are found: the last Get's
        # largest block stands for this one's (as get_into's buffers do).
        if 0 < self._get_hint <= self.inline_get_bytes and self._inline(namespace):
            found = super().get(keys, namespace=namespace, session_id=session_id)
            self._get_hint = max((len(b) for b in found if b is not None), default=0)
            return found
        out: list[bytes | None] = []
        ks = normalize_keys(keys)
        sent = time.monotonic()
        ns = resolve_namespace(namespace, self.namespace)
        try:
            leases, lease_s, unleased = self._acquire(ks, ns, session_id, 0)
        except CapacityExhausted:  # (as get_into)
            return super().get(ks, namespace=ns, session_id=session_id)
        bad: list[int] = []  # copies that failed their lease's CRC-32C
        try:
            self._get_hint = max((lease.size for lease in leases if lease is not None),
                                 default=0)
            plain: dict[int, bytes | None] = {}
            if unleased:  # (as get_into)
                plain = dict(zip((u.pos for u in unleased), super().get(
                    [u.key for u in unleased], namespace=ns, session_id=session_id),
                    strict=True))
            for i, lease in enumerate(leases):
                if lease is None:
                    out.append(plain.get(i))
                    continue
                data = bytes(lease.view)
                if checksum(data) != lease.crc32c:
                    bad.append(i)
                out.append(data)
        finally:
            expired = self._done_reading(leases, sent, lease_s, ns, defer=not bad)
        _check_copies(expired, bad)
        if bad:
            # (the leases ended above: the server may drop the bad copy)
            again = super().get([ks[i] for i in bad], namespace=ns, session_id=session_id)
            for i, block in zip(bad, again, strict=True):
                out[i] = block
        return out


def _check_size(size: int, index: int) -> int:
    n = check_integer(size, f"block #{index}: size")  # (a numpy integer too)
    if n <= 0:
        raise InvalidArgument(f"block #{index}: size must be a positive int, not {size!r}")
    return n


def _check_copies(expired: list[int], bad: Sequence[int]) -> None:
    """A read's verdict on its leases: StaleLease when one had expired before
    its release (a copy that failed its CRC-32C, ``bad``, included: the reader
    was paused past its lease, by a debugger, a frozen cgroup or a long GC,
    and the slot went to another block; no damage, a read to make again).
    Copies that failed under valid leases are the L1 copy's own fault (a
    writer paused past its reservation and the quarantine wrote into it):
    the caller reads them again by a plain Get, on which the server checks
    its copy, drops it and serves the next tier's, or a miss (CorruptBlock
    on every read would keep the bad copy, and cost the engine link its
    client each time)."""
    if expired:
        cause = CorruptBlock(f"the copies of {len(bad)} block(s) failed their CRC-32C") \
            if bad else None
        raise StaleLease(f"{len(expired)} lease(s) expired before release; read again") \
            from cause
