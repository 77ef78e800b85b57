"""ShmClient's control calls as data-plane frames (docs/dataplane.md)
instead of gRPC calls.

:class:`ShmFrames` is the lean path of ``put``, ``get_into``, ``get`` and
the leases: frames built and parsed straight from the arguments (no protobuf
objects), and one round trip per Put. Each data-plane session keeps its own
stock of anonymous slots (:mod:`kvstore.client._shmstock`): a Put whose
sizes the stock of the connection it runs on covers is a copy and one
SHM_COMMIT (the extended form, header flag FLAG_SHM_NEXT), which binds the
keys to the slots and asks for the next slots. The first Put of a size on a
session reserves (SHM_RESERVE, whose answer says whether the server takes
the extended commit: an older server gets the version-1 commit, two round
trips, as before). The stock lives and dies with its session: slots are
only ever committed on the connection that reserved them, and a session
that closes (a dropped connection, a crashed client) gives them up on the
server.

:func:`route_shm_calls` wraps each of ShmClient's gRPC callables in a
:class:`_Routed` with the same call signature: it takes the protobuf request
ShmClient built, sends it as a frame on a pooled data-plane connection, and
returns an object with the protobuf response's fields (only those ShmClient
reads). When the server offers no data plane the gRPC callable answers, as
before. The sessions act as the client's ShmAttach owner (OpenDataPlane's
``shm_owner``), so a lease taken one way can be released the other.

Retried on a new session after a dropped connection: acquire and release
(an acquire's leases on the dropped session are released by the server when
it closes). Not retried: reserve and commit (ConnectionFailed).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from kvstore._impl import copy_and_checksum
from kvstore.client._shmstock import SlotStock, StockBudget, StockSlot
from kvstore.client.dataplane import Connection, DataPlane
from kvstore.dataplane import frames
from kvstore.dataplane.frames import FLAG_SHM_NEXT, FLAG_SHM_VOUCHED, Op
from kvstore.errors import ReservationExpired


class _Slot(NamedTuple):
    slot_id: int
    offset: int
    size: int


class _Reserved(NamedTuple):
    open_ms: int
    slots: list[_Slot]


class _Counted(NamedTuple):
    stored: int
    bytes: int


class _Lease(NamedTuple):
    hit: bool
    tier: int
    lease_id: int
    offset: int
    size: int
    crc32c: int


_MISS = _Lease(False, 0, 0, 0, 0, 0)
#: L1 bytes the slot stocks of one ShmClient's data-plane sessions hold
#: together (each session's stock: 8 MiB at most).
STOCK_BUDGET_BYTES = 16 * 1024 * 1024


class _Acquired(NamedTuple):
    leases: list[_Lease]
    lease_ms: int
    expired: list[int]


class _Released(NamedTuple):
    expired: list[int]


def _reserve(conn: Connection, req: Any) -> _Reserved:
    meta = conn.call(Op.SHM_RESERVE, frames.ShmReserveRequest(
        req.namespace, [(b.key, b.size) for b in req.blocks], req.session_id).encode())
    res = frames.ShmReserveResult.decode(meta)
    return _Reserved(res.open_ms, [_Slot(s[0], s[1], s[2]) for s in res.slots])


def _commit_meta(req: Any) -> bytes:
    return frames.ShmCommitRequest(
        req.namespace, [(b.slot_id, b.offset, b.size, b.crc32c, b.format) for b in req.blocks],
        list(req.abandon), req.ack).encode()


def _commit(conn: Connection, req: Any) -> _Counted:
    res = frames.Counted.decode(conn.call(Op.SHM_COMMIT, _commit_meta(req)))
    return _Counted(res.stored, res.nbytes)


def _acquire(conn: Connection, req: Any) -> _Acquired:
    meta = conn.call(Op.SHM_ACQUIRE, frames.ShmAcquireRequest(
        req.namespace, list(req.keys), req.lease_ms, list(req.release),
        req.session_id).encode())
    res = frames.ShmAcquireResult.decode(meta)
    return _Acquired([
        _MISS if lease is None else
        _Lease(False, lease.tier, 0, 0, 0, 0) if isinstance(lease, frames.ShmUnleased) else
        _Lease(True, lease.tier, lease.lease_id, lease.offset, lease.size, lease.crc32c)
        for lease in res.leases], res.lease_ms, res.expired)


def _release(conn: Connection, req: Any) -> _Released:
    meta = conn.call(Op.SHM_RELEASE, frames.ShmReleaseRequest(
        req.namespace, list(req.lease_ids)).encode())
    return _Released(frames.ShmReleaseResult.decode(meta).expired)


def _keyed_reserve(req: Any) -> bool:
    return all(b.key for b in req.blocks)


def _plain_commit(req: Any) -> bool:
    """A commit a SHM_COMMIT frame can say: no anonymous slot bound to a key,
    no restock (fields of later ShmCommitRequests; such a commit goes by gRPC)."""
    return not (getattr(req, "reserve_next", None) or getattr(req, "session_id", "")
                or any(getattr(b, "key", b"") for b in req.blocks))


def _always(req: Any) -> bool:
    return True


def _frame_bytes(req: Any) -> int:
    """A bound on the metadata of the request's frame and of its answer (a
    slot or a lease per block or key): one larger than the session takes
    closed the connection, whatever had been done ("unknown outcome")."""
    items = 0
    for field in ("blocks", "keys", "lease_ids", "abandon"):
        items += len(getattr(req, field, ()))
    # the request as a frame (its protobuf size, a few bytes more per item),
    # or the answer (a slot or a lease per item), whichever is larger
    return max(req.ByteSize() + 8 * items, max(frames.SLOT_BYTES, frames.LEASE_BYTES) * items) \
        + 1024


class _Done:
    """A finished call in the shape of a grpc future."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def result(self, timeout: float | None = None) -> Any:
        return self._value


