"""An HTTP proxy on 127.0.0.1 in front of a real S3 server that answers
chosen requests itself with an S3 error (503 SlowDown by default), for the
L3 fault tests: a store that refuses only listings, or throttles every
other request.

Each request gets a connection of its own upstream (``Connection: close``
is sent on), so that every request passes through :attr:`fail` and none
rides an earlier one's connection unseen. ``fail(method, target)`` decides
per request (``target``: the request line's path and query); the counts of
what went where are kept for the test's asserts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from loopthread import Conn, LoopThread

_ERROR_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
               b"<Message>Please reduce your request rate.</Message></Error>")


def is_listing(method: str, target: str) -> bool:
    """ListObjects(V2): a GET of the bucket with a query and no object key."""
    path, _, query = target.partition("?")
    return method == "GET" and path.strip("/").count("/") == 0 and bool(query)


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        #: (method, target) -> answer this request with a 503 instead.
        self.fail: Callable[[str, str], bool] = lambda method, target: False
        self.forwarded: list[tuple[str, str]] = []
        self.failed: list[tuple[str, str]] = []
        #: (method, target, body) -> hold this request back until
        #: :attr:`release` is set (at most ``hold_max_s``), then send it on
        #: all the same: a request that reached a slow server, which the
        #: client gave up on, and that the server carries out later.
        self.hold: Callable[[str, str, bytes], bool] = lambda method, target, body: False
        self.release = threading.Event()
        self.hold_max_s = 30.0
        #: A status line (``b"504 Gateway Timeout"``) to answer a held request
        #: with at once, as a gateway that gave up on a slow upstream does;
        #: the request still goes on to the server once released (None: the
        #: client waits for the server's own answer).
        self.held_answer: bytes | None = None
        self.held: list[tuple[str, str]] = []
        #: (method, target) -> send this request on at once but hold its
        #: answer back until :attr:`answers_release` is set (at most
        #: ``hold_max_s``): a listing whose snapshot is taken before
        #: requests that land while its answer is on the way.
        self.hold_answer: Callable[[str, str], bool] = lambda method, target: False
        self.answers_release = threading.Event()
        self.answers_held: list[tuple[str, str]] = []
        #: The held requests once the server has answered them, with the status line.
        self.late: list[tuple[str, str, str]] = []
        self._late_tasks: set[asyncio.Future[None]] = set()
        self._server = LoopThread(self._handle)
        self.port = self._server.port

    def close(self) -> None:
        self._server.close()

    async def _forward(self, method: str, target: str, request: bytes) -> bytes:
        self.forwarded.append((method, target))
        async with self._server.connected(self.upstream_port) as server:
            await server.write(request)
            return await server.read_to_end()  # until the server closes: one request

    async def _late(self, method: str, target: str, request: bytes) -> None:
        """A held request the client was already answered for, sent on."""
        await asyncio.get_running_loop().run_in_executor(
            None, self.release.wait, self.hold_max_s)
        answer = await self._forward(method, target, request)
        self.late.append((method, target, answer.partition(b"\r\n")[0].decode("latin-1")))

    async def _handle(self, client: Conn) -> None:
        try:
            while True:
                head = await client.read_until(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [h for h in lines[1:] if h]
                length = 0
                for h in headers:
                    name, _, value = h.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await client.read_exactly(length) if length else b""
                if self.fail(method, target):
                    self.failed.append((method, target))
                    await client.write(b"HTTP/1.1 503 Slow Down\r\n"
                                       b"Content-Type: application/xml\r\n"
                                       b"Content-Length: %d\r\n\r\n%s"
                                       % (len(_ERROR_BODY), _ERROR_BODY))
                    continue  # the client's connection lives on
                held = self.hold(method, target, body)
                kept = [h for h in headers if h.partition(":")[0].strip().lower()
                        not in ("connection", "keep-alive")]
                request = "\r\n".join([lines[0], *kept, "Connection: close", "",
                                        ""]).encode("latin-1") + body
                if held:
                    self.held.append((method, target))
                    if self.held_answer is not None:
                        await client.write(b"HTTP/1.1 %s\r\nContent-Length: 0\r\n\r\n"
                                           % self.held_answer)
                        late = asyncio.ensure_future(self._late(method, target, request))
                        self._late_tasks.add(late)
                        late.add_done_callback(self._late_tasks.discard)
                        continue  # (the client's connection lives on)
                    await asyncio.get_running_loop().run_in_executor(
                        None, self.release.wait, self.hold_max_s)
                answer = await self._forward(method, target, request)
                if self.hold_answer(method, target):
                    self.answers_held.append((method, target))
                    await asyncio.get_running_loop().run_in_executor(
                        None, self.answers_release.wait, self.hold_max_s)
                if held:
                    status = answer.partition(b"\r\n")[0].decode("latin-1")
                    self.late.append((method, target, status))
                await client.write(_keep_alive(answer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went; LoopThread closes its socket


def _keep_alive(answer: bytes) -> bytes:
    """The upstream's answer with its ``Connection: close`` dropped (the
    client's own connection stays open); a body sent until the close (no
    Content-Length, not chunked) gets its length."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    kept = [h for h in lines[1:] if h.partition(b":")[0].strip().lower() != b"connection"]
    names = {h.partition(b":")[0].strip().lower() for h in kept}
    if b"content-length" not in names and b"transfer-encoding" not in names:
        kept.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join([lines[0], *kept]) + sep + body
