"""A test proxy's event loop on a thread of its own, serving a connection
handler on 127.0.0.1 (an ephemeral port) until :meth:`close` (which ends the
connections still open): the loop DelayProxy and FaultProxy run in."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class LoopThread:
    def __init__(self, handle: Handler) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._stop: asyncio.Event | None = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(handle, ready), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, handle: Handler, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._stop = asyncio.Event()
            ready.set()
            await self._stop.wait()
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

        self.loop.run_until_complete(main())
        self.loop.close()

    def close(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
