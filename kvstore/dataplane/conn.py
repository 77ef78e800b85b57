"""A data-plane connection's byte I/O: frames in, frames out.

Two kinds with one interface. :class:`SocketIO` (plain TCP, unix socket)
works on the non-blocking socket with the event loop's ``sock_*`` calls: a
request's header and metadata come through one 64 KiB buffer (one ``recv``
usually brings a small request whole), a PUT's block bytes are received
into a buffer in cache and copied into their L1 extent with their CRC-32C
(:func:`bounce_buffer`), and a response's payload is
sent straight from the arena (``sendmsg`` of header and block view). A call
that completes at once never waits on the loop. :class:`StreamIO` (TLS) goes
through asyncio streams: one more copy each way (the TLS layer's buffers).

A request that can be answered without waiting (a PING, a GET whose blocks
are all small L1 hits) is answered by :class:`SocketIO` from the socket's
readable callback, when the connection's task is idle between frames: no
task is woken and no coroutine runs (``fast``; the event loop's per-task
cost is most of a small GET's). A PUT that needs no waiting to begin is
begun there too (``fast_payload``) and fed its payload as it comes (a
:class:`PayloadSink`); the moment it would wait, the task takes it over
(:meth:`SocketIO.next_request`). Everything else, and everything after it,
is the task's: the callback stops at the first frame it does not answer and
wakes the task, so answers leave in request order. A fast answer the socket
did not take whole is finished by the task (under the same timeout) before
it reads the next frame.

A payload must move within ``timeout`` seconds; a peer slower than that is
:class:`PeerTooSlow` (the server then drops the connection and whatever it
held). Waiting for the next frame has no limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from kvstore.checksum import copy_and_checksum
from kvstore.dataplane.frames import HEADER, HEADER_SIZE, MAGIC, VERSION
from kvstore.tiers.base import Buffer

BUFFER_BYTES = 64 * 1024
#: A connection's buffer until its HELLO is accepted (HEADER + a HELLO's
#: metadata): an unauthenticated peer costs the server this much, no more.
HELLO_BUFFER_BYTES = 2048
#: TCP payloads: wake for at least this many bytes (SO_RCVLOWAT).
_LOWAT = 256 * 1024
#: A payload's receive lets the event loop's other tasks in every this many bytes.
_TURN_BYTES = 2 * 1024 * 1024
#: TLS: the most bytes read from the stream in one go.
_TLS_READ = 1024 * 1024
#: A checksummed payload (a PUT's block) comes in through a buffer of this
#: size that stays in cache, then is copied into its L1 extent in the same
#: pass as its CRC-32C (docs/performance.md, "A Put's bytes through a buffer
#: in cache"). Received straight into the extent, the kernel's copy wrote to
#: memory not in cache and the checksum read it back: a 1 MiB TCP Put took
#: 1.13-1.18x as long (4 MiB: 1.2x; unix socket: 1.07x). One buffer per
#: thread: nothing awaits between a receive into it and the copy out of it.
BOUNCE_BYTES = 256 * 1024
_bounce = threading.local()


def bounce_buffer() -> memoryview:
    """This thread's receive buffer for checksummed payloads."""
    view: memoryview | None = getattr(_bounce, "view", None)
    if view is None:
        view = _bounce.view = memoryview(bytearray(BOUNCE_BYTES))
    return view


#: ``rest(parts, sent)``: send what is left of ``parts`` once ``sent`` bytes of
#: them went out (a GET's answer from a shared arena checks its blocks again
#: before their last bytes go: ops.Session._send_rechecked).
SendRest = Callable[[Sequence[Buffer], int], Awaitable[None]]

#: ``fast(opcode, flags, request_id, meta)``: answer a payload-free request
#: now (True), or leave it, untouched, to the connection's task (False).
FastAnswer = Callable[[int, int, int, memoryview], bool]


