"""Start, run and stop the kvstore server (grpc.aio).

``serve`` opens the store (rebuilding the index from L2), listens on TCP
and/or a unix socket, writes an optional ready file (JSON with the bound
addresses, so tests and benches can ask for port 0), and on SIGTERM or SIGINT
stops taking new calls, lets in-flight calls finish for ``grace_seconds``,
then flushes L2 and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from kvstore import __version__
from kvstore._malloc import tune_malloc
from kvstore.budget import request_budget
from kvstore.config import Config, changed_options, format_size
from kvstore.dataplane.server import DataPlaneServer
from kvstore.dataplane.tickets import Binding
from kvstore.errors import InvalidConfig, StorageError
from kvstore.ownpath import make_directories
from kvstore.server import logs, metrics, preflight
from kvstore.server.auth import Authorizer
from kvstore.server.interceptor import ErrorInterceptor
from kvstore.server.loop import loop_factory
from kvstore.server.metrics_calls import CallRecorder, MetricsInterceptor
from kvstore.server.runtime import tune_gc
from kvstore.server.servicer import SERVICE_NAME, KVStoreServicer, add_to_server
from kvstore.server.tls import ServerTLS
from kvstore.sockpath import check_socket_path
from kvstore.store import SharedMemoryBroker, TieredStore

log = logging.getLogger("kvstore.server")

#: grpc.health service name that reports whether the L3 object store is reachable
#: (NOT_SERVING also when no L3 is configured: docs/protocol.md).
L3_HEALTH = "kvstore.v1.KVStore/L3"
#: grpcio-reflection (1.85) ships only v1alpha; v1 is the same protocol under
#: another service name, so the same servicer answers both (docs/protocol.md).
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
L3_WATCH_SECONDS = 0.2
L3_PROBE_SECONDS = 1.0


#: Keepalive pings the server accepts from a client (docs/protocol.md, "Client
#: settings"): one every 0.5 s or slower, with or without calls in flight. gRPC's
#: server default (one per 5 min while no data is sent, none without a call) ends
#: the connection with GOAWAY "too_many_pings" after the third early ping, which
#: cut the idle channels and the open Put and Watch streams of engines that ping
#: every 10 s (Go, Java, C++ keepalive settings) after 30 s. Half the usual
#: 1 s floor, so a client pinging every second is not struck for timer jitter.
MIN_CLIENT_PING_INTERVAL_MS = 500


def grpc_options(config: Config) -> list[tuple[str, int]]:
    size = config.server.max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Past it a connection is closed as it is accepted: 20,000 idle ones
        # ran the process out of file descriptors (L3 reads failed "Too many
        # open files", new clients were refused) and past its memory bound.
        ("grpc.max_allowed_incoming_connections", config.server.max_connections),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
    ]


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve grpc.reflection v1alpha and v1 (its wire-identical successor)."""
    servicer = reflection.aio.ReflectionServicer(
        (*service_names, reflection.SERVICE_NAME), pool=None)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(tuple(
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
        for name in (reflection.SERVICE_NAME, REFLECTION_V1)))


