"""kvstore.v1.KVStore servicer: protobuf in, domain calls, protobuf out.

The only module on the server side that touches ``_pb2`` types. Errors are
raised as kvstore exceptions and mapped to statuses by the interceptor. The
bulk messages (PutChunk in, GetChunk out) go through the hand-written codec in
``kvstore.wire`` so block bytes are copied once; ``add_to_server`` registers
the service with those (de)serializers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from kvstore.dataplane.frames import VERSION
from kvstore.dataplane.server import DataPlaneServer
from kvstore.dataplane.tickets import Binding
from kvstore.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    MalformedRequest,
    PermissionDenied,
)
from kvstore.server.auth import Authorizer
from kvstore.server.interceptor import HoldRequest, Reserve
from kvstore.store import BlockReader, BlockWriter, CommitSpec, SharedMemoryBroker, TieredStore
from kvstore.store.reads import WHOLE_CHECK_BYTES
from kvstore.store.shm import Slot, Unleased
from kvstore.store.tiered import all_durable
from kvstore.types import (
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
from kvstore.wire import codec as wire
from kvstore.wire import lookup as lookup_wire
from kvstore.wire.pb import kvstore_pb2 as pb

_FORMATS = frozenset(int(f) for f in BlockFormat)
#: The smallest Get chunk the server sends (a smaller max_chunk_bytes is raised
#: to it; docs/protocol.md).
MIN_CHUNK_BYTES = 64 * 1024
#: How long a Put stream that ended inside a block waits for its cancel.
CANCEL_GRACE_S = 0.1
# GetSmallResponse fields (tags), and GetChunk.data's.
_SMALL_CHUNK = b"\x0a"  # 1, length-delimited
_SMALL_ANSWERED = b"\x10"  # 2, varint
_SMALL_ANSWERED_BYTES = 1 + 10  # its tag and the longest varint
_GET_DATA = b"\x2a"  # GetChunk.data: 5, length-delimited
#: The largest kvstore-clock accepted (s; ~year 5000 as a Unix time).
_MAX_CLIENT_CLOCK = float(1 << 37)
#: gRPC's default receive limit (grpc.max_receive_message_length, 4 MiB).
_STOCK_RECEIVE_LIMIT = 4 * 1024 * 1024

_ACK: dict[int, AckLevel] = {
    pb.ACK_LEVEL_UNSPECIFIED: AckLevel.MEMORY,
    pb.ACK_LEVEL_MEMORY: AckLevel.MEMORY,
    pb.ACK_LEVEL_LOCAL: AckLevel.LOCAL,
    pb.ACK_LEVEL_REMOTE: AckLevel.REMOTE,
}


#: The most a miss's chunk costs in a GetSmallResponse (its tag, length, and
#: a GetChunk of an index up to 2^32 and found = false).
_SMALL_MISS_BYTES = 16


def _tier_pb(tier: TierName | None) -> Any:
    # Tier values equal kvstore.v1.Tier numbers (checked by a unit test).
    return int(tier) if tier is not None else pb.TIER_UNSPECIFIED


class KVStoreServicer:
    """``dataplane``: the data plane OpenDataPlane opens sessions on (None:
    off, the call answers UNIMPLEMENTED); ``auth``: the grants a session is
    bound to (None: auth off)."""

    def __init__(self, store: TieredStore, shm: SharedMemoryBroker,
                 dataplane: DataPlaneServer | None = None,
                 auth: Authorizer | None = None) -> None:
        self.store = store
        self.shm = shm
        self.dataplane = dataplane
        self.auth = auth
        cfg = store.config.server
        self.default_chunk = cfg.chunk_bytes
        self.max_chunk = cfg.max_chunk_bytes
        self.put_idle = cfg.put_idle_ms / 1000.0
        # GetSmall's largest response: the message limit less room for framing.
        self.max_response = cfg.max_message_bytes - 64 * 1024
        # ... and when the request names none, what a stock gRPC client
        # receives (4 MiB by default in every gRPC implementation): a client
        # written from the proto alone must not get a response it refuses.
        self.default_response = min(self.max_response, _STOCK_RECEIVE_LIMIT - 64 * 1024)

    def _tick(self, context: grpc.aio.ServicerContext) -> None:
        """policy.clock = client: take the policy's time from the call."""
        if self.store.client_clock:
            for key, value in context.invocation_metadata() or ():
                if key == "kvstore-clock":
                    try:
                        now = float(value)
                    except ValueError:
                        raise InvalidArgument(
                            f"kvstore-clock metadata {value!r} is not a number") from None
                    # The clock never goes back: one absurd value (inf, 1e300)
                    # would stop it for good, or break the policy's arithmetic.
                    if not 0.0 <= now < _MAX_CLIENT_CLOCK:
                        raise InvalidArgument(
                            f"kvstore-clock metadata {value!r} is not a time in seconds "
                            f"from 0 to {_MAX_CLIENT_CLOCK:.0f}")
                    self.store.set_client_time(now)

    async def Put(self, request_iterator: AsyncIterator[wire.PutChunkView | wire.BadPutChunk],
                  context: grpc.aio.ServicerContext) -> pb.PutResponse:
        self._tick(context)
        store = self.store
        namespace = ""
        ack = AckLevel.MEMORY
        first_ack = 0
        first = True
        writer: BlockWriter | None = None
        durable: list[asyncio.Future[None]] = []
        stored = nbytes = 0
        chunks = aiter(request_iterator)
        chunk: wire.PutChunkView | wire.BadPutChunk | None = None
        try:
            while True:
                # A block half sent holds its L1 room, and an open stream a
                # call's state: a client that stops sending may not keep
                # either from everyone else for long (60,000 streams that sent
                # nothing held the server 100 MB past its memory bound).
                try:
                    async with asyncio.timeout(self.put_idle):
                        chunk = await anext(chunks, None)
                except TimeoutError:
                    if writer is None:
                        raise DeadlineExceeded(
                            f"no message for {self.put_idle:g} s after {stored} blocks "
                            "(server.put_idle_ms): the stream was ended; the blocks before "
                            "were stored") from None
                    raise DeadlineExceeded(
                        f"block #{stored}: no chunk for {self.put_idle:g} s with "
                        f"{writer.received} of {writer.size} bytes sent "
                        "(server.put_idle_ms): nothing of it was stored") from None
                if chunk is None:
                    break
                if isinstance(chunk, wire.BadPutChunk):
                    raise MalformedRequest(chunk.error)
                if first:
                    first = False
                    namespace = store.check_namespace(chunk.namespace)
                    if chunk.ack not in _ACK:
                        # (the chunk decoder reads the enum unsigned: -1 is 2^64 - 1)
                        level = chunk.ack - 2**64 if chunk.ack >= 2**63 else chunk.ack
                        raise InvalidArgument(f"unknown acknowledgement level {level}")
                    ack = _ACK[chunk.ack]
                    store.check_ack(ack)
                    first_ack = chunk.ack
                elif (chunk.namespace and chunk.namespace != namespace) or \
                        (chunk.ack and _ACK.get(chunk.ack) != ack):
                    # The stream's first message decides both; a later one
                    # naming others was stored as the first said, and answered
                    # OK (another tenant's namespace, a durability not given).
                    raise InvalidArgument(
                        f"block #{stored}: a later message of the Put stream names namespace "
                        f"{chunk.namespace!r} / ack {chunk.ack}, not the first message's "
                        f"{namespace!r} / {first_ack}: one Put stream has one namespace and "
                        "one acknowledgement level (leave them unset after the first)")
                if chunk.block_size:
                    if not chunk.key and writer is not None:
                        raise MalformedRequest(
                            f"block #{stored}: a chunk sets block_size without a key before "
                            f"the block is complete ({writer.received} of {writer.size} bytes "
                            "sent); only a block's first chunk carries its key and block_size")
                    if writer is not None:
                        raise MalformedRequest(
                            f"block #{stored + 1} starts before block #{stored} is complete "
                            f"({writer.received} of {writer.size} bytes sent)")
                    validate_key(chunk.key, stored)
                    store.check_durable_size(ack, chunk.block_size, stored)  # before its bytes
                    if chunk.format not in _FORMATS:
                        raise InvalidArgument(f"block #{stored}: unknown block format "
                                              f"{chunk.format}")
                    writer = await store.begin_put(namespace, chunk.key, chunk.block_size,
                                                   session_or_none(chunk.session_id),
                                                   BlockFormat(chunk.format))
                elif chunk.key:
                    if writer is not None:
                        raise MalformedRequest(
                            f"block #{stored}: a chunk names a key before the block is "
                            f"complete ({writer.received} of {writer.size} bytes sent); "
                            "only a block's first chunk carries its key and block_size")
                    # block_size 0 is the field's default: an empty block
                    # cannot be told from a missing size, so none is stored.
                    raise MalformedRequest(
                        f"block #{stored}: block_size is 0 (or missing); a block holds 1 to "
                        f"{store.config.server.max_block_bytes} bytes "
                        "(server.max_block_bytes), so empty blocks cannot be stored")
                elif chunk.format and writer is not None and chunk.format != writer.format:
                    raise InvalidArgument(
                        f"block #{stored}: format {chunk.format} on a chunk after the block's "
                        "first: a block's format is set on its first chunk only")
                elif writer is None:
                    if not chunk.data:
                        continue
                    raise MalformedRequest("data sent before any block's first chunk "
                                           "(key and block_size)")
                if chunk.data:
                    try:
                        writer.write(chunk.data)
                    except MalformedRequest as exc:
                        raise exc.about(f"block #{stored}") from None
                if writer.complete:
                    done, writer = writer, None
                    fut = await store.finish_put(done, ack, stored)
                    if fut is not None and ack >= AckLevel.LOCAL:
                        durable.append(fut)
                    stored += 1
                    nbytes += done.size
            if writer is not None:
                # A client's cancel ends the request stream too, and grpc.aio
                # cancels this task soon after: give it that moment (the call
                # then counts as CANCELLED, not as a malformed stream; a stream
                # that did end inside a block is refused 0.1 s later).
                await asyncio.sleep(CANCEL_GRACE_S)  # (a cancel interrupts it)
                if context.cancelled():
                    raise Cancelled(
                        f"the client cancelled the Put inside block #{stored} "
                        f"({writer.received} of {writer.size} bytes sent): nothing of it "
                        "was stored")
                raise MalformedRequest(
                    f"stream ended inside block #{stored} ({writer.received} of "
                    f"{writer.size} bytes sent): nothing of it was stored")
            if first:
                store.check_namespace("")
        finally:
            # The last message's bytes are let go now (copied into L1, or
            # refused): a stream not read to its end stays held by grpc's
            # receiver, which holds itself in a reference cycle with it
            # until the cyclic collector runs (kvstore.server.runtime).
            # (4,000 failed 1 MiB Puts took the server 3.9 GB past its bound.)
            if isinstance(chunk, wire.PutChunkView) and chunk.data.nbytes:
                chunk.data.release()  # (never the shared empty view)
            chunk = None
            if writer is not None:
                writer.abort()
        if durable:
            await all_durable(durable)
        return pb.PutResponse(stored=stored, bytes=nbytes)

    async def Get(self, request: pb.GetRequest,
                  context: grpc.aio.ServicerContext
                  ) -> AsyncIterator[bytes | Reserve | HoldRequest]:
        """The blocks' chunks. Before each block it yields :class:`Reserve`:
        the bytes its chunks may hold in the server while the client reads
        them (two chunks: the one grpc is sending, and its bytes object),
        taken by the interceptor from the server's budget for streamed
        responses before the block is opened and pinned."""
        self._tick(context)
        store = self.store
        namespace = store.check_namespace(request.namespace)
        # (not listed: a list of 65,536 keys is ~3.6 MB more per call, held
        # while the answer streams)
        keys = request.keys
        validate_keys(keys)
        # At least MIN_CHUNK_BYTES: a chunk costs the server a message's work, and a
        # 1-byte chunk would make one Get of a 4 MiB block minutes of CPU.
        chunk_bytes = min(max(request.max_chunk_bytes or self.default_chunk, MIN_CHUNK_BYTES),
                          self.max_chunk)
        session = session_or_none(request.session_id)
        held = _request_hold(keys)
        if held > _SMALL_REQUEST_BYTES:
            yield HoldRequest(held)  # (counted for the whole call; see HoldRequest)
        reserve = Reserve(2 * chunk_bytes)
        for index, key in enumerate(keys):
            yield reserve  # (nothing to take unless a smaller block shrank it)
            reader = await _open_intact(store, (namespace, key), session,
                                        max(chunk_bytes, WHOLE_CHECK_BYTES))
            if reader is None:
                yield wire.encode_get_chunk(index, False)
                continue
            try:
                if reader.size < chunk_bytes:
                    yield Reserve(2 * reader.size)  # one chunk, smaller
                tier = int(reader.tier)
                for offset, piece in reader.chunks(chunk_bytes):
                    if offset == 0:
                        msg = wire.encode_get_chunk(index, True, reader.size, 0, piece, tier)
                    else:
                        msg = wire.encode_get_chunk(index, True, 0, offset, piece)
                    yield msg
            finally:
                reader.close()

    async def GetSmall(self, request: pb.GetRequest,
                       context: grpc.aio.ServicerContext) -> bytes:
        """Unary Get: the leading blocks that fit one response (a serialized
        GetSmallResponse). One reader is open at a time, as in Get: a reader
        may hold L1 space (a promotion), and holding several could wait on
        each other for space in a small L1."""
        self._tick(context)
        store = self.store
        namespace = store.check_namespace(request.namespace)
        keys = request.keys  # (not listed: only the leading keys are read)
        validate_keys(keys)
        budget = self.default_response
        if request.max_response_bytes:
            budget = min(self.max_response, request.max_response_bytes)
        session = session_or_none(request.session_id)
        budget -= _SMALL_ANSWERED_BYTES  # the answered count, always sent
        chunks: list[bytes] = []
        answered = 0
        for index, key in enumerate(keys):
            # What does not fit is left to the Get stream before it is read:
            # read here and dropped, it was counted twice (a get, a hit, a
            # promotion), once here and once by the stream.
            indexed = store.index.peek((namespace, key))  # (counts nothing)
            if budget < _SMALL_MISS_BYTES or (indexed is not None and
                                               budget < 12 + indexed.size + 48):
                break
            reader = await _open_intact(store, (namespace, key), session, budget)
            if reader is None:
                # A miss costs its few bytes too: 65,535 of them took a
                # response past a stock client's 4 MiB.
                chunk = wire.encode_get_chunk(index, False)
                miss = _SMALL_CHUNK + wire.encode_varint(len(chunk)) + chunk
                budget -= len(miss)
                if budget < 0:
                    break
                chunks.append(miss)
                answered += 1
                continue
            try:
                head = wire.encode_get_chunk(index, True, reader.size, 0, b"", int(reader.tier))
                data_head = _GET_DATA + wire.encode_varint(reader.size)
                length = len(head) + len(data_head) + reader.size
                budget -= 12 + length  # the chunk's tag and length, and headroom
                if budget < 0:
                    break  # this block and the rest go by the Get stream
                answered += 1
                framed = (_SMALL_CHUNK, wire.encode_varint(length), head, data_head, reader.view)
                if len(keys) == 1:  # the whole response, with one copy of the block
                    return b"".join((*framed, _SMALL_ANSWERED, b"\x01"))
                chunks.append(b"".join(framed))
            finally:
                reader.close()
        chunks.append(_SMALL_ANSWERED + wire.encode_varint(answered))
        return b"".join(chunks)

    async def Lookup(self, request: pb.LookupRequest,
                     context: grpc.aio.ServicerContext) -> bytes:
        self._tick(context)
        namespace = self.store.check_namespace(request.namespace)
        found, codes = await self.store.lookup_codes(namespace, list(request.keys),
                                                     request.lease_ms,
                                                     session_or_none(request.session_id))
        return lookup_wire.encode_lookup_response(found, codes)  # serialized LookupResponse

    async def Delete(self, request: pb.DeleteRequest,
                     context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        self._tick(context)
        namespace = self.store.check_namespace(request.namespace)
        deleted = await self.store.delete(namespace, list(request.keys))
        return pb.DeleteResponse(deleted=deleted)

    async def Stats(self, request: pb.StatsRequest,
                    context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        namespace = self.store.check_held_namespace(request.namespace) \
            if request.namespace else None
        s = await self.store.namespace_stats(namespace) if namespace else self.store.stats()
        return pb.StatsResponse(
            tiers=[pb.TierStats(tier=_tier_pb(t.tier), blocks=t.blocks, bytes=t.bytes,
                                capacity=t.capacity, hits=t.hits, misses=t.misses,
                                evictions=t.evictions, demotions=t.demotions,
                                promotions=t.promotions, corrupt=t.corrupt,
                                unavailable=not t.available, used=t.used) for t in s.tiers],
            puts=s.puts, gets=s.gets, get_hits=s.get_hits, session_events=s.session_events,
            policy=s.policy, namespace=s.namespace,
        )

    async def SessionEvent(self, request: pb.SessionEventRequest,
                           context: grpc.aio.ServicerContext) -> pb.SessionEventResponse:
        self._tick(context)
        namespace = self.store.check_namespace(request.namespace)
        which = request.WhichOneof("event")
        if (not request.session_id and which in ("turn_end", "session_end", None)) or \
                (which == "prefetch" and not request.session_id and not request.prefetch.keys):
            raise InvalidArgument("session_id is required")
        check_name(request.session_id, "session_id")
        event: Any
        if which == "turn_end":
            te = request.turn_end
            try:
                reason = TurnEndReason(te.reason)
            except ValueError:
                raise InvalidArgument(f"unknown turn end reason {te.reason}") from None
            event = TurnEnd(reason, te.expected_gap_ms, check_name(te.tool_name, "tool_name"))
        elif which == "session_end":
            event = SessionEnd(discard=request.session_end.discard)
        elif which == "prefetch":
            blocks, nbytes = self.store.prefetch(namespace, request.session_id,
                                                 list(request.prefetch.keys))
            return pb.SessionEventResponse(blocks=blocks, bytes=nbytes)
        elif which == "pin":
            blocks, nbytes = await self.store.pin(namespace, list(request.pin.keys),
                                                  request.pin.ttl_ms)
            return pb.SessionEventResponse(blocks=blocks, bytes=nbytes)
        elif which == "unpin":
            blocks, nbytes = self.store.unpin(namespace, list(request.unpin.keys))
            return pb.SessionEventResponse(blocks=blocks, bytes=nbytes)
        else:
            raise InvalidArgument("SessionEvent needs one of turn_end, session_end, prefetch, "
                                  "pin or unpin")
        self.store.session_event(SessionEvent(namespace, request.session_id, event))
        return pb.SessionEventResponse()

    # -- shared memory -----------------------------------------------------------------

    async def ShmAttach(self, request: pb.ShmAttachRequest,
                        context: grpc.aio.ServicerContext) -> pb.ShmAttachResponse:
        self.shm._require()
        if request.namespace:
            self._granted(context, request.namespace)
            self.shm.check_namespace(self.store.check_namespace(request.namespace))
        elif self.auth is not None and self.shm.namespaces:
            # The arena holds the shared-memory namespaces' blocks: its path
            # goes to identities granted one of them only.
            grant = self.auth.identify(context.invocation_metadata(), context.auth_context())
            if grant.namespaces is not None and not grant.namespaces & self.shm.namespaces:
                raise PermissionDenied(
                    f"identity {grant.identity!r} is granted none of the namespaces that may "
                    "use shared memory here (server.shm_namespaces)")
        return pb.ShmAttachResponse(path=self.shm.path, size=self.store.l1.capacity,
                                    instance=self.shm.instance,
                                    reserve_ms=self.shm.reserve_ms,
                                    default_lease_ms=self.shm.default_lease_ms,
                                    release_on_acquire=True, owner=self.shm.new_owner(),
                                    anonymous_slots=True,
                                    marker_offset=self.shm.marker())

    async def ShmReserve(self, request: pb.ShmReserveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ShmReserveResponse:
        self._tick(context)
        namespace = self.store.check_namespace(request.namespace)
        slots, open_ms = await self.shm.reserve(
            namespace, [(b.key, b.size) for b in request.blocks],
            session_or_none(request.session_id), check_name(request.owner, "owner"))
        return pb.ShmReserveResponse(slots=[_slot_pb(s) for s in slots], open_ms=open_ms)

    async def ShmCommit(self, request: pb.ShmCommitRequest,
                        context: grpc.aio.ServicerContext) -> pb.ShmCommitResponse:
        self._tick(context)
        namespace = self.store.check_namespace(request.namespace)
        if request.ack not in _ACK:
            raise InvalidArgument(f"unknown acknowledgement level {request.ack}")
        if any(b.format not in _FORMATS for b in request.blocks):
            raise InvalidArgument("unknown block format in ShmCommit")
        specs = [CommitSpec(b.slot_id, b.offset, b.size, b.crc32c, BlockFormat(b.format), b.key)
                 for b in request.blocks]
        started = self.shm.clock()
        # reserve_next (issue 14, one round trip per shm Put): anonymous slots
        # for the client's next Puts, reserved once this commit is done.
        restock = list(request.reserve_next)
        self.shm.check_restock(restock)
        stored, nbytes = await self.shm.commit(namespace, _ACK[request.ack], specs,
                                               list(request.abandon),
                                               check_name(request.owner, "owner"),
                                               session=session_or_none(request.session_id))
        response = pb.ShmCommitResponse(stored=stored, bytes=nbytes)
        if restock:
            slots, _ = await self.shm.restock(namespace, restock,
                                              check_name(request.owner, "owner"))
            response.next_slots.extend(_slot_pb(s) for s in slots)
            response.next_open_ms = int((self.shm.clock() - started) * 1000.0)
        return response

    async def ShmAcquire(self, request: pb.ShmAcquireRequest,
                         context: grpc.aio.ServicerContext) -> pb.ShmAcquireResponse:
        self._tick(context)
        namespace = self.store.check_namespace(request.namespace)
        # request.release: the previous Get's leases, piggybacked; ended before
        # acquiring, checked as ShmRelease checks them.
        # Under auth a tenant's share of the leases is its identity's (the
        # interceptor has checked the credential).
        identity = "" if self.auth is None else self.auth.identify(
            context.invocation_metadata(), context.auth_context()).identity
        leases, released, expired = await self.shm.acquire(
            namespace, list(request.keys), session_or_none(request.session_id), request.lease_ms,
            list(request.release), check_name(request.owner, "owner"), identity)
        return pb.ShmAcquireResponse(leases=[
            pb.ShmLease(hit=False) if lease is None else
            pb.ShmLease(hit=False, tier=_tier_pb(lease.tier)) if isinstance(lease, Unleased)
            else pb.ShmLease(
                hit=True, lease_id=lease.lease_id, offset=lease.offset, size=lease.size,
                crc32c=lease.checksum, generation=lease.generation,
                tier=_tier_pb(lease.tier))
            for lease in leases], released=released, expired=expired,
            lease_ms=self.shm.lease_ms(request.lease_ms))

    async def ShmRelease(self, request: pb.ShmReleaseRequest,
                         context: grpc.aio.ServicerContext) -> pb.ShmReleaseResponse:
        self._tick(context)
        # Leases are bound to the namespace and owner that took them; a
        # namespace named here is checked against the grant as elsewhere.
        if request.namespace:
            self._granted(context, request.namespace)
        namespace = self.store.check_namespace(request.namespace) if request.namespace else ""
        released, expired = self.shm.release(list(request.lease_ids), namespace,
                                             check_name(request.owner, "owner"))
        return pb.ShmReleaseResponse(released=released, expired=expired)


    def _granted(self, context: grpc.aio.ServicerContext, namespace: str) -> None:
        """The optional namespace of a method open to any identity (ShmAttach,
        ShmRelease): the caller's grant must name it (PERMISSION_DENIED, as
        for the methods whose namespace the interceptor checks)."""
        if self.auth is not None:
            grant = self.auth.identify(context.invocation_metadata(), context.auth_context())
            self.auth.authorize(grant, "Get", namespace)

    # -- issue 14 data plane -------------------------------------------------------------

    async def OpenDataPlane(self, request: pb.OpenDataPlaneRequest,
                            context: grpc.aio.ServicerContext) -> pb.OpenDataPlaneResponse:
        dp = self.dataplane
        if dp is None or not (dp.tcp_address or dp.unix_path):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "this server has no data plane (server.data_plane = false, "
                                "or both its listeners off): use the gRPC calls")
            raise AssertionError("unreachable")  # abort raises
        identity, namespaces = "", None
        credential: tuple[str, ...] = ()
        if self.auth is not None:
            # The interceptor has checked the credential; the ticket carries its grant.
            credential, grant = self.auth.identify_credential(context.invocation_metadata(),
                                                              context.auth_context())
            identity, namespaces = grant.identity, grant.namespaces
            if request.namespace:
                self.auth.authorize(grant, "Get", request.namespace)
        if request.namespace:
            self.store.check_namespace(request.namespace)
        owner = check_name(request.shm_owner, "shm_owner") or self.shm.new_owner()
        ticket = dp.issue_ticket(Binding(identity, namespaces, owner, credential))
        return pb.OpenDataPlaneResponse(
            ticket=ticket, tcp_address=dp.tcp_address, unix_path=dp.unix_path,
            ticket_ms=dp.tickets.ticket_ms, max_meta_bytes=dp.max_meta,
            max_payload_bytes=dp.max_payload, timeout_ms=int(dp.timeout * 1000),
            version=VERSION, tls=dp.tls is not None and bool(dp.tcp_address))

    # -- ops commands ------------------------------------------------------------------

    async def ListBlocks(self, request: pb.ListBlocksRequest,
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.ListBlocksResponse]:
        namespace = self.store.check_held_namespace(request.namespace)
        blocks, truncated = await self.store.list_blocks(namespace, request.prefix,
                                                         request.limit)
        for start in range(0, max(len(blocks), 1), _LIST_BATCH):
            batch = blocks[start:start + _LIST_BATCH]
            yield pb.ListBlocksResponse(
                blocks=[pb.ListedBlock(key=b.key, size=b.size,
                                       tiers=[_tier_pb(t) for t in b.tiers],
                                       age_ms=int(b.age_s * 1000)) for b in batch],
                truncated=truncated and start + _LIST_BATCH >= len(blocks))

    async def Flush(self, request: pb.FlushRequest,
                    context: grpc.aio.ServicerContext) -> pb.FlushResponse:
        namespace = self.store.check_held_namespace(request.namespace)
        return pb.FlushResponse(flushed=await self.store.flush(namespace))


def _request_hold(keys: Sequence[bytes]) -> int:
    """What a Get's request holds in the server while its answer streams,
    counted in the budget for requests of many keys: protobuf's parsed copy
    of its keys (~38 B a
    key beyond their bytes, measured: 2.5 MB for 65,536 keys of 5 bytes).
    (40 unread Gets of 65,536 keys each held 440 MiB beside their chunks,
    past the memory bound, when they listed their keys too.)"""
    return sum(map(len, keys)) + 48 * len(keys)


#: A Get whose request holds more than this (~80 short keys) counts it in the
#: budget for requests of many keys (interceptor.HoldRequest); smaller ones
#: are not counted:
#: server.max_calls of them hold 16 MiB at most beside each call's own ~6 KB.
_SMALL_REQUEST_BYTES = 4096


#: Blocks per ListBlocksResponse (a few hundred bytes each: well under any
#: message limit).
_LIST_BATCH = 256


def _slot_pb(slot: Slot) -> pb.ShmSlot:
    return pb.ShmSlot(slot_id=slot.slot_id, offset=slot.offset, size=slot.size,
                      generation=slot.generation)


async def _open_intact(store: TieredStore, block: BlockId, session: str | None,
                       whole_limit: int) -> BlockReader | None:
    """The block's reader, its L1 copy checked whole first when it is at
    most ``whole_limit`` bytes: a corrupt copy is dropped and the block read
    again (its L2 or L3 copy, or a miss), so no wrong byte is ever sent."""
    for attempt in range(2):
        reader = await store.open_read(block, session, reread=attempt > 0)
        if reader is None or reader.intact(whole_limit):
            return reader
        reader.close()  # drops the corrupt copy
    return None


def add_to_server(servicer: KVStoreServicer, server: grpc.aio.Server) -> None:
    """Register the kvstore.v1.KVStore service with the bulk-message codec."""
    handlers = {
        "Put": grpc.stream_unary_rpc_method_handler(
            servicer.Put, request_deserializer=wire.decode_put_chunk_or_error,
            response_serializer=pb.PutResponse.SerializeToString),
        "Get": grpc.unary_stream_rpc_method_handler(
            servicer.Get, request_deserializer=pb.GetRequest.FromString,
            response_serializer=wire.identity),
    }
    handlers["ListBlocks"] = grpc.unary_stream_rpc_method_handler(
        servicer.ListBlocks, request_deserializer=pb.ListBlocksRequest.FromString,
        response_serializer=pb.ListBlocksResponse.SerializeToString)
    handlers["GetSmall"] = grpc.unary_unary_rpc_method_handler(
        servicer.GetSmall, request_deserializer=pb.GetRequest.FromString,
        response_serializer=wire.identity)  # the handler serializes GetSmallResponse
    handlers["Lookup"] = grpc.unary_unary_rpc_method_handler(
        servicer.Lookup, request_deserializer=pb.LookupRequest.FromString,
        response_serializer=wire.identity)  # the handler serializes (kvstore.lookup_wire)
    for name, req, resp in (
        ("Delete", pb.DeleteRequest, pb.DeleteResponse),
        ("Stats", pb.StatsRequest, pb.StatsResponse),
        ("SessionEvent", pb.SessionEventRequest, pb.SessionEventResponse),
        ("ShmAttach", pb.ShmAttachRequest, pb.ShmAttachResponse),
        ("ShmReserve", pb.ShmReserveRequest, pb.ShmReserveResponse),
        ("ShmCommit", pb.ShmCommitRequest, pb.ShmCommitResponse),
        ("ShmAcquire", pb.ShmAcquireRequest, pb.ShmAcquireResponse),
        ("ShmRelease", pb.ShmReleaseRequest, pb.ShmReleaseResponse),
        ("Flush", pb.FlushRequest, pb.FlushResponse),
        ("OpenDataPlane", pb.OpenDataPlaneRequest, pb.OpenDataPlaneResponse),
    ):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVStore"].full_name
