"""The SDK's side of the data plane (docs/dataplane.md): Lookup, Get and Put
as frames on a plain socket beside the gRPC channel.

:class:`DataPlane` belongs to one sync client. On the first hot call it opens
a session through gRPC (``OpenDataPlane``, authenticated like every call),
connects to the unix socket when the client is on the server's host (it
reached gRPC over a unix socket or loopback, and the path exists) or to the
TCP listener otherwise (TLS when the gRPC channel uses TLS), and presents the
ticket in HELLO. A server without a data plane (UNIMPLEMENTED) is remembered
and the client keeps to gRPC (a debug log line says why). A listener that
cannot be used (unreachable, silent past ``OPEN_TIMEOUT_S``, failing the TLS
check, closing the connection at HELLO, refusing the ticket: another
server's listener) sends the call by gRPC
and is tried again after ``RETRY_S``, doubling up to ``RETRY_MAX_S`` while it
stays unusable (a warning says so the first time).

:class:`Connection` is one session's socket: a preallocated receive buffer
for headers and metadata, block bytes received with ``recv_into`` straight
into the caller's buffer, requests sent with one ``sendmsg`` of the header and
the caller's block views (no join). Connections are pooled (one per thread in
flight), so a client stays thread-safe with no lock on the hot path and no
thread per call.

Faults: an idle pooled connection the server has closed (a restart) is seen
before use and replaced. A connection that breaks during a call is dropped;
the next call opens a new session. The call that was in flight is retried
once on a new session only when it is idempotent (Lookup, Get); a Put raises
:class:`~kvstore.errors.ConnectionFailed` (whether its blocks were stored is
unknown: blocks whose bytes all arrived may be). A call that runs past the
client's ``timeout`` raises :class:`~kvstore.errors.DeadlineExceeded`, as
over gRPC: the timeout is the call's deadline, checked before each socket
wait and between pieces of at most 4 MiB sent or 16 MiB received (a wait that
begins with less than nine tenths of the timeout left is cut at the
deadline), so a call ends by 1.1 x the timeout, plus the copy of one piece,
at worst; ``get`` returning a large block as bytes receives it in one piece
(in pieces it cost a zeroed buffer and a copy more), whose copy the deadline
does not cut. (0.29.3 applied the timeout to each wait alone:
a Get of three 60 MiB blocks under a 50 ms timeout took 0.17 s and
succeeded.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from kvstore._impl import wait_readable
from kvstore._spin import MAX_BUSY_POLL_US
from kvstore.client import _convert as conv
from kvstore.client._convert import DataPlaneOffer as Offer
from kvstore.client._dproute import RETRY_S, NoRoute, Retry, Route, choose_route, open_timeout
from kvstore.client._errors import error_from_frame, error_from_rpc
from kvstore.cpuquota import ThrottleWatch
from kvstore.dataplane import frames
from kvstore.dataplane.frames import FLAG_CLOSING, FLAG_MORE, HEADER, HEADER_SIZE, MAGIC, Op
from kvstore.dataplane.tls import same_checks_as_grpc
from kvstore.errors import (
    BufferTooSmall,
    ConnectionFailed,
    DeadlineExceeded,
    InvalidArgument,
    KVStoreError,
    TooManyConnections,
)

log = logging.getLogger("kvstore.client")

#: The receive buffer of a connection: headers, metadata and small payloads.
_RECV_BUFFER = 256 * 1024
#: Buffers one sendmsg takes at most (Linux IOV_MAX is 1024).
_IOV_MAX = 512
#: The most bytes one send or receive system call moves once a call has a
#: deadline to keep: the deadline is checked between them. (One sendmsg of a
#: 1 GiB Put on a unix socket, whose send limit restarts for every chunk the
#: kernel moves, ran 21 x its timeout; one 512 MiB receive, 2.4 x: the
#: kernel counts waiting against the limit, not copying.)
_PIECE = 4 * 1024 * 1024
#: ... one TLS write (each such write's wait is polled for: see Connection._ready)
_TLS_PIECE = 1024 * 1024
#: ... and one receive: larger (a 64 MiB Get in 4 MiB pieces ran ~4 % slower;
#: a 16 MiB piece is ~3 ms of copying at this host's speed).
_RECV_PIECE = 16 * 1024 * 1024
_RESPONSE = frames.RESPONSE
_ERROR = int(Op.ERROR)
_GET_META = struct.Struct("<IBB")
#: A GET answer's header and metadata, read in one go on the common path.
_GET_FRAME = struct.Struct("<4sBBHIIQIBB")
_GET_FRAME_SIZE = _GET_FRAME.size
_GET_ANSWER = int(Op.GET) | frames.RESPONSE
_VERSION = frames.VERSION
_U16 = struct.Struct("<H")
_COUNT_AND_KEY = struct.Struct("<IH")  # a one-key request's key count and key length
#: A GET answer expected this large or larger: its header is received alone,
#: so that its block goes from the socket straight into its destination.
_DIRECT_BYTES = 64 * 1024
#: Namespace and session id pairs whose encoded metadata prefix is kept.
_PREFIXES = 64
_ENV = "KVSTORE_DATA_PLANE"
_BUSY_POLL_ENV = "KVSTORE_BUSY_POLL_US"
#: Requests whose answer is polled for (busy_poll_us): those the server
#: answers in microseconds, often from the socket's readable callback. Not a
#: GET of a large block (see Connection._fill_exactly). An SHM_COMMIT, and a
#: PUT of at most _PUT_POLL_MAX_BYTES, are polled for longer by their bytes
#: (_POLL_NS_PER_CHECKED_BYTE).
#: Polls in a row that ran out before their answer after which a connection
#: stops polling (its server is too far or too slow for the poll to pay), and
#: how often it then tries one again.
_POLL_GIVE_UP = 8
_POLL_RETRY_EVERY = 64
#: A poll for a quick answer that ran out with its answer arriving within
#: this many times its budget doubles the connection's window for quick
#: answers (up to this many times the budget) instead of counting towards
#: giving up (not the longer polls of Puts and commits): the
#: answer was late by a hop's wake-up, not by a remote server. Why: the round
#: trip of an SHM_ACQUIRE is ~40-45 µs on this VM when its vCPUs run and
#: 60-130 µs in phases when the host is busy; a 50 µs poll then ran out 8
#: times in a row, the connection stopped polling, and every Get paid the
#: wake-up (measured: 1 MiB shm Get p50 230-360 µs with 268 polls in 2,000
#: calls). A longer window costs nothing when answers are quick (the poll
#: ends with the answer); it is spent only on answers that come late.
_POLL_MAX_SCALE = 4
#: A poll during which this thread held its CPU for less than this share of
#: the time, and which lasted longer than _CONTENDED_AFTER_NS, counts as a
#: miss, even when it caught its answer: the CPU was wanted by other work
#: (more polling clients than CPUs, a busy loop, an engine's threads) or this
#: process's CPU quota ran out, and each yield between two polls handed the
#: CPU to it rather than to the server. Measured on this 2-vCPU VM, 4 KiB
#: Gets over the unix data plane: one client held its CPU for 99.6 % of its
#: polls (p50 43 µs); four clients for 3 % of them (p50 331 µs), and 4, 8 and
#: 16 clients polling moved 2-3 times fewer Gets a second than the same
#: clients not polling (8 clients over TCP: 7-44 against 53-62 MB/s). Such a
#: connection gives up polling as after answers that come late, and tries
#: again now and then: with this rule, same run, those 8 clients 56-67 MB/s
#: (p99 1.4-4.2 ms, was up to 106), 4 clients over unix 39-54 (was 20-43),
#: one client unchanged.
_CONTENDED_SHARE = 0.5
#: ... but a poll that held its CPU for a sliver of a short time is how a
#: poll goes when the client shares its CPU with the server itself: its
#: yields run the server, which answers. Counted as a miss (the rule before
#: 0.29.9), the client stopped polling and slept for each answer, and the
#: kernel, waking it where the server ran, could keep both on one CPU (4 KiB
#: Gets 31-39 µs in half the unpinned runs of bench.peers on one host, 21-25
#: in the others); a client that polls stays runnable, and the kernel moves
#: one of the two away. The cases differ in how long the CPU was gone.
#: Measured here, 4 KiB Gets: polls of a client pinned with its server
#: lasted 28-147 µs, beside a busy loop 0.9-4.7 ms (the loop keeps the CPU
#: until a tick ends its slice); four clients on two CPUs p50 61-70 µs, p90
#: 150 (they keep polling now: 1.08-1.34x the Gets a second of the former
#: rule), eight p50 ~190, p90 ~430, p99 2 ms (they stop, as before, a little
#: later: 0.84-1.06x, median 0.96; sixteen 0.96). The
#: bound does not grow with busy_poll_us (one bound by the poll's window,
#: tried in 0.29.8's review, never stopped a 10 ms poll beside a busy loop
#: whose slices are 4 ms). A poll that waits on the server's checksum of its
#: bytes (a Put, a shm commit) may last their checking time more
#: (_POLL_NS_PER_CHECKED_BYTE).
_CONTENDED_AFTER_NS = 250_000
#: Such a poll that lost the CPU for this long gives up polling at once,
#: without the one more try that 8 misses get (the next poll comes 64 calls
#: later): one such poll costs what ~50 polls that pay save (10-20 µs each).
#: A shorter one (more polling clients than CPUs) counts one miss, as a
#: poll that ran out. Why: beside a busy loop, with a server that ran on the
#: client's CPU now and then (a loaded host), its quick polls reset the count
#: between two of the loop's slices, and a client counting one miss a poll
#: kept polling through 25 of them in 200 calls (p90 4 ms).
_CONTENDED_GIVE_UP_NS = 1_000_000
#: Whether this process's CPU quota ran out lately (its cgroup's count of
#: throttled periods, read at most once a second): no poll for a while after
#: it did, as the server's loop (under a quota each poll spent the quota and
#: a caught one reset the count of misses, so polling never stopped).
_QUOTA = ThrottleWatch()
_POLLED = frozenset({int(Op.PING), int(Op.LOOKUP), int(Op.GET), int(Op.SHM_RESERVE),
                     int(Op.SHM_ACQUIRE), int(Op.SHM_RELEASE), int(Op.SHM_COMMIT),
                     int(Op.PUT), int(Op.SESSION_EVENT)})
#: An SHM_COMMIT's answer comes after the server has checked the CRC-32C of
#: the committed bytes and reserved the slots for the next Puts: for 1 MiB,
#: 100-150 µs of server work measured here (checksum 30-55, commit 45-55,
#: restock 28-34, decode ~20), so its poll lasts busy_poll_us plus 0.3 ns a
#: byte (1 MiB: 365 µs). Measured (1 MiB shm Puts, server busy-polling): the
#: commit's round trip 180-190 -> 135 µs with 0.1 ns a byte; with 0.3 the
#: server's send of the answer 27 -> 14 µs (the client is still polling, so
#: the kernel wakes no one); polling busy_poll_us alone ran out first.
_POLL_NS_PER_CHECKED_BYTE = 0.3
#: A PUT's answer follows the receipt of its bytes, most of which are still
#: in the socket when ``sendmsg`` returns: polled for as an SHM_COMMIT (the
#: same 0.3 ns a byte) when it carries at most 1 MiB (one chunk, how engines
#: Put), not when larger (the poll would mostly run out). Measured (1 MiB
#: Puts over TCP, two clients on one server, rounds alternated, quiet
#: machine): p50 471 -> 401 and 421 -> 382 µs, 764 of 768 answers caught.
_PUT_POLL_MAX_BYTES = 1024 * 1024 + 4096
#: Those polls start from three times busy_poll_us, not once: a Put's answer comes from
#: the connection's task, not the readable callback (server handler ~33 µs,
#: answer ~20, plus the task's wake-up), and with busy_poll_us alone a 4 KiB
#: Put's poll ran out every time (55 polls, 0 caught, then given up). 4 KiB
#: Puts, same machine, alternated runs: p50 250 -> 175 µs (shm), 215 -> 137
#: (unix data plane), 85-98 % of the answers caught. (An SHM_COMMIT that needs
#: no waiting is now answered from the readable callback, sooner, and so is
#: a PUT that needs none (dataplane/put.py): the poll ends with the answer,
#: so the longer window costs nothing there; it is kept for the PUTs the
#: server's task finishes.)
_CHECKED_POLL_BASE = 3
_PUT = int(Op.PUT)
#: Requests that store blocks: one interrupted after it went is waited for by
#: the next write (DataPlane.settle). A SHM_RESERVE stores nothing (and may
#: wait for room a Delete would free): its connection is closed instead.
_STORING = frozenset({_PUT, int(Op.SHM_COMMIT)})
#: How long a call polls for its answer unless told otherwise (µs): more than
#: a small answer's round trip on loopback (20-40 µs), little CPU per call.
DEFAULT_BUSY_POLL_US = 50
_Received = TypeVar("_Received", int, bytes)

T = TypeVar("T")


def data_plane_mode(value: bool | str | None) -> str:
    """``data_plane=`` as one of "off", "auto", "tcp", "unix". None reads the
    environment variable KVSTORE_DATA_PLANE (0/off/false, 1/on/auto, tcp,
    unix; unset: auto)."""
    if value is None:
        env = os.environ.get(_ENV, "auto").strip().lower() or "auto"
        if env in ("0", "off", "false", "no"):
            return "off"
        if env in ("1", "on", "true", "yes", "auto"):
            return "auto"
        if env in ("tcp", "unix"):
            return env
        raise InvalidArgument(f"${_ENV} must be 0/off/false, 1/on/auto, tcp or unix, "
                              f"not {env!r}")
    if value is True:
        return "auto"
    if value is False:
        return "off"
    if isinstance(value, str) and value in ("auto", "tcp", "unix"):
        return value
    raise InvalidArgument(f"data_plane must be True, False, 'auto', 'tcp' or 'unix', "
                          f"not {value!r}")


def busy_poll_setting(value: int | None) -> int:
    """``busy_poll_us=`` checked; None reads KVSTORE_BUSY_POLL_US (unset or
    empty: DEFAULT_BUSY_POLL_US)."""
    where = ""
    if value is None:
        raw = os.environ.get(_BUSY_POLL_ENV, "").strip()
        if not raw:
            return DEFAULT_BUSY_POLL_US
        where = f" (from ${_BUSY_POLL_ENV})"
        try:
            value = int(raw)
        except ValueError:
            raise InvalidArgument(f"busy_poll_us must be a whole number of microseconds "
                                  f"from 0 to {MAX_BUSY_POLL_US}, not {raw!r}{where}") from None
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 0 <= value <= MAX_BUSY_POLL_US:
        raise InvalidArgument(f"busy_poll_us must be a whole number of microseconds from 0 "
                              f"to {MAX_BUSY_POLL_US}, not {value!r}{where}")
    return value


_forks = 0  # how many times this process was forked from (see DataPlane._take)


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class Dropped(Exception):
    """The connection broke (closed, reset) during a call."""


class Connection:
    """One data-plane session's socket (used by one thread at a time)."""

    def __init__(self, sock: socket.socket, target: str, timeout: float | None,
                 busy_poll_us: int = 0) -> None:
        self.sock = sock
        self._fd = sock.fileno()
        #: Nanoseconds an answer is polled for before the receive sleeps.
        self.busy_poll_ns = busy_poll_us * 1000
        # The request just sent has a quick answer: poll for it this many ns
        # (see _POLLED; 0: no poll).
        self._poll_ns = 0
        # Polls in a row that ran out before the answer, per kind of request:
        # [0] quick answers, [1] answers after the request's bytes are checked
        # (a Put of one chunk, a shm commit). Apart, so that Puts whose answers
        # come late (a loaded or remote server) do not stop the quick polls.
        self._poll_misses = [0, 0]
        self._poll_kind = 0
        # How long the request just sent may be polled for, held by others
        # for most of it, before the poll counts as contended (see
        # _CONTENDED_AFTER_NS).
        self._contended_after_ns = _CONTENDED_AFTER_NS
        # Per kind: the poll window in multiples of its budget (quick
        # answers: 1, 2 or 4, see _POLL_MAX_SCALE; Puts and commits: 1).
        self._poll_scale = [1, 1]
        #: Polls made, and answers that arrived while polled for (proof the
        #: poll ran, for tests and benchmarks; see DataPlane.polled).
        self.polls = 0
        self.polled = 0
        self.target = target
        self.timeout = timeout
        #: The call in progress's deadline (time.monotonic(); 0: none), set
        #: by :meth:`begin_call`.
        self.deadline = 0.0
        # The socket's wait limits cut to the call's remainder (restored by
        # the next call): a setsockopt pair, only once a call has used a
        # tenth of its timeout (a 4 KiB Get would pay it on every receive).
        self._short = False
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.broken = False
        #: The opcode of the request sent last (0: none yet).
        self.last_opcode = 0
        self.max_meta_bytes = 1 << 20
        self.max_payload_bytes = 1 << 30
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # buffered bytes: self._buf[self._start:self._end]
        self._end = 0
        self._next_id = 0
        # The last GET answer's block was large (_DIRECT_BYTES or more).
        self._large = False
        # (namespace, session id) -> their encoded GET/LOOKUP metadata fields.
        self._prefixes: dict[tuple[str, str], bytes] = {}
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    # -- life --------------------------------------------------------------------------

    def hello(self, ticket: bytes) -> frames.HelloOk:
        rid = self.send(Op.HELLO, frames.Hello(ticket).encode())
        ok = frames.HelloOk.decode(self.response(rid, Op.HELLO))
        self.max_meta_bytes = ok.max_meta_bytes
        self.max_payload_bytes = ok.max_payload_bytes
        return ok

    def idle_and_open(self) -> bool:
        """An idle connection has nothing to read: if it has, the server
        closed it (or is closing it) and it is not reused."""
        return not self.broken and not self._poll.poll(0) and self._start == self._end

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def finish(self, timeout: float | None) -> None:
        """End a connection whose last request may still be under way on the
        server (its caller was interrupted): send nothing more, wait (at most
        ``timeout``) until the server, which answers a connection's requests
        one after another, has answered it and closed its end, then close.
        (A Put's payload cut short is dropped there, whole.)"""
        if self.broken:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with contextlib.suppress(OSError, ValueError):
            self.sock.shutdown(socket.SHUT_WR)
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.sock.settimeout(left)
                if not self.sock.recv(1 << 16):
                    break  # the server's end is closed: the request was answered
        self.close()

    # -- the call's deadline --------------------------------------------------------

    def begin_call(self, deadline: float) -> None:
        """A call begins: it must end by ``deadline`` (0: no deadline)."""
        self.deadline = deadline
        if self._short:
            _set_timeouts(self.sock, self.timeout)
            self._short = False

    def _check_deadline(self, what: str) -> None:
        """Before a socket wait: past the call's deadline it fails; near it,
        the wait is cut at the deadline."""
        deadline = self.deadline
        if not deadline:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            self.broken = True  # (mid-call: the rest of its answer would follow)
            raise self._past_deadline(what)
        assert self.timeout is not None
        if left < 0.9 * self.timeout and not self.tls:  # (TLS: _ready polls for what is left)
            # (at least 1 ms: a limit of 0 is no limit at all, a fix review)
            _set_timeouts(self.sock, max(left, 0.001))
            self._short = True

    def _past_deadline(self, what: str) -> DeadlineExceeded:
        unknown = (": whether it took effect is unknown (blocks whose bytes all arrived "
                   "may be stored)" if self.last_opcode in _STORING else "")
        exc = DeadlineExceeded(f"data plane to {self.target}: the call ran past its timeout "
                               f"of {self.timeout} s {what}{unknown}")
        exc.grpc_code = "DEADLINE_EXCEEDED"  # type: ignore[attr-defined]
        return exc

    # -- sending -----------------------------------------------------------------------

    def send(self, opcode: int, meta: bytes, payload: Sequence[memoryview] = (),
             payload_len: int = 0, flags: int = 0, checked_bytes: int = 0) -> int:
        """Send one request frame (header ``flags``); returns its request id.
        ``checked_bytes``: bytes the server checksums before it answers (an
        SHM_COMMIT's blocks; a PUT's payload counts itself), which lengthen
        the poll for the answer."""
        self._next_id = rid = (self._next_id + 1) & 0xFFFFFFFF
        self.last_opcode = opcode  # (before a byte goes: see DataPlane.run)
        poll = self.busy_poll_ns if opcode in _POLLED else 0
        if opcode == _PUT:
            if payload_len > _PUT_POLL_MAX_BYTES:
                poll = 0
            checked_bytes = payload_len
        if poll and checked_bytes:
            poll = min(poll * _CHECKED_POLL_BASE + int(checked_bytes * _POLL_NS_PER_CHECKED_BYTE),
                       MAX_BUSY_POLL_US * 1000)
        self._poll_ns = poll
        self._poll_kind = 1 if checked_bytes else 0
        self._contended_after_ns = _CONTENDED_AFTER_NS + \
            int(checked_bytes * _POLL_NS_PER_CHECKED_BYTE)
        head = HEADER.pack(MAGIC, _VERSION, opcode, flags, rid, len(meta), payload_len) + meta
        self._check_deadline("sending")
        try:
            if self.tls:
                if payload_len <= _DIRECT_BYTES:
                    # (one TLS record for a small request: one write, not one
                    # per part)
                    self._tls_send(b"".join((head, *payload)))
                else:
                    self._tls_send(head)
                    for part in payload:
                        self._tls_send(part)
            elif not payload:
                self.sock.sendall(head)
            elif self.deadline and payload_len > _PIECE:
                self._sendmsg_pieces([memoryview(head), *payload])
            else:
                self._sendmsg_all([memoryview(head), *payload])
        except (BlockingIOError, TimeoutError) as exc:
            self.broken = True
            raise self._deadline("sending") from exc
        except OSError as exc:
            self.broken = True
            raise Dropped(f"sending: {exc}") from exc
        return rid

    def _sendmsg_pieces(self, parts: list[memoryview]) -> None:
        """:meth:`_sendmsg_all` within the call's deadline: at most
        :data:`_PIECE` bytes a system call, none of them blocking, and the
        waits for room polled for at most what is left. (A blocking send on a
        unix socket restarts its limit for every chunk the kernel moves: one
        to a slow reader outlives any deadline.)"""
        i = 0
        while i < len(parts):
            self._check_deadline("sending")
            batch: list[memoryview] = []
            room = _PIECE
            for part in parts[i : i + _IOV_MAX]:
                if len(part) >= room:
                    batch.append(part[:room])
                    break
                batch.append(part)
                room -= len(part)
            try:
                sent = self.sock.sendmsg(batch, (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            if not sent:
                self._ready(select.POLLOUT, "sending")
                continue
            i = _consume(parts, i, sent)

    def _sendmsg_all(self, parts: list[memoryview]) -> None:
        """Send ``parts`` whole (blocking; a payload of at most :data:`_PIECE`
        bytes under a deadline: a reader that keeps taking them slowly may
        hold it past the deadline by that much, one that stops may not)."""
        i = 0
        first = True
        while i < len(parts):
            if not first:  # (a partial send: the wait was cut, or more to go)
                self._check_deadline("sending")
            first = False
            i = _consume(parts, i, self.sock.sendmsg(parts[i : i + _IOV_MAX]))

    # -- receiving ---------------------------------------------------------------------

    def _fill(self, n: int) -> None:
        """At least ``n`` bytes buffered (from self._start)."""
        have = self._end - self._start
        if have >= n:
            return
        if self._start + n > len(self._buf):
            if n > len(self._buf):  # a large metadata section
                self._buf = bytearray(max(n, 2 * len(self._buf)))
                self._buf[:have] = self._view[self._start : self._end]
                self._view = memoryview(self._buf)
            else:
                self._view[:have] = self._view[self._start : self._end]
            self._start, self._end = 0, have
        late_since = 0
        poll_ns = self._poll_ns
        if poll_ns:
            if self._end == self._start:
                late_since = self._poll_answer(poll_ns)
            self._poll_ns = 0
        while self._end - self._start < n:
            got = self._recv_into(self._view[self._end :])
            self._end += got
            if late_since:
                self._poll_late(poll_ns, time.perf_counter_ns() - late_since)
                late_since = 0

    def _fill_exactly(self, n: int) -> None:
        """At least ``n`` bytes buffered, receiving no more than that: what
        follows (a large payload) is received straight into its destination,
        not copied through the buffer."""
        if self._start + n > len(self._buf):
            have = self._end - self._start
            self._view[:have] = self._view[self._start : self._end]
            self._start, self._end = 0, have
        # No busy poll: a large block's answer is not due for a while (the
        # receive of its bytes sleeps anyway; a poll there only costs CPU).
        self._poll_ns = 0
        while self._end - self._start < n:
            self._end += self._recv_into(self._view[self._end : self._start + n])

    def _poll_answer(self, poll_ns: int) -> int:
        """Nothing buffered and an answer due: poll the socket for up to
        ``poll_ns`` times the kind's window before the receive sleeps (see
        kvstore/_spin.py). Returns when the poll began (perf_counter_ns) if it
        ran out, for :meth:`_poll_late`; 0 otherwise."""
        if self.tls and self.sock.pending():  # type: ignore[attr-defined]
            return 0  # bytes already decrypted: the receive returns at once
        if not _QUOTA.quota_left():
            return 0  # this process's CPU quota ran out lately: see kvstore/cpuquota.py
        kind = self._poll_kind
        misses = self._poll_misses[kind]
        if misses >= _POLL_GIVE_UP:
            # Answers keep coming later than the poll lasts (a remote server,
            # a slow link): sleep at once, and try a poll again now and then.
            self._poll_misses[kind] = misses + 1
            if (misses - _POLL_GIVE_UP) % _POLL_RETRY_EVERY:
                return 0
        self.polls += 1
        began = time.perf_counter_ns()
        held = time.thread_time_ns()
        caught = wait_readable(self._fd, min(poll_ns * self._poll_scale[kind],
                                             MAX_BUSY_POLL_US * 1000))
        if caught:
            self.polled += 1
        took = time.perf_counter_ns() - began
        if took > self._contended_after_ns:
            ran = time.thread_time_ns() - held
            if ran < _CONTENDED_SHARE * took:  # other work had its CPU: see _CONTENDED_AFTER_NS
                if took - ran < _CONTENDED_GIVE_UP_NS:
                    self._poll_missed(kind)
                elif misses < _POLL_GIVE_UP:
                    self._poll_misses[kind] = _POLL_GIVE_UP + 1  # no one more try
                    self._poll_scale[kind] = 1
                return 0
        if caught:
            self._poll_misses[kind] = 0
            return 0
        return began

    def _poll_late(self, poll_ns: int, waited_ns: int) -> None:
        """A poll of budget ``poll_ns`` ran out and its answer came
        ``waited_ns`` after the poll began: widen the window when a wider one
        would have caught it, or count a miss towards giving up."""
        kind = self._poll_kind
        scale = self._poll_scale[kind]
        most = MAX_BUSY_POLL_US * 1000
        # Quick answers only: a Put's poll is long already (its bytes), and
        # 4 times it would spin for milliseconds on a remote server's answers.
        if not kind and scale < _POLL_MAX_SCALE and poll_ns * scale < most and \
                waited_ns <= min(poll_ns * _POLL_MAX_SCALE, most):
            self._poll_scale[kind] = scale * 2
            return
        self._poll_missed(kind)

    def _poll_missed(self, kind: int) -> None:
        """A poll that did not pay: one more towards giving up."""
        misses = self._poll_misses[kind]
        if misses < _POLL_GIVE_UP:
            self._poll_misses[kind] = misses = misses + 1
        if misses >= _POLL_GIVE_UP:
            self._poll_scale[kind] = 1  # given up: the next retry starts small

    # A TLS socket is non-blocking (set once its handshake is done): Python's
    # TLS reads on a blocking socket retry the kernel's EAGAIN, so the socket's
    # wait limit never ended them, and a stalled TLS server held a call for as
    # long as it stalled (a fix review: 10 x the timeout; a cut link, for
    # ever). Each read or write that would block waits in poll() for at most
    # the call's remaining time (else its timeout). (Python's own socket
    # timeout would do it too, but polls before every TLS write: +10 µs a
    # 4 KiB Get; this polls only when a read or write would block.)

    def _ready(self, event: int, what: str) -> None:
        """Wait until the socket is ready for ``event`` (POLLIN, POLLOUT), at
        most the call's remaining time (else its timeout; None: no limit)."""
        ms: float | None = None  # (no timeout: wait for as long as it takes)
        if self.timeout is not None:
            left = self.deadline - time.monotonic() if self.deadline else self.timeout
            ms = max(left, 0.001) * 1000
        poller = self._poll
        if event != select.POLLIN:
            poller = select.poll()
            poller.register(self._fd, event)
        if not poller.poll(ms):
            self.broken = True
            raise self._past_deadline(what) if self.deadline else self._deadline(what)

    def _tls_send(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            self._check_deadline("sending")
            try:
                sent = self.sock.send(view[:_TLS_PIECE])
            except ssl.SSLWantWriteError:
                sent = 0
            except ssl.SSLWantReadError:  # (a TLS handshake message first)
                self._ready(select.POLLIN, "sending")
                continue
            if sent:
                view = view[sent:]
            else:
                self._ready(select.POLLOUT, "sending")

    def _tls_recv_into(self, view: memoryview) -> int:
        while True:
            self._check_deadline("waiting for the server's answer")
            try:
                return self.sock.recv_into(view, len(view))
            except ssl.SSLWantReadError:
                self._ready(select.POLLIN, "waiting for the server's answer")
            except ssl.SSLWantWriteError:
                self._ready(select.POLLOUT, "waiting for the server's answer")

    def _recv_into(self, view: memoryview, flags: int = 0) -> int:
        try:
            if self.tls:
                got = self._tls_recv_into(view)
            else:
                self._check_deadline("waiting for the server's answer")
                got = self.sock.recv_into(view, len(view), flags)
        except OSError as exc:
            raise self._receive_failed(exc) from exc
        if not got:
            raise self._receive_failed(None)
        return got

    def _recv(self, receive: Callable[[], _Received]) -> _Received:
        """One receive call, its failures said in the data plane's words."""
        self._check_deadline("waiting for the server's answer")
        try:
            got = receive()
        except OSError as exc:
            raise self._receive_failed(exc) from exc
        if not got:
            raise self._receive_failed(None)
        return got

    def _receive_failed(self, exc: OSError | None) -> Exception:
        """What a failed receive raises (``exc`` None: the peer closed)."""
        self.broken = True
        if exc is None:
            return Dropped("the server closed the connection")
        if isinstance(exc, (BlockingIOError, TimeoutError, ssl.SSLWantReadError)):
            return self._deadline("waiting for the server's answer")
        return Dropped(f"receiving: {exc}")

    def _deadline(self, what: str) -> DeadlineExceeded:
        if self._short:  # the wait was cut at the call's deadline: that, not a stall
            return self._past_deadline(what)
        exc = DeadlineExceeded(f"data plane to {self.target}: no progress for {self.timeout} s "
                               f"{what}")
        exc.grpc_code = "DEADLINE_EXCEEDED"  # type: ignore[attr-defined]
        return exc

    def head(self) -> tuple[int, int, int, int, bytes]:
        """The next frame's header and metadata: (opcode, flags, request id,
        payload_len, meta). Its payload, if any, is read next."""
        self._fill(HEADER_SIZE)
        magic, version, opcode, flags, rid, meta_len, payload_len = HEADER.unpack_from(
            self._buf, self._start)
        if magic != MAGIC or version != frames.VERSION:
            self.broken = True
            raise ConnectionFailed(f"data plane to {self.target}: the server sent a frame with "
                                   f"magic {bytes(magic)!r}, version {version}")
        self._start += HEADER_SIZE
        self._fill(meta_len)
        start = self._start
        self._start += meta_len
        return opcode, flags, rid, payload_len, bytes(self._view[start : self._start])

    def payload_into(self, dest: memoryview) -> None:
        """Read the next len(dest) payload bytes into ``dest``."""
        n = len(dest)
        have = min(self._end - self._start, n)
        if have:
            dest[:have] = self._view[self._start : self._start + have]
            self._start += have
        # (in pieces under a deadline: see _PIECE)
        piece = _RECV_PIECE if self.deadline else n
        while have < n:
            have += self._recv_into(dest[have : have + piece], socket.MSG_WAITALL)

    def payload_bytes(self, n: int) -> bytes:
        if self._end - self._start >= n:
            start = self._start
            self._start += n
            return bytes(self._view[start : self._start])
        if self._end == self._start and not self.tls:
            # (one receive, even under a deadline: the kernel counts its waits
            # against the limit the deadline cut, not its copying; in pieces
            # it needed a zeroed buffer and a copy more, and a 64 MiB get ran
            # 2.4 x slower: a fix review)
            # Nothing buffered: the kernel copies straight into the bytes
            # returned (a bytearray then bytes() would copy the block twice).
            first = self._recv(lambda: self.sock.recv(n, socket.MSG_WAITALL))
            if len(first) == n:
                return first
        else:
            first = b""
        out = bytearray(n)
        out[:len(first)] = first
        self.payload_into(memoryview(out)[len(first):])
        return bytes(out)

    def skip_payload(self, n: int) -> None:
        while n:
            self._fill(1)
            k = min(n, self._end - self._start)
            self._start += k
            n -= k

    def response(self, rid: int, opcode: int) -> bytes:
        """The metadata of the (single-frame, payload-free) answer to ``rid``;
        an ERROR frame raises its kvstore error."""
        op, flags, got_rid, payload_len, meta = self.head()
        self._check(op, flags, got_rid, rid, opcode, payload_len, meta)
        if payload_len:
            self.broken = True
            raise ConnectionFailed(f"data plane to {self.target}: a {Op(opcode).name} answer "
                                   "carries a payload")
        return meta

    def _check(self, op: int, flags: int, got_rid: int, rid: int, opcode: int,
               payload_len: int, meta: bytes) -> None:
        if got_rid != rid:
            self.broken = True
            if got_rid != 0 or op != _ERROR:
                raise ConnectionFailed(f"data plane to {self.target}: answer to request "
                                       f"{got_rid} where {rid} was due")
            # Request id 0: the server could not trust our header (its magic
            # or version: a server of another protocol version), and its
            # message says so; it closes the connection after it.
        if op == _ERROR:
            if flags & FLAG_CLOSING:
                self.broken = True
            if payload_len:
                self.skip_payload(payload_len)
            try:
                info = frames.ErrorInfo.decode(meta)
            except frames.FrameError as exc:
                self.broken = True
                raise ConnectionFailed(f"data plane to {self.target}: bad ERROR frame: "
                                       f"{exc}") from None
            raise error_from_frame(info.code, info.name, info.message, self.target)
        if op != opcode | _RESPONSE:
            self.broken = True
            raise ConnectionFailed(f"data plane to {self.target}: answer opcode {op:#x} to "
                                   f"a {Op(opcode).name}")

    # -- operations --------------------------------------------------------------------

    def lookup(self, namespace: str, keys: list[bytes], lease_ms: int,
               session_id: str) -> frames.LookupResult:
        rid = self.send(Op.LOOKUP, frames.LookupRequest(namespace, keys, lease_ms,
                                                        session_id).encode())
        return frames.LookupResult.decode(self.response(rid, Op.LOOKUP))

    def _get_meta(self, namespace: str, keys: list[bytes], session_id: str) -> bytes:
        """GetRequest(namespace, keys, session_id).encode(), its namespace and
        session fields encoded once per connection."""
        prefix = self._prefixes.get((namespace, session_id))
        if prefix is None:
            ns, sid = namespace.encode(), session_id.encode()
            if len(ns) > 0xFFFF or len(sid) > 0xFFFF:
                return frames.GetRequest(namespace, keys, session_id).encode()
            prefix = _U16.pack(len(ns)) + ns + _U16.pack(len(sid)) + sid
            if len(self._prefixes) < _PREFIXES:
                self._prefixes[(namespace, session_id)] = prefix
        if len(keys) == 1:
            key = keys[0]
            if len(key) <= 0xFFFF:
                return prefix + _COUNT_AND_KEY.pack(1, len(key)) + key
        return prefix + frames.MetaWriter().keys(keys).getvalue()

    def _get_answer(self, rid: int, index: int, count: int) -> tuple[int, int, int]:
        """The next GET answer frame's (flags, hit, payload_len): straight
        from the buffer when its header and metadata are there and as
        expected, else through the general checks (which raise)."""
        start = self._start
        if self._end - start >= _GET_FRAME_SIZE:
            magic, version, op, flags, got_rid, meta_len, payload_len, i, hit, _tier = \
                _GET_FRAME.unpack_from(self._buf, start)
            if (op == _GET_ANSWER and got_rid == rid and meta_len == _GET_META.size
                    and i == index and (i < count or not count) and magic == MAGIC
                    and version == _VERSION):
                self._start = start + _GET_FRAME_SIZE
                return flags, hit, payload_len
        op, flags, got_rid, payload_len, meta = self.head()
        self._check(op, flags, got_rid, rid, Op.GET, payload_len, meta)
        if len(meta) != _GET_META.size:
            self.broken = True
            raise ConnectionFailed(f"data plane to {self.target}: GET answer metadata of "
                                   f"{len(meta)} bytes")
        i, hit, _tier = _GET_META.unpack(meta)
        if i != index or (count and i >= count):
            self.broken = True
            raise ConnectionFailed(f"data plane to {self.target}: GET answered key #{i} "
                                   f"where #{index} was due ({count} keys)")
        return flags, hit, payload_len

    def get(self, namespace: str, keys: list[bytes], session_id: str,
            views: list[memoryview] | None) -> list[Any]:
        """Blocks as bytes (``views`` None) or sizes, read into ``views``; None
        for a miss. A block larger than its buffer raises InvalidArgument once
        the whole answer has been read (earlier buffers are filled)."""
        if self._start == self._end:
            self._start = self._end = 0  # nothing buffered: receive from the start
        rid = self.send(Op.GET, self._get_meta(namespace, keys, session_id))
        count = len(keys)
        out: list[Any] = [None] * count
        too_small: InvalidArgument | None = None
        index = 0
        answer = self._get_answer
        while True:
            if self._end - self._start < _GET_FRAME_SIZE:
                if (self._large if views is None or index >= count
                        else len(views[index]) >= _DIRECT_BYTES):
                    self._fill_exactly(_GET_FRAME_SIZE)
                else:
                    self._fill(HEADER_SIZE)
            flags, hit, payload_len = answer(rid, index, count)
            self._large = payload_len >= _DIRECT_BYTES
            i = index
            index += 1
            if hit and count:
                if views is None:
                    out[i] = self.payload_bytes(payload_len)
                elif too_small is not None or payload_len > len(views[i]):
                    self.skip_payload(payload_len)
                    too_small = too_small or BufferTooSmall(
                        f"buffer #{i} is {len(views[i])} bytes but key #{i} holds a block "
                        f"of {payload_len} bytes")
                else:
                    self.payload_into(views[i][:payload_len])
                    out[i] = payload_len
            elif payload_len:
                self.skip_payload(payload_len)
            if not flags & FLAG_MORE:
                break
        if index != max(count, 1):
            self.broken = True
            raise ConnectionFailed(f"data plane to {self.target}: GET answer ended after "
                                   f"{index} of {count} keys")
        if too_small is not None:
            raise too_small
        return out

    def put(self, namespace: str, ack: int, session_id: str,
            blocks: Sequence[tuple[bytes, memoryview]], block_format: int) -> frames.Counted:
        req = frames.PutRequest(namespace, [frames.PutBlock(k, len(v), block_format)
                                            for k, v in blocks], ack, session_id)
        total = sum(len(v) for _, v in blocks)
        rid = self.send(Op.PUT, req.encode(), [v for _, v in blocks], total)
        return frames.Counted.decode(self.response(rid, Op.PUT))

    def call(self, opcode: int, meta: bytes) -> bytes:
        """One request without payload; the answer's metadata."""
        return self.response(self.send(opcode, meta), opcode)

    # Added by dp-shm (issue 14, one round trip per shared-memory Put): the
    # shared-memory frames read and send header flags (FLAG_SHM_NEXT).
    def call_flags(self, opcode: int, meta: bytes, flags: int = 0,
                   checked_bytes: int = 0) -> tuple[int, bytes]:
        """One request without payload, sent with header ``flags``; the
        answer's flags and metadata (``checked_bytes``: see :meth:`send`)."""
        rid = self.send(opcode, meta, flags=flags, checked_bytes=checked_bytes)
        op, got_flags, got_rid, payload_len, answer = self.head()
        self._check(op, got_flags, got_rid, rid, opcode, payload_len, answer)
        if payload_len:
            self.broken = True
            raise ConnectionFailed(f"data plane to {self.target}: a {Op(opcode).name} answer "
                                   "carries a payload")
        return got_flags, answer


class DataPlane:
    """One client's data-plane sessions: opened on demand, pooled, replaced
    when they break. :meth:`run` returns :data:`UNAVAILABLE` when the server
    offers no data plane (the caller uses gRPC)."""

    def __init__(self, mode: str, channel: grpc.Channel, grpc_target: str, target: str,
                 metadata: Callable[[], Any], timeout: float | None, tls: Any,
                 busy_poll_us: int = 0,
                 call: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.mode = mode
        # How the session's gRPC opening is made (the sync Client's
        # CallDriver.call: on the main thread, not inside grpc's code).
        self._call_grpc = call if call is not None else (lambda fn: fn())
        self.busy_poll_us = busy_poll_us
        self.target = target
        self._grpc_target = grpc_target
        self._metadata = metadata
        self._timeout = timeout
        self._tls = tls
        self._open_rpc = channel.unary_unary(
            "/kvstore.v1.KVStore/OpenDataPlane",
            request_serializer=conv.encode_open_data_plane,
            response_deserializer=conv.decode_open_data_plane)
        #: The ShmAttach owner the sessions act as (ShmClient sets it).
        self.shm_owner = ""
        self._idle: list[Connection] = []
        # Connections whose write (a Put or a shm commit) was interrupted
        # after its request went: the next write waits for them (settle()).
        self._owing: list[Connection] = []
        self._lock = threading.Lock()
        self._refused = False  # the server has no data plane
        self._retry = Retry()  # a listener could not be used: gRPC until _retry.at
        self._closed = False
        self._forks = _forks
        # The largest request metadata and payload (the last HELLO's).
        self._limits = (1 << 20, 1 << 30)
        #: Calls answered by the data plane, and sessions opened (for tests
        #: and benchmarks: proof that the data plane was used).
        self.calls = 0
        self.sessions = 0

    @property
    def polls(self) -> int:
        """Polls made, over the idle pooled connections (for tests)."""
        with self._lock:
            return sum(conn.polls for conn in self._idle)

    @property
    def polled(self) -> int:
        """Answers that arrived while their call polled for them, over the
        idle pooled connections (busy_poll_us; for tests and benchmarks)."""
        with self._lock:
            return sum(conn.polled for conn in self._idle)

    @property
    def available(self) -> bool:
        return not self._refused and not self._closed and time.monotonic() >= self._retry.at

    def active(self) -> bool:
        """Whether calls go by the data plane (opens a session to find out)."""
        if not self.available:
            return False
        conn = self._take()
        if conn is None:
            return False
        self._give(conn)
        return True

    def close(self) -> None:
        self._closed = True
        with self._lock:
            owing, self._owing = self._owing, []
        for conn in owing + self.take_idle():
            conn.close()

    def take_idle(self) -> list[Connection]:
        """The pooled connections no call is using, taken out of the pool
        (a call on another thread may be using the others: their answers are
        theirs to read). Give each back with :meth:`give_back`."""
        self._mind_fork()
        with self._lock:
            idle, self._idle = self._idle, []
        return idle

    def give_back(self, conn: Connection) -> None:
        self._give(conn)

    def run(self, fn: Callable[[Connection], T], idempotent: bool) -> T | None:
        """``fn`` on a pooled connection; None when the data plane is not
        available (use gRPC). A dropped connection is retried once on a new
        session when ``idempotent``, else raises ConnectionFailed."""
        deadline = self.deadline()
        for attempt in (0, 1):
            conn = self._take()
            if conn is None:
                return None
            try:
                conn.begin_call(deadline)
                result = fn(conn)
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
            except KVStoreError:
                # The server's answer (an ERROR frame, read whole) or a check
                # of ours that marks the connection broken when it must.
                if conn.broken:
                    conn.close()
                else:
                    self._give(conn)
                raise
            except BaseException as exc:
                # Anything else (KeyboardInterrupt, an exception a signal
                # handler raised, a bug) may have stopped the call between
                # its request and the end of its answer: the rest of that
                # answer would be read by the next call. Never pooled again.
                # An interrupted write's request may still be under way on
                # the server: the next write waits for it (a Delete
                # acknowledged, then undone by the interrupted commit).
                parked = False
                if not idempotent and not isinstance(exc, Exception) and \
                        conn.last_opcode in _STORING:
                    with self._lock:
                        if not self._closed:  # (close() takes what is parked)
                            self._owing.append(conn)
                            parked = True
                if not parked:
                    conn.close()
                raise
            self._give(conn)
            self.calls += 1
            return result
        return None  # not reached: the second attempt returns or raises

    def deadline(self) -> float:
        """The deadline of a call beginning now (0: none)."""
        return time.monotonic() + self._timeout if self._timeout else 0.0

    def fits(self, meta_bytes: int, payload_bytes: int = 0) -> bool:
        """Whether a request this size fits one frame (else: gRPC)."""
        return meta_bytes <= self._limits[0] and payload_bytes <= self._limits[1]

    # -- the pool ------------------------------------------------------------------------

    def _mind_fork(self) -> None:
        """In a forked child, forget the parent's connections: their sessions
        are the parent's, never used here. (A child's ShmClient.close()
        abandoned the parent's stocked slots on them, under the parent's
        owner: the server gave that room to another client, whose blocks the
        parent's next Put then overwrote.) Their sockets close in this
        process only (the objects are dropped: no shutdown, nothing sent)."""
        if self._forks != _forks:
            self._forks = _forks
            self._idle = []
            self._owing = []

    def settle(self, timeout: float | None) -> None:
        """Before a write: wait (at most ``timeout`` each) until the writes
        interrupted after their request went are answered, so that none lands
        after this one. Any thread's write waits, several at once; a
        connection leaves the list only once finished (an interrupt here
        keeps it for the next write: it was dropped unclosed, and that write
        went ahead)."""
        self._mind_fork()
        if not self._owing:
            return
        with self._lock:
            owing = list(self._owing)
        for conn in owing:
            # (no lock: one an interrupt left taken made every later write
            # wait out its timeout; two threads may finish one connection,
            # both reading to its end, then closing it)
            conn.finish(timeout)
            with self._lock, contextlib.suppress(ValueError):
                self._owing.remove(conn)

    def _take(self) -> Connection | None:
        self._mind_fork()
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                break
            if conn.idle_and_open():
                return conn
            conn.close()  # the server closed it while it was idle (a restart)
        if not self.available:
            return None
        return self._open()

    def _give(self, conn: Connection) -> None:
        if self._closed or conn.broken:
            conn.close()
        else:
            self._idle.append(conn)

    def _open(self) -> Connection | None:
        try:
            metadata = self._metadata()
            offer = self._call_grpc(lambda: self._open_rpc(
                self.shm_owner, timeout=self._timeout, metadata=metadata))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.debug("kvstore server at %s offers no data plane (%s): using gRPC",
                          self.target, err.details())
                self._refused = True
                return None
            raise error_from_rpc(err, self.target, self._tls) from err
        setup = open_timeout(self._timeout)
        try:
            route = choose_route(self.mode, self._grpc_target, offer, self._tls is not None)
        except NoRoute as exc:
            log.debug("kvstore data plane at %s not used: %s", self.target, exc)
            self._refused = True
            return None
        try:
            sock = self._connect(route, setup)
        except OSError as exc:  # refused, timed out, TLS handshake or check failed
            self._retry.failed(self.target, route.where, exc)
            return None
        conn = Connection(sock, route.where, setup, self.busy_poll_us)
        try:
            hello = conn.hello(offer.ticket)
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
        _set_timeouts(conn.sock, self._timeout)
        self._retry.succeeded()
        self._limits = session_limits(offer, hello)
        self.sessions += 1
        log.debug("kvstore data plane session %d to %s", hello.session_id, route.where)
        return conn

    def _connect(self, route: Route, setup: float) -> socket.socket:
        """A socket to ``route``, its waits bounded by ``setup`` (the caller
        sets the client's timeout once the session is open)."""
        if route.unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, frames.UNIX_SEND_BUFFER)
                _set_timeouts(sock, setup)
                sock.connect(route.unix_path)
            except BaseException:
                sock.close()
                raise
            return sock
        raw = socket.create_connection((route.host, route.port), timeout=setup)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(None)
            _set_timeouts(raw, setup)
            if self._tls is not None:
                ctx = _tls_context(self._tls)
                # The handshake in Python's timeout mode: on a blocking socket
                # its loop retried the kernel's EAGAIN, and a peer that never
                # answered held the call for ever (a fix review).
                raw.settimeout(setup)
                raw = ctx.wrap_socket(raw, server_hostname=self._tls.server_name
                                       or route.server_name)
                raw.settimeout(0.0)  # (non-blocking from here: see Connection._ready)
        except BaseException:
            raw.close()
            raise
        return raw


def server_full(where: str, exc: TooManyConnections) -> float:
    """A HELLO refused for too many connections: when to try the data plane
    again (gRPC until then)."""
    log.debug("kvstore data plane at %s is full (%s): gRPC for %.0f s", where, exc.message,
              RETRY_S)
    return time.monotonic() + RETRY_S


def session_limits(offer: Offer, hello: frames.HelloOk) -> tuple[int, int]:
    """The largest request metadata and payload: the smaller of what the
    offer and the HELLO answer say (the offer's 0: not said)."""
    return (min(offer.max_meta_bytes or hello.max_meta_bytes, hello.max_meta_bytes),
            min(offer.max_payload_bytes or hello.max_payload_bytes, hello.max_payload_bytes))


def _consume(parts: list[memoryview], i: int, sent: int) -> int:
    """``sent`` bytes of ``parts[i:]`` went: the index of the first part not
    sent whole (a part sent in part is cut to what is left)."""
    while sent and i < len(parts):
        n = len(parts[i])
        if sent >= n:
            sent -= n
            i += 1
        else:
            parts[i] = parts[i][sent:]
            sent = 0
    return i


def _set_timeouts(sock: socket.socket, timeout: float | None) -> None:
    """The socket stays blocking (no poll before each recv); the kernel ends a
    wait longer than ``timeout`` with EAGAIN (None: no limit). Not for a TLS
    socket: Python retries the EAGAIN (see Connection._ready)."""
    timeout = timeout or 0.0
    secs = int(timeout)
    tv = struct.pack("ll", secs, int((timeout - secs) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _tls_context(tls: Any) -> ssl.SSLContext:
    from kvstore.client._base import _pem

    ca = _pem(tls.ca)
    ctx = ssl.create_default_context(cadata=ca.decode() if ca is not None else None)
    same_checks_as_grpc(ctx)
    cert, key = _pem(tls.cert), _pem(tls.key)
    if cert is not None and key is not None:
        # ssl loads a certificate chain from files only: a private temporary one.
        with tempfile.TemporaryDirectory(prefix="kvstore-tls-") as tmp:
            cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            for path, data in ((cert_path, cert), (key_path, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            ctx.load_cert_chain(cert_path, key_path)
    return ctx


