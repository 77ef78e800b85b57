from __future__ import annotations

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
