"""Same-host client: block bytes through the server's shared-memory arena.

``ShmClient`` is a :class:`kvstore.Client` whose ``put``, ``get`` and
``get_into`` move bytes through the L1 arena the server keeps in a
shared-memory file, so they never cross the socket; every other call (and the
control messages of these three) is ordinary gRPC, normally over the unix
socket. It needs a server started with ``l1.shm_path`` on the same host, and
the permission to open that file (the service's own user).

Put: reserve slots, copy each block into its slot while computing its
CRC-32C in the same pass, commit (the server checks offsets and sizes and
verifies each checksum before the block becomes visible). Get: acquire leases,
copy out while checksumming, compare with the lease's checksum, release; a
lease that expired before its release means the copy may be stale, and the
call raises :class:`StaleLease` rather than return it.

For packing straight into shared memory (no intermediate buffer), use
``reserve``/``commit`` and ``acquire``/``release`` directly.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from kvstore._impl import checksum, copy_and_checksum, pack
from kvstore.client import kv
from kvstore.client._common import (
    DEFAULT_TARGET,
    Blocks,
    PutResult,
    check_session_id,
    normalize_blocks,
    normalize_buffers,
    normalize_keys,
    parse_ack,
    resolve_namespace,
)
from kvstore.client._errors import error_from_rpc
from kvstore.client.sync import Client
from kvstore.errors import CorruptBlock, InvalidArgument, StaleLease
from kvstore.types import BlockFormat, TierName
from kvstore.v1 import kvstore_pb2 as pb

_SERVICE = "/kvstore.v1.KVStore/"
# Bytes per ShmCommit when a Put is pipelined.
_COMMIT_GROUP = 16 * 1024 * 1024


@dataclass(slots=True)
class ReservedSlot:
    """A reserved slot: write the block into ``view``, then commit."""

    key: bytes
    slot_id: int
    offset: int
    size: int
    view: memoryview


@dataclass(slots=True)
class LeasedBlock:
    """A leased block: ``view`` is valid until the lease is released."""

    key: bytes
    lease_id: int
    size: int
    crc32c: int
    tier: TierName | None
    view: memoryview


class ShmClient(Client):
    def __init__(self, target: str = DEFAULT_TARGET, *, namespace: str | None = None,
                 timeout: float | None = 60.0, **kwargs: Any) -> None:
        super().__init__(target, namespace=namespace, timeout=timeout, **kwargs)
        ch = self._channel

        def rpc(name: str, req: Any, resp: Any) -> Any:
            return ch.unary_unary(_SERVICE + name, request_serializer=req.SerializeToString,
                                  response_deserializer=resp.FromString)

        self._attach = rpc("ShmAttach", pb.ShmAttachRequest, pb.ShmAttachResponse)
        self._reserve = rpc("ShmReserve", pb.ShmReserveRequest, pb.ShmReserveResponse)
        self._commit = rpc("ShmCommit", pb.ShmCommitRequest, pb.ShmCommitResponse)
        self._acquire = rpc("ShmAcquire", pb.ShmAcquireRequest, pb.ShmAcquireResponse)
        self._release = rpc("ShmRelease", pb.ShmReleaseRequest, pb.ShmReleaseResponse)
        info = self._call(self._attach, pb.ShmAttachRequest())
        self.shm_path: str = info.path
        self.instance: str = info.instance
        fd = os.open(info.path, os.O_RDWR)
        try:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self._map = mmap.mmap(fd, info.size, flags=flags)
        finally:
            os.close(fd)
        self._arena = memoryview(self._map)

    def _call(self, rpc: Any, request: Any) -> Any:
        try:
            return rpc(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err

    def close(self) -> None:
        try:
            self._arena.release()
            self._map.close()
        except (BufferError, AttributeError):
            pass
        super().close()

    # -- Put -------------------------------------------------------------------------

    def reserve(self, sizes: Sequence[tuple[bytes, int]], *, namespace: str | None = None,
                session_id: str | None = None) -> list[ReservedSlot]:
        ns = resolve_namespace(namespace, self.namespace)
        req = pb.ShmReserveRequest(
            namespace=ns, session_id=check_session_id(session_id),
            blocks=[pb.ShmBlockSpec(key=k, size=n) for k, n in sizes])
        resp = self._call(self._reserve, req)
        return [ReservedSlot(k, s.slot_id, s.offset, s.size,
                             self._arena[s.offset : s.offset + s.size])
                for (k, _), s in zip(sizes, resp.slots, strict=True)]

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
        if crcs is None:
            crcs = [checksum(s.view) for s in slots]
        req = pb.ShmCommitRequest(
            namespace=ns, ack=int(parse_ack(ack)),  # type: ignore[arg-type]
            blocks=[pb.ShmCommitBlock(slot_id=s.slot_id, offset=s.offset, size=s.size,
                                      crc32c=c, format=int(block_format))  # type: ignore[arg-type]
                    for s, c in zip(slots, crcs, strict=True)],
            abandon=[s.slot_id for s in abandon])
        for s in (*slots, *abandon):
            s.view.release()
        return req

    def put(self, blocks: Blocks, *, namespace: str | None = None, ack: str | Any = "memory",
            session_id: str | None = None,
            block_format: BlockFormat = BlockFormat.RAW) -> PutResult:
        items = normalize_blocks(blocks)
        if not items:
            return PutResult(0, 0)
        slots = self.reserve([(k, len(v)) for k, v in items], namespace=namespace,
                             session_id=session_id)
        # Pipelined: while the server verifies and commits one group, this
        # thread copies the next (the two run on different cores).
        pending: list[Any] = []
        done = 0
        try:
            while done < len(slots):
                group: list[ReservedSlot] = []
                nbytes = 0
                while done + len(group) < len(slots) and (not group or nbytes < _COMMIT_GROUP):
                    group.append(slots[done + len(group)])
                    nbytes += group[-1].size
                crcs = [copy_and_checksum(s.view, 0, items[done + i][1], 0)
                        for i, s in enumerate(group)]
                req = self._commit_request(group, crcs, namespace, ack, (), block_format)
                pending.append(self._commit.future(req, timeout=self.timeout))
                done += len(group)
            stored = nbytes = 0
            for fut in pending:
                resp = fut.result()
                stored += resp.stored
                nbytes += resp.bytes
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err
        except BaseException:
            if done < len(slots):
                self.commit([], [], namespace=namespace, abandon=slots[done:])
            raise
        return PutResult(stored, nbytes)

    def put_kv(self, keys: Sequence[bytes], k_pages: kv.PageArrays, v_pages: kv.PageArrays | None,
               page_lists: Sequence[Sequence[int]], *, dtype: Any = None,
               block_tokens: int | None = None, namespace: str | None = None,
               ack: str | Any = "memory", session_id: str | None = None) -> PutResult:
        """Pack straight into reserved shared-memory slots (no intermediate
        buffer, nothing through the socket), then commit."""
        kv.check_lists(keys, page_lists)
        if not keys:
            return PutResult(0, 0)
        first = kv.pack_blocks(k_pages, v_pages, page_lists[:1], dtype=dtype,
                               block_tokens=block_tokens)[0]
        size = len(first)  # every block of one engine cache has the same size
        slots = self.reserve([(k, size) for k in keys], namespace=namespace,
                             session_id=session_id)
        try:
            slots[0].view[:] = first
            for slot, ids in zip(slots[1:], page_lists[1:], strict=True):
                pack(k_pages, v_pages, ids, tokens=block_tokens, dtype=dtype, out=slot.view)
            crcs = [checksum(s.view) for s in slots]
        except BaseException:
            self.commit([], [], namespace=namespace, abandon=slots)
            raise
        return self.commit(slots, crcs, namespace=namespace, ack=ack,
                           block_format=BlockFormat.KV_V1)

    def get_kv_into(self, keys: Sequence[bytes], k_pages: kv.PageArrays,
                    v_pages: kv.PageArrays | None, page_lists: Sequence[Sequence[int]], *,
                    dtype: Any = None, namespace: str | None = None,
                    session_id: str | None = None) -> int:
        """Unpack straight from leased shared memory into the engine's pages
        (each block verified). Returns the number of leading blocks restored."""
        kv.check_lists(keys, page_lists)
        with self.leased(keys, namespace=namespace, session_id=session_id) as leases:
            return kv.unpack_prefix([lease.view if lease is not None else None
                                     for lease in leases], k_pages, v_pages, page_lists,
                                    dtype=dtype)

    # -- Get -------------------------------------------------------------------------

    def acquire(self, keys: Iterable[bytes], *, namespace: str | None = None,
                session_id: str | None = None, lease_ms: int = 0) -> list[LeasedBlock | None]:
        ns = resolve_namespace(namespace, self.namespace)
        key_list = normalize_keys(keys)
        req = pb.ShmAcquireRequest(namespace=ns, keys=key_list, lease_ms=lease_ms,
                                   session_id=check_session_id(session_id))
        resp = self._call(self._acquire, req)
        out: list[LeasedBlock | None] = []
        for key, lease in zip(key_list, resp.leases, strict=True):
            if not lease.hit:
                out.append(None)
                continue
            tier = TierName(lease.tier) if lease.tier in (1, 2, 3) else None
            out.append(LeasedBlock(key, lease.lease_id, lease.size, lease.crc32c, tier,
                                   self._arena[lease.offset : lease.offset + lease.size]))
        return out

    def release(self, leases: Iterable[LeasedBlock | None]) -> list[int]:
        """End leases; returns the ids of those that had expired."""
        held = [lease for lease in leases if lease is not None]
        for lease in held:
            lease.view.release()
        if not held:
            return []
        resp = self._call(self._release,
                          pb.ShmReleaseRequest(lease_ids=[lease.lease_id for lease in held]))
        return list(resp.expired)

    @contextmanager
    def leased(self, keys: Iterable[bytes], **kwargs: Any) -> Iterator[list[LeasedBlock | None]]:
        """Zero-copy read: the blocks' views in shared memory, released at exit.
        Raises StaleLease at exit if a lease expired meanwhile."""
        leases = self.acquire(keys, **kwargs)
        try:
            yield leases
        finally:
            expired = self.release(leases)
        if expired:
            raise StaleLease(f"{len(expired)} lease(s) expired before release; read again")

    def get_into(self, keys: Iterable[bytes], buffers: Sequence[Any], *,
                 namespace: str | None = None) -> list[int | None]:
        key_list = normalize_keys(keys)
        views = normalize_buffers(buffers, len(key_list))
        sizes: list[int | None] = []
        with self.leased(key_list, namespace=namespace) as leases:
            for i, (lease, dest) in enumerate(zip(leases, views, strict=True)):
                if lease is None:
                    sizes.append(None)
                    continue
                if lease.size > len(dest):
                    raise InvalidArgument(
                        f"buffer #{i} is {len(dest)} bytes but key #{i} holds a block of "
                        f"{lease.size} bytes")
                crc = copy_and_checksum(dest, 0, lease.view, 0)
                if crc != lease.crc32c:
                    raise CorruptBlock(f"key #{i}: the copy read from shared memory fails "
                                       f"its CRC-32C ({crc:#010x} != {lease.crc32c:#010x})")
                sizes.append(lease.size)
        return sizes

    def get(self, keys: Iterable[bytes], *, namespace: str | None = None,
            session_id: str | None = None) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self.leased(keys, namespace=namespace, session_id=session_id) as leases:
            for i, lease in enumerate(leases):
                if lease is None:
                    out.append(None)
                    continue
                data = bytes(lease.view)
                if checksum(data) != lease.crc32c:
                    raise CorruptBlock(f"key #{i}: the copy read from shared memory fails "
                                       "its CRC-32C")
                out.append(data)
        return out
