"""A TCP proxy on 127.0.0.1 that holds back each chunk by a settable delay,
per direction: slow uploads (client → server) or slow answers (server →
client) for the L3 tests, against a real S3 server behind it."""

from __future__ import annotations

import asyncio

from loopthread import Conn, LoopThread


class DelayProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``, sleeping
    ``up_delay_s`` before each chunk the client sends and ``down_delay_s``
    before each chunk the server sends (both may be changed while it runs)."""

    def __init__(self, upstream_port: int, *, up_delay_s: float = 0.0,
                 down_delay_s: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.up_delay_s = up_delay_s
        self.down_delay_s = down_delay_s
        #: Bytes forwarded so far, per direction (a test waits on them to
        #: know that a request is on its way).
        self.up_bytes = 0
        self.down_bytes = 0
        #: Chunks read from the server, counted before their delay (a test
        #: waits on it to know that an answer is being held back).
        self.down_chunks_read = 0
        self._server = LoopThread(self._handle)
        self.port = self._server.port

    def close(self) -> None:
        self._server.close()

    async def _handle(self, client: Conn) -> None:
        async def pipe(source: Conn, sink: Conn, upstream: bool) -> None:
            try:
                while data := await source.read(65536):
                    if not upstream:
                        self.down_chunks_read += 1
                    delay = self.up_delay_s if upstream else self.down_delay_s
                    if delay:
                        await asyncio.sleep(delay)
                    await sink.write(data)
                    if upstream:
                        self.up_bytes += len(data)
                    else:
                        self.down_bytes += len(data)
            except ConnectionError:
                pass
            finally:
                sink.end_writing()  # a side that ended is passed on to the other

        try:
            async with self._server.connected(self.upstream_port) as server:
                await asyncio.gather(pipe(client, server, True), pipe(server, client, False))
        except OSError:
            return  # (the upstream refused: the client's connection ends)
