"""A raw loopback-socket transfer of the same bytes: the floor under any RPC.

One process serves TCP (127.0.0.1, ephemeral port) and a unix socket; one
thread per connection. Batch protocol: a header ``(op, block_bytes, count)``;
``P`` (put): the client sends ``count`` blocks back to back, the server
receives them into a reused buffer and answers one byte; ``G`` (get): the
server sends ``count`` blocks, the client receives them into its buffers.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from multiprocessing.connection import Connection

_HDR = struct.Struct("<cQI")  # op, block bytes, blocks


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if not r:
            raise ConnectionError("peer closed")
        got += r


def _serve_conn(sock: socket.socket, max_bytes: int) -> None:
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(os.urandom(max_bytes))  # pre-faulted
    view = memoryview(buf)
    payload = memoryview(bytes(buf))
    hdr = memoryview(bytearray(_HDR.size))
    try:
        while True:
            recv_exact_into(sock, hdr)
            op, n, count = _HDR.unpack(hdr)
            if op == b"P":
                for _ in range(count):
                    recv_exact_into(sock, view[:n])
                sock.sendall(b"\x01")
            elif op == b"G":
                for _ in range(count):
                    sock.sendall(payload[:n])
            else:
                return
    except (ConnectionError, OSError):
        return
    finally:
        sock.close()


def raw_server_main(conn: Connection, unix_path: str, max_bytes: int) -> None:
    """Process entry: listen on TCP and ``unix_path``, report (port, path)."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(64)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen(64)
    conn.send((tcp.getsockname()[1], unix_path))

    def accept_loop(lsock: socket.socket) -> None:
        while True:
            try:
                s, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=_serve_conn, args=(s, max_bytes), daemon=True).start()

    for lsock in (tcp, unix):
        threading.Thread(target=accept_loop, args=(lsock,), daemon=True).start()
    try:
        conn.recv()  # returns or raises once the parent is done
    except EOFError:
        pass
    tcp.close()
    unix.close()


class RawClient:
    def __init__(self, address: tuple[str, int] | str) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ack = memoryview(bytearray(1))

    def put(self, blocks: list[memoryview]) -> None:
        self.sock.sendall(_HDR.pack(b"P", len(blocks[0]), len(blocks)))
        for b in blocks:
            self.sock.sendall(b)
        recv_exact_into(self.sock, self.ack)

    def get_into(self, n: int, dests: list[memoryview]) -> None:
        self.sock.sendall(_HDR.pack(b"G", n, len(dests)))
        for d in dests:
            recv_exact_into(self.sock, d[:n])

    def close(self) -> None:
        try:
            self.sock.sendall(_HDR.pack(b"Q", 0, 0))
        except OSError:
            pass
        self.sock.close()
