"""The data plane's listeners and connections (docs/dataplane.md).

Runs on the gRPC server's event loop: one task per connection, reading one
frame at a time and answering it before reading the next (requests may be
pipelined: they wait in the socket). A connection's failure is its own: a
malformed frame gets an ERROR frame with CLOSING and the connection closes;
a peer too slow to take a response or send a payload is dropped; in every
case what its session held (reservations, leases, a PUT's half-filled
extent) is given back, and nothing else is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.budget import BUDGET_WAIT_SECONDS, ResponseBudget, request_budget
from kvstore.config import Config
from kvstore.dataplane import frames as f
from kvstore.dataplane.conn import (
    HELLO_BUFFER_BYTES,
    ConnectionClosed,
    FastAnswer,
    FastPayload,
    PayloadSink,
    PeerTooSlow,
    SocketIO,
    StreamIO,
)
from kvstore.dataplane.ops import Answered, Session, error_frame
from kvstore.dataplane.tickets import Binding, TicketBook
from kvstore.errors import (
    CapacityExhausted,
    InvalidConfig,
    KVStoreError,
    MalformedRequest,
    TooManyConnections,
    Unauthenticated,
)
from kvstore.ownpath import make_directories
from kvstore.ratelimit import RateLimitedWarning
from kvstore.sockpath import UNIX_PATH_MAX, check_socket_path
from kvstore.store import SharedMemoryBroker, TieredStore
from kvstore.tiers.base import Buffer
from kvstore.types import MAX_KEYS_PER_REQUEST

log = logging.getLogger("kvstore.server")

_OFF = "off"
_PUT = int(f.Op.PUT)
#: The most metadata a frame may carry before HELLO is accepted (a HELLO's is
#: a ticket: 2 + TICKET_BYTES).
HELLO_MAX_META = 1024

#: A request with more metadata than this is counted in the server's budget
#: for requests of many keys (kvstore.budget.REQUEST_BUDGET_BYTES, shared
#: with gRPC Gets) while it runs (its answer sent included; without room it
#: waits, before its metadata is read, at most BUDGET_WAIT_SECONDS, then its
#: connection is closed, CapacityExhausted: an
#: outside review's 150 connections, each a GET of 65,536 keys whose answer
#: it did not read, took the server's own memory 144 -> 698 MB):
#: its metadata and what it decodes to stay in memory as long as its client
#: takes to read the answer. Smaller ones are not (1,024 connections at this
#: size hold ~45 MiB at most).
SMALL_META_BYTES = 2048


def request_hold(meta_len: int) -> int:
    """What a request with ``meta_len`` bytes of metadata may hold while it
    runs: the metadata, and its keys as Python objects (at most one per 3
    bytes of metadata, ~64 B each beyond their bytes: measured 3.7-4.3 MiB
    for a GET of 65,536 short keys)."""
    return meta_len + 64 * min(meta_len // 3, MAX_KEYS_PER_REQUEST)


@dataclass
class DataPlaneStats:
    """Counters for the metrics endpoint."""

    connections: int = 0  # open now
    connections_total: int = 0
    frames: int = 0  # requests answered (an ERROR answer included)
    errors: int = 0  # ERROR frames sent
    bytes_in: int = 0
    bytes_out: int = 0
    receiving: int = 0  # PUT extents being filled now
    refused: int = 0  # sessions refused: data_plane_max_connections were open
    puts_begun: int = 0  # PUTs begun from the readable callback (put.PutProgress)
    puts_handed_over: int = 0  # of those, finished by the connection's task


#: A stopping server's wait, after a connection's last answer, for its peer
#: to close (SocketIO.linger): what it sends meanwhile is read and dropped.
LINGER_SECONDS = 1.0


def listen_addresses(config: Config) -> tuple[str, str]:
    """The TCP address and unix path the data plane binds ("" for none)."""
    s = config.server
    tcp = s.data_plane_listen
    if tcp == _OFF:
        tcp = ""
    elif not tcp and s.listen:
        tcp = f"{s.listen.rsplit(':', 1)[0]}:0"
    unix = s.data_plane_unix
    if unix == _OFF:
        unix = ""
    elif not unix and s.unix_socket:
        unix = f"{s.unix_socket}.dp"
    return tcp, unix


class DataPlaneServer:
    def __init__(self, config: Config, store: TieredStore, shm: SharedMemoryBroker,
                 tls: ssl.SSLContext | None = None,
                 requests: ResponseBudget | None = None) -> None:
        """``tls``: the TCP listener's context when server.tls_cert is set
        (the server's ServerTLS keeps it current as certificates are renewed);
        ``requests``: the server's budget for requests of many keys (one of
        its own when None)."""
        s = config.server
        self.config = config
        self.store = store
        self.shm = shm
        self.tickets = TicketBook(s.data_plane_ticket_ms)
        self.timeout = s.data_plane_timeout_ms / 1000.0
        self.max_meta = s.data_plane_max_meta
        self.max_payload = s.data_plane_max_payload
        self.max_connections = s.data_plane_max_connections
        self.stats = DataPlaneStats()
        self.requests = requests if requests is not None else request_budget()
        self._slow_log = RateLimitedWarning(log, "data plane: dropping a slow peer", 10.0)
        self._accept_log = RateLimitedWarning(log, "data plane: accept failed", 10.0)
        self.tcp_address = ""
        self.unix_path = ""
        if s.tls_cert and tls is None:  # never plaintext where TLS is configured
            raise ValueError("server.tls_cert is set: the data plane needs its TLS context")
        self.tls = tls
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()  # accept loops and connections
        self._connections: set[asyncio.Task[None]] = set()
        #: Each open connection's I/O (a graceful stop tells each to close),
        #: and those whose HELLO was answered (the others it just closes).
        self._open: dict[asyncio.Task[Any], SocketIO | StreamIO] = {}
        self._greeted: set[asyncio.Task[Any]] = set()
        #: each connection's binding, from the moment its ticket is redeemed
        self._bound: dict[asyncio.Task[Any], Binding] = {}
        self._draining = False

    # -- listeners ------------------------------------------------------------------------

    async def start(self) -> None:
        tcp, unix = listen_addresses(self.config)
        loop = asyncio.get_running_loop()
        try:
            if tcp:
                self.tcp_address = await self._listen_tcp(loop, tcp)
            if unix:
                self.unix_path = self._listen_unix(loop, unix)
        except BaseException:
            await self.close()
            raise

    async def _listen_tcp(self, loop: asyncio.AbstractEventLoop, address: str) -> str:
        host, _, port = address.rpartition(":")
        bare = host.strip("[]")
        sock: socket.socket | None = None
        try:
            # A host name listens at its first address, the family that
            # address has: a name with only IPv6 addresses (an IPv6-only
            # cluster) made an IPv4 socket that failed to start the server.
            family, kind, proto, _, where = socket.getaddrinfo(
                bare, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
            sock.listen(128)
        except (OSError, ValueError) as exc:
            if sock is not None:
                sock.close()
            raise InvalidConfig(f"server.data_plane_listen {address}: cannot listen there "
                                f"({exc})") from None
        sock.setblocking(False)
        self._sockets.append(sock)
        bound = sock.getsockname()[1]
        self._spawn(self._accept(loop, sock, tcp=True))
        return f"{host}:{bound}"

    def _listen_unix(self, loop: asyncio.AbstractEventLoop, path: str) -> str:
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise InvalidConfig(f"server.data_plane_unix {path}: longer than {UNIX_PATH_MAX} "
                                "bytes, the most a unix socket path may have")
        p = Path(path)
        try:
            # Made before the check, which then looks at what the socket
            # will be bound in (another user may have made it first).
            make_directories(p.parent, 0o755)
        except OSError as exc:
            raise InvalidConfig(f"server.data_plane_unix {path}: cannot listen there "
                                f"({exc.strerror})") from None
        # Only a stale socket is removed: never a file, never a live server's.
        if check_socket_path("server.data_plane_unix", path):
            p.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The service's user only, as the gRPC socket, from the bind on
            # (Linux makes the socket file with the mode of the unbound socket).
            with contextlib.suppress(OSError):
                os.fchmod(sock.fileno(), 0o600)
            sock.bind(path)
            os.chmod(path, 0o600)  # (elsewhere the bind may not take the mode)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise InvalidConfig(f"server.data_plane_unix {path}: cannot listen there "
                                f"({exc.strerror})") from None
        sock.setblocking(False)
        self._sockets.append(sock)
        self._spawn(self._accept(loop, sock, tcp=False))
        return path

    def _spawn(self, coro: Coroutine[Any, Any, None], connection: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._track(task, connection)

    def _track(self, task: asyncio.Task[None], connection: bool) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if connection:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def drop_sessions(self, keep: Callable[[Binding], bool] | None = None) -> int:
        """The grants changed (auth.tokens_file was reloaded; a ticket and a
        session carry the grant they were issued under): close the sessions
        and forget the tickets not yet redeemed, all of them or those whose
        binding ``keep`` refuses; their clients open new sessions,
        authenticated afresh. A connection whose HELLO is not in yet stands
        or falls with its ticket. Returns the sessions closed."""
        self.tickets.clear(keep)
        if keep is None:
            tasks = list(self._connections)
        else:
            tasks = [t for t, binding in self._bound.items() if not keep(binding)]
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def _accept(self, loop: asyncio.AbstractEventLoop, listener: socket.socket,
                      tcp: bool) -> None:
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. out of file descriptors: keep accepting
                self._accept_log.note(str(exc))  # (every 0.1 s per listener, for as long)
                await asyncio.sleep(0.1)  # back off, not synchronisation
                continue
            if self._flooded():
                sock.close()
                continue
            if tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:  # (GET answers: see frames.UNIX_SEND_BUFFER)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, f.UNIX_SEND_BUFFER)
            if tcp and self.tls is not None:
                # Counted from accept like the others: connections that never
                # finish their handshake were not, and a burst of them each held
                # a descriptor for the handshake's timeout, past any limit.
                self._spawn(self._serve_tls(loop, sock), connection=True)
                continue
            self._spawn(self._serve(SocketIO(sock, self.timeout, HELLO_BUFFER_BYTES)),
                        connection=True)

    def _flooded(self) -> bool:
        """Twice the limit open, counting from accept: the new connection is to be
        closed unread (a flood of connections that send no HELLO would otherwise
        hold a buffer each until their timeout). Below that, HELLO refuses them.
        Counted as connection tasks, which exist from accept: a burst accepted
        before any of its tasks ran got past a count the tasks keep."""
        if len(self._connections) < 2 * self.max_connections:
            return False
        self.stats.refused += 1
        return True

    async def _serve_tls(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """One TLS connection: its handshake (within the data plane's timeout),
        then its session, as a plaintext one's."""
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self.tls, ssl_handshake_timeout=self.timeout)
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception:  # a failed or timed-out handshake: nothing to serve
            sock.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self._serve(StreamIO(reader, writer, self.timeout))

    async def drain(self, grace: float) -> None:
        """A graceful stop's first half: accept no more connections, close
        those waiting for a request, and give the requests under way up to
        ``grace`` seconds to be answered (each connection closes after its
        answer). :meth:`close` then ends whatever is left. (Closing every
        connection at once cut in-flight Puts and Gets: a rolling restart
        turned them into client errors, while gRPC's calls had their grace.)"""
        await self._end([t for t in self._tasks if t not in self._connections])
        for task, io in self._open.items():
            if task in self._greeted:
                io.begin_closing()
            else:  # no session yet (its HELLO not in): nothing under way
                task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=grace)

    async def close(self) -> None:
        await self._end(list(self._tasks))
        if self.unix_path:
            Path(self.unix_path).unlink(missing_ok=True)

    async def _end(self, tasks: list[asyncio.Task[None]]) -> None:
        """Accept nothing more: ``tasks`` (accept loops, connections) ended
        first (they unregister their sockets from the selector), then the
        listening sockets closed."""
        self._draining = True
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for sock in self._sockets:
            sock.close()

    def issue_ticket(self, binding: Binding) -> bytes:
        return self.tickets.issue(binding)

    # -- one connection -------------------------------------------------------------------

    async def _serve(self, io: SocketIO | StreamIO) -> None:
        stats = self.stats
        stats.connections += 1
        stats.connections_total += 1
        session: Session | None = None
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = io
        if self._draining:  # (accepted just before the listeners closed)
            io.begin_closing()
        try:
            session = await self._hello(io)
            if session is not None:
                self._greeted.add(task)
                if self._draining:  # (answered while the stop began)
                    io.begin_closing()
                if isinstance(io, SocketIO):
                    io.fast = self._fast_answers(session)
                    io.fast_payload = self._fast_payloads(session)
                await self._requests(io, session)
            if isinstance(io, StreamIO):  # the TLS transport may still hold an answer
                await io.flush(self.timeout)
                if io.closing:
                    await io.close_now(LINGER_SECONDS)
            elif io.closing:  # (answers may wait unread in the peer's socket)
                await io.linger(LINGER_SECONDS)
        except PeerTooSlow as exc:
            self._slow_log.note(str(exc))
        except (ConnectionClosed, ConnectionError):
            pass  # the peer went away; what it held is given back below
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("data plane: internal error; connection closed")
        finally:
            del self._open[task]
            self._greeted.discard(task)
            self._bound.pop(task, None)
            stats.connections -= 1
            stats.bytes_in += io.bytes_in
            stats.bytes_out += io.bytes_out
            if session is not None:
                session.close()
            if isinstance(io, SocketIO):
                io.fast = None  # (closures over the session: the other cycle)
                io.fast_payload = None
            io.close()

    def _fast_answers(self, session: Session) -> FastAnswer:
        """What the connection answers from its readable callback."""
        stats = self.stats
        answer = session.answer_now
        max_meta = self.max_meta

        def fast(opcode: int, flags: int, request_id: int, meta: memoryview) -> bool:
            if len(meta) > max_meta:
                return False  # the task refuses it (server.data_plane_max_meta)
            answered = answer(opcode, flags, request_id, meta)
            if answered:
                stats.frames += 1
                if answered is Answered.ERROR:
                    stats.errors += 1
                return True
            return False
        return fast

    def _fast_payloads(self, session: Session) -> FastPayload:
        """What begins a PUT from the readable callback (put.PutProgress)."""
        stats = self.stats
        begin = session.put_now
        max_meta = min(self.max_meta, SMALL_META_BYTES)  # (larger: the budget's, the task's)
        max_payload = self.max_payload

        def received() -> None:
            stats.receiving -= 1

        def fast_payload(opcode: int, request_id: int, meta: memoryview,
                         payload_len: int) -> PayloadSink | None:
            if opcode != _PUT or len(meta) > max_meta or payload_len > max_payload:
                return None  # (the task refuses what breaks a limit)
            sink = begin(request_id, meta, payload_len)
            if sink is not None:
                stats.frames += 1
                stats.puts_begun += 1
                stats.receiving += 1
                sink.on_end = received
            return sink
        return fast_payload

    async def _read_head(self, io: SocketIO | StreamIO, max_meta: int | None = None,
                         who: str | None = None) -> tuple[f.Header, object, int] | None:
        """The next request's header and metadata, and what it holds of
        :attr:`requests` (None: clean EOF); a FrameError (with the request id
        when the header was read) when the frame breaks the rules that keep
        the stream in step. ``max_meta``: the metadata limit (default
        ``server.data_plane_max_meta``); ``who``: the caller whose share of
        :attr:`requests` a request with large metadata takes (None: none is
        taken), before the metadata is read."""
        raw: Buffer | None = io.take(f.HEADER_SIZE)
        if raw is None:
            raw = await io.next_header()
            if raw is None:
                return None
        header = f.decode_header(raw)
        if header.opcode not in f.REQUESTS:
            raise _Fatal(header.request_id, f"unknown opcode {header.opcode:#04x}")
        if max_meta is not None and header.meta_len > max_meta:
            raise _Fatal(header.request_id, f"metadata of {header.meta_len} bytes before "
                         f"HELLO was accepted: a HELLO's is at most {max_meta}")
        if header.meta_len > self.max_meta:
            raise _Fatal(header.request_id, f"metadata of {header.meta_len} bytes exceeds the "
                         f"limit of {self.max_meta} (server.data_plane_max_meta)")
        if header.payload_len > self.max_payload:
            raise _Fatal(header.request_id, f"payload of {header.payload_len} bytes exceeds "
                         f"the limit of {self.max_payload} (server.data_plane_max_payload)")
        if header.payload_len and header.opcode != f.Op.PUT:
            raise _Fatal(header.request_id, f"opcode {header.opcode:#04x} takes no payload "
                         f"(got {header.payload_len} bytes)")
        held = 0
        if who is not None and header.meta_len > SMALL_META_BYTES:
            held = min(request_hold(header.meta_len), self.requests.capacity)
            if not self.requests.take_now(held, who):
                try:
                    await self.requests.take(held, BUDGET_WAIT_SECONDS, who)
                except CapacityExhausted as exc:
                    raise _Fatal(header.request_id, exc.message, CapacityExhausted) from None
        try:
            meta: Buffer | None = io.take(header.meta_len)
            if meta is None:
                meta = await io.read_exact(header.meta_len)
        except BaseException:
            if held:
                self.requests.give(held, who or "")
            raise
        return header, meta, held

    async def _hello(self, io: SocketIO | StreamIO) -> Session | None:
        rid = 0
        try:
            try:
                # An unauthenticated peer may not hold a connection for long,
                # nor make the server buffer more than a HELLO.
                async with asyncio.timeout(self.timeout):
                    head = await self._read_head(io, HELLO_MAX_META)
            except TimeoutError:
                raise PeerTooSlow(f"no HELLO within {self.timeout:g} s") from None
            if head is None:
                return None
            header, meta, _ = head
            rid = header.request_id
            if header.opcode != f.Op.HELLO:
                raise _Fatal(header.request_id, "the first frame must be HELLO with a ticket "
                             "from OpenDataPlane", Unauthenticated)
            hello = f.Hello.decode(meta)  # type: ignore[arg-type]
            open_now = self.stats.connections  # this one included
            if open_now > self.max_connections:
                # Refused before the ticket is redeemed: nothing was granted.
                self.stats.refused += 1
                raise _Fatal(header.request_id, f"the data plane has {open_now - 1} connections "
                             f"open, its limit (server.data_plane_max_connections = "
                             f"{self.max_connections}): use gRPC", TooManyConnections)
            try:
                binding = self.tickets.redeem(hello.ticket)
            except Unauthenticated as exc:
                raise _Fatal(header.request_id, exc.message, Unauthenticated) from None
            task = asyncio.current_task()
            assert task is not None
            self._bound[task] = binding  # (a reload from here on judges it)
        except f.FrameError as exc:
            await self._fatal(io, _Fatal(rid, f"malformed frame: {exc}"))
            return None
        except _Fatal as exc:
            await self._fatal(io, exc)
            return None
        io.grow()
        session = Session(self.store, self.shm, binding, io)
        ok = f.HelloOk(secrets.randbits(63), self.max_meta, self.max_payload,
                       int(self.timeout * 1000))
        await io.send((f.frame(f.Op.HELLO | f.RESPONSE, header.request_id, ok.encode()),))
        return session

    async def _requests(self, io: SocketIO | StreamIO, session: Session) -> None:
        stats = self.stats
        handlers = session.handlers
        # (auth off: no identity, each connection's owner its own caller)
        who = session.binding.identity or session.binding.owner
        while True:
            rid = 0
            held = 0
            try:
                begun = await io.next_request()
                if begun is not None:  # a PUT its readable callback began
                    rid = begun.request_id
                    stats.puts_handed_over += 1
                    await begun.run()  # (counted in stats.receiving from its start)
                    continue
                head = await self._read_head(io, who=who)
                if head is None:
                    return
                header, meta, held = head
                rid = header.request_id
                handler = handlers.get(header.opcode)
                if handler is None:  # HELLO again
                    raise _Fatal(header.request_id, "HELLO was already sent on this "
                                 "connection")
                stats.frames += 1
                if header.payload_len:
                    stats.receiving += 1
                    try:
                        await handler(header, meta)
                    finally:
                        stats.receiving -= 1
                else:
                    await handler(header, meta)
            except _Fatal as exc:
                await self._fatal(io, exc)
                return
            except f.FrameError as exc:
                await self._fatal(io, _Fatal(rid, f"malformed frame: {exc}"))
                return
            except KVStoreError as exc:
                stats.errors += 1
                await io.send((error_frame(rid, exc),))
            except (ConnectionClosed, ConnectionError, asyncio.CancelledError):
                raise
            except Exception as exc:
                # A bug: the connection's state is unknown (a payload half
                # read); say so and close it. The server keeps serving.
                log.exception("data plane: internal error; connection closed")
                await self._fatal(io, _Fatal(rid, f"internal error: {type(exc).__name__}: "
                                             f"{exc}", KVStoreError))
                return
            finally:
                if held:
                    self.requests.give(held, who)

    async def _fatal(self, io: SocketIO | StreamIO, exc: Exception) -> None:
        self.stats.errors += 1
        if isinstance(exc, _Fatal):
            rid, error = exc.request_id, exc.error
        else:
            rid, error = 0, MalformedRequest(f"malformed frame: {exc}")
        with contextlib.suppress(ConnectionClosed, OSError):
            await io.send((error_frame(rid, error, f.FLAG_CLOSING),))


class _Fatal(Exception):
    """A frame the connection cannot continue after."""

    def __init__(self, request_id: int, message: str,
                 kind: type[KVStoreError] = MalformedRequest) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.error = kind(message)
