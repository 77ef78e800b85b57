"""One data-plane session's operations: a request frame in, store or broker
calls with domain values, response frames out (docs/dataplane.md).

The same checks, in the same order, as the gRPC servicer and its
interceptor: the namespace against the session's grant (PermissionDenied,
before the store is touched), then the store's own checks (unknown
namespace, malformed key, block size, ack level). Reservations and leases go
through the one shared-memory broker; blocks go into and out of the L1 arena
as over gRPC (checksummed on the way in, verified on the way out).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from kvstore.dataplane import frames as f
from kvstore.dataplane.conn import ConnectionClosed, SocketIO, StreamIO
from kvstore.dataplane.put import PutProgress
from kvstore.dataplane.tickets import Binding
from kvstore.errors import (
    BlockTooLarge,
    InvalidArgument,
    KVStoreError,
    MalformedRequest,
    PermissionDenied,
)
from kvstore.store import CommitSpec, SharedMemoryBroker, TieredStore
from kvstore.store.index import Entry
from kvstore.store.l1check import l1_intact
from kvstore.store.reads import BlockReader
from kvstore.store.shm import VERIFY_INLINE_BYTES, Lease, Unleased
from kvstore.tiers.base import Buffer
from kvstore.types import (
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    AckLevel,
    BlockFormat,
    BlockId,
    SessionEnd,
    SessionEvent,
    TierName,
    TurnEnd,
    TurnEndReason,
    check_name,
    session_or_none,
    validate_key,
    validate_keys,
)

log = logging.getLogger("kvstore.server")

_ACK = {0: AckLevel.MEMORY, 1: AckLevel.MEMORY, 2: AckLevel.LOCAL, 3: AckLevel.REMOTE}
_FORMATS = frozenset(int(x) for x in BlockFormat)
#: How often a SHM_RESERVE waiting for L1 room looks whether its client is still there.
_PEER_CHECK_S = 0.5
# Blocks up to VERIFY_INLINE_BYTES are verified on the event loop before they
# are sent, and a GET of them may be answered from the readable callback;
# larger ones on the store's executor: the same bound as a commit's (2 MiB TCP
# Gets from a shared arena 1.05 -> 0.75 ms p50, 4 MiB 1.51 -> 1.21 ms, against
# the executor's hop at 1 MiB).
_GET_RESPONSE = int(f.Op.GET | f.RESPONSE)
_GET, _LOOKUP, _PING = int(f.Op.GET), int(f.Op.LOOKUP), int(f.Op.PING)
_PING_ANSWER = f.encode_header(f.Op.PING | f.RESPONSE, 0, 0)
_LOOKUP_RESPONSE = int(f.Op.LOOKUP | f.RESPONSE)
_SHM_ACQUIRE, _SHM_RELEASE = int(f.Op.SHM_ACQUIRE), int(f.Op.SHM_RELEASE)
_SHM_COMMIT = int(f.Op.SHM_COMMIT)
_SHM_RESERVE = int(f.Op.SHM_RESERVE)
_SHM_RESERVE_RESPONSE = int(f.Op.SHM_RESERVE | f.RESPONSE)
_SESSION_EVENT = int(f.Op.SESSION_EVENT)
_SESSION_EVENT_RESPONSE = int(f.Op.SESSION_EVENT | f.RESPONSE)
_SHM_COMMIT_RESPONSE = int(f.Op.SHM_COMMIT | f.RESPONSE)
_SHM_ACQUIRE_RESPONSE = int(f.Op.SHM_ACQUIRE | f.RESPONSE)
_SHM_RELEASE_RESPONSE = int(f.Op.SHM_RELEASE | f.RESPONSE)
_L1 = int(TierName.L1)
_MORE = f.FLAG_MORE
_MAGIC, _VERSION = f.MAGIC, f.VERSION
#: A GET answer's header and metadata (docs/dataplane.md), packed in one go.
_HIT_FRAME = struct.Struct("<4sBBHIIQIBB")
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
#: A GET's answers are sent together up to this many block bytes, or parts
#: (each answer is one or two parts; IOV_MAX is 1024).
_BATCH_BYTES = 8 * 1024 * 1024
_BATCH_PARTS = 512
#: Namespaces remembered as checked, per session.
_CHECKED_NAMESPACES = 64

Handler = Callable[[f.Header, Any], Awaitable[None]]


def _nothing() -> None:
    pass


class Answered(enum.IntEnum):
    """What :meth:`Session.answer_now` did (true when it answered)."""

    NO = 0  # nothing: the connection's task answers it
    YES = 1
    ERROR = 2  # answered with an ERROR frame


def error_frame(request_id: int, exc: KVStoreError, flags: int = 0) -> bytes:
    """The ERROR frame that answers a request ``exc`` failed."""
    info = f.ErrorInfo(f.STATUS_CODES.get(exc.code, 13), type(exc).__name__, exc.message)
    return f.frame(f.Op.ERROR, request_id, info.encode(), 0, flags)


class Session:
    """One authenticated connection's state: what it may use (``binding``)
    and the reservations and leases it took (released when it closes)."""

    def __init__(self, store: TieredStore, shm: SharedMemoryBroker, binding: Binding,
                 io: SocketIO | StreamIO) -> None:
        self.store = store
        self.shm = shm
        self.binding = binding
        self.owner = binding.owner
        self.io = io
        # A GET's blocks go from a checked (shared) arena without a copy:
        # what the socket does not take at once is checked again before it
        # ends (TLS copies them as they are checked).
        self._recheck = store.reads.check.enabled and isinstance(io, SocketIO)
        self.slots: set[int] = set()
        self.leases: set[int] = set()
        self._checked: set[str] = set()  # namespaces this session may use
        # The check of the last vouched commit answered before it (at most
        # one at a time: each pins its blocks until done; never cancelled, so
        # it always unpins: a task cancelled before it starts runs nothing).
        self._answered_check: asyncio.Task[None] | None = None
        self.handlers: dict[int, Handler] = {
            f.Op.PING: self.ping, f.Op.LOOKUP: self.lookup, f.Op.GET: self.get,
            f.Op.PUT: self.put, f.Op.SHM_RESERVE: self.shm_reserve,
            f.Op.SHM_COMMIT: self.shm_commit, f.Op.SHM_ACQUIRE: self.shm_acquire,
            f.Op.SHM_RELEASE: self.shm_release, f.Op.SESSION_EVENT: self.session_event,
        }

    #: Namespaces as sent (UTF-8) -> checked, for :meth:`_get_now` (made
    #: on first use).
    _fast_namespaces: dict[bytes, str] | None = None

    def close(self) -> tuple[int, int]:
        """Give up what the session still holds: (reservations, leases)."""
        held = self.shm.end_session(list(self.slots), list(self.leases), self.owner)
        self.slots.clear()
        self.leases.clear()
        # Its own bound methods: a reference cycle that kept every closed
        # connection (and its 64 KiB buffer) until the cyclic collector ran,
        # which the server runs seldom (runtime.py): ~68 KB per client restart.
        self.handlers.clear()
        return held

    def namespace(self, namespace: str) -> str:
        """The namespace, checked against the grant, then by the store (each
        name once per session: neither answer changes while it lives)."""
        checked = self._checked
        if namespace in checked:
            return namespace
        binding = self.binding
        if namespace and not binding.allows(namespace):
            raise PermissionDenied(f"identity {binding.identity!r} may not use namespace "
                                   f"{namespace!r}")
        self.store.check_namespace(namespace)
        if len(checked) < _CHECKED_NAMESPACES:
            checked.add(namespace)
        return namespace

    async def reply(self, header: f.Header, meta: bytes, flags: int = 0) -> None:
        await self.io.send((f.encode_header(header.opcode | f.RESPONSE, header.request_id,
                                            len(meta), 0, flags) + meta,))

    # -- small operations ---------------------------------------------------------------

    async def ping(self, header: f.Header, meta: Any) -> None:
        if len(meta):
            raise f.FrameError("PING takes no metadata")
        await self.reply(header, b"")

    async def lookup(self, header: f.Header, meta: Any) -> None:
        req = f.LookupRequest.decode(meta)
        namespace = self.namespace(req.namespace)
        found, tiers = await self.store.lookup_codes(namespace, req.keys, req.lease_ms,
                                                     session_or_none(req.session_id))
        await self.reply(header, f.encode_lookup_result(found, tiers))

    async def session_event(self, header: f.Header, meta: Any) -> None:
        self.store.session_event(self._session_event(meta))
        await self.reply(header, b"")

    def _session_event_now(self, rid: int, meta: memoryview) -> bool:
        try:
            event = self._session_event(meta)
        except (f.FrameError, KVStoreError):
            return False
        self.store.session_event(event)
        self.reply_now(f.encode_header(_SESSION_EVENT_RESPONSE, rid, 0))
        return True

    def _session_event(self, meta: Any) -> SessionEvent:
        """A SESSION_EVENT's event, checked."""
        req = f.SessionEventRequest.decode(meta)
        namespace = self.namespace(req.namespace)
        if not req.session_id:
            raise InvalidArgument("session_id is required")
        check_name(req.session_id, "session_id")
        event: TurnEnd | SessionEnd
        if req.kind == f.EVENT_TURN_END:
            try:
                reason = TurnEndReason(req.reason)
            except ValueError:
                raise InvalidArgument(f"unknown turn end reason {req.reason}") from None
            event = TurnEnd(reason, req.expected_gap_ms, check_name(req.tool_name, "tool_name"))
        elif req.kind == f.EVENT_SESSION_END:
            event = SessionEnd(discard=req.discard)
        else:
            raise InvalidArgument(f"unknown session event kind {req.kind} (1 turn end, "
                                  "2 session end)")
        return SessionEvent(namespace, req.session_id, event)

    # -- GET: one frame per key, the block sent straight from where it is -----------------

    async def get(self, header: f.Header, meta: Any) -> None:
        req = f.GetRequest.decode(meta)
        namespace = self.namespace(req.namespace)
        keys = req.keys
        validate_keys(keys)
        session = session_or_none(req.session_id)
        rid = header.request_id
        send = self.io.send
        if not keys:
            await send((f.encode_header(_GET_RESPONSE, rid, 6) + f.encode_get_block(0, False, 0),))
            return
        # Consecutive answers go out in one sendmsg: L1 hits stay pinned until
        # their batch is sent. Before a key that is not in L1 the batch is sent
        # first, so a promotion (which needs L1 room) never waits on this
        # request's own pins.
        in_l1 = self.store.index.blocks.get
        open_read = self.store.open_read
        encode = f.encode_get_frame
        parts: list[Buffer] = []
        readers: list[BlockReader] = []
        pending = 0
        last = len(keys) - 1
        try:
            for index, key in enumerate(keys):
                block = (namespace, key)
                if readers and ((entry := in_l1(block)) is None or entry.l1_offset < 0):
                    await self._flush(parts, readers)
                    pending = 0
                flags = f.FLAG_MORE if index < last else 0
                try:
                    reader = await open_read(block, session)
                    # As the gRPC Get: an L1 copy is checked whole before its
                    # first byte goes out (a small one right here).
                    if reader is not None and reader.needs_check:
                        small = reader.size <= VERIFY_INLINE_BYTES
                        if not small or not reader.intact(reader.size):
                            reader = await self._verified(reader, block, session, small)
                except KVStoreError:
                    await self._flush(parts, readers)  # the answers before the error
                    raise
                if reader is None:
                    parts.append(encode(rid, index, 0, 0, flags))
                else:
                    readers.append(reader)
                    parts.append(encode(rid, index, int(reader.tier), reader.size, flags))
                    # A slice, not the reader's own view: the reader releases
                    # its view when it closes, whatever the socket layer holds.
                    parts.append(reader.view[0:])
                    pending += reader.size
                if pending >= _BATCH_BYTES or len(parts) >= _BATCH_PARTS:
                    await self._flush(parts, readers)
                    pending = 0
                if index & 4095 == 4095:
                    # Misses and hits in L1 never wait: a GET of many keys
                    # lets the other connections in now and then.
                    await asyncio.sleep(0)
            await self._flush(parts, readers)
        finally:
            for reader in readers:
                reader.close()

    # -- answered on the spot (from the socket's readable callback) ----------------------

    def answer_now(self, opcode: int, flags: int, request_id: int,
                   meta: memoryview) -> Answered:
        """Answer a request that needs no waiting (a PING; a GET whose blocks
        are all L1 hits small enough to check here; a LOOKUP that needs no
        L3 query; an SHM_ACQUIRE of L1 hits; an SHM_RELEASE; an SHM_RESERVE
        or SHM_COMMIT that needs no waiting; a SESSION_EVENT) with one
        ``sendmsg``: YES when answered (what
        the socket did not take is sent by the connection's task), ERROR when
        answered with an error, NO when nothing was done (the task answers
        it, errors included)."""
        if opcode == _GET:
            done = self._get_now(request_id, meta)
        elif opcode == _SHM_COMMIT:
            return self._shm_commit_now(flags, request_id, meta)
        elif opcode == _SHM_RESERVE:
            done = self._shm_reserve_now(request_id, meta)
        elif opcode == _SHM_ACQUIRE:
            done = self._shm_acquire_now(request_id, meta)
        elif opcode == _SHM_RELEASE:
            done = self._shm_release_now(request_id, meta)
        elif opcode == _LOOKUP:
            done = self._lookup_now(request_id, meta)
        elif opcode == _SESSION_EVENT:
            done = self._session_event_now(request_id, meta)
        elif opcode == _PING and not len(meta):
            self.reply_now(_PING_ANSWER if not request_id else f.encode_header(
                f.Op.PING | f.RESPONSE, request_id, 0))
            done = True
        else:
            done = False
        return Answered.YES if done else Answered.NO

    def reply_now(self, answer: bytes) -> None:
        io = self.io
        assert isinstance(io, SocketIO)
        sent = io.send_now((answer,))
        if sent < len(answer):
            io.defer((answer,), sent, _nothing)

    def _lookup_now(self, rid: int, meta: memoryview) -> bool:
        try:
            req = f.LookupRequest.decode(meta)
            namespace = self.namespace(req.namespace)
            found = self.store.lookups.lookup_tiers_now(namespace, req.keys, req.lease_ms,
                                                        session_or_none(req.session_id))
        except (f.FrameError, KVStoreError):
            return False
        if found is None:
            return False
        result = f.encode_lookup_result(*found)
        self.reply_now(f.encode_header(_LOOKUP_RESPONSE, rid, len(result)) + result)
        return True

    def _shm_acquire_now(self, rid: int, meta: memoryview) -> bool:
        # The broker grants every lease as acquire() would, or declines
        # having changed nothing (a key to promote or wait for); an error
        # is raised before anything changes, and the task raises it again.
        try:
            req = f.ShmAcquireRequest.decode(meta)
            namespace = self.namespace(req.namespace)
            granted = self.shm.acquire_now(namespace, req.keys, session_or_none(req.session_id),
                                           req.lease_ms, req.release, self.owner,
                                           self.binding.identity)
        except (f.FrameError, KVStoreError):
            return False
        if granted is None:
            return False
        leases, released, expired = granted
        self._took_leases(req.release, leases)
        result = f.encode_shm_acquire_granted(
            self.shm.lease_ms(req.lease_ms), released, expired,
            [(lease.lease_id, lease.offset, lease.size, lease.checksum, lease.generation)
             for lease in leases], _L1)
        self.reply_now(f.encode_header(_SHM_ACQUIRE_RESPONSE, rid, len(result)) + result)
        return True

    def _shm_release_now(self, rid: int, meta: memoryview) -> bool:
        try:  # release() checks every id before it ends any
            req = f.ShmReleaseRequest.decode(meta)
            namespace = self.namespace(req.namespace) if req.namespace else ""
            released, expired = self.shm.release(req.lease_ids, namespace, self.owner)
        except (f.FrameError, KVStoreError):
            return False
        self.leases.difference_update(req.lease_ids)
        result = f.ShmReleaseResult(released, expired).encode()
        self.reply_now(f.encode_header(_SHM_RELEASE_RESPONSE, rid, len(result)) + result)
        return True

    def _took_leases(self, release: list[int], leases: list[Any]) -> None:
        """The session's leases after an acquire that ended ``release``."""
        held = self.leases
        if release:
            held.difference_update(release)
        for lease in leases:
            if isinstance(lease, Lease):
                held.add(lease.lease_id)

    def _get_now(self, rid: int, meta: memoryview) -> bool:
        # GetRequest.decode, unrolled for this path: anything it would not
        # take as a GET of 1..N valid keys goes to the task (which says why).
        buf = bytes(meta)
        try:
            end = 2 + _u16(buf, 0)[0]
            raw_namespace = buf[2:end]
            pos = end + 2
            end = pos + _u16(buf, end)[0]
            raw_session = buf[pos:end]
            count = _u32(buf, end)[0]
            pos = end + 4
            if not 0 < count <= _BATCH_PARTS // 2:
                return False
            keys = []
            for _ in range(count):
                end = pos + 2 + _u16(buf, pos)[0]
                key = buf[pos + 2:end]
                if not 0 < len(key) <= MAX_KEY_BYTES:
                    return False
                keys.append(key)
                pos = end
            if pos != len(buf) or len(raw_session) > MAX_NAME_BYTES:
                return False  # (the task's decode says what is wrong)
            session = raw_session.decode() if raw_session else None
        except (struct.error, UnicodeDecodeError):
            return False
        namespaces = self._fast_namespaces
        if namespaces is None:
            namespaces = self._fast_namespaces = {}
        namespace = namespaces.get(raw_namespace)
        if namespace is None:
            try:
                namespace = self.namespace(raw_namespace.decode())
            except (UnicodeDecodeError, KVStoreError):
                return False
            if len(namespaces) < _CHECKED_NAMESPACES:
                namespaces[raw_namespace] = namespace
        # Every block first (no side effect): one not served at once sends the
        # whole request the ordinary way.
        reads = self.store.reads
        ready = reads.l1_ready
        # (a block is checked here, on the loop, only up to 4 MiB; unchecked
        # bytes can go at once whatever their size)
        whole = VERIFY_INLINE_BYTES if reads.check.enabled else _BATCH_BYTES
        views: list[memoryview] = []
        total = 0
        for key in keys:
            view = ready((namespace, key), whole)
            if view is None:
                return False
            total += len(view)
            views.append(view)
        if total > _BATCH_BYTES:
            return False
        hit = reads.count_l1_hit
        last = count - 1
        parts: list[Buffer] = []
        for index, view in enumerate(views):
            hit((namespace, keys[index]), session)
            parts.append(_HIT_FRAME.pack(_MAGIC, _VERSION, _GET_RESPONSE, _MORE if index < last
                                         else 0, rid, 6, len(view), index, 1, _L1))
            parts.append(view)
        io = self.io
        assert isinstance(io, SocketIO)
        sent = io.send_now(parts)
        if sent < total + count * _HIT_FRAME.size:
            # The rest is sent by the task: the blocks stay pinned until then.
            entry = self.store.index.blocks.__getitem__
            entries = [entry((namespace, key)) for key in keys]
            pin = self.store.index.pin_reader
            for e in entries:
                pin(e)
            io.defer(parts, sent, functools.partial(self._unpin_all, entries),
                     functools.partial(self._send_rechecked, list(entries))
                     if self._recheck else None)
        return True

    def _unpin_all(self, entries: list[Entry]) -> None:
        unpin = self.store.index.unpin_reader
        for entry in entries:
            unpin(entry)

    async def _flush(self, parts: list[Buffer], readers: list[BlockReader]) -> None:
        """Send the answers batched so far, then unpin their blocks."""
        if parts:
            if readers and self._recheck:
                owners = [r.entry if r.entry is not None and r.entry.l1_offset >= 0 else None
                          for r in readers]
                await self.io.send(parts, functools.partial(self._send_rechecked, owners))
            else:
                await self.io.send(parts)
            parts.clear()
        for reader in readers:
            reader.close()
        readers.clear()

    async def _send_rechecked(self, owners: list[Entry | None], parts: Sequence[Buffer],
                              sent: int) -> None:
        """The rest of a GET's answer that the socket did not take at once
        (the reader is slower than the server), from a shared arena: the
        blocks were checked before their first byte went, and their bytes
        are sent from the arena without a copy, so every attached client
        could change them until they go. Each block's last byte is withheld
        until its bytes check again; a block that no longer does ends the
        connection there, its frame unfinished (the client has no whole copy
        of it; the next Get finds the copy corrupt and drops it).
        ``owners``: the entry of each block's view in ``parts`` (the views
        are the memoryviews, in order; None: bytes not in the arena)."""
        io = self.io
        left: list[Buffer] = []
        offset = 0
        view = 0
        for part in parts:
            size = len(part)
            start = min(max(sent - offset, 0), size)
            offset += size
            entry = None
            if isinstance(part, memoryview):
                entry = owners[view]
                view += 1
            if start == size:
                continue  # gone with the first send, right after its check
            if entry is None:
                left.append(part[start:])
                continue
            if start < size - 1:
                left.append(part[start:size - 1])
            await io.send(left)
            left = []
            if not await self._unchanged(part, entry):
                log.warning("data plane: a block changed in the shared arena while its GET "
                            "answer was being sent (a client writing where it holds no slot?): "
                            "connection closed before the block's last byte")
                raise ConnectionClosed("a block changed while its answer was sent")
            left.append(part[size - 1:])
        if left:
            await io.send(left)

    async def _unchanged(self, view: Buffer, entry: Entry) -> bool:
        """Whether the block's arena bytes ``view`` still match its checksum."""
        if len(view) <= VERIFY_INLINE_BYTES:
            return l1_intact(view, entry)
        return await asyncio.get_running_loop().run_in_executor(
            self.store.executor, l1_intact, view, entry)

    async def _verified(self, reader: BlockReader, block: BlockId, session: str | None,
                        failed: bool) -> BlockReader | None:
        """``reader`` once its copy is checked whole (``failed``: it already
        failed the check). A corrupt copy is dropped and the block read once
        more (its L2 or L3 copy, or a miss), as the gRPC Get does."""
        if not failed and await self._intact(reader):
            return reader
        reader.close()  # drops the corrupt copy
        again = await self.store.open_read(block, session, reread=True)
        if again is None or await self._intact(again):
            return again
        again.close()
        return None

    async def _intact(self, reader: BlockReader) -> bool:
        size = reader.size
        if size <= VERIFY_INLINE_BYTES:
            return reader.intact(size)
        return await asyncio.get_running_loop().run_in_executor(
            self.store.executor, reader.intact, size)

    # -- PUT: blocks received into their L1 extents (put.PutProgress) -------------------

    async def put(self, header: f.Header, meta: Any) -> None:
        try:
            req, namespace, ack = self._put_request(meta, header.payload_len)
        except (f.FrameError, ConnectionClosed, asyncio.CancelledError):
            raise  # the connection ends: nothing to keep in step
        except Exception:
            if header.payload_len:
                await self.io.discard(header.payload_len)  # keep the stream in step
            raise
        await PutProgress(self, header.request_id, req, namespace, ack,
                          header.payload_len).run()

    def put_now(self, request_id: int, meta: memoryview, payload_len: int) -> PutProgress | None:
        """Begin a PUT from the readable callback (the connection then feeds
        it its payload: PutProgress.feed), or None: the task reads it (a
        request it refuses included, for its error; what a failed
        reservation evicted at once stays evicted, as for any reservation).
        Only what needs no wait to begin: acknowledged at ``memory`` without
        a write-back that writes every block first, blocks in the block
        format small enough to verify on the loop, and room in L1 for the
        first block now."""
        try:
            req, namespace, ack = self._put_request(meta, payload_len)
        except (f.FrameError, KVStoreError):
            return None
        if ack != AckLevel.MEMORY or not req.blocks or not self.store.acked_now():
            return None
        placement = self.store.placement
        for b in req.blocks:
            if b.format == BlockFormat.KV_V1 and not placement.verifies_on_loop(b.size):
                return None
        progress = PutProgress(self, request_id, req, namespace, ack, payload_len)
        if not progress.reserve_now():
            return None
        return progress

    def check_open(self) -> None:
        """ConnectionClosed once the client has closed or reset the connection,
        for a block about to be stored after a wait (for L1 room, for L2
        write-queue room, for the delete of an older copy, for its bytes):
        a client killed meanwhile, whose bytes had all come, must not
        overwrite what its successor put and was told was stored."""
        if self.io.peer_gone():
            raise ConnectionClosed("the client went before its block was stored")

    def _put_request(self, meta: Any, payload_len: int) -> tuple[f.PutRequest, str, AckLevel]:
        """A PUT's request, decoded, with everything about it that can be
        checked before its bytes come (its payload's length included)."""
        req = f.PutRequest.decode(meta)
        namespace = self.namespace(req.namespace)
        if req.ack not in _ACK:
            raise InvalidArgument(f"unknown acknowledgement level {req.ack}")
        ack = _ACK[req.ack]
        self.store.check_ack(ack)
        placement = self.store.placement
        total = 0
        for i, b in enumerate(req.blocks):
            validate_key(b.key, i)
            if b.format not in _FORMATS:
                raise InvalidArgument(f"block #{i}: unknown block format {b.format}")
            try:
                placement.check_block_size(b.size)
            except (BlockTooLarge, MalformedRequest) as exc:
                raise exc.about(f"block #{i}") from None
            self.store.check_durable_size(ack, b.size, i)  # before its bytes come
            total += b.size
        if total != payload_len:
            raise MalformedRequest(f"PUT payload is {payload_len} bytes but its blocks' sizes "
                                   f"add up to {total}")
        return req, namespace, ack

    # -- shared memory: the broker, as the session's owner --------------------------------

    async def shm_reserve(self, header: f.Header, meta: Any) -> None:
        req = f.ShmReserveRequest.decode(meta)
        namespace = self.namespace(req.namespace)
        reserving = asyncio.ensure_future(self.shm.reserve(
            namespace, req.blocks, session_or_none(req.session_id), self.owner))
        try:
            # It may wait for L1 room (up to the reserve's wait): a client
            # that goes meanwhile ends it, and gives back what it holds,
            # within _PEER_CHECK_S (a review: a client killed while its
            # reserve waited held its session and 4 slots for 28 s, L1 room
            # every other client waited for).
            while not (await asyncio.wait((reserving,), timeout=_PEER_CHECK_S))[0]:
                self.check_open()
        except BaseException:
            reserving.cancel()  # (reserve gives back the slots it took)
            raise
        slots, open_ms = reserving.result()
        # FLAG_SHM_NEXT: this server takes the extended SHM_COMMIT (a client's
        # first Put learns it here, before its commit).
        await self.reply(header, self._reserved(slots, open_ms), f.FLAG_SHM_NEXT)

    def _shm_reserve_now(self, rid: int, meta: memoryview) -> bool:
        # The broker reserves every slot at once or none (where one would
        # wait for room); an error is raised before anything is reserved,
        # and the task raises it again.
        try:
            req = f.ShmReserveRequest.decode(meta)
            namespace = self.namespace(req.namespace)
            slots = self.shm.reserve_now(namespace, req.blocks, session_or_none(req.session_id),
                                         self.owner)
        except (f.FrameError, KVStoreError):
            return False
        if slots is None:
            return False
        result = self._reserved(slots, 0)
        self.reply_now(f.encode_header(_SHM_RESERVE_RESPONSE, rid, len(result), 0,
                                        f.FLAG_SHM_NEXT) + result)
        return True

    def _reserved(self, slots: list[Any], open_ms: int) -> bytes:
        """A SHM_RESERVE's answer; the slots are the session's until committed."""
        self.slots.update(s.slot_id for s in slots)
        return f.ShmReserveResult(open_ms, [
            (s.slot_id, s.offset, s.size, s.generation) for s in slots]).encode()

    async def shm_commit(self, header: f.Header, meta: Any) -> None:
        extended = bool(header.flags & f.FLAG_SHM_NEXT)
        req, namespace, specs = self._commit_request(meta, extended)
        started = self.shm.clock()
        # A vouched commit this large is stored at once and checked after
        # its answer, off the loop (SharedMemoryBroker.commit_unchecked), by
        # a task of its own: the connection goes on to its next request (the
        # client's next reserve), one check in flight at a time.
        left: list[Any] = []
        try:
            if header.flags & f.FLAG_SHM_VOUCHED and self.shm.answers_vouched():
                if self._answered_check is not None:
                    await asyncio.wait((self._answered_check,))
                stored, nbytes, left = await self.shm.commit_unchecked(
                    namespace, _ACK[req.ack], specs, req.abandon, self.owner,
                    session=session_or_none(req.session_id), check_open=self.check_open)
            else:
                stored, nbytes = await self.shm.commit(
                    namespace, _ACK[req.ack], specs, req.abandon, self.owner,
                    session=session_or_none(req.session_id), check_open=self.check_open)
        except BaseException:
            self._committed(specs, req.abandon, failed=True)
            raise
        self._committed(specs, req.abandon)
        try:
            if not extended:
                await self.reply(header, f.Counted(stored, nbytes).encode())
                return
            slots: list[Any] = []
            if req.reserve_next:
                slots, _ = await self.shm.restock(namespace, req.reserve_next, self.owner)
            await self.reply(header, self._commit_result(stored, nbytes, started, slots),
                             f.FLAG_SHM_NEXT)
        finally:
            if left:
                self._answered_check = asyncio.ensure_future(self._check_answered(left))

    async def _check_answered(self, left: list[Any]) -> None:
        try:
            await self.shm.check_answered(left)
        except Exception:  # the executor gone at shutdown: the blocks stay, reads check them
            log.warning("data plane: the check of an answered shared-memory commit did not "
                        "run", exc_info=True)

    def _shm_commit_now(self, flags: int, rid: int, meta: memoryview) -> Answered:
        # The broker commits on the spot or declines having changed nothing
        # (a commit that would wait: larger than it checks here, acknowledged
        # beyond memory, an overwrite waiting for its L2 delete); the slots
        # for the client's next Puts are those L1 has room for now.
        extended = bool(flags & f.FLAG_SHM_NEXT)
        try:
            req, namespace, specs = self._commit_request(meta, extended)
        except (f.FrameError, KVStoreError):
            return Answered.NO
        started = self.shm.clock()
        # A vouched commit is answered before its check (the check and the
        # client's copy of its next block then run at once); nothing else
        # runs on the loop before it is stored, so no reader sees the gap.
        # Not one that restocks: the restock, which the answer carries, may
        # evict, and an eviction can start the L2 write of a block this
        # commit replaces (take_now found its overwrite needed no wait).
        vouched = bool(flags & f.FLAG_SHM_VOUCHED) and not req.reserve_next and \
            self.shm.answers_vouched()
        try:
            taken = self.shm.take_now(namespace, _ACK[req.ack], specs, req.abandon,
                                      self.owner, session=session_or_none(req.session_id))
            if taken is None:
                return Answered.NO
            if vouched:
                stored, nbytes = len(taken), sum(r.size for _, r in taken)
            else:
                stored, nbytes = self.shm.store_taken(taken)
        except KVStoreError as exc:
            self._committed(specs, req.abandon, failed=True)
            self.reply_now(error_frame(rid, exc))
            return Answered.ERROR
        self._committed(specs, req.abandon)
        try:
            if not extended:
                result = f.Counted(stored, nbytes).encode()
                self.reply_now(f.encode_header(_SHM_COMMIT_RESPONSE, rid, len(result)) + result)
                return Answered.YES
            slots = self.shm.restock_now(namespace, req.reserve_next, self.owner) \
                if req.reserve_next else []
            result = self._commit_result(stored, nbytes, started, slots)
            self.reply_now(f.encode_header(_SHM_COMMIT_RESPONSE, rid, len(result), 0,
                                            f.FLAG_SHM_NEXT) + result)
            return Answered.YES
        finally:
            if vouched:
                self.shm.store_vouched(taken)

    def _commit_request(self, meta: Any, extended: bool
                        ) -> tuple[f.ShmCommitRequest, str, list[CommitSpec]]:
        """An SHM_COMMIT's request, its namespace checked, and its blocks."""
        req = f.ShmCommitRequest.decode(meta, extended)
        namespace = self.namespace(req.namespace)
        if req.ack not in _ACK:
            raise InvalidArgument(f"unknown acknowledgement level {req.ack}")
        if any(b[4] not in _FORMATS for b in req.blocks):
            raise InvalidArgument("unknown block format in SHM_COMMIT")
        keys = req.keys if extended else [b""] * len(req.blocks)
        # reserve_next (extended): anonymous slots for the client's next Puts,
        # reserved once this commit is done, as the gRPC ShmCommit does.
        self.shm.check_restock(req.reserve_next)
        return req, namespace, [
            CommitSpec(slot, offset, size, crc, BlockFormat(fmt), key)
            for (slot, offset, size, crc, fmt), key in zip(req.blocks, keys, strict=True)]

    def _committed(self, specs: list[CommitSpec], abandon: list[int],
                   failed: bool = False) -> None:
        # Committed, abandoned or given up by a failed commit: no longer ours
        # to give up (a foreign id was refused and never ours). A commit
        # refused before it took any slot (another owner's slot named, an ack
        # it cannot give) leaves its own slots reserved: still ours, given up
        # when the connection closes (they were forgotten, and held until
        # they expired).
        named = [s.slot_id for s in specs]
        named.extend(abandon)
        kept = self.shm.reserved_by(named, self.owner) if failed else ()
        self.slots.difference_update(named)
        self.slots.update(kept)

    def _commit_result(self, stored: int, nbytes: int, started: float, slots: list[Any]) -> bytes:
        """An extended SHM_COMMIT's answer; ``slots``: the restock, the
        session's like any reservation (given up if it closes first)."""
        open_ms = int((self.shm.clock() - started) * 1000.0) if slots else 0
        self.slots.update(s.slot_id for s in slots)
        return f.ShmCommitResult(stored, nbytes, open_ms, [
            (s.slot_id, s.offset, s.size, s.generation) for s in slots]).encode()

    async def shm_acquire(self, header: f.Header, meta: Any) -> None:
        req = f.ShmAcquireRequest.decode(meta)
        namespace = self.namespace(req.namespace)
        leases, released, expired = await self.shm.acquire(
            namespace, req.keys, session_or_none(req.session_id), req.lease_ms, req.release,
            self.owner, self.binding.identity)
        self._took_leases(req.release, leases)
        await self.reply(header, f.encode_shm_acquire_result(
            self.shm.lease_ms(req.lease_ms), released, expired,
            [None if lease is None else
             f.ShmUnleased(int(lease.tier)) if isinstance(lease, Unleased) else
             f.ShmLease(lease.lease_id, lease.offset, lease.size, lease.checksum,
                        lease.generation, int(lease.tier))
             for lease in leases]))

    async def shm_release(self, header: f.Header, meta: Any) -> None:
        req = f.ShmReleaseRequest.decode(meta)
        namespace = self.namespace(req.namespace) if req.namespace else ""
        released, expired = self.shm.release(req.lease_ids, namespace, self.owner)
        self.leases.difference_update(req.lease_ids)
        await self.reply(header, f.ShmReleaseResult(released, expired).encode())
