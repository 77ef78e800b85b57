"""A client process of ``bench.peers``: runs the rounds it is sent.

Each worker holds one client per system (created on first use and reused),
a pool of distinct pre-faulted source blocks (64 MiB in all, more than the
last-level cache, so Puts read memory as an engine would) and one batch of
pre-faulted destination buffers reused by every Get. After each Get round,
outside its timing, the blocks of its last call are compared with those Put
under the keys (``Worker.check_get``).
"""

from __future__ import annotations

import os
import resource
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

SOURCE_POOL_BYTES = 64 * 1024 * 1024


class Worker:
    def __init__(self, wid: int, cfg: dict[str, Any]) -> None:
        import numpy as np

        self.np = np
        self.wid = wid
        self.cfg = cfg
        self.clients: dict[str, Any] = {}
        self._src: tuple[int, list[memoryview]] | None = None
        self._dst: tuple[int, int, list[memoryview]] | None = None
        self._store: Any = None  # memcpy baseline: this worker's "server memory"
        self._last_values: list[Any] = []  # redis: the last MGET's values, for check_get

    # -- buffers --------------------------------------------------------------------

    def sources(self, block: int) -> list[memoryview]:
        if self._src is None or self._src[0] != block:
            rng = self.np.random.default_rng(self.wid)
            n = max(1, SOURCE_POOL_BYTES // block)
            arrays = [rng.integers(0, 256, block, dtype=self.np.uint8) for _ in range(n)]
            self._src = (block, [memoryview(a) for a in arrays])
        return self._src[1]

    def dests(self, block: int, batch: int) -> list[memoryview]:
        if self._dst is None or self._dst[:2] != (block, batch):
            self._dst = None
            arrays = [self.np.ones(block, dtype=self.np.uint8) for _ in range(batch)]  # faulted
            self._dst = (block, batch, [memoryview(a) for a in arrays])
        return self._dst[2]

    def memstore(self, nbytes: int) -> memoryview:
        if self._store is None or len(self._store) < nbytes:
            self._store = None
            self._store = memoryview(self.np.ones(nbytes, dtype=self.np.uint8))
        return self._store

    # -- clients --------------------------------------------------------------------

    def client(self, system: str) -> Any:
        c = self.clients.get(system)
        if c is not None:
            return c
        cfg = self.cfg
        # The -nopoll variants: the same clients without the busy poll (the
        # path before it), for same-run comparisons.
        busy = {"busy_poll_us": 0} if system.endswith("-nopoll") else {}
        # The shm systems' server (its own with bench.peers --arena split).
        shm_target = cfg.get("kv_shm_unix") or cfg.get("kv_unix", "")
        if system.removesuffix("-nopoll") in ("kvstore-dp-tcp", "kvstore-dp-unix"):
            from kvstore import Client

            # The transport named, not the one the client would pick (on this
            # host, the unix socket).
            transport = "tcp" if system.startswith("kvstore-dp-tcp") else "unix"
            target = cfg["kv_tcp"] if transport == "tcp" else cfg["kv_unix"]
            c = Client(target, namespace="bench", timeout=300, data_plane=transport, **busy)
            _require_data_plane(c, system)
        elif system.removesuffix("-nopoll") == "kvstore-dp-shm":
            from kvstore.client.shm import ShmClient

            c = ShmClient(shm_target, namespace="bench", timeout=300, **busy)
            _require_data_plane(c, system)
        elif system == "kvstore-tcp":
            from kvstore import Client

            c = Client(cfg["kv_tcp"], namespace="bench", timeout=300, data_plane=False)
        elif system == "kvstore-unix":
            from kvstore import Client

            c = Client(cfg["kv_unix"], namespace="bench", timeout=300, data_plane=False)
        elif system == "kvstore-shm":
            from kvstore.client.shm import ShmClient

            c = ShmClient(shm_target, namespace="bench", timeout=300, data_plane=False)
        elif system in ("kvstore-tcp-stream", "kvstore-unix-stream"):
            from kvstore import Client

            target = cfg["kv_tcp"] if system == "kvstore-tcp-stream" else cfg["kv_unix"]
            c = Client(target, namespace="bench", timeout=300, unary_get=False,
                       data_plane=False)
        elif system == "kvstore-tcp-threaded":
            from kvstore import Client

            class ThreadedGetClient(Client):
                single_threaded_get = False

            c = ThreadedGetClient(cfg["kv_tcp"], namespace="bench", timeout=300,
                                  unary_get=False, data_plane=False)
        elif system == "kvstore-tcp-syncput":
            from kvstore import Client

            c = Client(cfg["kv_tcp"], namespace="bench", timeout=300, aio_put=False,
                       data_plane=False)
        elif system == "kvstore-shm-2rpc":
            from kvstore.client.shm import ShmClient

            c = ShmClient(shm_target, namespace="bench", timeout=300,
                          release_on_acquire=False, data_plane=False)
            c.stream_batch_bytes = None  # cached stores, as before
            c.stream_get_bytes = c.stream_put_bytes = None
        elif system == "redis-tcp":
            import redis

            # peer_host: the servers' address when they run on another
            # (simulated) host, bench.cross_host.
            c = redis.Redis(host=cfg.get("peer_host", "127.0.0.1"), port=cfg["redis_port"],
                            socket_timeout=300,
                            socket_read_size=cfg["redis_read_size"])
        elif system == "redis-unix":
            import redis

            c = redis.Redis(unix_socket_path=cfg["redis_unix"], socket_timeout=300,
                            socket_read_size=cfg["redis_read_size"])
        elif system == "raw-tcp":
            from bench._peers.raw import RawClient

            c = RawClient((cfg.get("peer_host", "127.0.0.1"), cfg["raw_port"]))
        elif system == "raw-unix":
            from bench._peers.raw import RawClient

            c = RawClient(cfg["raw_unix"])
        elif system == "mooncake-tcp":
            c = MooncakeClient(cfg["mooncake_site"], cfg["mooncake_master"], self.np)
        elif system == "memcpy":
            c = True
        else:
            raise ValueError(f"unknown system {system}")
        self.clients[system] = c
        return c

    def close(self) -> None:
        for c in self.clients.values():
            close = getattr(c, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass

    # -- one batch call per system ------------------------------------------------------

    def call(self, system: str, op: str, block: int) -> Callable[[list[bytes], list[memoryview],
                                                                  list[memoryview], int], None]:
        c = self.client(system)
        if system.startswith("kvstore"):
            if op == "put":
                def kv_put(keys: list[bytes], src: list[memoryview], dst: list[memoryview],
                           base: int) -> None:
                    c.put(list(zip(keys, src, strict=True)))
                return kv_put

            def kv_get(keys: list[bytes], src: list[memoryview], dst: list[memoryview],
                       base: int) -> None:
                sizes = c.get_into(keys, dst)
                if any(s != block for s in sizes):
                    raise RuntimeError(f"{system} get_into returned sizes {sizes}")
            return kv_get
        if system.startswith("redis"):
            if op == "put":
                def redis_put(keys: list[bytes], src: list[memoryview], dst: list[memoryview],
                              base: int) -> None:
                    c.mset(dict(zip(keys, src, strict=True)))
                return redis_put

            def redis_get(keys: list[bytes], src: list[memoryview], dst: list[memoryview],
                          base: int) -> None:
                vals = c.mget(keys)
                if any(v is None or len(v) != block for v in vals):
                    raise RuntimeError(f"{system} MGET returned a miss or a wrong size")
                # A reference (no copy) for check_get, after the round's timing.
                self._last_values = vals
            return redis_get
        if system.startswith("mooncake"):
            if op == "put":
                def mc_put(keys: list[bytes], src: list[memoryview], dst: list[memoryview],
                           base: int) -> None:
                    c.put(keys, src)
                return mc_put

            def mc_get(keys: list[bytes], src: list[memoryview], dst: list[memoryview],
                       base: int) -> None:
                sizes = c.get_into(keys, dst)
                if any(n != block for n in sizes):
                    raise RuntimeError(f"{system} batch_get_into returned {sizes}")
            return mc_get
        if system.startswith("raw"):
            if op == "put":
                def raw_put(keys: list[bytes], src: list[memoryview], dst: list[memoryview],
                            base: int) -> None:
                    c.put(src)
                return raw_put

            # Not checked by check_get: the raw server stores nothing (it sends
            # its own buffer), a baseline of moving the bytes, not of a store.
            def raw_get(keys: list[bytes], src: list[memoryview], dst: list[memoryview],
                        base: int) -> None:
                c.get_into(block, dst)
            return raw_get
        # memcpy: the same bytes copied between this process's own buffers
        store = self._store
        if op == "put":
            def mem_put(keys: list[bytes], src: list[memoryview], dst: list[memoryview],
                        base: int) -> None:
                for i, s in enumerate(src):
                    off = (base + i) * block
                    store[off : off + block] = s
            return mem_put

        def mem_get(keys: list[bytes], src: list[memoryview], dst: list[memoryview],
                    base: int) -> None:
            for i, d in enumerate(dst):
                off = (base + i) * block
                d[:] = store[off : off + block]
        return mem_get

    def run(self, system: str, op: str, block: int, batch: int, count: int,
            start_at: float) -> tuple[float, float, list[float], float]:
        keys = [f"{system}/w{self.wid}/{block}/{i}".encode() for i in range(count)]
        srcs = self.sources(block)
        dst = self.dests(block, batch)
        if system == "memcpy":
            self.memstore(count * block)
        fn = self.call(system, op, block)
        batches = []
        for i in range(0, count, batch):
            ks = keys[i : i + batch]
            batches.append((i, ks, [srcs[(i + j) % len(srcs)] for j in range(len(ks))],
                            dst[: len(ks)]))
        if op == "get":
            # Before the timing, every system alike: what the last round left in
            # the reused buffers (the same keys' bytes) would pass check_get for
            # a Get that writes nothing.
            for d in dst:
                self.np.frombuffer(d, dtype=self.np.uint8).fill(0)
        lat: list[float] = []
        delay = start_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        c0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for base, ks, src, dd in batches:
            s = time.perf_counter()
            fn(ks, src, dd, base)
            lat.append(time.perf_counter() - s)
        t1 = time.perf_counter()
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
        if op == "get" and batches:
            # Outside the timing: the destinations are reused, so the last call's
            # blocks are the ones left to check.
            _, ks, src, dd = batches[-1]
            self.check_get(system, ks, src, dd)
        return t0, t1, lat, cpu

    def check_get(self, system: str, keys: list[bytes], src: list[memoryview],
                  dst: list[memoryview]) -> None:
        """The bytes a Get left (``dst``; Redis: the last MGET's values) are
        exactly those Put under ``keys`` (``src``, the blocks they were put
        from): sizes alone let a Get that writes nothing, or serves another
        key's block, pass as a fast one."""
        if system.startswith("raw"):
            return  # no store: see raw_get
        np = self.np
        got: list[Any] = self._last_values if system.startswith("redis") else dst
        if len(got) != len(keys):
            raise RuntimeError(f"{system}: the last Get returned {len(got)} values for "
                               f"{len(keys)} keys")
        for key, want, have in zip(keys, src, got, strict=True):
            if have is None or not np.array_equal(np.frombuffer(have, dtype=np.uint8),
                                                  np.frombuffer(want, dtype=np.uint8)):
                raise RuntimeError(f"{system}: a Get of {key.decode()} returned bytes other "
                                   "than those Put under it")

    def cleanup(self, systems: list[str], block: int, count: int) -> None:
        for system in systems:
            if system not in self.clients:
                continue
            keys = [f"{system}/w{self.wid}/{block}/{i}".encode() for i in range(count)]
            c = self.clients[system]
            if system.startswith("kvstore"):
                c.delete(keys)
            elif system.startswith("redis"):
                for i in range(0, len(keys), 256):
                    c.delete(*keys[i : i + 256])
            elif system.startswith("mooncake"):
                c.delete(keys)


def _require_data_plane(client: Any, system: str) -> None:
    """A data-plane system must measure the data plane, not a silent fallback."""
    if not client.data_plane_active():
        raise RuntimeError(f"{system}: the server offers no data plane (the client fell back "
                           "to gRPC)")


class MooncakeClient:
    """Mooncake Store's Python client with its zero-copy calls: sources and
    destinations registered once (``register_buffer``), then
    ``batch_upsert_from`` / ``batch_get_into`` per batch (upsert: the rounds
    put the same keys again, as with the other systems)."""

    def __init__(self, site: str, master: str, np: Any) -> None:
        import sys

        if site not in sys.path:
            sys.path.append(site)
        from mooncake.store import MooncakeDistributedStore

        self.np = np
        self.store = MooncakeDistributedStore()
        # No memory segment of its own: every byte goes to the holder by TCP.
        rc = self.store.setup("127.0.0.1", "P2PHANDSHAKE", 0, 64 * 1024 * 1024, "tcp", "",
                              master)
        if rc:
            raise RuntimeError(f"Mooncake setup failed: {rc}")
        self._registered: dict[int, int] = {}

    def _ptr(self, view: memoryview) -> int:
        ptr = int(self.np.frombuffer(view, dtype=self.np.uint8).ctypes.data)
        if ptr not in self._registered:
            rc = self.store.register_buffer(ptr, len(view))
            if rc:
                raise RuntimeError(f"Mooncake register_buffer failed: {rc}")
            self._registered[ptr] = len(view)
        return ptr

    def put(self, keys: list[bytes], src: list[memoryview]) -> None:
        rcs = self.store.batch_upsert_from([k.decode() for k in keys],
                                           [self._ptr(v) for v in src], [len(v) for v in src])
        if any(rcs):
            raise RuntimeError(f"Mooncake batch_upsert_from returned {rcs}")

    def get_into(self, keys: list[bytes], dst: list[memoryview]) -> list[int]:
        return list(self.store.batch_get_into([k.decode() for k in keys],
                                              [self._ptr(v) for v in dst],
                                              [len(v) for v in dst]))

    def delete(self, keys: list[bytes]) -> None:
        self.store.batch_remove([k.decode() for k in keys])

    def close(self) -> None:
        self.store.close()


def worker_main(conn: Connection, wid: int, cfg: dict[str, Any]) -> None:
    if cfg.get("malloc_tuning", True):
        from kvstore._malloc import tune_malloc

        tune_malloc()  # what the SDK does on import anyway
    w = Worker(wid, cfg)
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            try:
                if msg[0] == "run":
                    conn.send(("ok", w.run(*msg[1:])))
                elif msg[0] == "cleanup":
                    w.cleanup(*msg[1:])
                    conn.send(("ok", None))
                elif msg[0] == "hello":
                    conn.send(("ok", os.getpid()))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        w.close()
