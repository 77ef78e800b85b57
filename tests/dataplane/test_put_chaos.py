"""Random PUTs over the data plane from several connections at once (seeded):
sent whole, in pieces, cut and closed, cut mid-payload and left to stall,
reset; blocks of 1 byte to 700 KiB, with good, missing and wrong CRC-32Cs,
at ack memory and local, on keys they overwrite, into an L1 that evicts.
Afterwards every key holds one of the values put under it or nothing, every
connection and PUT the server had is gone, and once the keys are deleted L1
holds nothing: no extent was left reserved, however a PUT ended, whether the
socket's readable callback or the connection's task had it."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from serverproc import ServerProcess

from dataplane.raw import PUT, Raw, block_of, get, metric, put_meta, request, session, wait_until
from kvstore import Client
from kvstore.checksum import checksum

KEYS = [b"key%02d" % i for i in range(16)]
SIZES = [1, 100, 4096, 65536, 300_000, 600_000]


@pytest.fixture
def server(server_factory: type[ServerProcess]) -> Iterator[ServerProcess]:
    srv = server_factory("--server-metrics-listen", "127.0.0.1:0",
                         "--server-data-plane-timeout-ms", "300", l1_capacity="12MiB")
    with srv:
        yield srv


def _l1(srv: ServerProcess, name: str) -> float:
    return metric(srv.data_dir, f'{name}{{tier="L1"}}')


def _client(srv: ServerProcess, seed: int, puts: int, sent: dict[bytes, set[int]],
            lock: threading.Lock, failures: list[BaseException]) -> None:
    rng = random.Random(seed)
    raw = session(srv.tcp, kind=rng.choice(["tcp", "unix"]))
    try:
        for rid in range(10, 10 + puts):
            blocks = []
            for _ in range(rng.randint(1, 4)):
                key = rng.choice(KEYS)
                value = os.urandom(rng.choice([*SIZES, rng.randint(1, 700_000)]))
                crc = rng.choice(["good", "good", "none", "bad"])
                blocks.append((key, value, None if crc == "none" else
                               checksum(value) ^ (crc == "bad")))
                with lock:
                    sent[key].add(checksum(value))
            payload = sum(len(v) for _, v, _ in blocks)
            meta = put_meta("ns", [(k, len(v), 0, c) for k, v, c in blocks],
                            rng.choice([0, 0, 0, 2]))
            data = request(PUT, rid, meta, b"".join(v for _, v, _ in blocks))
            head = len(data) - payload
            how = rng.choice(["whole"] * 4 + ["pieces"] * 3 + ["cut", "stall", "reset"])
            if how == "whole":
                raw.send(data)
            elif how == "pieces":
                pos = 0
                while pos < len(data):
                    step = rng.randint(1, 200_000)
                    raw.send(data[pos:pos + step])
                    pos += step
            else:
                if how == "stall" and payload > 1:
                    raw.send(data[:rng.randint(head + 1, len(data) - 1)])
                    # Mid-payload: the server drops it after its 0.3 s timeout.
                    assert raw.closed(), "a PUT stalled mid-payload was not dropped"
                else:
                    raw.send(data[:rng.randint(1, len(data) - 1)])
                    if how == "reset":
                        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                            struct.pack("ii", 1, 0))
                raw.close()
                raw = session(srv.tcp, kind=rng.choice(["tcp", "unix"]))
                continue
            answer = raw.frame()
            assert answer.rid == rid and answer.op in (PUT | 0x80, 0xFF), answer
    except BaseException as exc:
        failures.append(exc)
    finally:
        raw.close()


def test_random_puts_cut_short_leave_nothing_behind(server: ServerProcess) -> None:
    srv = server
    sent: dict[bytes, set[int]] = {k: set() for k in KEYS}
    lock = threading.Lock()
    failures: list[BaseException] = []
    clients = [threading.Thread(target=_client, args=(srv, seed, 40, sent, lock, failures))
               for seed in range(3)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    assert not failures, failures
    assert wait_until(lambda: metric(srv.data_dir, "kvstore_dataplane_put_receiving") == 0
                      and metric(srv.data_dir, "kvstore_dataplane_connections") == 0, 30)
    assert metric(srv.data_dir, "kvstore_dataplane_puts_begun_total") > 0
    raw: Raw = session(srv.tcp, kind="unix")
    for i, key in enumerate(KEYS):
        value = block_of(get(raw, 100 + i, "ns", [key])[0])
        assert value is None or checksum(value) in sent[key], f"{key!r}: bytes never put"
    raw.close()
    with Client(srv.tcp, namespace="ns", data_plane=False) as c:
        c.delete(KEYS)
    assert wait_until(lambda: _l1(srv, "kvstore_tier_blocks") == 0
                      and _l1(srv, "kvstore_tier_used_bytes") == 0, 15), \
        "L1 still holds room after every key was deleted"