class _Routed:
    """A gRPC unary callable's stand-in: the data plane first, else ``rpc``."""

    __slots__ = ("_dp", "_fits", "_fn", "_idempotent", "_rpc")

    def __init__(self, dp: DataPlane, fn: Callable[[Connection, Any], Any], rpc: Any,
                 idempotent: bool, fits: Callable[[Any], bool] = _always) -> None:
        self._dp = dp
        self._fn = fn
        self._rpc = rpc
        self._idempotent = idempotent
        self._fits = fits  # whether a frame can carry this request

    def _routable(self, request: Any) -> bool:
        return self._dp.available and self._fits(request) and \
            self._dp.fits(_frame_bytes(request))

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        if self._routable(request):
            fn = self._fn
            out = self._dp.run(lambda conn: fn(conn, request), self._idempotent)
            if out is not None:
                return out
        return self._rpc(request, **kwargs)

    def future(self, request: Any, **kwargs: Any) -> Any:
        # The data plane answers at once (a commit group of a large Put; the
        # next group is copied after it). gRPC keeps its real future.
        if self._routable(request):
            fn = self._fn
            out = self._dp.run(lambda conn: fn(conn, request), self._idempotent)
            if out is not None:
                return _Done(out)
        return self._rpc.future(request, **kwargs)


def route_shm_calls(dp: DataPlane, owner: str, reserve: Any, commit: Any, acquire: Any,
                    release: Any) -> tuple[_Routed, _Routed, _Routed, _Routed]:
    """The four callables, routed through ``dp``, whose sessions act as ``owner``."""
    dp.shm_owner = owner
    return (_Routed(dp, _reserve, reserve, False, _keyed_reserve),
            _Routed(dp, _commit, commit, False, _plain_commit),
            _Routed(dp, _acquire, acquire, True), _Routed(dp, _release, release, True))


class _SessionShm:
    """What one data-plane session knows for shared-memory Puts."""

    __slots__ = ("next", "stock")

    def __init__(self, stock: SlotStock | None) -> None:
        #: The server takes the extended SHM_COMMIT (its SHM_RESERVE answer said so).
        self.next = False
        #: Anonymous slots reserved on this session (None: the stock is off).
        self.stock = stock


