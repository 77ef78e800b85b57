"""The test proxies (tests/delayproxy.py, tests/faultproxy.py) forward what
they are given and, closed while connections still arrive, leave no socket
unclosed: a socket freed unclosed is a ResourceWarning, an error in this
suite, raised in whichever later test the collector happens to run (a
parallel run failed an unrelated L3 test so)."""

from __future__ import annotations

import gc
import socket
import sys
import threading
from collections.abc import Iterator

import pytest
from delayproxy import DelayProxy
from faultproxy import FaultProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A plain echo server on 127.0.0.1, a thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            conns.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield listener.getsockname()[1]
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    acceptor.join(10)
    for conn in conns:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def test_the_delay_proxy_forwards_both_ways_and_passes_the_end_on(echo_port: int) -> None:
    proxy = DelayProxy(echo_port, up_delay_s=0.001, down_delay_s=0.001)
    try:
        payload = bytes(range(256)) * 1024
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)  # the echo server sees the end, and closes
            got = bytearray()
            while data := s.recv(65536):
                got += data
        assert bytes(got) == payload
        assert proxy.up_bytes == proxy.down_bytes == len(payload)
    finally:
        proxy.close()


@pytest.mark.parametrize("make", [
    lambda port: DelayProxy(port, down_delay_s=0.001),
    lambda port: FaultProxy(port),
], ids=["delay", "fault"])
def test_a_proxy_closed_while_connections_arrive_leaves_none_unclosed(
        echo_port: int, make: object, monkeypatch: pytest.MonkeyPatch) -> None:
    freed_unclosed: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook",
                        lambda u: freed_unclosed.append(repr(u.exc_value)))
    opened = 0
    for _ in range(15):
        proxy = make(echo_port)  # type: ignore[operator]
        stop = threading.Event()
        some_in = threading.Event()
        clients: list[socket.socket] = []
        lock = threading.Lock()

        def connect(proxy: DelayProxy | FaultProxy = proxy, stop: threading.Event = stop,
                    some_in: threading.Event = some_in,
                    clients: list[socket.socket] = clients,
                    lock: threading.Lock = lock) -> None:
            nonlocal opened
            while not stop.is_set():
                try:
                    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5)
                except OSError:
                    return  # the proxy has closed (a SYN it dropped: 0.5 s)
                with lock:
                    clients.append(s)
                    opened += 1
                    if len(clients) >= 3:
                        some_in.set()
                try:
                    s.sendall(b"GET /bucket/key HTTP/1.1\r\nHost: x\r\n\r\n")
                except OSError:
                    pass

        threads = [threading.Thread(target=connect) for _ in range(3)]
        for t in threads:
            t.start()
        assert some_in.wait(10), "no connection reached the proxy"
        proxy.close()
        stop.set()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        for s in clients:
            s.close()
        assert not proxy._server.thread.is_alive(), "the proxy's loop did not end"
        gc.collect()
    assert opened >= 45
    assert freed_unclosed == [], f"{len(freed_unclosed)} freed unclosed: {freed_unclosed[:3]}"
