"""The benches' own checks (a session 29 review): a Get is timed only if it
returned the bytes Put under its keys, rounds of a comparison interleave, and
a bad flag is one argparse error (exit 2), not a traceback or a silent default.

Unit tests of the harness: fake clients stand in for a broken store; the real
server path runs in the smoke tests (test_bench_smoke.py and others)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pytest

import bench.aio_client as aio_client
import bench.handover as handover
import bench.peers as peers
import bench.per_call as per_call
import bench.throughput as throughput
from bench._peers.worker import Worker

KiB = 1024
BLOCK, BATCH, COUNT = 64 * KiB, 4, 16


class FakeKV:
    """A kvstore client's put/get_into over a dict; ``mode`` breaks its Gets."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.blocks: dict[bytes, bytes] = {}

    def put(self, pairs: list[tuple[bytes, memoryview]]) -> None:
        for key, view in pairs:
            self.blocks[key] = bytes(view)

    def get_into(self, keys: list[bytes], bufs: list[memoryview]) -> list[int]:
        if self.mode != "nothing":  # "nothing": the right sizes, no bytes written
            for key, buf in zip(keys, bufs, strict=True):
                buf[:] = self.blocks[next(iter(self.blocks)) if self.mode == "key0" else key]
        return [len(b) for b in bufs]


class FakeRedis:
    def __init__(self, wrong: bool = False) -> None:
        self.wrong = wrong
        self.values: dict[bytes, bytes] = {}

    def mset(self, mapping: dict[bytes, memoryview]) -> None:
        self.values.update((k, bytes(v)) for k, v in mapping.items())

    def mget(self, keys: list[bytes]) -> list[bytes]:
        return [bytes(BLOCK) if self.wrong else self.values[k] for k in keys]


def _worker(system: str, client: Any) -> Worker:
    w = Worker(0, {})
    w.clients[system] = client
    return w


def test_worker_get_check_passes_the_right_bytes() -> None:
    w = _worker("kvstore-dp-tcp", FakeKV())
    w.run("kvstore-dp-tcp", "put", BLOCK, BATCH, COUNT, 0)
    t0, t1, lat, _ = w.run("kvstore-dp-tcp", "get", BLOCK, BATCH, COUNT, 0)
    assert t1 >= t0 and len(lat) == COUNT // BATCH


@pytest.mark.parametrize("mode", ["nothing", "key0"])
def test_worker_get_check_raises_on_wrong_bytes(mode: str) -> None:
    """A get_into that answers the right sizes but writes nothing (its
    buffers held the same keys' bytes from the round before: they are
    cleared before each round), or serves key 0's block for every key."""
    fake = FakeKV()
    w = _worker("kvstore-dp-tcp", fake)
    w.run("kvstore-dp-tcp", "put", BLOCK, BATCH, COUNT, 0)
    w.run("kvstore-dp-tcp", "get", BLOCK, BATCH, COUNT, 0)  # the buffers now hold the bytes
    fake.mode = mode
    with pytest.raises(RuntimeError, match=r"kvstore-dp-tcp: a Get of "
                                           r"kvstore-dp-tcp/w0/65536/12 returned bytes other"):
        w.run("kvstore-dp-tcp", "get", BLOCK, BATCH, COUNT, 0)


def test_worker_get_check_covers_redis_and_memcpy() -> None:
    w = _worker("redis-tcp", FakeRedis())
    w.run("redis-tcp", "put", BLOCK, BATCH, COUNT, 0)
    w.run("redis-tcp", "get", BLOCK, BATCH, COUNT, 0)
    w.clients["redis-tcp"].wrong = True
    with pytest.raises(RuntimeError, match="redis-tcp: a Get of redis-tcp/w0/65536/12"):
        w.run("redis-tcp", "get", BLOCK, BATCH, COUNT, 0)
    # memcpy: its store holds what was put; a Get of keys never put does not pass
    w.run("memcpy", "put", BLOCK, BATCH, COUNT, 0)
    w.run("memcpy", "get", BLOCK, BATCH, COUNT, 0)
    with pytest.raises(RuntimeError, match="memcpy: a Get of memcpy/w1/65536/12"):
        Worker(1, {}).run("memcpy", "get", BLOCK, BATCH, COUNT, 0)


