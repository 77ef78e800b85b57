"""A test proxy's event loop on a thread of its own, serving a connection
handler on 127.0.0.1 (an ephemeral port) until :meth:`LoopThread.close`,
which ends every connection the loop made: the loop DelayProxy and
FaultProxy run in.

Connections are bare sockets read and written with the loop's ``sock_*``
calls, each one recorded the moment it exists (accepted, or made by
:meth:`LoopThread.connect`), so that close can close them all. Streams and
transports are not used on purpose: a transport is made inside asyncio, out
of reach, and a task cancelled at close between an accept and its transport
freed its socket unclosed (a ResourceWarning, an error in this suite, in
whichever later test the collector ran).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable


class Conn:
    """One connection on the loop: its socket and what was read ahead."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self.sock = sock
        self._buffer = bytearray()

    async def read(self, limit: int = 65536) -> bytes:
        """Up to ``limit`` bytes; ``b""`` at end of stream."""
        if self._buffer:
            return self._take(limit)
        return await self._loop.sock_recv(self.sock, limit)

    async def _fill(self) -> None:
        data = await self._loop.sock_recv(self.sock, 65536)
        if not data:
            raise asyncio.IncompleteReadError(bytes(self._buffer), None)
        self._buffer += data

    async def read_until(self, separator: bytes) -> bytes:
        """Everything up to and with ``separator``
        (:class:`asyncio.IncompleteReadError` if the stream ends first)."""
        while (at := self._buffer.find(separator)) < 0:
            await self._fill()
        return self._take(at + len(separator))

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._fill()
        return self._take(n)

    async def read_to_end(self) -> bytes:
        while data := await self._loop.sock_recv(self.sock, 65536):
            self._buffer += data
        return self._take(len(self._buffer))

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def write(self, data: bytes) -> None:
        await self._loop.sock_sendall(self.sock, data)

    def end_writing(self) -> None:
        """Send end of stream (the peer reads ``b""``); reading goes on."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer has gone already


Handler = Callable[[Conn], Awaitable[None]]


class LoopThread:
    def __init__(self, handle: Handler) -> None:
        self.loop = asyncio.new_event_loop()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        #: Every connection the loop made and has not closed.
        self._sockets: set[socket.socket] = set()
        self._serving: set[asyncio.Future[None]] = set()
        self._handle = handle
        self._stop: asyncio.Event | None = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            self.loop.add_reader(self._listener, self._accept)
            ready.set()
            await self._stop.wait()
            self.loop.remove_reader(self._listener)
            self._listener.close()  # new connections are refused from here on
            # Every task (handlers, and any a handler started) ends before
            # the sockets close, so no task is left reading a closed one.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.loop.run_until_complete(main())
        finally:
            for sock in [*self._sockets, self._listener]:
                sock.close()
            self._sockets.clear()
            self.loop.close()

    def _accept(self) -> None:
        # A plain callback, not a task: a socket is recorded the moment it is
        # accepted, with no await between at which a cancel could drop it.
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self._sockets.add(sock)
            sock.setblocking(False)
            task = asyncio.ensure_future(self._serve(sock))
            self._serving.add(task)  # (the loop holds its tasks weakly)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self._handle(Conn(self.loop, sock))
        finally:
            self._close(sock)

    @contextlib.asynccontextmanager
    async def connected(self, port: int) -> AsyncIterator[Conn]:
        """A connection to 127.0.0.1:``port`` (for a handler's upstream),
        closed on leaving (and by close if it comes first)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sockets.add(sock)
        try:
            sock.setblocking(False)
            await self.loop.sock_connect(sock, ("127.0.0.1", port))
            yield Conn(self.loop, sock)
        finally:
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        self._sockets.discard(sock)
        sock.close()

    def close(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
