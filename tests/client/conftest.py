from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from kvstore_client_fake import FakeServer


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected unix socket pair (a peer for the SDK's connection code), closed after."""
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()