class Server:
    """A running kvstore server; ``await stop()`` shuts it down gracefully."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Before the store allocates L1: a missing extra or a bad address fails at once.
        #: auth.tokens_file: the grants every call is checked against (None: off).
        self.auth = Authorizer(config.auth.tokens_file) if config.auth.tokens_file else None
        s = config.server
        #: server.tls_cert: both TCP listeners' certificate, reread when renewed (None: off).
        self.tls = ServerTLS(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
        self.metrics = metrics.MetricsExporter(config.server.metrics_listen) \
            if config.server.metrics_listen else None
        self.store = TieredStore(config)  # (which releases what it made if it fails)
        try:
            if config.quota.enabled:
                self.store.placement.limit_l1(config.quota.l1_limit)
            self.shm = SharedMemoryBroker(self.store, config.server.shm_reserve_ms,
                                          config.server.shm_lease_ms, config.server.max_lease_ms)
            #: issue 14: the data plane beside gRPC (None: server.data_plane off).
            #: requests of many keys, gRPC Gets' and the data plane's together
            self.requests = request_budget()
            self.dataplane = DataPlaneServer(
                config, self.store, self.shm,
                self.tls.listener_context if self.tls is not None else None,
                self.requests) if config.server.data_plane else None
            self.calls = CallRecorder()
            timing = [MetricsInterceptor(self.calls)] if self.metrics else []
            # (60,000 Put streams sending nothing held 420 MB: calls are
            # bounded as connections are, in the interceptor: not the health
            # checks)
            errors = ErrorInterceptor(self.auth, stream_idle=s.put_idle_ms / 1000.0,
                                      max_calls=s.max_calls, requests=self.requests)
            self.grpc = grpc.aio.server(interceptors=[*timing, errors],
                                        options=grpc_options(config))
        except BaseException:
            self.store.abandon()  # the L1 arena's file goes, L2 closes
            raise
        logs.quiet_undelivered_answers()
        self.health = health.aio.HealthServicer()
        self.addresses: dict[str, str | None] = {"tcp": None, "unix": None,
                                                 "data_plane_tcp": None,
                                                 "data_plane_unix": None}
        self._stopped = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None
        self._store_started = False

    async def start(self) -> None:
        """Start serving. If any step fails, what the server made is released
        before the error goes up: listeners closed, the store closed (the L1
        arena's file removed), so a refused start leaves nothing behind."""
        try:
            await self._start()
        except BaseException:
            await self._abort_start()
            raise

    async def _abort_start(self) -> None:
        with contextlib.suppress(Exception):  # (started or not)
            await self.grpc.stop(0)
        await self._release(self._store_started)

    async def _release(self, store_started: bool) -> None:
        """What serving held, once no call is under way: the data plane's
        sessions (before the broker: they give back leases), the metrics
        endpoint, the broker, the store (closed, or abandoned if it never
        started) and the unix socket's file."""
        if self.dataplane is not None:
            await self.dataplane.close()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        await self.shm.close()
        if store_started:
            await self.store.close()
        else:
            self.store.abandon()
        if self.addresses["unix"]:
            Path(self.addresses["unix"]).unlink(missing_ok=True)

    async def _start(self) -> None:
        if self.metrics is not None:  # first: a taken port fails before the index rebuild
            self.addresses["metrics"] = self.metrics.start(metrics.KVStoreCollector(
                self.store, self.shm, self.calls, asyncio.get_running_loop(), __version__,
                self.dataplane.stats if self.dataplane is not None else None, self.tls))
        self._store_started = True
        await self.store.start()
        self._listen()
        if self.dataplane is not None:
            await self.dataplane.start()
            self.addresses["data_plane_tcp"] = self.dataplane.tcp_address or None
            self.addresses["data_plane_unix"] = self.dataplane.unix_path or None
        add_to_server(KVStoreServicer(self.store, self.shm, self.dataplane, self.auth),
                      self.grpc)
        self.shm.start()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        enable_reflection(self.grpc, (SERVICE_NAME, health.SERVICE_NAME))
        await self.grpc.start()
        cfg = self.config.server
        if cfg.unix_socket:
            os.chmod(cfg.unix_socket, 0o600)  # the service's user only
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.store.l3 is not None:
            await self.health.set(L3_HEALTH, health_pb2.HealthCheckResponse.SERVING)
            self._monitor = asyncio.get_running_loop().create_task(self._watch_l3())
        else:
            # A known name with a definite answer: L3 cannot serve (ack
            # remote fails), and a Watch on it does not wait forever.
            await self.health.set(L3_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
        summary, fields = startup_summary(self.config, self.addresses)
        log.info("%s", summary, extra=fields)
        warning = shared_arena_warning(self.config)
        if warning:
            log.warning("%s", warning)

    def _listen(self) -> None:
        """Bind the TCP listener and the unix socket; a failure is an
        InvalidConfig naming the option (preflight catches most before)."""
        cfg = self.config.server
        if cfg.listen:
            try:
                if self.tls is not None:
                    port = self.grpc.add_secure_port(cfg.listen, self.tls.grpc_credentials())
                else:
                    port = self.grpc.add_insecure_port(cfg.listen)
            except (RuntimeError, OSError) as exc:
                raise InvalidConfig(f"server.listen {cfg.listen}: cannot listen there "
                                    f"({exc})") from None
            host = cfg.listen.rsplit(":", 1)[0]
            self.addresses["tcp"] = f"{host}:{port}"
        if cfg.unix_socket:
            path = Path(cfg.unix_socket)
            try:
                make_directories(path.parent, 0o755)
                # Only a stale socket goes: never a file, never a live server's.
                if check_socket_path("server.unix_socket", str(path)):
                    path.unlink()
                # grpc binds (and listens) here with mode 0777 less the umask;
                # under a umask of 0 another user could connect before the
                # chmod below and keep the connection: no window at all.
                umask = os.umask(0o177)
                try:
                    self.grpc.add_insecure_port(f"unix:{path}")
                finally:
                    os.umask(umask)
            except (RuntimeError, OSError) as exc:
                reason = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) else \
                    "grpc cannot bind it (is its directory writable?)"
                raise InvalidConfig(f"server.unix_socket {path}: cannot listen there: "
                                    f"{reason}") from None
            self.addresses["unix"] = str(path)

    def reload_auth(self) -> None:
        """SIGHUP: reread auth.tokens_file. Data plane sessions were bound to
        a grant when they opened: those whose credential has no grant now,
        or another one, are closed (their clients open new ones,
        authenticated afresh); the others go on. (Closing them all failed
        the Puts under way of every tenant at every reload, and put a
        client whose ticket was voided on gRPC for 5 s.)"""
        auth = self.auth
        if auth is None or not auth.reload() or self.dataplane is None:
            return

        def still_granted(binding: Binding) -> bool:
            grant = auth.grant_of(binding.credential)
            return grant is not None and grant.identity == binding.identity \
                and grant.namespaces == binding.namespaces

        dropped = self.dataplane.drop_sessions(still_granted)
        if dropped:
            log.info("auth: closed %d data plane sessions whose grant changed", dropped)

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.health.enter_graceful_shutdown()
        grace = self.config.server.grace_seconds if grace is None else grace
        # Both transports' calls under way get the grace, side by side.
        stopping = [self.grpc.stop(grace)]
        if self.dataplane is not None:
            stopping.append(self.dataplane.drain(grace))
        await asyncio.gather(*stopping)
        await self._release(True)

    async def _watch_l3(self) -> None:
        """Report L3's state as the health of ``kvstore.v1.KVStore/L3``: the
        server stays SERVING (L1 and L2 work without it) while the object
        store is down. While the breaker is open, probe it so an idle server
        notices the store coming back."""
        assert self.store.l3 is not None
        l3 = self.store.l3
        serving = True
        loop = asyncio.get_running_loop()
        last_probe = loop.time()
        while True:
            # Probe at once while the breaker is open (it lets one through
            # when due), and now and then while healthy so that an outage is
            # noticed without traffic.
            if not l3.healthy or loop.time() - last_probe >= L3_PROBE_SECONDS:
                last_probe = loop.time()
                with contextlib.suppress(Exception):
                    await l3.tier.check()
            if l3.healthy != serving:
                serving = l3.healthy
                status = health_pb2.HealthCheckResponse.SERVING if serving else \
                    health_pb2.HealthCheckResponse.NOT_SERVING
                await self.health.set(L3_HEALTH, status)
                if serving:
                    log.warning("L3 is back")
                    self.store.after_demotion()  # move what L2 held during the outage
                else:
                    log.warning("L3 is unavailable: %s", l3.tier.last_error or "no answer")
            await asyncio.sleep(L3_WATCH_SECONDS)  # a periodic check, not synchronisation

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _write_ready_file(path: str, addresses: dict[str, str | None]) -> None:
    # A new file of a name no one could guess (not "<path>.tmp", which another
    # user may have made a link to any file the server may write, in /tmp),
    # renamed over the path: readers never see a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, 0o644)  # addresses and a pid: as readable as before
        with os.fdopen(fd, "w") as fh:
            json.dump({**addresses, "pid": os.getpid()}, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _version() -> str:
    return __version__


def shared_arena_warning(config: Config) -> str | None:
    """What to say at start when tenants (auth.tokens_file) share a server
    whose L1 is a shared-memory arena: the arena holds every namespace's L1
    blocks, and server.shm_namespaces says only who may attach to it. (A
    review read, and overwrote, another tenant's blocks from a namespace on
    that list; the README had read as if the list protected the others.)"""
    if not (config.auth.tokens_file and config.l1.shm_path):
        return None
    who = (f"identities granted {', '.join(config.server.shm_namespaces)}"
           if config.server.shm_namespaces else "every identity (server.shm_namespaces is empty)")
    return (f"auth is on and L1 is the shared-memory arena {config.l1.shm_path}: it holds the L1 "
            f"blocks of every namespace, and {who} may attach to it and read or overwrite any "
            "of them. Tenants that must not read each other need a server each (or no "
            "l1.shm_path); see README, \"Trust boundary\"")


def startup_summary(config: Config, addresses: dict[str, str | None]) \
        -> tuple[str, dict[str, object]]:
    """The one line that says what this server is: version, listeners, tiers,
    policy, data directory; and the same as fields for JSON logs."""
    s = config.server
    listeners = [f"tcp {addresses['tcp']}" + (" (mutual TLS)" if s.tls_client_ca else
                                              " (TLS)" if s.tls_cert else "")
                 if addresses["tcp"] else "", f"unix {addresses['unix']}"
                 if addresses["unix"] else ""]
    verified = config.l1.reads_checked
    l1 = (f"L1 {format_size(config.l1.capacity)}"
          + (f" in {config.l1.shm_path}" if config.l1.shm_path else "")
          + (" (reads checked)" if verified else " (anonymous: reads not checked again)"))
    write = "write-back" if config.l2.write_mode == "evict" else "write-behind"
    l2 = (f"L2 {format_size(config.l2.capacity)} in {config.l2_path} ({write}"
          f"{', fsync' if config.l2.sync else ''})") if config.l2.enabled else "L2 off"
    l3 = f"L3 {config.l3.url}" if config.l3.url else "L3 none"
    policy = f"policy {config.policy.name}" + (" (client clock)"
                                               if config.policy.clock == "client" else "")
    dp = [f"tcp {addresses['data_plane_tcp']}" + (" (mutual TLS)" if s.tls_client_ca else
                                                   " (TLS)" if s.tls_cert else "")
          if addresses.get("data_plane_tcp") else "",
          f"unix {addresses['data_plane_unix']}" if addresses.get("data_plane_unix") else ""]
    if any(dp):
        listeners.append(f"data plane {', '.join(x for x in dp if x)}")
    if addresses.get("metrics"):
        listeners.append(f"metrics http://{addresses['metrics']}/metrics")
    line = (f"kvstore {_version()} serving on {', '.join(x for x in listeners if x)}; "
            f"{l1}; {l2}; {l3}; {policy}; data dir {config.data_dir}")
    fields: dict[str, object] = {
        "version": _version(), "tcp": addresses["tcp"], "unix": addresses["unix"],
        "tls": "mutual" if s.tls_client_ca else "on" if s.tls_cert else "off",
        "l1_capacity": config.l1.capacity, "l1_reads_checked": verified,
        "l2_capacity": config.l2.capacity if config.l2.enabled else None,
        "l3_url": config.l3.url or None, "policy": config.policy.name,
        "data_dir": config.data_dir,
        "data_plane_tcp": addresses.get("data_plane_tcp"),
        "data_plane_unix": addresses.get("data_plane_unix"),
        "metrics": addresses.get("metrics"),
    }
    return line, fields


async def serve(config: Config, ready_file: str | None = None,
                reload: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM / SIGINT; the exit status: 0, or 1 when blocks only
    in memory could not be written to L2 at the stop (a supervisor sees it).
    ``reload``: loads the configuration again as the start did (from the
    same file, environment and flags), for SIGHUP to say what changed."""
    loop = asyncio.get_running_loop()
    started: list[Server] = []

    def on_sighup() -> None:
        """Reread auth.tokens_file and the TLS files; without either, say so
        and carry on (SIGHUP's default action would kill the server without
        the SIGTERM flush)."""
        if not started:  # the files are read as the server is made, after this
            log.info("SIGHUP during start-up: auth.tokens_file and the TLS files are read as "
                     "the server starts")
            return
        server = started[0]
        if reload is not None:
            mind_config_changes(config, reload)
        if server.auth is None and server.tls is None:
            log.warning("SIGHUP: no auth.tokens_file nor server.tls_cert, nothing to reload")
        if server.auth is not None:  # rotate credentials without a restart
            server.reload_auth()
        if server.tls is not None:  # a renewed certificate, without waiting for a handshake
            server.tls.check(force=True)

    # First, before the (long) start-up: a SIGHUP then must not kill the server
    # either, nor a SIGTERM or SIGINT leave the arena file in /dev/shm (the
    # default action ended the process there, exit 143, no log line): one
    # that comes during start-up stops the server as soon as it has started.
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tune_malloc()
    preflight.check(config)
    try:
        server = Server(config)
        started.append(server)
        await server.start()
    except StorageError as exc:
        raise StartRefused(str(exc)) from exc
    tune_gc()  # after the index rebuild: the collector skips what exists now
    if ready_file and not stop.is_set():
        try:
            _write_ready_file(ready_file, server.addresses)
        except OSError as exc:
            # A start-up refusal like the others (one line naming the path,
            # exit 2), after a clean stop: L2 flushed, the arena file removed.
            await server.stop(grace=0)
            raise InvalidConfig(f"--ready-file {ready_file}: cannot write it: "
                                f"{exc.strerror or exc}") from None
    await stop.wait()
    log.info("shutting down: finishing in-flight calls, flushing L2")
    await server.stop()
    if ready_file:  # a stopped server is not ready: scripts waiting on the file see so
        Path(ready_file).unlink(missing_ok=True)
    lost = server.store.lost_at_close
    if lost:
        log.error("stopped: %d blocks held only in memory (Puts acknowledged at memory, and "
                  "blocks whose own L2 write failed, their Put refused) could not be written "
                  "to L2 (see the errors above) and are lost", lost)
        return 1
    log.info("stopped")
    return 0


def mind_config_changes(running: Config, reload: Callable[[], Config]) -> None:
    """SIGHUP rereads the tokens file and the TLS files, nothing else: an
    edit of the configuration (another tokens_file, server.namespaces, a
    quota) was ignored without a word. Say which options changed, or why
    the configuration no longer loads; the running one stays."""
    try:
        changed = changed_options(running, reload())
    except InvalidConfig as exc:
        log.warning("SIGHUP: the configuration no longer loads (%s); the running one stays "
                    "(a restart with it would be refused)", exc)
        return
    if changed:
        log.warning("SIGHUP: the configuration changed (%s): not applied, it takes effect at "
                    "a restart; SIGHUP rereads only the contents of auth.tokens_file and the "
                    "TLS files", ", ".join(changed))


class StartRefused(StorageError):
    """A StorageError met while the server started (a damaged L2, or one that
    is not this data dir's): ``kvstore serve`` says "cannot start", exit 1.
    One met later (a failed flush at the stop) is not reported so."""


def run(config: Config, ready_file: str | None = None,
        reload: Callable[[], Config] | None = None) -> int:
    """Serve (see :func:`serve`); returns the exit status."""
    logs.configure(config.log_format, os.environ.get("KVSTORE_LOG_LEVEL", "INFO"))
    with asyncio.Runner(loop_factory=loop_factory(config.server.busy_poll_us)) as runner:
        return runner.run(serve(config, ready_file, reload))
