"""Prometheus metrics: an HTTP endpoint on ``server.metrics_listen``.

The exporter is off unless ``server.metrics_listen`` is set, and
``prometheus-client`` (kvstore's ``metrics`` extra) is imported only then.
Nothing is counted twice: a collector reads the store's own counters
(``TieredStore.stats()``), the shared-memory broker and the per-method call
counters (kvstore/server/metrics_calls.py) when Prometheus scrapes, so the
store pays nothing between scrapes. The snapshot is taken on the event loop
(the store is single-threaded); the HTTP server runs on its own thread and
binds only the configured address. docs/metrics.md lists every series.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvstore.config import check_metrics_extra
from kvstore.dataplane.server import DataPlaneStats
from kvstore.errors import InvalidConfig
from kvstore.server.loop import busy_poll_counts
from kvstore.server.metrics_calls import LATENCY_BUCKETS, CallRecorder, MethodSnapshot
from kvstore.types import StoreStats

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from kvstore.server.tls import ServerTLS
    from kvstore.store import SharedMemoryBroker, TieredStore

#: How long a scrape waits for the event loop to take the snapshot.
SNAPSHOT_TIMEOUT_S = 5.0

def require_prometheus_client() -> None:
    """Fail with one clear line when metrics are asked for but the extra is missing
    (the configuration's validation says so first)."""
    check_metrics_extra()


def parse_listen(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidConfig(
            f"server.metrics_listen {address!r}: use host:port, e.g. 127.0.0.1:9400")
    return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass(frozen=True)
class Snapshot:
    """What one scrape reports, copied on the event loop."""

    stats: StoreStats
    calls: list[MethodSnapshot]
    shm_reservations: int | None  # None: shared memory is off
    shm_leases: int | None
    l3_queued_bytes: int | None  # None: no L3
    #: L3 requests: (sent, failed, retried, breaker openings, deletes in
    #: doubt); None: no L3.
    l3_requests: tuple[int, int, int, int, int] | None = None
    #: issue 14 data plane (None: off).
    dataplane: DataPlaneStats | None = None
    #: The event loop's busy poll: (spins, spins that found a request); None: off.
    busy_poll: tuple[int, int] | None = None
    #: TLS on the TCP listeners: (the served certificate's end as Unix time,
    #: reloads, reloads refused); None: no TLS.
    tls: tuple[float, int, int] | None = None


class KVStoreCollector:
    """A prometheus_client collector over the running server's counters."""

    def __init__(self, store: TieredStore, shm: SharedMemoryBroker, calls: CallRecorder,
                 loop: asyncio.AbstractEventLoop, version: str,
                 dataplane: DataPlaneStats | None = None,
                 tls: ServerTLS | None = None) -> None:
        self.dataplane = dataplane
        self.tls = tls
        self.store = store
        self.shm = shm
        self.calls = calls
        self.loop = loop
        self.version = version

    def take_snapshot(self) -> Snapshot:
        """On the event loop: copy every counter at one instant."""
        shm_on = self.shm.enabled
        l3 = self.store.l3
        return Snapshot(
            stats=self.store.stats(),
            calls=self.calls.snapshot(),
            shm_reservations=self.shm.reservations if shm_on else None,
            shm_leases=self.shm.leases if shm_on else None,
            l3_queued_bytes=l3.queued if l3 is not None else None,
            l3_requests=None if l3 is None else (
                l3.tier.requests, l3.tier.failed_requests, l3.tier.retried,
                l3.tier.breaker.opened, l3.tier.deletes_in_doubt),
            dataplane=dataclasses.replace(self.dataplane) if self.dataplane else None,
            busy_poll=busy_poll_counts(self.loop),
            tls=self._tls_figures(),
        )

    def _tls_figures(self) -> tuple[float, int, int] | None:
        tls = self.tls
        if tls is None:
            return None
        tls.check()  # a scrape also sees a renewed certificate with no new connection
        return (tls.material.not_after, tls.reloads, tls.failures)

    def _snapshot_from_thread(self) -> Snapshot:
        result: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                result.set_result(self.take_snapshot())
            except BaseException as exc:
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(take)
        return result.result(timeout=SNAPSHOT_TIMEOUT_S)

    def collect(self) -> Iterator[Metric]:
        yield from families(self._snapshot_from_thread(), self.version)


def families(snap: Snapshot, version: str) -> Iterator[Metric]:
    """The metric families of one snapshot (names and units: docs/metrics.md)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    stats = snap.stats
    info = GaugeMetricFamily("kvstore_info", "Always 1: the server's version and policy",
                             labels=["version", "policy"])
    info.add_metric([version, stats.policy], 1)
    yield info

    def per_tier(kind: Any, name: str, doc: str, field: str,
                 tiers: Any = stats.tiers) -> Any:
        family = kind(name, doc, labels=["tier"])
        for t in tiers:
            family.add_metric([t.tier.name], float(getattr(t, field)))
        return family

    sized = [t for t in stats.tiers if t.capacity]
    yield per_tier(GaugeMetricFamily, "kvstore_tier_blocks", "Blocks held in the tier", "blocks")
    yield per_tier(GaugeMetricFamily, "kvstore_tier_bytes", "Payload bytes held in the tier",
                   "bytes")
    yield per_tier(GaugeMetricFamily, "kvstore_tier_used_bytes",
                   "Capacity taken in the tier: L1 counts whole pages per block and room "
                   "reserved for blocks arriving; L2 and L3 payload bytes", "used")
    yield per_tier(GaugeMetricFamily, "kvstore_tier_capacity_bytes",
                   "Configured capacity of the tier (L3 has none)", "capacity", sized)
    yield per_tier(GaugeMetricFamily, "kvstore_tier_available",
                   "1 while the tier can be reached, 0 while it cannot (L3 breaker open)",
                   "available")
    yield per_tier(CounterMetricFamily, "kvstore_tier_hits",
                   "Block reads served from the tier", "hits")
    yield per_tier(CounterMetricFamily, "kvstore_tier_misses",
                   "Block reads the tier could not serve", "misses")
    yield per_tier(CounterMetricFamily, "kvstore_tier_evictions",
                   "Blocks that left the tier to make room", "evictions")
    yield per_tier(CounterMetricFamily, "kvstore_tier_demotions",
                   "Evictions that kept a copy in the next tier down", "demotions")
    yield per_tier(CounterMetricFamily, "kvstore_tier_promotions",
                   "Blocks copied up into the tier on a read", "promotions")
    yield per_tier(CounterMetricFamily, "kvstore_tier_corrupt_blocks",
                   "Copies that failed their checksum when read (dropped, read as a miss)",
                   "corrupt")

    for name, doc, value in (
        ("kvstore_block_puts", "Blocks stored (Put and shared-memory commits)", stats.puts),
        ("kvstore_block_gets", "Block reads (Get and shared-memory acquires)", stats.gets),
        ("kvstore_block_get_hits", "Block reads that found the block in some tier",
         stats.get_hits),
        ("kvstore_session_events", "hints recorded (SessionEvent turn ends and session ends)",
         stats.session_events),
    ):
        counter = CounterMetricFamily(name, doc)
        counter.add_metric([], float(value))
        yield counter

    if snap.l3_queued_bytes is not None:
        yield GaugeMetricFamily("kvstore_l3_write_queue_bytes",
                                "Bytes being written to L3 (demotions and ack=remote Puts)",
                                value=float(snap.l3_queued_bytes))
    if snap.l3_requests is not None:
        sent, failed, retried, opened, in_doubt = snap.l3_requests
        for name, doc, value in (
            ("kvstore_l3_requests", "Requests sent to the object store (L3)", sent),
            ("kvstore_l3_request_failures",
             "L3 requests that failed (an error answer, a timeout, a dropped connection), "
             "retried or not", failed),
            ("kvstore_l3_request_retries",
             "L3 requests sent again after a failure (throttling that retries absorb shows "
             "here)", retried),
            ("kvstore_l3_breaker_openings",
             "Times the L3 circuit breaker opened (L3 then counted unavailable)", opened),
            ("kvstore_l3_deletes_in_doubt",
             "L3 deletes given up on after their request went out (the next write of their "
             "object waits until they have landed)", in_doubt),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(value))
            yield counter
    if snap.shm_reservations is not None and snap.shm_leases is not None:
        yield GaugeMetricFamily("kvstore_shm_reservations",
                                "Shared-memory slots reserved and not yet committed",
                                value=float(snap.shm_reservations))
        yield GaugeMetricFamily("kvstore_shm_leases",
                                "Shared-memory read leases held by clients",
                                value=float(snap.shm_leases))

    if snap.dataplane is not None:
        dp = snap.dataplane
        yield GaugeMetricFamily("kvstore_dataplane_connections",
                                "Data plane connections open", value=float(dp.connections))
        yield GaugeMetricFamily("kvstore_dataplane_put_receiving",
                                "Data plane PUT payloads being received now",
                                value=float(dp.receiving))
        for name, doc, value in (
            ("kvstore_dataplane_connections_accepted", "Data plane connections accepted",
             dp.connections_total),
            ("kvstore_dataplane_sessions_refused",
             "Data plane sessions refused at HELLO: server.data_plane_max_connections open",
             dp.refused),
            ("kvstore_dataplane_requests", "Data plane requests answered", dp.frames),
            ("kvstore_dataplane_errors", "Data plane ERROR frames sent", dp.errors),
            ("kvstore_dataplane_puts_begun",
             "Data plane PUTs begun from the socket's readable callback", dp.puts_begun),
            ("kvstore_dataplane_puts_handed_over",
             "Data plane PUTs begun from the readable callback and finished by the "
             "connection's task (a step had to wait)", dp.puts_handed_over),
            ("kvstore_dataplane_received_bytes",
             "Bytes received on data plane connections (counted as each closes)", dp.bytes_in),
            ("kvstore_dataplane_sent_bytes",
             "Bytes sent on data plane connections (counted as each closes)", dp.bytes_out),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(value))
            yield counter

    if snap.busy_poll is not None:
        for name, doc, value in (
            ("kvstore_loop_busy_polls",
             "Event loop busy polls started (server.busy_poll_us, after activity)",
             snap.busy_poll[0]),
            ("kvstore_loop_busy_poll_hits",
             "Event loop busy polls that found a request before they ran out",
             snap.busy_poll[1]),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(value))
            yield counter

    if snap.tls is not None:
        not_after, reloads, failures = snap.tls
        yield GaugeMetricFamily("kvstore_tls_certificate_expiry_timestamp_seconds",
                                "When the certificate chain new TLS connections get "
                                "expires: the first to end of the certificate and its "
                                "chain's certificates valid at load (Unix time)",
                                value=not_after)
        for name, doc, value in (
            ("kvstore_tls_reloads", "Renewed TLS certificate files taken into use", reloads),
            ("kvstore_tls_reload_failures",
             "Changed TLS certificate files refused (the previous ones kept serving)",
             failures),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(value))
            yield counter

    requests = CounterMetricFamily("kvstore_grpc_requests", "gRPC calls by method and status",
                                   labels=["service", "method", "code"])
    latency = HistogramMetricFamily("kvstore_grpc_request_duration_seconds",
                                    "gRPC call duration on the server, handler start to end",
                                    labels=["service", "method"])
    for m in snap.calls:
        for code, count in sorted(m.codes.items()):
            requests.add_metric([m.service, m.method, code], float(count))
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), m.buckets, strict=True):
            cumulative += count
            buckets.append((_bound_text(bound), float(cumulative)))
        latency.add_metric([m.service, m.method], buckets, m.sum)
    yield requests
    yield latency


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class MetricsExporter:
    """The HTTP endpoint: ``start`` binds it, ``stop`` closes it."""

    def __init__(self, listen: str) -> None:
        require_prometheus_client()
        self.host, self.port = parse_listen(listen)
        self._httpd: Any = None
        self._thread: Any = None

    def start(self, collector: KVStoreCollector) -> str:
        """Serve /metrics; returns the bound address (port 0 becomes a real port)."""
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        ProcessCollector(registry=registry)
        try:
            self._httpd, self._thread = start_http_server(self.port, self.host, registry)
        except OSError as exc:
            raise InvalidConfig(f"server.metrics_listen {self.host}:{self.port}: "
                                f"{exc.strerror or exc}") from None
        port = self._httpd.server_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"

    def stop(self) -> None:
        """Close the listener; blocks up to the server's poll interval (0.5 s)."""
        if self._httpd is None:
            return
        httpd, self._httpd = self._httpd, None
        httpd.shutdown()
        httpd.server_close()
        self._thread.join()