class ShmFrames:
    """ShmClient's lean data-plane path (see the module's docstring).
    Methods return None when the data plane is not available (use gRPC)."""

    def __init__(self, dp: DataPlane, arena: memoryview, reserve_s: float, stock: bool,
                 margin: float) -> None:
        self.dp = dp
        self.arena = arena
        self.reserve_s = reserve_s
        self.use_stock = stock
        self.margin = margin  # seconds of a reservation kept in hand (as ShmClient's)
        self._sessions: weakref.WeakKeyDictionary[Connection, _SessionShm] = \
            weakref.WeakKeyDictionary()
        #: What all sessions' stocks hold together (one session's stock alone
        #: is 8 MiB at most: the first sessions of a client shared by many
        #: threads keep theirs, the others Put without stock).
        self._budget = StockBudget(STOCK_BUDGET_BYTES)

    def _session(self, conn: Connection) -> _SessionShm:
        state = self._sessions.get(conn)
        if state is None:
            state = self._sessions[conn] = _SessionShm(
                SlotStock(max_per_size=8, budget=self._budget) if self.use_stock else None)
        return state

    def stocked(self) -> int:
        """Anonymous slots held in stock, all sessions together."""
        return sum(s.stock.held() for s in list(self._sessions.values()) if s.stock is not None)

    # -- Put -----------------------------------------------------------------------------

    def put(self, namespace: str, ack: int, session_id: str,
            items: Sequence[tuple[bytes, memoryview]], block_format: int,
            streaming: bool | None) -> tuple[int, int] | None:
        """Store ``items`` through shared memory: (stored, bytes)."""
        arena = self.arena

        def write(index: int, offset: int) -> int:
            return copy_and_checksum(arena, offset, items[index][1], 0, streaming)

        return self.put_with(namespace, ack, session_id, [k for k, _ in items],
                             [len(v) for _, v in items], write, block_format)

    def put_with(self, namespace: str, ack: int, session_id: str, keys: Sequence[bytes],
                 sizes: Sequence[int], write: Callable[[int, int], int],
                 block_format: int) -> tuple[int, int] | None:
        """Store blocks of ``sizes`` under ``keys``: ``write(index, offset)``
        fills block ``index``'s slot at ``offset`` in the arena and returns
        the CRC-32C of the bytes it left there (the commit vouches for it:
        the server may answer before its own check, FLAG_SHM_VOUCHED; a
        wrong one loses the block, unreported). (stored, bytes)."""
        # Its reserve and commit frames must fit the session's metadata limit
        # (a key and ~40 bytes of slot fields per block): a larger one closed
        # the connection ("whether it took effect is unknown"); gRPC takes it.
        if not self.dp.fits(sum(map(len, keys)) + frames.COMMIT_BLOCK_BYTES * len(keys) + 1024):
            return None
        return self.dp.run(lambda conn: self._put(conn, namespace, ack, session_id, keys,
                                                  sizes, write, block_format),
                           idempotent=False)

    def _put(self, conn: Connection, ns: str, ack: int, sid: str, keys: Sequence[bytes],
             sizes: Sequence[int], write: Callable[[int, int], int],
             block_format: int) -> tuple[int, int]:
        state = self._session(conn)
        stock = state.stock if state.next else None
        # Per block: (slot id, offset, size, deadline, anonymous).
        slots: list[tuple[int, int, int, float, bool]] = []
        missing: list[int] = []
        if stock is not None:
            for i, got in enumerate(stock.take(ns, sizes, time.monotonic())):
                if got is None:
                    missing.append(i)
                    slots.append((0, 0, 0, 0.0, False))
                else:
                    slots.append((got.slot_id, got.offset, got.size, got.deadline, True))
        else:
            missing = list(range(len(keys)))
            slots = [(0, 0, 0, 0.0, False)] * len(keys)
        if missing:
            try:
                meta = frames.ShmReserveRequest(ns, [(keys[i], sizes[i]) for i in missing],
                                                sid).encode()
                sent = time.monotonic()
                flags, answer = conn.call_flags(Op.SHM_RESERVE, meta)
                res = frames.ShmReserveResult.decode(answer)
            except BaseException:
                if stock is not None:
                    stock.put_back(ns, [StockSlot(s[0], s[1], s[2], s[3])
                                        for s in slots if s[4]])
                raise
            # The server's answer says whether it takes the extended commit
            # (the first Put on a session learns it here).
            state.next = bool(flags & FLAG_SHM_NEXT)
            stock = state.stock if state.next else None
            # The server started their clock open_ms after the request arrived.
            deadline = sent + res.open_ms / 1000.0 + self.reserve_s - self.margin
            for i, (slot_id, offset, size, _gen) in zip(missing, res.slots, strict=True):
                slots[i] = (slot_id, offset, size, deadline, False)
        committing = False
        try:
            blocks = []
            for i, (slot_id, offset, size, deadline, _) in enumerate(slots):
                _check_deadline(deadline, slot_id, i)  # never write a slot taken back
                blocks.append((slot_id, offset, size, write(i, offset), block_format))
            for i, slot in enumerate(slots):
                _check_deadline(slot[3], slot[0], i)  # nor commit one
            committing = True
            # Vouched: each CRC-32C came from ``write``, from the bytes it left
            # in the slot, so the server may answer before its own check.
            if stock is None:
                _, answer = conn.call_flags(Op.SHM_COMMIT,
                                            frames.encode_shm_commit(ns, ack, blocks, []),
                                            FLAG_SHM_VOUCHED, checked_bytes=sum(sizes))
                counted = frames.Counted.decode(answer)
                return counted.stored, counted.nbytes
            meta = frames.encode_shm_commit(
                ns, ack, blocks, stock.to_abandon(ns),
                [key if slot[4] else b"" for key, slot in zip(keys, slots, strict=True)],
                sid, stock.wanted(ns, sizes))
            sent = time.monotonic()
            _, answer = conn.call_flags(Op.SHM_COMMIT, meta, FLAG_SHM_NEXT | FLAG_SHM_VOUCHED,
                                        checked_bytes=sum(sizes))
            done = frames.ShmCommitResult.decode(answer)
            if done.next_slots:
                stock.add(ns, ((s[0], s[1], s[2]) for s in done.next_slots),
                          sent + done.next_open_ms / 1000.0 + self.reserve_s - self.margin)
            return done.stored, done.nbytes
        except BaseException:
            if not committing and not conn.broken:
                # Nothing was committed: give the slots back now (best effort;
                # they expire on the server anyway).
                with contextlib.suppress(Exception):
                    conn.call(Op.SHM_COMMIT, frames.encode_shm_commit(
                        ns, 0, [], [s[0] for s in slots]))
            raise

    def drain(self) -> None:
        """Abandon the slots in stock (ShmClient.close), on the connections
        no call is using: a call in flight on another thread owns its
        connection until its answer is read (the slots of those sessions go
        when their connections close, or expire)."""
        idle = self.dp.take_idle()
        try:
            for conn in idle:
                conn.begin_call(self.dp.deadline())  # (its own: not the last call's)
                state = self._sessions.get(conn)
                if state is None or state.stock is None:
                    continue
                for ns, ids in state.stock.drain().items():
                    if conn.idle_and_open():
                        try:
                            conn.call(Op.SHM_COMMIT, frames.encode_shm_commit(ns, 0, [], ids))
                        except Exception:  # they expire on the server anyway
                            conn.close()
        finally:
            for conn in idle:
                self.dp.give_back(conn)

    # -- Get -----------------------------------------------------------------------------

    def acquire(self, namespace: str, keys: list[bytes], session_id: str, lease_ms: int,
                release: list[int]) -> frames.ShmAcquireResult | None:
        meta = frames.encode_shm_acquire(namespace, session_id, lease_ms, keys, release)
        # The request, and an answer of a lease per key, must fit one frame.
        if not self.dp.fits(max(len(meta), frames.LEASE_BYTES * len(keys) + 1024)):
            return None
        return self.dp.run(lambda conn: frames.ShmAcquireResult.decode(
            conn.call(Op.SHM_ACQUIRE, meta)), idempotent=True)

    def release(self, namespace: str, lease_ids: list[int]) -> list[int] | None:
        """End leases; the ids of those that had expired."""
        meta = frames.ShmReleaseRequest(namespace, lease_ids).encode()
        return self.dp.run(lambda conn: frames.ShmReleaseResult.decode(
            conn.call(Op.SHM_RELEASE, meta)).expired, idempotent=True)


def _check_deadline(deadline: float, slot_id: int, index: int) -> None:
    if time.monotonic() >= deadline:
        raise ReservationExpired(
            f"the reservation of slot {slot_id} (block #{index}) ran out before its block "
            "was written and committed: the server may reuse the slot, so it is not "
            "written; put again")
