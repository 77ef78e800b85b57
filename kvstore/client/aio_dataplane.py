"""The asyncio SDK's side of the data plane (docs/dataplane.md): Lookup, Get,
Put and the turn-end / session-end events as frames on non-blocking sockets
beside the grpc.aio channel. The sync client's twin is
kvstore/client/dataplane.py; the two behave the same.

:class:`AsyncDataPlane` belongs to one :class:`~kvstore.AsyncClient` (and so
to one event loop). On the first hot call it opens a session through gRPC
(``OpenDataPlane``), connects to the unix socket when the client is on the
server's host or to the TCP listener otherwise (TLS when the gRPC channel uses
TLS; kvstore/client/_dproute.py chooses), and presents the ticket in HELLO. A
server without a data plane (UNIMPLEMENTED), or one whose listener cannot be
reached, is remembered and the client keeps to gRPC.

:class:`AioConnection` is one session's socket. Its frames are read by a
reader callback of the event loop (not by the coroutines waiting for them):
headers and metadata into a preallocated buffer, a large block straight into
the caller's buffer (``get_into``). Requests are sent with one ``sendmsg`` of
header, metadata and the caller's block views, and may be pipelined: the
server answers in order, so each answer belongs to the oldest request
waiting (its request id is checked). Up to ``MAX_CONNECTIONS`` sessions are
pooled; a call takes an idle one, or opens another, or queues behind the
least loaded.

Faults, as in the sync client: an idle connection the server closed is
replaced before use; a connection that breaks fails every call waiting on it,
and each is retried once on a new session when it is idempotent (Lookup,
Get), while a Put raises :class:`~kvstore.errors.ConnectionFailed` (whether
its blocks were stored is unknown). No progress on a connection for the
client's ``timeout`` raises :class:`~kvstore.errors.DeadlineExceeded` in the
calls waiting on it and closes it.

Cancellation: a cancelled call's answer is still read and thrown away (its
caller's buffers are not written after the cancellation), so the connection
and the calls pipelined behind it go on; a cancelled Put whose bytes are not
all sent yet has what is left copied first (its caller may reuse the
buffers at once), so the server receives the block whole: a cancelled Put
may still be stored.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import select
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from kvstore.client._convert import DataPlaneOffer
from kvstore.client._dproute import NoRoute, Retry, Route, choose_route, open_timeout
from kvstore.client._errors import closed_in_flight, error_from_frame, error_from_rpc
from kvstore.client.dataplane import (
    Dropped,
    _tls_context,
    server_full,
    session_limits,
)
from kvstore.dataplane import frames
from kvstore.dataplane.frames import FLAG_CLOSING, FLAG_MORE, HEADER, HEADER_SIZE, MAGIC, Op
from kvstore.errors import (
    BufferTooSmall,
    ConnectionFailed,
    DeadlineExceeded,
    InvalidArgument,
    KVStoreError,
    TooManyConnections,
)

log = logging.getLogger("kvstore.client")

#: Sessions one client keeps open at most (calls beyond are pipelined).
MAX_CONNECTIONS = 4
#: The receive buffer of a connection: headers, metadata and small payloads.
_RECV_BUFFER = 256 * 1024
#: A payload at least this large (still to come) is received straight into
#: its destination; a smaller one through the receive buffer (fewer calls).
_DIRECT = 64 * 1024
#: Buffers one sendmsg takes at most (Linux IOV_MAX is 1024).
_IOV_MAX = 512
#: A TLS socket is written in pieces of at most this (one SSL_write each).
_TLS_PIECE = 256 * 1024
#: A unix socket's send buffer: what a Put queues before waiting for the
#: server to read (frames.UNIX_SEND_BUFFER says why).
_UNIX_SEND_BUFFER = frames.UNIX_SEND_BUFFER
_RESPONSE = frames.RESPONSE
_ERROR = int(Op.ERROR)
_GET_META = struct.Struct("<IBB")
_GET_FRAME_HEAD = HEADER_SIZE + _GET_META.size
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

T = TypeVar("T")


class _Request:
    """One request waiting for its answer (in its connection's queue)."""

    __slots__ = ("answered", "count", "error", "future", "index", "opcode", "out", "rid",
                 "settled", "views")

    def __init__(self, rid: int, opcode: int, future: asyncio.Future[Any],
                 count: int = 0, views: list[memoryview] | None = None) -> None:
        self.rid = rid
        self.opcode = opcode
        self.future = future
        self.count = count  # GET: keys asked
        self.index = 0  # GET: the key whose frame is due
        self.views = views  # GET: the caller's buffers (None: blocks returned as bytes)
        self.out: Any = [None] * count if opcode == Op.GET else None
        self.error: BaseException | None = None
        #: A cancelled PUT: set once its answer is read (or the connection goes).
        self.settled: asyncio.Future[None] | None = None
        self.answered = False  # its answer was read (or the connection went)


def drain_closed_sessions(conns: Sequence[AioConnection], timeout: float | None) -> None:
    """Sessions whose event loop has closed with cancelled Puts unanswered
    (``settling``): send what of them was left to send and read their
    answers, blocking, until no byte has moved on any of them for
    ``timeout`` seconds (None: until answered or the connections go). A
    write from the next loop, on a session of its own, must not be
    overtaken by them (a fix review: dropped unread, a Delete made in the
    next loop landed first, and the cancelled Put's block was served after
    the Delete was answered). poll(), not select(): a process with more
    than 1,024 files open has descriptors select() cannot take."""
    for conn in conns:
        if conn.settling:
            for req in conn._waiting:  # (no caller's buffer is written from here on)
                conn._forget(req, ())
    last_progress = time.monotonic()
    while True:
        waiting = {c._fd: c for c in conns if c.settling and not c.broken}
        if not waiting:
            return
        left = None if timeout is None else timeout - (time.monotonic() - last_progress)
        if left is not None and left <= 0:
            return
        poller = select.poll()
        for fd, conn in waiting.items():
            poller.register(fd, select.POLLIN | (select.POLLOUT if conn._outq else 0))
        try:
            events = poller.poll(None if left is None else max(1, math.ceil(left * 1000)))
        except OSError:
            return
        for fd, event in events:
            conn = waiting[fd]
            if event & select.POLLOUT:
                conn._flush()
            if event & ~select.POLLOUT:
                conn._on_readable()  # (non-blocking: what came; EOF or an error closes it)
            last_progress = time.monotonic()


class AioConnection:
    """One data-plane session's socket, driven by the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, target: str,
                 timeout: float | None, on_close: Callable[[AioConnection], None]) -> None:
        self.loop = loop
        self.sock = sock
        self.target = target
        self.timeout = timeout
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.broken = False
        #: An ERROR frame said CLOSING: the server closes it next (no new requests).
        self.broken_soon = False
        self._on_close = on_close
        self._fd = sock.fileno()
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # buffered bytes: self._buf[self._start:self._end]
        self._end = 0
        self._next_id = 0
        self._waiting: collections.deque[_Request] = collections.deque()
        # The payload being received: where to (None: thrown away), how much.
        self._dest: memoryview | None = None
        self._dest_at = 0
        self._payload_left = 0
        self._last = False  # the payload is the request's answer's last
        self._last_block = 0  # the size of the last block a GET answer carried
        self._outq: collections.deque[memoryview] = collections.deque()  # unsent bytes
        self._progress = 0.0  # loop.time() of the last byte moved or request queued
        self._watchdog: asyncio.TimerHandle | None = None
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        #: Cancelled PUTs whose answer is still to come (see AsyncDataPlane.writes_settled).
        self.settling: set[asyncio.Future[None]] = set()
        loop.add_reader(self._fd, self._on_readable)

    @property
    def load(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._waiting)

    def idle_and_open(self) -> bool:
        """An idle connection with something to read has been closed by the
        server (a restart): read it now, so that it is not reused."""
        if self.broken:
            return False
        if not self._waiting and self._poll.poll(0):
            self._on_readable()
        return not self.broken

    def close(self, reason: str = "the client closed the connection",
              error: Callable[[str], Exception] = Dropped) -> None:
        """Close the socket; every call waiting on it fails with ``error``."""
        if self.broken:
            return
        self.broken = True
        self.loop.remove_reader(self._fd)
        if self._outq:
            self.loop.remove_writer(self._fd)
            self._outq.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.sock.close()
        waiting, self._waiting = self._waiting, collections.deque()
        for req in waiting:
            if not self.loop.is_closed():
                if not req.future.done():
                    req.future.set_exception(error(reason))
                self._settle(req)
        self._on_close(self)

    def _settle(self, req: _Request) -> None:
        req.answered = True
        settled = req.settled
        if settled is not None:
            self.settling.discard(settled)
            if not settled.done() and not self.loop.is_closed():
                settled.set_result(None)

    # -- requests ----------------------------------------------------------------------

    async def request(self, opcode: int, meta: bytes, payload: Sequence[memoryview] = (),
                      payload_len: int = 0, *, count: int = 0,
                      views: list[memoryview] | None = None) -> Any:
        """Send one request and wait for its answer: the answer's metadata
        (GET: the blocks). An ERROR frame raises its kvstore error."""
        if self.broken:
            raise Dropped("the connection is closed")
        self._next_id = rid = (self._next_id + 1) & 0xFFFFFFFF
        req = _Request(rid, opcode, self.loop.create_future(), count, views)
        if not self._waiting:
            self._progress = self.loop.time()
            if self._watchdog is None and self.timeout is not None:
                self._watchdog = self.loop.call_at(self._progress + self.timeout,
                                                   self._check_progress)
        self._waiting.append(req)
        self._send([memoryview(frames.encode_header(opcode, rid, len(meta), payload_len)
                               + meta), *payload])
        try:
            return await req.future
        except asyncio.CancelledError:
            self._forget(req, payload)
            # (cancelled with its answer read already, in the same loop step,
            # before or after the cancel: nothing is coming, and a wait for it
            # held every later write for the client's timeout, or for ever;
            # an outside review's wait_for-bounded Puts)
            if opcode == Op.PUT and not self.broken and req.future.cancelled() \
                    and not req.answered:
                # Its bytes go on, and the server may store them: the client's
                # later writes wait for its answer (a later acknowledged Delete
                # or Put, sent on another session or over gRPC, was overtaken
                # by it: the deleted or older block served again).
                req.settled = self.loop.create_future()
                self.settling.add(req.settled)
            raise

    def _forget(self, req: _Request, payload: Sequence[memoryview]) -> None:
        """A cancelled call: its answer is still read, into nothing; bytes of
        its payload not yet sent are copied (the caller may reuse its buffers
        now). Only its own: copying the whole backlog at every cancel made
        cancelling n queued Puts cost n times the backlog (seconds of a
        blocked loop for a few hundred)."""
        req.views = None
        if self._waiting and self._waiting[0] is req and req.opcode == Op.GET:
            self._dest = None  # the block being received: the rest is thrown away
        if payload and self._outq:
            # A part still queued is the payload's, or a slice of it (same base).
            owners = {id(p.obj) for p in payload}
            self._outq = collections.deque(
                memoryview(bytes(v)) if id(v.obj) in owners else v for v in self._outq)

    # -- sending -----------------------------------------------------------------------

    def _send(self, parts: list[memoryview]) -> None:
        if self._outq:  # a backlog: after it, in order
            self._outq.extend(p for p in parts if p.nbytes)
            return
        self._outq.extend(p for p in parts if p.nbytes)  # (an empty one would never go)
        self._flush()
        if self._outq and not self.broken:
            self.loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        self._flush()
        if not self._outq and not self.broken:
            self.loop.remove_writer(self._fd)

    def _flush(self) -> None:
        """Send what the socket takes now."""
        q = self._outq
        try:
            while q:
                if self.tls:
                    sent = self.sock.send(q[0][:_TLS_PIECE])
                else:
                    sent = self.sock.sendmsg(list(q)[:_IOV_MAX] if len(q) > 1 else [q[0]])
                self._progress = self.loop.time()
                while sent:
                    n = len(q[0])
                    if sent >= n:
                        sent -= n
                        q.popleft()
                    else:
                        q[0] = q[0][sent:]
                        sent = 0
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            self.close(f"sending: {exc}")

    # -- receiving ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            while not self.broken:
                if self._payload_left >= _DIRECT and self._dest is not None \
                        and self._start == self._end:
                    target = self._dest[self._dest_at : self._dest_at + self._payload_left]
                    got = self.sock.recv_into(target)
                    if not got:
                        break
                    self._dest_at += got
                    self._payload_left -= got
                    if not self._payload_left:
                        self._payload_done()
                else:
                    if self._start == self._end:
                        self._start = self._end = 0
                    elif self._start and len(self._buf) - self._end < _DIRECT:
                        self._compact()
                    if self._start == self._end and not self._payload_left \
                            and self._large_block_next():
                        # The next frame's header alone: its block then goes
                        # straight into its buffer, none of it through this one.
                        target = self._view[self._end : self._end + _GET_FRAME_HEAD]
                    else:
                        target = self._view[self._end :]
                    got = self.sock.recv_into(target)
                    if not got:
                        break
                    self._end += got
                    self._process()
                self._progress = self.loop.time()
                if got < len(target) and not self.tls:
                    return  # the socket is (most likely) drained
            else:
                return
        except _WOULD_BLOCK:
            return
        except ProtocolViolation as exc:
            self._violation(str(exc))
            return
        except OSError as exc:
            self.close(f"receiving: {exc}")
            return
        self.close("the server closed the connection")

    def _large_block_next(self) -> bool:
        """Whether the next frame is (likely) a GET answer with a large block:
        its buffer is large, or (blocks returned as bytes) the last was."""
        if not self._waiting:
            return False
        req = self._waiting[0]
        if req.opcode != Op.GET or req.index >= req.count:
            return False
        if req.views is not None:
            return len(req.views[req.index]) >= _DIRECT
        return self._last_block >= _DIRECT and not req.future.done()

    def _compact(self, need: int = 0) -> None:
        """Move the buffered bytes to the buffer's start (a larger buffer
        when ``need`` bytes would not fit)."""
        have = self._end - self._start
        if need > len(self._buf):
            buf = bytearray(max(need, 2 * len(self._buf)))
            buf[:have] = self._view[self._start : self._end]
            self._buf, self._view = buf, memoryview(buf)
        else:
            self._view[:have] = self._view[self._start : self._end]
        self._start, self._end = 0, have

    def _process(self) -> None:
        """Consume every whole frame (and payload bytes) buffered."""
        view = self._view
        while True:
            if self._payload_left:
                k = min(self._payload_left, self._end - self._start)
                if not k:
                    return
                if self._dest is not None:
                    self._dest[self._dest_at : self._dest_at + k] = \
                        view[self._start : self._start + k]
                    self._dest_at += k
                self._start += k
                self._payload_left -= k
                if self._payload_left:
                    return
                self._payload_done()
                continue
            have = self._end - self._start
            if have < HEADER_SIZE:
                return
            magic, version, opcode, flags, rid, meta_len, payload_len = HEADER.unpack_from(
                view, self._start)
            if magic != MAGIC or version != frames.VERSION:
                raise ProtocolViolation(f"the server sent a frame with magic "
                                        f"{bytes(magic)!r}, version {version}")
            if have < HEADER_SIZE + meta_len:
                if self._start + HEADER_SIZE + meta_len > len(self._buf):
                    self._compact(HEADER_SIZE + meta_len)
                    view = self._view
                return
            at = self._start + HEADER_SIZE
            meta = bytes(view[at : at + meta_len])
            self._start = at + meta_len
            self._frame(opcode, flags, rid, meta, payload_len)

    def _frame(self, op: int, flags: int, rid: int, meta: bytes, payload_len: int) -> None:
        if not self._waiting:
            raise ProtocolViolation(f"an answer to request {rid}, which nothing waits for")
        req = self._waiting[0]
        # An ERROR with request id 0: the server could not trust our header
        # (its magic or version: a server of another protocol version), and
        # its message says so; it is the answer due, and the server closes.
        untrusted = rid != req.rid
        if untrusted and (rid != 0 or op != _ERROR):
            raise ProtocolViolation(f"answer to request {rid} where {req.rid} was due")
        if op == _ERROR:
            try:
                info = frames.ErrorInfo.decode(meta)
            except frames.FrameError as exc:
                raise ProtocolViolation(f"bad ERROR frame: {exc}") from None
            req.error = error_from_frame(info.code, info.name, info.message, self.target)
            if flags & FLAG_CLOSING or untrusted:
                self.broken_soon = True
            self._expect_payload(None, payload_len, last=True)
            return
        if op != req.opcode | _RESPONSE:
            raise ProtocolViolation(f"answer opcode {op:#x} to a {Op(req.opcode).name}")
        if req.opcode != Op.GET:
            if payload_len:
                raise ProtocolViolation(f"a {Op(req.opcode).name} answer carries a payload")
            req.out = meta
            self._finish()
            return
        if len(meta) != _GET_META.size:
            raise ProtocolViolation(f"GET answer metadata of {len(meta)} bytes")
        i, hit, _tier = _GET_META.unpack(meta)
        if hit:
            self._last_block = payload_len
        count = req.count
        if i != req.index or (count and i >= count):
            raise ProtocolViolation(f"GET answered key #{i} where #{req.index} was due "
                                    f"({count} keys)")
        req.index += 1
        last = not flags & FLAG_MORE
        if last and req.index != max(count, 1):
            raise ProtocolViolation(f"GET answer ended after {req.index} of {count} keys")
        dest: memoryview | None = None
        if hit and count and not req.future.done():
            views = req.views
            if views is None:
                if self._end - self._start >= payload_len:  # all here: one copy
                    req.out[i] = bytes(self._view[self._start : self._start + payload_len])
                    self._start += payload_len
                    payload_len = 0
                else:
                    block = bytearray(payload_len)
                    req.out[i] = block
                    dest = memoryview(block)
            elif req.error is not None or payload_len > len(views[i]):
                req.error = req.error or BufferTooSmall(
                    f"buffer #{i} is {len(views[i])} bytes but key #{i} holds a block of "
                    f"{payload_len} bytes")
            else:
                dest = views[i][:payload_len]
                req.out[i] = payload_len
        self._expect_payload(dest, payload_len, last)

    def _expect_payload(self, dest: memoryview | None, n: int, last: bool) -> None:
        self._dest, self._dest_at, self._payload_left = dest, 0, n
        self._last = last
        if not n:
            self._payload_done()

    def _payload_done(self) -> None:
        self._dest = None
        if self._last:
            self._finish()

    def _finish(self) -> None:
        req = self._waiting.popleft()
        if not req.future.done() and not self.loop.is_closed():
            # (a loop closed with calls pending: drain_closed_sessions reads on)
            if req.error is not None:
                req.future.set_exception(req.error)
            else:
                req.future.set_result(req.out)
        self._settle(req)

    def _violation(self, what: str) -> None:
        """The server broke the protocol: the call it was answering fails
        (not retried), the rest as for a dropped connection."""
        message = f"data plane to {self.target}: {what}"
        if self._waiting:
            req = self._waiting.popleft()
            if not req.future.done() and not self.loop.is_closed():
                req.future.set_exception(ConnectionFailed(message))
            self._settle(req)
        self.close(message)

    def _check_progress(self) -> None:
        self._watchdog = None
        if self.broken or not self._waiting or self.timeout is None:
            return
        quiet_until = self._progress + self.timeout
        if self.loop.time() < quiet_until:
            self._watchdog = self.loop.call_at(quiet_until, self._check_progress)
            return
        self.close(f"data plane to {self.target}: no progress for {self.timeout} s waiting "
                   "for the server's answer", _deadline)


class ProtocolViolation(Exception):
    """A frame the protocol does not allow here."""


def _deadline(message: str) -> DeadlineExceeded:
    exc = DeadlineExceeded(message)
    exc.grpc_code = "DEADLINE_EXCEEDED"  # type: ignore[attr-defined]
    return exc


def _shared(failure: KVStoreError) -> KVStoreError:
    """The failure of a session open that a call waited behind, raised again
    for that call (a new exception of the same kind, its code kept)."""
    err = type(failure)(f"{failure} (opening a data-plane session, which this call waited "
                        "for)")
    code = getattr(failure, "grpc_code", None)
    if code is not None:
        err.grpc_code = code  # type: ignore[attr-defined]
    return err


class AsyncDataPlane:
    """One AsyncClient's data-plane sessions: opened on demand, pooled,
    replaced when they break. :meth:`run` returns None when the data plane
    is not available (the caller uses gRPC)."""

    def __init__(self, mode: str, open_session: Callable[[], Awaitable[DataPlaneOffer]],
                 grpc_target: str, target: str, timeout: float | None, tls: Any,
                 max_connections: int | None = None) -> None:
        self.mode = mode
        self.target = target
        self._open_session = open_session
        self._grpc_target = grpc_target
        self._timeout = timeout
        self._tls = tls
        self._max = max_connections or MAX_CONNECTIONS
        self._conns: list[AioConnection] = []
        self._opening: asyncio.Lock | None = None
        # Session opens so far, and how the latest ended (None: it opened, or
        # gave up without an error of its own): calls waiting behind an open
        # that failed share its failure instead of each waiting a timeout of
        # its own in turn (the k-th call of k failed after k x timeout).
        self._opens = 0
        self._open_failure: KVStoreError | None = None
        self._refused = False  # the server has no data plane
        self._retry = Retry()  # a listener could not be used: gRPC until _retry.at
        self._closed = False
        self._limits = (1 << 20, 1 << 30)
        #: Calls answered by the data plane, and sessions opened (for tests
        #: and benchmarks: proof that the data plane was used).
        self.calls = 0
        self.sessions = 0

    @property
    def available(self) -> bool:
        return not self._refused and not self._closed and time.monotonic() >= self._retry.at

    async def active(self) -> bool:
        """Whether calls go by the data plane (opens a session to find out)."""
        return self.available and await self._take() is not None

    def close(self) -> None:
        self._closed = True
        for conn in list(self._conns):
            conn.close("the client was closed", ConnectionFailed)

    def fits(self, meta_bytes: int, payload_bytes: int = 0) -> bool:
        """Whether a request this size fits one frame (else: gRPC)."""
        return meta_bytes <= self._limits[0] and payload_bytes <= self._limits[1]

    async def writes_settled(self) -> None:
        """Wait until every Put cancelled on a session after its bytes began
        to go is answered (or its connection gone): a later write must not
        be overtaken by it. (Bounded by the connection's progress watchdog.)"""
        self._mind_loop()  # (an earlier, closed loop's sessions: drained, then dropped)
        pending = [f for conn in self._conns for f in conn.settling]
        if pending:
            await asyncio.wait(pending, timeout=self._timeout)

    async def run(self, fn: Callable[[AioConnection], Awaitable[T]],
                  idempotent: bool) -> T | None:
        """``fn`` on a pooled connection; None when the data plane is not
        available (use gRPC). A dropped connection is retried once on a new
        session when ``idempotent``, else raises ConnectionFailed."""
        for attempt in (0, 1):
            conn = await self._take()
            if conn is None:
                if self._closed:  # close() came while this call waited for a session
                    raise closed_in_flight(self.target)
                return None
            try:
                result = await fn(conn)
            except Dropped as exc:
                conn.close()
                if idempotent and attempt == 0:
                    log.debug("data plane to %s dropped (%s); retrying on a new session",
                              self.target, exc)
                    continue
                err = ConnectionFailed(
                    f"data plane connection to {self.target} dropped during the call ({exc})"
                    + ("" if idempotent else ": whether it took effect is unknown (blocks "
                       "whose bytes all arrived may be stored); retry it"))
                err.grpc_code = "UNAVAILABLE"  # type: ignore[attr-defined]
                raise err from None
            self.calls += 1
            return result
        return None  # not reached: the second attempt returns or raises

    # -- the pool ------------------------------------------------------------------------

    def _pick(self) -> AioConnection | None:
        best: AioConnection | None = None
        for conn in self._conns:
            if conn.broken or conn.broken_soon:
                continue
            if best is None or conn.load < best.load:
                best = conn
        return best

    def _mind_loop(self) -> None:
        """Sessions of an earlier, closed event loop are closed (its reader
        callbacks are gone with it); another running loop's raise."""
        if self._conns and self._conns[0].loop is not asyncio.get_running_loop():
            if not self._conns[0].loop.is_closed():
                # Another loop's, still open: closing its sessions from here
                # (another thread) breaks the calls it has on them.
                raise InvalidArgument("this AsyncClient is in use in another running event "
                                      "loop: use one AsyncClient per event loop")
            drain_closed_sessions(self._conns, self._timeout)
            for old in list(self._conns):
                old.close("the client moved to another event loop")
            self._opening = None

    async def _take(self) -> AioConnection | None:
        self._mind_loop()
        while True:
            conn = self._pick()
            if conn is not None and conn.load == 0 and not conn.idle_and_open():
                continue  # it was closed while idle: look again
            lock = self._opening
            if conn is not None and (conn.load == 0 or len(self._conns) >= self._max
                                     or (lock is not None and lock.locked())):
                return conn
            if not self.available:
                return None
            if lock is None:
                lock = self._opening = asyncio.Lock()
            opens = self._opens
            async with lock:
                failure = self._open_failure
                if self._opens != opens and failure is not None:
                    raise _shared(failure)
                conn = self._pick()
                if conn is not None and (conn.load == 0 or len(self._conns) >= self._max):
                    continue
                if not self.available:
                    return None
                self._open_failure = None
                try:
                    return await self._open()
                except KVStoreError as exc:
                    self._open_failure = exc
                    raise
                finally:
                    self._opens += 1  # (after: a call that came meanwhile sees it end)

    def _forget(self, conn: AioConnection) -> None:
        if conn in self._conns:
            self._conns.remove(conn)

    async def _open(self) -> AioConnection | None:
        try:
            offer = await self._open_session()
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.debug("kvstore server at %s offers no data plane (%s): using gRPC",
                          self.target, err.details())
                self._refused = True
                return None
            raise error_from_rpc(err, self.target, self._tls) from err
        try:
            route = choose_route(self.mode, self._grpc_target, offer, self._tls is not None)
        except NoRoute as exc:
            log.debug("kvstore data plane at %s not used: %s", self.target, exc)
            self._refused = True
            return None
        loop = asyncio.get_running_loop()
        setup = open_timeout(self._timeout)
        try:
            sock = await asyncio.wait_for(self._connect(loop, route), setup)
        except OSError as exc:  # refused, timed out, TLS handshake or check failed
            self._retry.failed(self.target, route.where, exc)
            return None
        conn = AioConnection(loop, sock, route.where, setup, self._forget)
        try:
            meta = await conn.request(Op.HELLO, frames.Hello(offer.ticket).encode())
            hello = frames.HelloOk.decode(meta)
        except TooManyConnections as exc:
            conn.close()
            self._retry.at = server_full(route.where, exc)
            return None
        except (Dropped, KVStoreError) as exc:
            # No answer within `setup`, a ticket refused (the listener is
            # another server's: a port-forward or NAT that leads elsewhere),
            # the connection closed at once (a proxy with nowhere to send it,
            # a sidecar, a server over its limit or stopping), an answer that
            # is not the data plane's: nothing was asked yet, so the call
            # goes by gRPC, which answers it or says why not.
            conn.close()
            self._retry.failed(self.target, route.where, exc)
            return None
        except BaseException:
            conn.close()
            raise
        conn.timeout = self._timeout
        self._retry.succeeded()
        if self._closed:  # close() came while the session opened: nothing would close it
            conn.close("the client was closed", ConnectionFailed)
            raise closed_in_flight(self.target)
        self._limits = session_limits(offer, hello)
        self._conns.append(conn)
        self.sessions += 1
        log.debug("kvstore data plane session %d to %s", hello.session_id, route.where)
        return conn

    async def _connect(self, loop: asyncio.AbstractEventLoop, route: Route) -> socket.socket:
        if route.unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            if _UNIX_SEND_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UNIX_SEND_BUFFER)
            try:
                await loop.sock_connect(sock, route.unix_path)
            except BaseException:
                sock.close()
                raise
            return sock
        infos = await loop.getaddrinfo(route.host, route.port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {route.host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, address)
                if self._tls is not None:
                    sock = await _handshake(loop, sock, self._tls, route.server_name)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error


async def _handshake(loop: asyncio.AbstractEventLoop, sock: socket.socket, tls: Any,
                     host: str) -> ssl.SSLSocket:
    """TLS over a connected non-blocking socket, with the gRPC channel's settings."""
    wrapped = _tls_context(tls).wrap_socket(sock, server_hostname=tls.server_name or host,
                                            do_handshake_on_connect=False)
    fd = wrapped.fileno()
    try:
        while True:
            try:
                wrapped.do_handshake()
                return wrapped
            except ssl.SSLWantReadError:
                await _ready(loop, fd, write=False)
            except ssl.SSLWantWriteError:
                await _ready(loop, fd, write=True)
    except BaseException:
        wrapped.close()
        raise


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await done
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