class PayloadSink(Protocol):
    """A request with a payload that the readable callback began
    (``fast_payload``): it is fed the payload's bytes as they come, and
    answers the request itself once it has them all (dataplane.put.PutProgress)."""

    #: payload bytes still to come
    left: int
    #: the sink stopped (it has to wait, or refused what came): the
    #: connection's task takes it over (``SocketIO.next_request``)
    needs_task: bool
    #: the loop's time by which the bytes it waits for must be in
    deadline: float
    request_id: int

    def wanted(self) -> int:
        """The most bytes the next receive may bring (at most BOUNCE_BYTES,
        all of which it takes); 0 when it stopped."""
        ...

    def block_left(self) -> int:
        """The bytes still to come of the part it has a deadline for (a
        PUT's block): what the socket may be asked to wait for at once."""
        ...

    def feed(self, data: memoryview) -> int:
        """Take ``data`` (at most ``left`` bytes): the bytes taken (fewer
        only when it stopped)."""
        ...

    def drop(self) -> None:
        """The connection ends with the request unfinished (never handed to
        the task): give back what it holds."""
        ...

    async def run(self) -> None:
        """The task's part: finish the request from where it stands, and answer it."""
        ...


#: ``fast_payload(opcode, request_id, meta, payload_len)``: begin a request
#: with a payload (its header and metadata consumed) or leave it, untouched,
#: to the task (None).
FastPayload = Callable[[int, int, memoryview, int], PayloadSink | None]
# poll() events of a peer that closed (FIN) or reset the connection; POLLHUP
# and POLLERR are reported whatever is asked. Linux only: elsewhere 0, and a
# connection counts as open until a read finds its end.
_HUNG_UP = getattr(select, "POLLRDHUP", 0)
_CLOSED = select.POLLHUP | select.POLLERR


def hung_up(fd: int, half_closed: bool = True) -> bool:
    """Whether the peer of the socket ``fd`` has closed or reset it, even with
    bytes it sent still unread here. ``half_closed``: whether a peer that
    only shut down its sending side counts (TCP: a killed process's FIN
    looks the same); on a unix socket a peer's close, not its
    ``shutdown(SHUT_WR)``, is POLLHUP, so there it need not."""
    if fd < 0:
        return True  # (closed here already)
    if not _HUNG_UP:
        return False
    poller = select.poll()
    poller.register(fd, _HUNG_UP)
    events = poller.poll(0)
    return bool(events) if half_closed else any(ev & _CLOSED for _, ev in events)


class ConnectionClosed(Exception):
    """The peer closed the connection in the middle of a frame."""


class PeerTooSlow(ConnectionClosed):
    """A payload was not received, or a response not taken by its reader,
    whole within the connection's timeout (a deadline for all of it, not
    for each piece)."""