def test_the_other_benches_check_get_bytes() -> None:
    data = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
    throughput._check_get([b"k"], [data], data)
    for got in (None, bytes(BLOCK), bytearray(BLOCK)):
        with pytest.raises(RuntimeError, match="a Get of k returned bytes other"):
            throughput._check_get([b"k"], [got], data)
    view = memoryview(np.frombuffer(data, dtype=np.uint8))
    per_call._check_get("tcp", b"k", view, view)
    with pytest.raises(RuntimeError, match="tcp: a Get of k returned bytes other"):
        per_call._check_get("tcp", b"k", memoryview(bytearray(BLOCK)), view)
    keys = [b"k0", b"k1"]
    aio_client._check("dp-tcp", "get", keys, data, [], [], [(1, [data])])
    aio_client._check("dp-tcp", "get_into", keys, data, [bytearray(data)], [], [(1, [BLOCK])])
    with pytest.raises(RuntimeError, match="dp-tcp: get of k1 missed"):
        aio_client._check("dp-tcp", "get", keys, data, [], [1], [(1, [None])])
    with pytest.raises(RuntimeError, match="dp-tcp: get_into of k1 returned bytes other"):
        aio_client._check("dp-tcp", "get_into", keys, data, [bytearray(BLOCK)], [],
                          [(1, [BLOCK])])


def test_throughput_interleaves_kv_and_raw_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """kv and raw rounds alternate within a cell (they ran in two blocks),
    and get_into's raw baseline is measured in its own cell (it was copied
    from the get cell)."""
    calls: list[tuple[str, str]] = []

    class FakePool:
        def __init__(self, *args: Any) -> None:
            pass

        def run(self, kind: str, op: str, block: int, clients: int,
                count: int) -> tuple[float, list]:
            calls.append((kind, op))
            return 0.01, [0.001]

        def close(self) -> None:
            pass

    class FakeServer:
        command = ["fake"]
        tcp = unix_target = "fake"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def start(self) -> FakeServer:
            return self

        def stop(self) -> None:
            pass

        def rss_bytes(self) -> int:
            return 0

    import bench._server

    monkeypatch.setattr(throughput, "Pool", FakePool)
    monkeypatch.setattr(bench._server, "BenchServer", FakeServer)
    args = argparse.Namespace(sizes=[BLOCK], clients=[1], batch=1, rounds=4, server_flag=None,
                              metrics="off", l1_capacity="64MiB", l2=False, unix=False,
                              chunk_bytes=KiB * KiB, bytes_per_round=BLOCK * 4, quick=True)
    doc = throughput.run_bench(args)
    for op in ("put", "get", "get_into"):
        kinds = [k for k, o in calls if o == op and k != "cleanup"]
        # the warm-ups, then ABBA
        assert kinds == ["kv", "raw", "kv", "raw", "raw", "kv", "kv", "raw", "raw", "kv"], op
    get_into = next(c for c in doc["results"] if c["op"] == "get_into")
    assert get_into["raw"]["calls"] == 4


@pytest.mark.parametrize(("main", "argv", "flag"), [
    (peers.main, ["--tiny", "--systems", "memcpy", "--rounds", "0"], "--rounds"),
    (peers.main, ["--tiny", "--systems", "memcpy", "--rounds", "-1"], "--rounds"),
    (peers.main, ["--tiny", "--systems", "memcpy", "--per-call", "0"], "--per-call"),
    (peers.main, ["--tiny", "--systems", "memcpy", "--clients", "0"], "--clients"),
    (peers.main, ["--tiny", "--systems", "memcpy", "--sizes", "0"], "--sizes"),
    (peers.main, ["--tiny", "--systems", "memcpy", "--bytes-per-round", "0"],
     "--bytes-per-round"),
    (peers.main, ["--tiny", "--systems", "memcpy", "--sizes", "1 MiB?"], "--sizes"),
    (per_call.main, ["--sizes", "0", "--paths", "tcp", "--rounds", "1"], "--sizes"),
    (per_call.main, ["--sizes", "1MiB", "--paths", "tcp", "--rounds", "0"], "--rounds"),
    (throughput.main, ["--sizes", "64KiB", "--clients", "1", "--rounds", "0", "--quick"],
     "--rounds"),
    (throughput.main, ["--sizes", "64KiB", "--clients", "1", "--batch", "0", "--quick"],
     "--batch"),
    (aio_client.main, ["--calls", "0"], "--calls"),
    (handover.main, ["--rounds", "0"], "--rounds"),
])
def test_bad_flags_are_one_argparse_error(main: Any, argv: list[str], flag: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"argument {flag}:" in errors[0], err


def test_per_call_sizes_take_the_config_syntax() -> None:
    assert peers.positive_size("1MB") == 1024 * 1024  # per_call's own parser refused it
    assert peers.positive_size("4KiB") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        peers.positive_size("0")
    with pytest.raises(argparse.ArgumentTypeError):
        peers.positive_int("1.5")
