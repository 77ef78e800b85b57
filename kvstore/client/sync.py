"""The blocking client (a gRPC sync channel). Thread-safe: share one per process."""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc

from kvstore.client import _convert as conv
from kvstore.client import kv
from kvstore.client._aioput import AioPutter, status_lost
from kvstore.client._base import ClientBase, ClientSettings, open_channel, turn_end_event
from kvstore.client._calldriver import CallDriver, CallJob
from kvstore.client._common import (
    DEFAULT_TARGET,
    GET_SMALL,
    SINGLE_THREADED_UNARY_STREAM,
    SMALL_GET_BYTES,
    BlockBuffers,
    Blocks,
    GetAssembler,
    KeyLike,
    PutResult,
    block_view,
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
from kvstore.client._errors import error_from_rpc
from kvstore.client.dataplane import DataPlane, busy_poll_setting, data_plane_mode
from kvstore.dataplane.frames import Op
from kvstore.errors import InvalidArgument
from kvstore.types import (
    MAX_KEY_BYTES,
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

class SyncClientSettings(ClientSettings, total=False):
    """The keyword arguments of :class:`Client` (its subclasses pass them on)."""

    aio_put: bool
    unary_get: bool
    data_plane: bool | str | None
    busy_poll_us: int | None


class Client(ClientBase):
    """Blocking kvstore client.

    ``target`` is ``host:port``, ``unix:/path`` or ``unix:///abs/path``.
    ``namespace`` is the default for every call; ``timeout`` the deadline of
    each call in seconds (None: none); ``chunk_bytes`` the largest piece of a
    block per message, both ways. ``options`` are extra gRPC channel options;
    ``tls`` (a :class:`TLS`) connects over TLS. ``metadata`` is gRPC metadata
    sent with every call: a mapping or (key, value) pairs, or a function
    called at each call that returns them (for values that change from call
    to call). ``unary_get`` (default on) reads a batch expected to move at
    most 2 MiB (judged from the largest block of the previous Get) with one
    unary GetSmall call instead of a Get stream (what does not fit one
    message goes by the stream); larger Gets stream on a second channel whose
    streams grpc drives from its own thread (receiving while this thread
    copies). ``aio_put`` (default on) sends Put streams of more than one
    message (more than one block, or a block larger than ``chunk_bytes``)
    from a private grpc.aio event loop thread with its own connection,
    started at the first such Put (faster than grpc's sync stream calls for
    them); a Put of one message, and every Put with it off, uses the sync
    channel like every other call. Errors are :mod:`kvstore.errors` classes,
    as the server raised them. Calls made on the main thread run their gRPC
    part on a thread of the client's own, so that Ctrl-C cannot land inside
    grpc's code (where it left the client hung): an interrupted Get stops
    writing into your buffers before the KeyboardInterrupt reaches you, and
    an interrupted write goes on, the next write waiting for it.

    ``data_plane`` (default on) sends Lookup, Get, Put and the turn and
    session ends as frames on the
    server's data plane (docs/dataplane.md) when it offers one: a session
    opened through gRPC, then a unix socket when this client is on the
    server's host, else TCP (TLS when ``tls`` is set). A server without one,
    or ``data_plane=False``, keeps every call on gRPC; ``"tcp"`` or
    ``"unix"`` picks the transport. None (the default) reads
    ``KVSTORE_DATA_PLANE`` (``0`` turns it off for the process). After a
    dropped connection the next call opens a new session; the call in flight
    is retried once when it is idempotent (Lookup, Get), while a Put raises
    ConnectionFailed (blocks whose bytes all arrived may be stored).

    ``busy_poll_us`` (data plane only): how long, in microseconds, a call
    polls its socket for the answer before sleeping in the kernel (the GIL
    released while it polls). An answer that lands within it needs no
    wake-up of this thread, which on a virtual machine saves tens of
    microseconds per call (docs/performance.md, "Busy polling") for at most
    that much CPU per call. None (the default) reads ``KVSTORE_BUSY_POLL_US``
    (unset: 50); 0 turns it off.
    """

    #: Get streams read on the calling thread; False gives grpc's default, a
    #: thread started per Get stream (kept for same-run A/B measurements).
    single_threaded_get = True

    def __init__(self, target: str = DEFAULT_TARGET, *, aio_put: bool = True,
                 unary_get: bool = True, data_plane: bool | str | None = None,
                 busy_poll_us: int | None = None,
                 **settings: Unpack[ClientSettings]) -> None:
        self._want_aio_put = aio_put
        self._unary_get = unary_get
        self._data_plane_mode = data_plane_mode(data_plane)
        self.busy_poll_us = busy_poll_setting(busy_poll_us)
        if settings.get("metadata") is not None and self._data_plane_mode != "off":
            # Frames carry no per-call metadata (the server's interceptors and
            # policy read it on gRPC calls): such a client keeps to gRPC.
            if data_plane not in (None, True):
                raise InvalidArgument("metadata= goes with gRPC calls only: pass "
                                      "data_plane=False (or no metadata)")
            self._data_plane_mode = "off"
        super().__init__(target, **settings)

    def _connect(self) -> None:
        credentials = self._credentials()
        # A Get stream read on the calling thread: without this option grpc
        # starts a thread to drive each unary-stream call.
        options = self._options
        if self.single_threaded_get:
            options = [*options, (SINGLE_THREADED_UNARY_STREAM, 1)]
        self._channel = open_channel(grpc, self._grpc_target, options, credentials)
        # Gets expected to move more than SMALL_GET_BYTES: streams driven by
        # grpc's own thread, which receives the next chunk while this thread
        # copies the last (a thread per call, worth it at that size).
        self._bulk_credentials = credentials
        # makes the main thread's calls (see _calldriver); an unclosed
        # client's thread is stopped when the client goes
        self._driver = CallDriver(self.timeout)
        weakref.finalize(self, self._driver.close)
        self._bulk_get_rpc: Any = None
        self._small_limit = max_response_bytes(self._options)
        # Largest block the last Get returned (0: none yet): a batch whose
        # keys times this fits one message goes by GetSmall.
        self._block_hint = 0
        self._aio_put: AioPutter | None = None
        if self._want_aio_put:
            self._aio_put = AioPutter(self._grpc_target, self._options, credentials)
            # An unclosed client's loop thread is stopped when the client goes.
            weakref.finalize(self, self._aio_put.close)
        ch = self._channel
        self._data_plane: DataPlane | None = None
        if self._data_plane_mode != "off":
            self._data_plane = DataPlane(self._data_plane_mode, ch, self._grpc_target,
                                         self.target, self._metadata, self.timeout, self.tls,
                                         self.busy_poll_us, self._driver.call)
        self._put_rpc = ch.stream_unary(
            conv.PUT, request_serializer=conv.identity,
            response_deserializer=conv.decode_put_response,
        )
        self._get_rpc = ch.unary_stream(
            conv.GET, request_serializer=conv.identity,
            response_deserializer=conv.decode_get_chunk,
        )
        self._get_small_rpc = ch.unary_unary(
            GET_SMALL, request_serializer=conv.identity,
            response_deserializer=conv.identity,
        )
        self._lookup_rpc = ch.unary_unary(
            conv.LOOKUP, request_serializer=conv.identity,
            response_deserializer=conv.decode_lookup_response,
        )
        self._delete_rpc = ch.unary_unary(
            conv.DELETE, request_serializer=conv.identity,
            response_deserializer=conv.decode_delete_response,
        )
        self._stats_rpc = ch.unary_unary(
            conv.STATS, request_serializer=conv.identity,
            response_deserializer=conv.decode_stats_response,
        )
        self._list_blocks_rpc = ch.unary_stream(
            conv.LIST_BLOCKS, request_serializer=conv.identity,
            response_deserializer=conv.decode_list_blocks_response,
        )
        self._flush_rpc = ch.unary_unary(
            conv.FLUSH, request_serializer=conv.identity,
            response_deserializer=conv.decode_flush_response,
        )
        self._session_rpc = ch.unary_unary(
            conv.SESSION_EVENT, request_serializer=conv.identity,
            response_deserializer=conv.decode_session_event_response,
        )

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        if self._data_plane is not None:
            self._data_plane.close()
        if self._aio_put is not None:
            self._aio_put.close()
        self._driver.close()
        if self._bulk_get_rpc is not None and self._bulk_get_rpc is not self._get_rpc and \
                self._bulk_channel is not None:
            self._bulk_channel.close()

        self._channel.close()

    def __enter__(self) -> Self:
        # (Self: ``with ShmClient(...) as c`` is a ShmClient to type checkers)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the data plane ----------------------------------------------------------

    def data_plane_active(self) -> bool:
        """Whether Lookup, Get and Put go by the data plane (opens its session
        if none is open yet): False when it is off or the server offers none."""
        return self._data_plane is not None and self._data_plane.active()

    @property
    def data_plane_calls(self) -> int:
        """How many calls the data plane has answered."""
        return self._data_plane.calls if self._data_plane is not None else 0

    def _dp(self) -> DataPlane | None:
        dp = self._data_plane
        return dp if dp is not None and dp.available else None

    # -- calls -----------------------------------------------------------------

    def put(
        self,
        blocks: Blocks,
        *,
        namespace: str | None = None,
        ack: str | AckLevel = "memory",
        session_id: str | None = None,
        block_format: BlockFormat = BlockFormat.RAW,
    ) -> PutResult:
        """Store ``blocks`` (a mapping key → buffer, or (key, buffer) pairs) in
        one stream. Buffers are bytes or any C-contiguous buffer (numpy arrays,
        memoryviews); they are read while the call runs, so keep them unchanged
        until it returns."""
        prep = self._prepare_put(blocks, namespace, ack, session_id, block_format)
        if not prep.blocks:
            return PutResult(0, 0)
        self._settle_puts()
        dp = self._dp()
        if dp is not None and dp.fits(sum(len(k) + 20 for k, _ in prep.blocks) + 600,
                                      sum(len(v) for _, v in prep.blocks)):
            counted = dp.run(lambda conn: conn.put(prep.namespace, int(prep.ack),
                                                   prep.session_id, prep.blocks,
                                                   int(prep.block_format)), idempotent=False)
            if counted is not None:
                return PutResult(counted.stored, counted.nbytes)
        try:
            # A Put of one message goes on the sync stream: through the
            # driver and the private loop it crosses two threads each way,
            # one more than the sync call (since 0.29.0), which cost a 4 KiB
            # Put 12 % (docs/performance.md, "gRPC Puts of one message").
            one_message = len(prep.blocks) == 1 and len(prep.blocks[0][1]) <= self.chunk_bytes
            if self._aio_put is not None and not one_message and not self._aio_put.forked():
                started = time.monotonic()
                putter, metadata = self._aio_put, self._metadata()
                try:
                    # (from the main thread by way of the driver: an interrupt
                    # inside run_coroutine_threadsafe left the Put unscheduled
                    # and its end never marked, and every later write waited
                    # out its timeout)
                    stored, nbytes = self._driver.call(lambda: putter.put(
                        prep.messages(self.chunk_bytes), self.timeout, metadata), write=True)
                except grpc.RpcError as err:
                    left = None if self.timeout is None else \
                        self.timeout - (time.monotonic() - started)
                    if not status_lost(err) or (left is not None and left <= 0):
                        raise
                    # The server refused the stream while a message was being
                    # written, and grpc.aio replaced its status with that write's
                    # local failure: sent again through the sync channel, the
                    # same refusal comes with its class (BlockTooLarge,
                    # PermissionDenied, ...; the blocks before it are stored
                    # again, the same bytes).
                    stored, nbytes = self._sync_put(prep, left)
            else:
                stored, nbytes = self._sync_put(prep, self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target, self.tls) from err
        return PutResult(stored, nbytes)

    def _sync_put(self, prep: Any, timeout: float | None) -> tuple[int, int]:
        """A Put stream on the sync channel (its messages sent by grpc's
        thread); one interrupted goes on, and the next write waits for it."""
        metadata = self._metadata()
        sent: tuple[int, int] = self._driver.call(lambda: self._put_rpc(
            prep.messages(self.chunk_bytes), timeout=timeout, metadata=metadata), write=True)
        return sent

    def put_kv(self, keys: Sequence[bytes], k_pages: kv.PageArrays, v_pages: kv.PageArrays | None,
               page_lists: Sequence[Sequence[int]], *, dtype: Any = None,
               block_tokens: int | None = None, namespace: str | None = None,
               ack: str | AckLevel = "memory", session_id: str | None = None) -> PutResult:
        """Pack one block per page list straight from an engine's per-layer
        page arrays (``v_pages=None`` for K-only/MLA caches) and store them in
        the block format; the server verifies each block before storing it."""
        kv.check_lists(keys, page_lists)
        blocks = kv.pack_blocks(k_pages, v_pages, page_lists, dtype=dtype,
                                block_tokens=block_tokens)
        return self.put(list(zip(keys, blocks, strict=True)), namespace=namespace, ack=ack,
                        session_id=session_id, block_format=BlockFormat.KV_V1)

    def get_kv_into(self, keys: Sequence[bytes], k_pages: kv.PageArrays,
                    v_pages: kv.PageArrays | None, page_lists: Sequence[Sequence[int]], *,
                    dtype: Any = None, namespace: str | None = None,
                    session_id: str | None = None) -> int:
        """Fetch blocks and scatter each (verified) into the pages of its
        page list. Returns the number of leading blocks restored: the usable
        prefix, stopping at the first miss."""
        kv.check_lists(keys, page_lists, distinct=True)
        kv.check_page_ids(k_pages, v_pages, page_lists)
        found = self.get(keys, namespace=namespace, session_id=session_id)
        return kv.unpack_prefix(found, k_pages, v_pages, page_lists, dtype=dtype)

    def get(
        self,
        keys: Iterable[KeyLike],
        *,
        namespace: str | None = None,
        session_id: str | None = None,
    ) -> list[bytes | None]:
        """The blocks stored under ``keys``, in order; None for a miss."""
        ks = key_list(keys)
        dp = self._dp()
        if dp is not None:
            ns = resolve_namespace(namespace, self.namespace)
            kl = normalize_keys(ks)
            sid = check_session_id(session_id)
            if not kl:
                return []
            if dp.fits(sum(len(k) + 2 for k in kl) + 300):
                blocks = dp.run(lambda conn: conn.get(ns, kl, sid, None), idempotent=True)
                if blocks is not None:
                    return blocks
        count, req = self._prepare_get(ks, namespace, session_id)
        if not count:
            return []
        found: list[bytes | None] = self._get(ks, req, None, namespace, session_id)
        self._block_hint = max((len(b) for b in found if b is not None), default=0)
        return found

    def get_into(
        self,
        keys: Iterable[KeyLike],
        buffers: BlockBuffers,
        *,
        namespace: str | None = None,
    ) -> list[int | None]:
        """Read blocks into caller-owned writable buffers (numpy arrays,
        bytearrays, memoryviews), one per key. Returns each block's size, or
        None for a miss (that buffer is left as it was). A buffer smaller than
        its block raises InvalidArgument; buffers before it are filled."""
        ks = key_list(keys)
        dp = self._dp()
        if dp is not None:
            ns = resolve_namespace(namespace, self.namespace)
            if len(ks) == 1 and type(key := ks[0]) is bytes and 0 < len(key) <= MAX_KEY_BYTES \
                    and isinstance(buffers, (list, tuple)) and len(buffers) == 1:
                # One chunk per call (how engines ask): the general checks
                # below, without their per-call lists and generators.
                kl, dests, meta = ks, [block_view(buffers[0], 0, writable=True)], len(key) + 302
            else:
                kl = normalize_keys(ks)
                dests = normalize_buffers(buffers, len(kl))
                if not kl:
                    return []
                meta = sum(len(k) + 2 for k in kl) + 300
            if dp.fits(meta):
                got = dp.run(lambda conn: conn.get(ns, kl, "", dests), idempotent=True)
                if got is not None:
                    return got
        count, req, views = self._prepare_get_into(ks, buffers, namespace)
        if not count:
            return []
        sizes: list[int | None] = self._get(ks, req, views, namespace, None)
        self._block_hint = max((n for n in sizes if n is not None), default=0)
        return sizes

    def _get(self, keys: list[bytes], req: bytes, views: list[memoryview] | None,
             namespace: str | None, session_id: str | None) -> list[Any]:
        """One GetSmall when the batch should fit one message (the rest, if
        it did not, by a Get stream), else a Get stream."""
        count = len(keys)
        expected = count * self._block_hint
        if expected > SMALL_GET_BYTES:
            return self._stream_get(req, GetAssembler(count, views), self._bulk_rpc())
        if not self._unary_get:
            return self._stream_get(req, GetAssembler(count, views))
        asm = GetAssembler(count, views)
        small = req + small_request_suffix(self._small_limit)
        metadata = self._metadata()

        def get_small() -> Any:
            raw = self._get_small_rpc(small, timeout=self.timeout, metadata=metadata)
            # The blocks are copied out on the thread that received them;
            # get_into's buffers only on the caller's (an interrupted unary
            # call goes on, and must not write into them after the interrupt).
            return raw if views is not None else feed_small_response(asm, raw)

        try:
            got = self._driver.call(get_small)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server without GetSmall
                self._unary_get = False
                return self._stream_get(req, GetAssembler(count, views))
            raise error_from_rpc(err, self.target, self.tls) from err
        answered: int = got if views is None else feed_small_response(asm, got)
        if answered == count:
            return asm.done()
        # The blocks from ``answered`` on did not fit one message: stream them.
        rest = keys[answered:]
        _, rest_req = self._prepare_get(rest, namespace, session_id)
        tail = self._stream_get(rest_req, GetAssembler(
            len(rest), None if views is None else views[answered:]), self._bulk_rpc())
        return asm.results[:answered] + tail

    def _bulk_rpc(self) -> Any:
        if self._bulk_get_rpc is None:
            if not self.single_threaded_get:
                self._bulk_get_rpc = self._get_rpc
            else:
                self._bulk_channel = open_channel(grpc, self._grpc_target, self._options,
                                                  self._bulk_credentials)
                self._bulk_get_rpc = self._bulk_channel.unary_stream(
                    conv.GET, request_serializer=conv.identity,
                    response_deserializer=conv.decode_get_chunk)
        return self._bulk_get_rpc

    def _stream_get(self, req: bytes, asm: GetAssembler, rpc: Any = None) -> list[Any]:
        metadata = self._metadata()
        return self._driver.stream(
            lambda job: self._drive_get(req, asm, rpc or self._get_rpc, metadata, job))

    def _drive_get(self, req: bytes, asm: GetAssembler, rpc: Any, metadata: Any,
                   job: CallJob | None) -> list[Any]:
        try:
            call = rpc(req, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target, self.tls) from err
        if job is not None:
            job.started(call)
        try:
            for piece in call:
                if job is not None and job.cancelled:
                    break  # (the caller was interrupted: no more writes into its buffers)
                asm.feed(piece)
        except grpc.RpcError as err:
            if job is not None and job.cancelled:
                return []
            raise error_from_rpc(err, self.target, self.tls) from err
        except BaseException:
            call.cancel()
            raise
        if job is not None and job.cancelled:
            call.cancel()
            return []
        return asm.done()

    def lookup(
        self,
        keys: Iterable[KeyLike],
        *,
        namespace: str | None = None,
        lease_ms: int = 0,
        session_id: str | None = None,
    ) -> LookupResult:
        """How many leading keys of a prefix chain are stored, and the fastest
        tier holding each key (None: not stored). ``lease_ms`` > 0 keeps the
        blocks found from eviction for that long."""
        dp = self._dp()
        if dp is not None:
            ns = resolve_namespace(namespace, self.namespace)
            kl, _ = normalize_keys_with_lengths(keys)
            lease = check_lease_ms(lease_ms)
            sid = check_session_id(session_id)
            if not kl:
                return LookupResult(found=0, tiers=[])
            if dp.fits(sum(len(k) + 2 for k in kl) + 300):
                r = dp.run(lambda conn: conn.lookup(ns, kl, lease, sid), idempotent=True)
                if r is not None:
                    return LookupResult(found=r.found, tiers=[conv.tier_name(t) for t in r.tiers])
            keys = kl
        count, req = self._prepare_lookup(keys, namespace, lease_ms, session_id)
        if not count:
            return LookupResult(found=0, tiers=[])
        result: LookupResult = self._unary(self._lookup_rpc, req)
        return result

    def _settle_puts(self) -> None:
        """Before a write: a Put interrupted under way (Ctrl-C) is answered
        first (see AioPutter.put), so that it cannot land after this one."""
        if self._aio_put is not None:
            self._aio_put.settle(self.timeout)
        self._driver.settle(self.timeout)
        if self._data_plane is not None:
            self._data_plane.settle(self.timeout)

    def delete(self, keys: Iterable[KeyLike], *, namespace: str | None = None) -> int:
        """Remove blocks from every tier; returns how many were stored."""
        count, req = self._prepare_delete(keys, namespace)
        if not count:
            return 0
        self._settle_puts()
        deleted: int = self._unary(self._delete_rpc, req, write=True)
        return deleted

    def stats(self, namespace: str | None = None) -> StoreStats:
        """Per-tier counters and occupancy. With ``namespace``: that
        namespace's blocks and bytes per tier (the event counters, such as
        hits and misses, are server-wide and left 0)."""
        result: StoreStats = self._unary(self._stats_rpc, self._prepare_stats(namespace))
        return result

    def list_blocks(self, namespace: str | None = None, *, prefix: bytes | str = b"",
                    limit: int = 0) -> BlockListing:
        """The namespace's blocks (key, size, tiers, age) in key order, only
        those whose key starts with ``prefix``: at most ``limit`` (0: the
        server's default, 1000; the server caps it). ``truncated`` tells
        whether more matched."""
        req = self._prepare_list_blocks(namespace, prefix, limit)
        metadata = self._metadata()

        def listing(job: CallJob | None) -> BlockListing:
            blocks: list[ListedBlock] = []
            truncated = False
            call = self._list_blocks_rpc(req, timeout=self.timeout, metadata=metadata)
            if job is not None:
                job.started(call)
            for page in call:
                blocks.extend(page.blocks)
                truncated = truncated or page.truncated
            return BlockListing(blocks, truncated)

        try:
            return self._driver.stream(listing)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target, self.tls) from err

    def flush(self, namespace: str | None = None) -> int:
        """Remove every block of the namespace from every tier (L3 objects
        included); returns how many were removed. An admin operation."""
        ns = resolve_namespace(namespace, self.namespace)
        self._settle_puts()
        flushed: int = self._unary(self._flush_rpc, conv.encode_flush_request(ns), write=True)
        return flushed

    def session_event(
        self,
        session_id: str,
        event: SessionHint,
        *,
        namespace: str | None = None,
    ) -> SessionEventResult:
        """Tell the placement policy about a session: TurnEnd, SessionEnd,
        Prefetch, Pin or Unpin (hints: they never affect stored data)."""
        req = self._prepare_session_event(session_id, event, namespace)
        dp = self._dp()
        meta = self._session_event_frame(session_id, event, namespace) if dp else None
        # Not idempotent: a turn end counted twice would skew the policy.
        if dp is not None and meta is not None and dp.fits(len(meta)) and dp.run(
                lambda conn: conn.call(Op.SESSION_EVENT, meta), idempotent=False) is not None:
            return SessionEventResult()
        result: SessionEventResult = self._unary(self._session_rpc, req)
        return result

    def prefetch(self, session_id: str = "", keys: Iterable[KeyLike] = (), *,
                 namespace: str | None = None) -> SessionEventResult:
        """Bring ``keys`` (or the blocks of the session's latest Lookup) into
        L1 ahead of the next request. Returns the blocks found."""
        return self.session_event(session_id, Prefetch(tuple(key_list(keys))), namespace=namespace)

    def pin(self, keys: Iterable[KeyLike], ttl_ms: int = 0, *, session_id: str = "",
            namespace: str | None = None) -> SessionEventResult:
        """Keep blocks in L1 for ``ttl_ms`` (within the namespace's pin quota)."""
        return self.session_event(session_id, Pin(tuple(key_list(keys)), ttl_ms),
                                  namespace=namespace)

    def unpin(self, keys: Iterable[KeyLike], *, session_id: str = "",
              namespace: str | None = None) -> SessionEventResult:
        return self.session_event(session_id, Unpin(tuple(key_list(keys))), namespace=namespace)

    def turn_end(
        self,
        session_id: str,
        reason: TurnEndReason | str,
        expected_gap_ms: int = 0,
        tool_name: str = "",
        *,
        namespace: str | None = None,
    ) -> None:
        """The session's turn ended (``reason``: tool_call, awaiting_user, done)."""
        self.session_event(
            session_id, turn_end_event(reason, expected_gap_ms, tool_name), namespace=namespace
        )

    def session_end(self, session_id: str, *, namespace: str | None = None,
                    discard: bool = False) -> None:
        """The session is over: its blocks leave L1 first (to L2, never to L3);
        ``discard``: they are the first victims of every tier and are dropped,
        not moved, when room is needed (served until then)."""
        self.session_event(session_id, SessionEnd(discard), namespace=namespace)

    def _unary(self, rpc: Any, req: bytes, write: bool = False) -> Any:
        metadata = self._metadata()
        try:
            return self._driver.call(lambda: rpc(req, timeout=self.timeout, metadata=metadata),
                                     write)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target, self.tls) from err
