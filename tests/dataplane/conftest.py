from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess

from dataplane.raw import OPEN
from kvstore.server.auth import hash_token

ALICE, BOB, OPS = "alice-dp-token", "bob-dp-token", "ops-dp-token"


def shm_path(tag: str) -> str:
    return f"/dev/shm/kvstore-test-dp-{os.getpid()}-{tag}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with auth on (alice: chat; bob: other; ops: every namespace),
    shared memory, 4 MiB blocks at most and 2 s tickets."""
    data_dir = tmp_path_factory.mktemp("dp")
    tokens = data_dir / "tokens"
    tokens.write_text(f"{hash_token(ALICE)} alice chat\n{hash_token(BOB)} bob other\n"
                      f"{hash_token(OPS)} ops * admin\n")
    server = ServerProcess(data_dir, "--auth-tokens-file", str(tokens),
                           "--l1-shm-path", shm_path("conf"),
                           "--server-max-block-bytes", "4MiB",
                           "--server-data-plane-ticket-ms", "2000",
                           "--server-metrics-listen", "127.0.0.1:0",
                           l1_capacity="64MiB")
    with server:
        yield server


@pytest.fixture(autouse=True)
def close_raw_sockets() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def data_dir_of(server: ServerProcess) -> Path:
    return server.data_dir
