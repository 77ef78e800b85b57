"""close() of a sync Client while threads share it: every call in flight
returns or raises promptly, none waits forever."""

from __future__ import annotations

import threading
import time

from serverproc import ServerProcess

from kvstore import Client
from kvstore.errors import KVStoreError


def threads_left_waiting(target: str, data: bytes) -> int:
    """16 threads put through one gRPC client; close() while they do."""
    client = Client(target, namespace="close", timeout=10, data_plane=False)
    client.put({b"warm": b"x"})
    stop = threading.Event()
    outcomes: list[str] = []
    started = threading.Barrier(17)

    def put_until_stopped(i: int) -> None:
        started.wait(10)
        while not stop.is_set():
            try:
                client.put({b"k%d" % i: data})
                outcomes.append("ok")
            except KVStoreError as exc:
                outcomes.append(type(exc).__name__)
            except ValueError:  # a call started after close(): refused at once
                outcomes.append("closed")

    threads = [threading.Thread(target=put_until_stopped, args=(i,), daemon=True)
               for i in range(16)]
    for t in threads:
        t.start()
    started.wait(10)
    deadline = time.monotonic() + 10
    while outcomes.count("ok") < 8 and time.monotonic() < deadline:
        time.sleep(0.01)  # a bounded poll for Puts under way, not synchronisation
    client.close()
    stop.set()
    closed_at = time.monotonic()
    for t in threads:
        t.join(max(0.1, closed_at + 15 - time.monotonic()))
    return sum(t.is_alive() for t in threads)


def test_close_during_grpc_puts_from_many_threads_leaves_no_thread_waiting(
        server_factory: type[ServerProcess]) -> None:
    """A Put scheduled on the client's private loop as close() stopped it
    never ran, and its thread waited on it forever (2 of 6 tries: 15-16 of
    16 threads still blocked 25 s after close())."""
    server = server_factory().start()
    data = b"\x01" * (4 << 20)
    for attempt in range(4):
        hung = threads_left_waiting(server.tcp, data)
        assert hung == 0, f"try {attempt}: {hung} of 16 threads still waiting 15 s after close()"
