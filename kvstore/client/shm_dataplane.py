"""ShmClient's four control calls (reserve, commit, acquire, release) as
data-plane frames (docs/dataplane.md) instead of gRPC calls.

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

from collections.abc import Callable
from typing import Any, NamedTuple

from kvstore.client.dataplane import Connection, DataPlane
from kvstore.dataplane import frames
from kvstore.dataplane.frames import Op


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
    return _Acquired([_MISS if lease is None else _Lease(True, lease.tier, lease.lease_id,
                                                         lease.offset, lease.size,
                                                         lease.crc32c)
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

    def __call__(self, request: Any, **kwargs: Any) -> Any:
        if self._dp.available and self._fits(request):
            fn = self._fn
            out = self._dp.run(lambda conn: fn(conn, request), self._idempotent)
            if out is not None:
                return out
        return self._rpc(request, **kwargs)

    def future(self, request: Any, **kwargs: Any) -> Any:
        # The data plane answers at once (a commit group of a large Put; the
        # next group is copied after it). gRPC keeps its real future.
        if self._dp.available and self._fits(request):
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
