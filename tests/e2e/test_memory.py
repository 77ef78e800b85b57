"""Bounded memory: with L1 capacity C the server's RSS stays under C + 300 MiB
while 4 clients put 4 x C of data."""

from __future__ import annotations

import os
import threading

from kvstore import Client

MiB = 1024**2


def test_rss_stays_bounded_under_four_writers(server_factory) -> None:  # type: ignore[no-untyped-def]
    capacity = 128 * MiB
    server = server_factory("--l1-prefault", "true", l1_capacity="128MiB").start()
    peak = [server.rss_bytes()]
    stop = threading.Event()
    errors: list[BaseException] = []

    def sample() -> None:
        while not stop.wait(0.02):
            try:
                peak[0] = max(peak[0], server.rss_bytes())
            except (OSError, ValueError):
                return

    def writer(n: int) -> None:
        try:
            payload = os.urandom(MiB)
            with Client(server.tcp, namespace=f"w{n}") as c:
                for i in range(capacity // MiB):  # 4 writers x C bytes each = 4 x C
                    c.put({f"{n}-{i}".encode(): payload})
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(240)
    stop.set()
    sampler.join()
    assert not errors, errors
    print(f"peak RSS {peak[0] / MiB:.0f} MiB with L1 {capacity / MiB:.0f} MiB")
    assert peak[0] < capacity + 300 * MiB, f"peak RSS {peak[0] / MiB:.0f} MiB"
    with Client(server.tcp, namespace="w3") as c:
        assert c.lookup([b"3-0", b"3-127"]).found == 2