class SocketIO:
    """The socket stays registered with the loop's selector while the
    connection waits for requests (registering and unregistering it around
    every wait would cost two ``epoll_ctl`` calls and the selector's Python
    bookkeeping per request). While a request is being handled the socket is
    not read; if the selector reports it readable then, twice in a row, it is
    unregistered until the next wait, so a busy connection never spins."""

    __slots__ = ("_end", "_failed", "_fd", "_handover", "_idle", "_idle_fires", "_lowat",
                 "_pending", "_sink", "_sink_timer", "_start", "_tcp", "_waiter", "_watching",
                 "buf", "bytes_in", "bytes_out", "closing", "fast", "fast_payload", "loop", "mv",
                 "sock", "timeout")

    def __init__(self, sock: socket.socket, timeout: float,
                 buffer_bytes: int = BUFFER_BYTES) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.buf = bytearray(buffer_bytes)
        self.mv = memoryview(self.buf)
        self._start = self._end = 0
        self.bytes_in = self.bytes_out = 0
        self._waiter: asyncio.Future[None] | None = None
        self._watching = False
        self._idle_fires = 0
        #: Answers requests from the readable callback (set after HELLO).
        self.fast: FastAnswer | None = None
        #: Begins requests with a payload (PUTs) from the readable callback.
        self.fast_payload: FastPayload | None = None
        self._sink: PayloadSink | None = None  # the payload the callback is taking in
        self._sink_timer: asyncio.TimerHandle | None = None  # its deadline
        self._lowat = False  # SO_RCVLOWAT raised for it
        self._handover: PayloadSink | None = None  # stopped: the task's next request
        self._idle = False  # the task waits for the next frame (fast may answer)
        # A fast answer not sent whole: (parts, bytes sent, called once it is).
        self._pending: tuple[Sequence[Buffer], int, Callable[[], None],
                             SendRest | None] | None = None
        self._failed: BaseException | None = None  # the fast path's, for the task
        #: A graceful stop: answer what is under way, then close (next_header: None).
        self.closing = False

    def peer_gone(self) -> bool:
        """Whether the client has closed or reset the connection (a request of
        a client that died must not take effect after the requests of those
        that came after it). On a unix socket a client that only shut down
        its sending side and waits for the answer is still there."""
        return hung_up(self._fd, half_closed=self._tcp)

    def begin_closing(self) -> None:
        """A graceful stop: nothing more is answered from the readable
        callback; the task finishes what is under way (an answer half sent,
        a frame half received or buffered), then its next header is None."""
        self.closing = True
        waiter = self._waiter
        if self._idle and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _readable(self) -> None:
        if self._idle:
            try:
                handover = self.closing or self._answer_ready()
            except BaseException as exc:  # a bug: the task raises it
                self._failed = exc
                handover = True
            if handover:
                waiter = self._waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
            return
        self._idle_fires += 1
        if self._idle_fires > 1:  # nobody is reading: stop watching until someone does
            self.loop.remove_reader(self._fd)
            self._watching = False

    async def _recv_into(self, view: memoryview) -> int:
        """One ``recv_into`` (0: EOF), waiting for the socket as needed."""
        sock = self.sock
        while True:
            try:
                return sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise ConnectionClosed(f"receive failed: {exc}") from None
            self._idle_fires = 0
            if not self._watching:
                self.loop.add_reader(self._fd, self._readable)
                self._watching = True
            waiter = self._waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def _fill(self, need: int) -> bool:
        """At least ``need`` bytes buffered (False: EOF with none buffered)."""
        if self._end - self._start >= need:
            return True
        if self._start:
            avail = self._end - self._start
            self.buf[:avail] = self.mv[self._start:self._end]
            self._start, self._end = 0, avail
        while self._end < need:
            n = await self._recv_into(self.mv[self._end:])
            if n == 0:
                if self._end == 0:
                    return False
                raise ConnectionClosed(f"peer closed after {self._end} of {need} bytes")
            self._end += n
            self.bytes_in += n
        return True

    def grow(self) -> None:
        """The full buffer (after HELLO), keeping what is buffered; views of the
        old one stay valid (it is replaced, not resized)."""
        if len(self.buf) >= BUFFER_BYTES:
            return
        avail = self._end - self._start
        buf = bytearray(BUFFER_BYTES)
        buf[:avail] = self.mv[self._start:self._end]
        self.buf, self.mv = buf, memoryview(buf)
        self._start, self._end = 0, avail

    def take(self, n: int) -> memoryview | None:
        """``n`` bytes if they are buffered already (valid until the next
        read), else None: the common case needs no coroutine."""
        start = self._start
        if self._end - start < n:
            return None
        self._start = start + n
        return self.mv[start:start + n]

    # -- answers given from the readable callback ---------------------------------------

    def _answer_ready(self) -> bool:
        """Answer what ``fast`` can of the buffered requests and of what one
        receive brings (when those were all answered). True when the task has
        to act: a frame
        ``fast`` left is at the buffer's start, an answer is partly sent, the
        peer closed or the receive failed (the task's own receive finds out
        which); False when all that came is answered (or half a frame waits
        for the rest)."""
        if self._handover is not None:
            return True
        fast = self.fast
        assert fast is not None
        buf = self.buf
        received = False
        while True:
            if self._sink is not None:
                if self._take_payload():
                    return True
                if self._sink is not None:
                    return False  # more of its payload is to come
                if self._pending is not None or self._failed is not None:
                    return True
                received = True  # (the payload's receives were this call's)
            start = self._start
            while self._end - start >= HEADER_SIZE:
                magic, version, opcode, flags, rid, meta_len, payload_len = HEADER.unpack_from(
                    buf, start)
                if magic != MAGIC or version != VERSION:
                    return True  # a bad frame: the task's
                end = start + HEADER_SIZE + meta_len
                if end > self._end:
                    if end - start > BUFFER_BYTES:
                        return True  # more metadata than the buffer holds
                    break  # the rest of the frame is still to come
                meta = self.mv[start + HEADER_SIZE:end]
                if payload_len:
                    begin = self.fast_payload
                    sink = None if begin is None else begin(opcode, rid, meta, payload_len)
                    if sink is None:
                        return True  # the task's (it may refuse it)
                    self._start = end
                    self._sink = sink
                    break  # (taken in at the loop's top)
                if not fast(opcode, flags, rid, meta):
                    return True
                self._start = start = end
                if self._pending is not None or self._failed is not None:
                    return True
            if self._sink is not None:
                continue
            if received:
                # One receive per call: a peer that keeps sending cannot keep
                # the loop from the others (the selector says when more came).
                return False
            if start == self._end:
                self._start = self._end = 0
            elif start:  # half a frame left: move it to the front
                avail = self._end - start
                self.buf[:avail] = self.mv[start:self._end]
                self._start, self._end = 0, avail
            try:
                n = self.sock.recv_into(self.mv[self._end:])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True
            if n == 0:
                return True
            self._end += n
            self.bytes_in += n
            received = True

    # -- a payload taken in from the readable callback -----------------------------------

    def _take_payload(self) -> bool:
        """Feed the sink what is buffered, then what the socket holds: True
        when the task has to act (the sink stopped, the peer closed, a
        receive failed: its own receive finds out which); False when the
        payload is all in (the sink answered it; :attr:`_sink` is None) or
        more is to come (the selector calls again)."""
        sink = self._sink
        assert sink is not None
        avail = self._end - self._start
        if avail:
            start = self._start
            self._start += sink.feed(self.mv[start:start + min(avail, sink.left)])
            if sink.needs_task:
                return self._hand_over()
        if not sink.left:
            self._payload_done()
            return False
        self._start = self._end = 0  # (all it held was fed)
        sock = self.sock
        bounce = bounce_buffer()
        got = 0
        while True:
            want = sink.wanted()
            if not want:
                return self._hand_over()
            try:
                n = sock.recv_into(bounce[:want])
            except (BlockingIOError, InterruptedError):
                self._await_payload(sink)
                return False
            except OSError:
                return self._hand_over()
            if n == 0:
                return self._hand_over()
            self.bytes_in += n
            # (fed at once: the buffer is this thread's, and others use it)
            sink.feed(bounce[:n])
            if sink.needs_task:
                return self._hand_over()
            if not sink.left:
                self._payload_done()
                return False
            got += n
            if got >= _TURN_BYTES:
                # As read_into: a sender faster than this loop must not keep
                # it from the other connections (the selector calls again).
                self._await_payload(sink)
                return False

    def _await_payload(self, sink: PayloadSink) -> None:
        """More of the sink's payload is to come: on TCP, wake once _LOWAT
        bytes wait while more than that of the block is to come (as
        read_into: never asking for bytes the block's deadline does not
        cover, which a slow sender would send only after it); a timer for
        its deadline."""
        if self._tcp:
            lowat = sink.block_left() > _LOWAT
            if lowat != self._lowat:
                self._lowat = lowat
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT,
                                         _LOWAT if lowat else 1)
        if self._sink_timer is None:
            self._sink_timer = self.loop.call_at(sink.deadline, self._payload_late)

    def _payload_late(self) -> None:
        """The sink's deadline: the task takes it over (its receive raises
        PeerTooSlow there once the deadline has passed)."""
        self._sink_timer = None
        sink = self._sink
        if sink is None:
            return
        if self.loop.time() < sink.deadline:  # (a later block's deadline)
            self._sink_timer = self.loop.call_at(sink.deadline, self._payload_late)
            return
        self._hand_over()
        waiter = self._waiter
        if self._idle and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _payload_done(self) -> None:
        self._sink = None
        if self._sink_timer is not None:
            self._sink_timer.cancel()
            self._sink_timer = None
        if self._lowat:
            self._lowat = False
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def _hand_over(self) -> bool:
        """The sink goes to the task (:meth:`next_request`). True."""
        sink = self._sink
        self._payload_done()
        self._handover = sink
        return True

    async def next_request(self) -> PayloadSink | None:
        """Wait, answering what ``fast`` can, until a frame is buffered that
        it left (None: the task reads it, :meth:`next_header`) or a payload
        the callback began is the task's to finish (the sink)."""
        if self.fast is not None:
            await self._next_unanswered()
        if self._sink is not None:  # (a stop began, or the connection failed, mid-payload)
            self._hand_over()
        sink, self._handover = self._handover, None
        return sink

    def send_now(self, parts: Sequence[Buffer]) -> int:
        """One ``sendmsg`` of ``parts`` from the fast path; the bytes it took
        (the rest goes through :meth:`defer`). A failed send ends the
        connection: the task raises ConnectionClosed at its next frame."""
        try:
            sent = self.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._failed = ConnectionClosed(f"send failed: {exc}")
            sent = sum(map(len, parts))  # nothing more goes out on this connection
        self.bytes_out += sent
        return sent

    def defer(self, parts: Sequence[Buffer], sent: int, done: Callable[[], None],
              rest: SendRest | None = None) -> None:
        """The rest of a fast answer (``sent`` bytes of ``parts`` went out):
        the task sends it (with ``rest``, as :meth:`send` does), under the
        timeout, before its next frame, then calls ``done`` (also when the
        connection fails or closes first)."""
        self._pending = (parts, sent, done, rest)

    async def _finish_pending(self) -> None:
        assert self._pending is not None
        parts, sent, done, rest = self._pending
        self._pending = None
        try:
            await self._send_left(parts, sent, rest)
        finally:
            done()

    async def _next_unanswered(self) -> None:
        """Wait, answering what ``fast`` can, until a frame is buffered that
        it left (or the peer closed, or a receive failed)."""
        while True:
            if self._pending is not None:
                await self._finish_pending()
            failed, self._failed = self._failed, None
            if failed is not None:
                raise failed
            if self.closing:
                return  # the task reads what is left; nothing more answered here
            if self._answer_ready():
                if self._pending is None and self._failed is None:
                    return
                continue
            self._idle_fires = 0
            if not self._watching:
                self.loop.add_reader(self._fd, self._readable)
                self._watching = True
            waiter = self._waiter = self.loop.create_future()
            self._idle = True
            try:
                await waiter
            finally:
                self._idle = False
                self._waiter = None

    async def linger(self, timeout: float) -> None:
        """A stop's close, after the last answer: FIN first, then what the
        peer still sends (a request pipelined after the stop began) is read
        and dropped until it closes, for at most ``timeout`` s. Closed with
        unread bytes, the socket would answer with a RST, and the peer's
        kernel would drop the answers it had not read yet."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(Exception):  # (the peer gone, or the time up)
            async with asyncio.timeout(timeout):
                while await self._recv_into(self.mv):
                    pass

    def _received_now(self) -> bool:
        """One receive without waiting (a request sent before the stop began
        may be in the socket still): whether it brought anything."""
        self._start = self._end = 0
        try:
            n = self.sock.recv_into(self.mv)
        except OSError:  # (BlockingIOError: nothing came)
            return False
        self._end = n
        self.bytes_in += n
        return n > 0

    async def next_header(self) -> memoryview | None:
        """The next frame's header bytes (valid until the next read), or None
        when the peer closed cleanly between frames (after :meth:`next_request`,
        once the connection answers from its readable callback)."""
        if self.closing and self._start == self._end and not self._received_now():
            return None  # stopping, and nothing of another request came: close
        if not await self._fill(HEADER_SIZE):
            return None
        start = self._start
        self._start = start + HEADER_SIZE
        return self.mv[start:start + HEADER_SIZE]

    async def read_exact(self, n: int) -> Buffer:
        """``n`` bytes (metadata; valid until the next read)."""
        if n > len(self.buf):
            out = bytearray(n)
            await self.read_into(memoryview(out), None)
            return out
        if not await self._fill(n):
            raise ConnectionClosed(f"peer closed before {n} bytes of metadata")
        start = self._start
        self._start = start + n
        return self.mv[start:start + n]

    async def read_into(self, dest: memoryview, crc: int | None,
                        streaming: bool = False, deadline: float = 0.0) -> int:
        """Fill ``dest``; returns the CRC-32C continued from ``crc`` over its
        bytes (0 when ``crc`` is None), within the connection's timeout (or
        by ``deadline``, the loop's time, when given: a payload the readable
        callback began). A checksummed payload comes through
        this thread's :func:`bounce_buffer`, copied out with its checksum in
        one pass, with streaming stores when ``streaming`` (nothing reads the
        bytes again soon: they need not stay in cache) and the payload is at
        least BOUNCE_BYTES; one not checksummed
        (metadata, bytes dropped) is received straight into ``dest``."""
        size = len(dest)
        # (a small block's bytes may as well stay in cache)
        streaming = streaming and size >= BOUNCE_BYTES
        pos = min(self._end - self._start, size)
        if pos:
            piece = self.mv[self._start:self._start + pos]
            if crc is None:
                dest[:pos] = piece
            else:
                crc = copy_and_checksum(dest, 0, piece, crc, streaming)
            self._start += pos
        if pos == size:
            return crc or 0
        # TCP: while much is still to come, the selector wakes this task only
        # once _LOWAT bytes are waiting (not at every segment).
        lowat = self._tcp and size - pos > _LOWAT
        if lowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _LOWAT)
        turn = pos + _TURN_BYTES
        bounce = bounce_buffer() if crc is not None else None
        try:
            async with asyncio.timeout_at(deadline or self.loop.time() + self.timeout):
                while pos < size:
                    if pos >= turn:
                        # A sender faster than this loop never leaves recv_into
                        # wanting: one 32 MiB block held every other connection
                        # (and gRPC, on the same loop) ~10 ms a Put. Others go
                        # in between, every _TURN_BYTES.
                        turn = pos + _TURN_BYTES
                        await asyncio.sleep(0)
                    if lowat and size - pos <= _LOWAT:
                        lowat = False
                        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                    if bounce is None:
                        n = await self._recv_into(dest[pos:])
                    else:
                        # (the receive and the copy in one step of this task)
                        n = await self._recv_into(bounce[:min(size - pos, BOUNCE_BYTES)])
                        if n:
                            crc = copy_and_checksum(dest, pos, bounce[:n], crc or 0,
                                                    streaming)
                    if n == 0:
                        raise ConnectionClosed(f"peer closed after {pos} of {size} payload "
                                               "bytes")
                    pos += n
                    self.bytes_in += n
        except TimeoutError:
            raise PeerTooSlow(f"payload not received within {self.timeout:g} s ({pos} of "
                              f"{size} bytes)") from None
        finally:
            if lowat:
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return crc or 0

    async def discard(self, n: int) -> None:
        """Read and drop ``n`` payload bytes (a refused PUT's), letting the
        loop's other tasks in every _TURN_BYTES as read_into does (read in
        buffer-sized pieces, a refused 256 MiB PUT held the loop for 100 MiB)."""
        turn = _TURN_BYTES
        while n > 0:
            avail = self._end - self._start
            if avail:
                k = min(avail, n)
                self._start += k
                n -= k
                continue
            self._start = self._end = 0
            k = min(n, BUFFER_BYTES)
            await self.read_into(self.mv[:k], None)
            self._start = self._end = 0
            n -= k
            turn -= k
            if turn <= 0:
                turn = _TURN_BYTES
                await asyncio.sleep(0)

    async def send(self, parts: Sequence[Buffer], rest: SendRest | None = None) -> None:
        """Send ``parts`` in order; block views go out without a copy. The
        caller keeps them valid (the block pinned) until this returns.
        ``rest``: what sends the part the socket did not take at once
        (default: all of it, as the socket takes it)."""
        total = sum(map(len, parts))
        try:
            sent = self.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise ConnectionClosed(f"send failed: {exc}") from None
        self.bytes_out += sent
        if sent != total:
            await self._send_left(parts, sent, rest)

    async def _send_left(self, parts: Sequence[Buffer], sent: int,
                         rest: SendRest | None) -> None:
        """What ``sent`` bytes of ``parts`` left, by ``rest`` or as the socket
        takes it."""
        if rest is None:
            await self._send_rest(parts, sent, sum(map(len, parts)))
        else:
            await rest(parts, sent)

    async def _send_rest(self, parts: Sequence[Buffer], sent: int, total: int) -> None:
        """Send what is left of ``parts`` once ``sent`` bytes went out: one
        ``sendmsg`` of all that is left each time the socket is writable
        (a GET answer's small headers do not go out as packets of their own;
        the socket stays registered for writing until all is sent)."""
        left = [memoryview(part) for part in parts]
        sock = self.sock
        loop = self.loop
        waiter: asyncio.Future[None] | None = None

        def writable() -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        loop.add_writer(self._fd, writable)
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    while left and sent >= len(left[0]):
                        sent -= len(left.pop(0))
                    if not left:
                        return
                    if sent:
                        left[0] = left[0][sent:]
                    waiter = loop.create_future()
                    await waiter
                    try:
                        sent = sock.sendmsg(left)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    self.bytes_out += sent
        except TimeoutError:
            raise PeerTooSlow(f"the peer did not read a {total}-byte response within "
                              f"{self.timeout:g} s") from None
        except OSError as exc:
            raise ConnectionClosed(f"send failed: {exc}") from None
        finally:
            loop.remove_writer(self._fd)

    def close(self) -> None:
        if self._watching:
            self.loop.remove_reader(self._fd)
            self._watching = False
        for sink in (self._sink, self._handover):  # (a payload never finished)
            if sink is not None:
                sink.drop()
        self._payload_done()
        self._handover = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[2]()
        self.sock.close()


class StreamIO:
    """TLS: the same interface over asyncio streams (one more copy)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.bytes_in = self.bytes_out = 0
        self.closing = False
        self._between_frames = False

    def peer_gone(self) -> bool:
        """As SocketIO's."""
        if self.writer.transport.is_closing():
            return True
        sock = self.writer.get_extra_info("socket")
        return sock is not None and hung_up(sock.fileno())

    def begin_closing(self) -> None:
        """A graceful stop (as SocketIO's): a task waiting for its next frame
        reads what the stream holds, then its end; one busy with a request
        finishes it, then does the same."""
        self.closing = True
        if self._between_frames:
            self._end_if_nothing_came()

    def _end_if_nothing_came(self) -> None:
        """EOF for the stream, unless part of a request has come (asyncio
        keeps it in the reader's buffer): that request is answered first."""
        if not getattr(self.reader, "_buffer", b""):
            self.reader.feed_eof()

    def grow(self) -> None:
        """(SocketIO's: a stream's buffer is asyncio's.)"""

    def take(self, n: int) -> None:
        return None  # nothing is read ahead: always through the stream

    async def next_request(self) -> PayloadSink | None:
        """(SocketIO's: a stream has no readable callback.)"""
        return None

    async def next_header(self) -> Buffer | None:
        if self.closing:
            self._end_if_nothing_came()  # (at a frame's boundary)
        self._between_frames = True
        try:
            data = await self.reader.readexactly(HEADER_SIZE)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise ConnectionClosed("peer closed mid-header") from None
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from None
        finally:
            self._between_frames = False
        self.bytes_in += HEADER_SIZE
        return data

    async def read_exact(self, n: int) -> Buffer:
        try:
            data = await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, OSError):
            raise ConnectionClosed(f"peer closed before {n} bytes of metadata") from None
        self.bytes_in += n
        return data

    async def read_into(self, dest: memoryview, crc: int | None,
                        streaming: bool = False, deadline: float = 0.0) -> int:
        size = len(dest)
        streaming = streaming and size >= BOUNCE_BYTES
        pos = 0
        seed = crc or 0
        try:
            async with asyncio.timeout(self.timeout):
                while pos < size:
                    chunk = await self.reader.read(min(size - pos, _TLS_READ))
                    if not chunk:
                        raise ConnectionClosed(f"peer closed after {pos} of {size} payload "
                                               "bytes")
                    seed = copy_and_checksum(dest, pos, chunk, seed, streaming)
                    pos += len(chunk)
                    self.bytes_in += len(chunk)
        except TimeoutError:
            raise PeerTooSlow(f"payload not received within {self.timeout:g} s") from None
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from None
        return seed if crc is not None else 0

    async def discard(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, _TLS_READ)))
        while n > 0:
            k = min(n, len(scratch))
            await self.read_into(scratch[:k], None)
            n -= k

    async def send(self, parts: Sequence[Buffer], rest: SendRest | None = None) -> None:
        # Copied: the TLS transport may keep a reference to what it is given
        # after drain() returns, and a block's pin ends when this returns.
        # (``rest`` is not needed: the copy is made here, right after the
        # blocks were checked.)
        self.writer.write(b"".join(parts))
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except TimeoutError:
            raise PeerTooSlow(f"the peer did not read a response within {self.timeout:g} "
                              "s") from None
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from None
        self.bytes_out += sum(map(len, parts))

    def close(self) -> None:
        self.writer.close()

    async def close_now(self, timeout: float) -> None:
        """A stop's close: TLS's close_notify, a wait of at most ``timeout``
        s for the peer's, then the socket closed whatever came. (Left to
        asyncio's own timeout, 30 s, the transport outlived the loop, and
        Python 3.13 printed a traceback as it was collected.)"""
        self.writer.close()
        try:
            async with asyncio.timeout(timeout):
                await self.writer.wait_closed()
        except Exception:  # (the time up, or the peer gone)
            self.writer.transport.abort()

    async def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until the TLS transport holds nothing
        more of the last answer (``send`` returns once it holds less than its
        high-water mark): a stopping server may exit right after the close.
        Not until the peer's close_notify: a peer that no longer reads would
        hold the stop for its whole grace."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                transport = self.writer.transport
                # drain() then waits until it holds nothing (high=0 would
                # pause an empty transport for good: it pauses at >= high).
                transport.set_write_buffer_limits(high=1)
                await self.writer.drain()
                # What TLS has encrypted may still wait in the socket's own
                # transport, of which asyncio gives no public handle.
                inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
                while inner is not None and inner.get_write_buffer_size():
                    await asyncio.sleep(0.005)  # (a stop's last answer: bounded above)
