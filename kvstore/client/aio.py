"""The asyncio client (a grpc.aio channel), with the same API as the sync one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc
import grpc.aio

from kvstore.client import _convert as conv
from kvstore.client import kv
from kvstore.client._aioput import (
    aio_channel_closed,
    aio_channel_opened,
    check_aio_after_fork,
    parents_objects,
    put_stream,
    task_cancelled,
)
from kvstore.client._base import ClientBase, ClientSettings, open_channel, turn_end_event
from kvstore.client._common import (
    DEFAULT_TARGET,
    GET_SMALL,
    SMALL_GET_BYTES,
    BlockBuffers,
    Blocks,
    GetAssembler,
    KeyLike,
    PutResult,
    check_lease_ms,
    check_session_id,
    feed_small_response,
    key_list,
    max_response_bytes,
    normalize_buffers,
    normalize_keys,
    normalize_keys_with_lengths,
    resolve_namespace,
    small_request_suffix,
)
from kvstore.client._errors import closed_in_flight, error_from_rpc
from kvstore.client.aio_dataplane import AioConnection, AsyncDataPlane
from kvstore.client.dataplane import data_plane_mode
from kvstore.dataplane import frames
from kvstore.dataplane.frames import Op
from kvstore.errors import InvalidArgument
from kvstore.types import (
    AckLevel,
    BlockFormat,
    BlockListing,
    ListedBlock,
    LookupResult,
    Pin,
    Prefetch,
    SessionEnd,
    SessionEventResult,
    SessionHint,
    StoreStats,
    TurnEndReason,
    Unpin,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack


class AsyncClient(ClientBase):
    """asyncio kvstore client; see :class:`kvstore.Client` for the arguments
    (all but ``aio_put`` and ``busy_poll_us``: the event loop waits).

    The channel opens on the first call, in the running event loop, and is
    bound to that loop: use one AsyncClient per loop. ``async with`` closes it.

    ``data_plane`` as for :class:`kvstore.Client`: Lookup, Get, Put and the
    turn-end and session-end events go as frames on the server's data plane
    (docs/dataplane.md) when it offers one, on up to four sessions whose
    requests are pipelined (kvstore/client/aio_dataplane.py); the rest, and
    every call of a client with ``metadata``, go over gRPC. A call cancelled
    while it waits leaves its session usable (its answer is read and dropped).
    On a data-plane session ``timeout`` bounds the time without progress (a
    call queued behind others' bytes waits for them), not each call's total
    time as over gRPC: use ``asyncio.wait_for`` for a per-call bound.
    :meth:`close` fails the calls in flight with ConnectionFailed.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, unary_get: bool = True,
                 data_plane: bool | str | None = None,
                 **settings: Unpack[ClientSettings]) -> None:
        self._unary_get = unary_get
        self._data_plane_mode = data_plane_mode(data_plane)
        if settings.get("metadata") is not None and self._data_plane_mode != "off":
            # Frames carry no per-call metadata: such a client keeps to gRPC.
            if data_plane not in (None, True):
                raise InvalidArgument("metadata= goes with gRPC calls only: pass "
                                      "data_plane=False (or no metadata)")
            self._data_plane_mode = "off"
        super().__init__(target, **settings)

    def _connect(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._channel_loop: asyncio.AbstractEventLoop | None = None
        # Taken to claim the client for a loop: two loops' first calls at once
        # both passed the loop check (an outside review: one then waited for
        # ever on the other loop's session lock).
        self._loop_lock = threading.Lock()
        self._rpcs: dict[str, Any] = {}
        self._closed = False
        self._small_limit = max_response_bytes(self._options)
        self._block_hint = 0  # largest block of the last Get (see Client)
        self._pid = os.getpid()
        self._data_plane: AsyncDataPlane | None = None
        if self._data_plane_mode != "off":
            self._data_plane = AsyncDataPlane(
                self._data_plane_mode, self._open_data_plane, self._grpc_target, self.target,
                self.timeout, self.tls)

    def _mind_fork(self) -> None:
        """In a forked child: a channel and data-plane sessions of its own.
        The parent's are kept, never closed nor used (dropping its grpc.aio
        channel hung the child; its sessions are the parent's)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        parents_objects.append((self._channel, self._data_plane))
        self._channel = None
        self._channel_loop = None
        self._loop_lock = threading.Lock()
        self._rpcs = {}
        if self._data_plane is not None:
            self._data_plane = AsyncDataPlane(
                self._data_plane_mode, self._open_data_plane, self._grpc_target, self.target,
                self.timeout, self.tls)

    async def _open_data_plane(self) -> conv.DataPlaneOffer:
        with self._closing_cuts():  # (grpc.RpcError: the data plane's own handling)
            offer: conv.DataPlaneOffer = await self._rpc(_OPEN_DATA_PLANE)(
                "", timeout=self.timeout, metadata=self._metadata())
        return offer

    @contextlib.contextmanager
    def _closing_cuts(self) -> Iterator[None]:
        """A gRPC call that :meth:`close` cut (closing the channel cancels its
        calls: grpc.aio raises CancelledError in a task nobody cancelled)
        raises ConnectionFailed instead; the task's own cancellation passes."""
        try:
            yield
        except asyncio.CancelledError:
            if self._closed and not task_cancelled():
                raise closed_in_flight(self.target) from None
            raise

    @contextlib.contextmanager
    def _grpc_edge(self) -> Iterator[None]:
        """grpc's errors as kvstore's (and a call cut by close())."""
        with self._closing_cuts():
            try:
                yield
            except grpc.RpcError as err:
                if self._closed and err.code() == grpc.StatusCode.CANCELLED:
                    raise closed_in_flight(self.target) from None  # cut by close()
                raise error_from_rpc(err, self.target, self.tls) from err

    def _claim_loop(self) -> None:
        """The running loop is the client's (the first call claims it), or
        :meth:`_new_loop` says what of it."""
        loop = asyncio.get_running_loop()
        if self._channel_loop is loop:
            return
        with self._loop_lock:
            if self._channel_loop is loop:
                return
            if self._channel_loop is not None:
                self._new_loop()
            self._channel_loop = loop

    def _rpc(self, name: str) -> Any:
        self._mind_fork()
        self._claim_loop()
        rpc = self._rpcs.get(name)
        if rpc is None:
            if self._closed:
                # As the sync Client's closed channel does (a call after
                # close quietly opened a channel nothing would close).
                raise ValueError("the client is closed")
            if self._channel is None:
                check_aio_after_fork(self.target)
                self._channel = open_channel(grpc.aio, self._grpc_target, self._options,
                                             self._credentials())
                aio_channel_opened(self._channel)
            ch = self._channel
            if name == conv.PUT:
                rpc = ch.stream_unary(name, request_serializer=conv.identity,
                                      response_deserializer=conv.decode_put_response)
            elif name == conv.GET:
                rpc = ch.unary_stream(name, request_serializer=conv.identity,
                                      response_deserializer=conv.decode_get_chunk)
            elif name == _OPEN_DATA_PLANE:
                rpc = ch.unary_unary(name, request_serializer=conv.encode_open_data_plane,
                                     response_deserializer=conv.decode_open_data_plane)
            elif name == conv.LIST_BLOCKS:
                rpc = ch.unary_stream(name, request_serializer=conv.identity,
                                      response_deserializer=conv.decode_list_blocks_response)
            else:
                rpc = ch.unary_unary(name, request_serializer=conv.identity,
                                     response_deserializer=_DECODERS[name])
            self._rpcs[name] = rpc
        return rpc

    def _new_loop(self) -> None:
        """A call from another event loop than the channel's: after that loop
        closed (one ``asyncio.run`` after another), a new channel; while it
        runs, a clear error (grpc.aio's channel works in its own loop only)."""
        old = self._channel_loop
        if old is not None and not old.is_closed():
            raise InvalidArgument("this AsyncClient is in use in another running event loop: "
                                  "use one AsyncClient per event loop")
        if self._channel is not None:
            aio_channel_closed(self._channel)  # (a fork may use grpc.aio again)
        self._channel = None  # (its loop is gone: nothing can close it any more)
        self._rpcs.clear()

    # -- lifecycle -------------------------------------------------------------

    async def close(self) -> None:
        self._mind_fork()  # (a child never closes its parent's channel: that hung it)
        self._closed = True
        if self._data_plane is not None:
            self._data_plane.close()
        channel, self._channel = self._channel, None
        self._rpcs.clear()
        if channel is not None:
            aio_channel_closed(channel)
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the data plane ----------------------------------------------------------

    async def data_plane_active(self) -> bool:
        """Whether Lookup, Get and Put go by the data plane (opens its session
        if none is open yet): False when it is off or the server offers none."""
        dp = self._dp()
        return dp is not None and await dp.active()

    @property
    def data_plane_calls(self) -> int:
        """How many calls the data plane has answered."""
        return self._data_plane.calls if self._data_plane is not None else 0

    def _dp(self) -> AsyncDataPlane | None:
        self._mind_fork()
        # Before the data plane is touched: its sessions are the channel
        # loop's. A call from a second running loop closed them from its
        # thread (futures and readers of a loop not its own; on uvloop,
        # libuv's handles): the first loop's calls stalled (2 s) and
        # reopened their sessions before this raised InvalidArgument.
        self._claim_loop()
        dp = self._data_plane
        return dp if dp is not None and dp.available else None

    async def _writes_settled(self) -> None:
        """Before a write: the Puts this client cancelled mid-way are answered
        (see AsyncDataPlane.writes_settled). A call from another running loop
        is refused first (a Delete's or Flush's waited, from the wrong
        thread, on the other loop's Puts: for the timeout, or for ever)."""
        self._mind_fork()
        self._claim_loop()
        dp = self._data_plane
        if dp is not None:
            await dp.writes_settled()

    # -- calls -----------------------------------------------------------------

    async def put(
        self,
        blocks: Blocks,
        *,
        namespace: str | None = None,
        ack: str | AckLevel = "memory",
        session_id: str | None = None,
        block_format: BlockFormat = BlockFormat.RAW,
    ) -> PutResult:
        """See :meth:`kvstore.Client.put`."""
        prep = self._prepare_put(blocks, namespace, ack, session_id, block_format)
        if not prep.blocks:
            return PutResult(0, 0)
        dp = self._dp()
        await self._writes_settled()
        payload = sum(len(v) for _, v in prep.blocks)
        if dp is not None and dp.fits(sum(len(k) + 20 for k, _ in prep.blocks) + 600, payload):
            meta = frames.PutRequest(prep.namespace, [
                frames.PutBlock(k, len(v), int(prep.block_format)) for k, v in prep.blocks],
                int(prep.ack), prep.session_id).encode()

            def put(conn: AioConnection) -> Any:
                return conn.request(Op.PUT, meta, [v for _, v in prep.blocks], payload)

            answer = await dp.run(put, idempotent=False)
            if answer is not None:
                counted = frames.Counted.decode(answer)
                return PutResult(counted.stored, counted.nbytes)
        with self._grpc_edge():
            # Message by message (grpc.aio's request iterator lost the server's
            # status when it refused the Put mid-stream: "Internal error from Core").
            stored, nbytes = await put_stream(self._rpc(conv.PUT),
                                              prep.messages(self.chunk_bytes), self.timeout,
                                              self._metadata())
        return PutResult(stored, nbytes)

    async def put_kv(self, keys: Sequence[bytes], k_pages: kv.PageArrays,
                     v_pages: kv.PageArrays | None, page_lists: Sequence[Sequence[int]], *,
                     dtype: Any = None, block_tokens: int | None = None,
                     namespace: str | None = None, ack: str | AckLevel = "memory",
                     session_id: str | None = None) -> PutResult:
        """See :meth:`kvstore.Client.put_kv`."""
        kv.check_lists(keys, page_lists)
        blocks = kv.pack_blocks(k_pages, v_pages, page_lists, dtype=dtype,
                                block_tokens=block_tokens)
        return await self.put(list(zip(keys, blocks, strict=True)), namespace=namespace,
                              ack=ack, session_id=session_id, block_format=BlockFormat.KV_V1)

    async def get_kv_into(self, keys: Sequence[bytes], k_pages: kv.PageArrays,
                          v_pages: kv.PageArrays | None, page_lists: Sequence[Sequence[int]],
                          *, dtype: Any = None, namespace: str | None = None,
                          session_id: str | None = None) -> int:
        """See :meth:`kvstore.Client.get_kv_into`."""
        kv.check_lists(keys, page_lists, distinct=True)
        kv.check_page_ids(k_pages, v_pages, page_lists)
        found = await self.get(keys, namespace=namespace, session_id=session_id)
        return kv.unpack_prefix(found, k_pages, v_pages, page_lists, dtype=dtype)

    async def get(
        self,
        keys: Iterable[KeyLike],
        *,
        namespace: str | None = None,
        session_id: str | None = None,
    ) -> list[bytes | None]:
        """See :meth:`kvstore.Client.get`."""
        ks = key_list(keys)
        dp = self._dp()
        if dp is not None:
            ns = resolve_namespace(namespace, self.namespace)
            kl = normalize_keys(ks)
            sid = check_session_id(session_id)
            if not kl:
                return []
            blocks = await self._dp_get(dp, ns, kl, sid, None)
            if blocks is not None:
                return [bytes(b) if isinstance(b, bytearray) else b for b in blocks]
        count, req = self._prepare_get(ks, namespace, session_id)
        if not count:
            return []
        found: list[bytes | None] = await self._get(ks, req, None, namespace, session_id)
        self._block_hint = max((len(b) for b in found if b is not None), default=0)
        return found

    async def get_into(
        self,
        keys: Iterable[KeyLike],
        buffers: BlockBuffers,
        *,
        namespace: str | None = None,
    ) -> list[int | None]:
        """See :meth:`kvstore.Client.get_into`."""
        ks = key_list(keys)
        dp = self._dp()
        if dp is not None:
            ns = resolve_namespace(namespace, self.namespace)
            kl = normalize_keys(ks)
            dests = normalize_buffers(buffers, len(kl))
            if not kl:
                return []
            got = await self._dp_get(dp, ns, kl, "", dests)
            if got is not None:
                return got
        count, req, views = self._prepare_get_into(ks, buffers, namespace)
        if not count:
            return []
        sizes: list[int | None] = await self._get(ks, req, views, namespace, None)
        self._block_hint = max((n for n in sizes if n is not None), default=0)
        return sizes

    @staticmethod
    async def _dp_get(dp: AsyncDataPlane, namespace: str, keys: list[bytes], session_id: str,
                      views: list[memoryview] | None) -> list[Any] | None:
        """A Get by the data plane; None when it is not available."""
        if not dp.fits(sum(len(k) + 2 for k in keys) + 300):
            return None
        meta = frames.GetRequest(namespace, keys, session_id).encode()

        def get(conn: AioConnection) -> Any:
            return conn.request(Op.GET, meta, count=len(keys), views=views)

        found: list[Any] | None = await dp.run(get, idempotent=True)
        return found

    async def _get(self, keys: list[bytes], req: bytes, views: list[memoryview] | None,
                   namespace: str | None, session_id: str | None) -> list[Any]:
        """As :meth:`kvstore.Client._get`: GetSmall for up to SMALL_GET_BYTES."""
        count = len(keys)
        if not self._unary_get or count * self._block_hint > SMALL_GET_BYTES:
            return await self._stream_get(req, GetAssembler(count, views))
        try:
            with self._closing_cuts():
                raw = await self._rpc(GET_SMALL)(req + small_request_suffix(self._small_limit),
                                                 timeout=self.timeout, metadata=self._metadata())
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server without GetSmall
                self._unary_get = False
                return await self._stream_get(req, GetAssembler(count, views))
            raise error_from_rpc(err, self.target, self.tls) from err
        asm = GetAssembler(count, views)
        answered = feed_small_response(asm, raw)
        if answered == count:
            return asm.done()
        rest = keys[answered:]
        _, rest_req = self._prepare_get(rest, namespace, session_id)
        tail = await self._stream_get(rest_req, GetAssembler(
            len(rest), None if views is None else views[answered:]))
        return asm.results[:answered] + tail

    async def _stream_get(self, req: bytes, asm: GetAssembler) -> list[Any]:
        call = self._rpc(conv.GET)(req, timeout=self.timeout, metadata=self._metadata())
        with self._grpc_edge():
            try:
                async for piece in call:
                    asm.feed(piece)
            except grpc.RpcError:
                raise
            except BaseException:
                call.cancel()
                raise
        return asm.done()

    async def lookup(
        self,
        keys: Iterable[KeyLike],
        *,
        namespace: str | None = None,
        lease_ms: int = 0,
        session_id: str | None = None,
    ) -> LookupResult:
        """See :meth:`kvstore.Client.lookup`."""
        dp = self._dp()
        if dp is not None:
            ns = resolve_namespace(namespace, self.namespace)
            kl, _ = normalize_keys_with_lengths(keys)
            lease = check_lease_ms(lease_ms)
            sid = check_session_id(session_id)
            if not kl:
                return LookupResult(found=0, tiers=[])
            if dp.fits(sum(len(k) + 2 for k in kl) + 300):
                meta = frames.LookupRequest(ns, kl, lease, sid).encode()

                def lookup(conn: AioConnection) -> Any:
                    return conn.request(Op.LOOKUP, meta)

                answer = await dp.run(lookup, idempotent=True)
                if answer is not None:
                    r = frames.LookupResult.decode(answer)
                    return LookupResult(found=r.found, tiers=[conv.tier_name(t) for t in r.tiers])
            keys = kl
        count, req = self._prepare_lookup(keys, namespace, lease_ms, session_id)
        if not count:
            return LookupResult(found=0, tiers=[])
        result: LookupResult = await self._unary(conv.LOOKUP, req)
        return result

    async def delete(self, keys: Iterable[KeyLike], *, namespace: str | None = None) -> int:
        """See :meth:`kvstore.Client.delete`."""
        count, req = self._prepare_delete(keys, namespace)
        if not count:
            return 0
        await self._writes_settled()
        deleted: int = await self._unary(conv.DELETE, req)
        return deleted

    async def stats(self, namespace: str | None = None) -> StoreStats:
        """See :meth:`kvstore.Client.stats`."""
        result: StoreStats = await self._unary(conv.STATS, self._prepare_stats(namespace))
        return result

    async def list_blocks(self, namespace: str | None = None, *, prefix: bytes | str = b"",
                          limit: int = 0) -> BlockListing:
        """See :meth:`kvstore.Client.list_blocks`."""
        req = self._prepare_list_blocks(namespace, prefix, limit)
        blocks: list[ListedBlock] = []
        truncated = False
        with self._grpc_edge():
            call = self._rpc(conv.LIST_BLOCKS)(req, timeout=self.timeout,
                                               metadata=self._metadata())
            async for page in call:
                blocks.extend(page.blocks)
                truncated = truncated or page.truncated
        return BlockListing(blocks, truncated)

    async def flush(self, namespace: str | None = None) -> int:
        """See :meth:`kvstore.Client.flush`."""
        ns = resolve_namespace(namespace, self.namespace)
        await self._writes_settled()
        flushed: int = await self._unary(conv.FLUSH, conv.encode_flush_request(ns))
        return flushed

    async def session_event(
        self,
        session_id: str,
        event: SessionHint,
        *,
        namespace: str | None = None,
    ) -> SessionEventResult:
        """See :meth:`kvstore.Client.session_event`."""
        req = self._prepare_session_event(session_id, event, namespace)
        dp = self._dp()
        meta = self._session_event_frame(session_id, event, namespace) if dp else None
        if dp is not None and meta is not None and dp.fits(len(meta)):

            def send_event(conn: AioConnection) -> Any:
                return conn.request(Op.SESSION_EVENT, meta)

            # Not idempotent: a turn end counted twice would skew the policy.
            if await dp.run(send_event, idempotent=False) is not None:
                return SessionEventResult()
        result: SessionEventResult = await self._unary(conv.SESSION_EVENT, req)
        return result

    async def prefetch(self, session_id: str = "", keys: Iterable[KeyLike] = (), *,
                       namespace: str | None = None) -> SessionEventResult:
        """See :meth:`kvstore.Client.prefetch`."""
        return await self.session_event(session_id, Prefetch(tuple(key_list(keys))),
                                        namespace=namespace)

    async def pin(self, keys: Iterable[KeyLike], ttl_ms: int = 0, *, session_id: str = "",
                  namespace: str | None = None) -> SessionEventResult:
        """See :meth:`kvstore.Client.pin`."""
        return await self.session_event(session_id, Pin(tuple(key_list(keys)), ttl_ms),
                                        namespace=namespace)

    async def unpin(self, keys: Iterable[KeyLike], *, session_id: str = "",
                    namespace: str | None = None) -> SessionEventResult:
        return await self.session_event(session_id, Unpin(tuple(key_list(keys))),
                                        namespace=namespace)

    async def turn_end(
        self,
        session_id: str,
        reason: TurnEndReason | str,
        expected_gap_ms: int = 0,
        tool_name: str = "",
        *,
        namespace: str | None = None,
    ) -> None:
        """See :meth:`kvstore.Client.turn_end`."""
        await self.session_event(
            session_id, turn_end_event(reason, expected_gap_ms, tool_name), namespace=namespace
        )

    async def session_end(self, session_id: str, *, namespace: str | None = None,
                          discard: bool = False) -> None:
        """See :meth:`kvstore.Client.session_end`."""
        await self.session_event(session_id, SessionEnd(discard), namespace=namespace)

    async def _unary(self, name: str, req: bytes) -> Any:
        with self._grpc_edge():
            return await self._rpc(name)(req, timeout=self.timeout,
                                             metadata=self._metadata())


_OPEN_DATA_PLANE = "/kvstore.v1.KVStore/OpenDataPlane"

_DECODERS = {
    GET_SMALL: conv.identity,
    conv.LOOKUP: conv.decode_lookup_response,
    conv.DELETE: conv.decode_delete_response,
    conv.STATS: conv.decode_stats_response,
    conv.SESSION_EVENT: conv.decode_session_event_response,
    conv.FLUSH: conv.decode_flush_response,
}
