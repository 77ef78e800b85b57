"""Start, run and stop the kvstore server (grpc.aio).

``serve`` opens the store (rebuilding the index from L2), listens on TCP
and/or a unix socket, writes an optional ready file (JSON with the bound
addresses, so tests and benches can ask for port 0), and on SIGTERM or SIGINT
stops taking new calls, lets in-flight calls finish for ``grace_seconds``,
then flushes L2 and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore._malloc import tune_malloc
from kvstore.config import Config
from kvstore.server.interceptor import ErrorInterceptor
from kvstore.server.servicer import SERVICE_NAME, KVStoreServicer, add_to_server
from kvstore.shm import SharedMemoryBroker
from kvstore.store import TieredStore

log = logging.getLogger("kvstore.server")


def grpc_options(config: Config) -> list[tuple[str, int]]:
    size = config.server.max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),
    ]


class Server:
    """A running kvstore server; ``await stop()`` shuts it down gracefully."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = TieredStore(config)
        self.shm = SharedMemoryBroker(self.store, config.server.shm_reserve_ms,
                                      config.server.shm_lease_ms, config.server.max_lease_ms)
        self.grpc = grpc.aio.server(interceptors=[ErrorInterceptor()],
                                    options=grpc_options(config))
        self.health = health.aio.HealthServicer()
        self.addresses: dict[str, str | None] = {"tcp": None, "unix": None}
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        await self.store.start()
        add_to_server(KVStoreServicer(self.store, self.shm), self.grpc)
        self.shm.start()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        cfg = self.config.server
        if cfg.listen:
            port = self.grpc.add_insecure_port(cfg.listen)
            host = cfg.listen.rsplit(":", 1)[0]
            self.addresses["tcp"] = f"{host}:{port}"
        if cfg.unix_socket:
            path = Path(cfg.unix_socket)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                path.unlink()
            self.grpc.add_insecure_port(f"unix:{path}")
            self.addresses["unix"] = str(path)
        await self.grpc.start()
        if cfg.unix_socket:
            os.chmod(cfg.unix_socket, 0o600)  # the service's user only
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("kvstore serving on %s", {k: v for k, v in self.addresses.items() if v})

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.config.server.grace_seconds if grace is None else grace)
        await self.shm.close()
        await self.store.close()
        if self.addresses["unix"]:
            Path(self.addresses["unix"]).unlink(missing_ok=True)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _write_ready_file(path: str, addresses: dict[str, str | None]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump({**addresses, "pid": os.getpid()}, fh)
    os.replace(tmp, path)  # readers never see a half-written file


async def serve(config: Config, ready_file: str | None = None) -> None:
    tune_malloc()
    server = Server(config)
    await server.start()
    if ready_file:
        _write_ready_file(ready_file, server.addresses)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight calls, flushing L2")
    await server.stop()
    log.info("stopped")


def run(config: Config, ready_file: str | None = None) -> None:
    logging.basicConfig(level=os.environ.get("KVSTORE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config, ready_file))
