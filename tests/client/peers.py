"""Helpers for peers emulated on a socket pair (the SDK's connection code
against a server that misbehaves in one precise way)."""

from __future__ import annotations

import socket


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock`` (ConnectionError if the client closes first)."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("the client closed")
        out += chunk
    return out
