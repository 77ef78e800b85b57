"""A PUT's block bytes on their way into L1 (docs/dataplane.md): a checksummed
payload is received through one buffer per server thread and copied into its
extent with its CRC-32C (kvstore/dataplane/conn.py, ``bounce_buffer``).
Several connections' payloads arriving piece by piece, interleaved, must each
land whole, under the right checksum: the server of ``dp_server`` keeps L1
in shared memory, so every Get checks a block against its checksum."""

from __future__ import annotations

import os

import pytest
from serverproc import ServerProcess

from dataplane.conftest import ALICE
from dataplane.raw import PUT, block_of, get, put_meta, request, session, u32, u64

MiB = 1024**2
PIECE = 192 * 1024  # not a multiple of the server's buffer: pieces straddle it


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_interleaved_payloads_each_land_whole_under_their_checksum(
        dp_server: ServerProcess, kind: str) -> None:
    conns = [session(dp_server.tcp, ALICE, kind) for _ in range(3)]
    blocks = {f"bytes-{kind}-{i}".encode(): os.urandom(3 * MiB + 1000 * i + 7)
              for i in range(len(conns))}
    frames = [request(PUT, 1, put_meta("chat", [(key, len(data), 0, None)]), data)
              for key, data in blocks.items()]
    # Each connection's request goes in pieces, the connections in turn: the
    # server receives the three payloads at once, a piece of one between
    # pieces of another.
    for at in range(0, max(map(len, frames)), PIECE):
        for raw, frame in zip(conns, frames, strict=True):
            if at < len(frame):
                raw.send(frame[at:at + PIECE])
    for raw, data in zip(conns, blocks.values(), strict=True):
        answer = raw.frame()
        assert answer.op == PUT | 0x80, answer
        assert answer.meta == u32(1) + u64(len(data)), answer  # 1 block stored, its bytes
    reader = conns[0]
    for rid, (key, data) in enumerate(blocks.items(), start=10):
        (got,) = get(reader, rid, "chat", [key])
        assert block_of(got) == data, f"{key!r}: the bytes read back differ"
